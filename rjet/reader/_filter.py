"""A key filter whose formula the reader knows: :class:`ShardFilter`."""

from __future__ import annotations

import dataclasses

from rjet._keyhash import hash_bytes
from rjet.errors import ConfigError

__all__ = ["ShardFilter"]


@dataclasses.dataclass(frozen=True, slots=True)
class ShardFilter:
    """``filter(foreign_id) -> bool``: whether a foreign ID is in shard ``m`` (0-based) of ``n``, that
    is ``xxh3_64(utf8(foreign_id)) % n == m`` (``rjet.parallel.shard_of``; the hash of
    ``rjet/_keyhash.py``, stable forever).

    A stream client given one as its ``key_filter`` knows the formula, and hashes a plain foreign ID's
    raw header bytes itself instead of decoding a string and calling the filter: the hot path of a
    worker passing over other shards' events. Any other callable is called per event.

    >>> ShardFilter(1, 4)("user-42")
    True
    """

    m: int
    n: int

    def __post_init__(self) -> None:
        n, m = self.n, self.m
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n must be an int >= 1 (the number of shards), not {n!r}")
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < n:
            raise ConfigError(f"shard index must be an int in [0, {n}), not {m!r}")

    def __call__(self, foreign_id: str) -> bool:
        return hash_bytes(foreign_id.encode("utf-8")) % self.n == self.m
