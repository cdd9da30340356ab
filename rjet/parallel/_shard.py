"""How foreign IDs map to shards, and how shards are named. Both are stable forever.

A shard is one of ``n`` slices of a stream's foreign IDs. ``shard_of`` is the foreign ID's key hash
(``rjet/_keyhash.py``: XXH3 64-bit of its UTF-8 bytes, seed 0) modulo ``n``: every process on every
host, in every version of rjet, puts a foreign ID in the same shard. The test vectors in ``tests/test_shard.py`` pin it.
"""

from __future__ import annotations

from rjet._keyhash import key_hash
from rjet.errors import ConfigError
from rjet.reader import ShardFilter

__all__ = ["check_n", "key_filter", "log_fields", "shard_name", "shard_of"]


def check_n(n: object, what: str = "n") -> int:
    """``n`` when it is a usable shard count (an int >= 1); :class:`rjet.ConfigError` otherwise."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{what} must be an int >= 1 (the number of shards), not {n!r}")
    return n


def shard_of(foreign_id: str, n: int) -> int:
    """The 0-based shard of ``foreign_id`` among ``n``: ``xxh3_64_intdigest(utf8(foreign_id)) % n``.

    >>> shard_of("user-42", 4)
    1
    """
    return key_hash(foreign_id) % check_n(n)


def shard_name(name: str, m: int, n: int) -> str:
    """The consumer (and cursor) name of shard ``m`` (0-based) of ``n``: ``f"{name}_{m+1}_of_{n}"``.

    This is reflex's convention (``rpatterns.Parallel``), so cursors line up with Go consumers.

    >>> shard_name("mailer", 0, 3)
    'mailer_1_of_3'
    """
    check_n(n)
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < n:
        raise ConfigError(f"shard index must be an int in [0, {n}), not {m!r}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name must be a non-empty str, not {name!r}")
    return f"{name}_{m + 1}_of_{n}"


def log_fields(name: str, m: int, n: int, member: str | None = None) -> dict[str, str | int]:
    """The ``extra`` fields of a log record about shard ``m`` (0-based) of group ``name``: what
    ``rjet --log-json`` prints besides the message. ``shard`` counts from 1, as the shard's name does."""
    fields: dict[str, str | int] = {"group": name, "shard": m + 1, "n": n, "consumer": f"{name}_{m + 1}_of_{n}"}
    if member is not None:
        fields["member"] = member
    return fields


def key_filter(m: int, n: int) -> ShardFilter:
    """``filter(foreign_id) -> bool``: whether a foreign ID belongs to shard ``m`` of ``n``; a
    :class:`rjet.ShardFilter`, which the stream client recognises and hashes on raw header bytes."""
    shard_name("x", m, n)  # the same checks, and errors, as a shard's name
    return ShardFilter(m, n)
