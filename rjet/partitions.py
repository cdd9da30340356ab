"""Partitioned streams: the subject of each event carries its partition, so the server can shard.

A stream created with ``partitions=P`` stores each event on ``<insert subject>.<digits>``, where the
digits spell ``p = xxh3_64(foreign_id) % P`` in a mixed radix made of P's prime factors: for every
prime q with q**e dividing P, the e lowest base-q digits of p, lowest first. For P = 720 = 2**4 * 3**2
* 5 a subject looks like ``orders.events.1.0.1.1.2.0.3`` (four bits, two base-3 digits, one
base-5 digit).

Why digits: shard m of n (n dividing P) owns the events with ``xxh3 % n == m``, and for
n = prod(q**k) that holds exactly when the k lowest base-q digits of p equal those of m. So every
shard's events match ONE subject filter with wildcards for the digits it does not care about
(``orders.events.0.*.*.*.1.*.*`` for m=4... of n=6), however large P is: consumer creation and the
server's filtering cost stay those of a single filter subject.

P is recorded in the stream's metadata (``rjet_partitions``) when the stream is created, so every
reader finds it; it never changes for the life of the stream.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from rjet._keyhash import key_hash
from rjet.errors import ConfigError

__all__ = ["DEFAULT_PARTITIONS", "METADATA_KEY", "Partitions"]

DEFAULT_PARTITIONS: Final = 720
"""2**4 * 3**2 * 5: divisible by every n in 1-6, 8-10, 12, 15, 16, 18, 20, 24, 30, 36, 40, 45, 48, ..."""

METADATA_KEY: Final = "rjet_partitions"
"""The stream metadata key that records a partitioned stream's partition count."""

_MAX_PARTITIONS: Final = 1 << 16


def _factor(n: int) -> list[tuple[int, int]]:
    out = []
    q = 2
    while q * q <= n:
        e = 0
        while n % q == 0:
            n //= q
            e += 1
        if e:
            out.append((q, e))
        q += 1
    if n > 1:
        out.append((n, 1))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class Partitions:
    """The partition layout of a stream with ``count`` partitions.

    >>> layout = Partitions(720)
    >>> layout.partition("user-7") == xxhash.xxh3_64_intdigest(b"user-7") % 720
    True
    >>> layout.filter_subject("orders.events", 4, 6)
    'orders.events.0.*.*.*.1.*.*'
    """

    count: int
    _radix: tuple[tuple[int, int], ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= _MAX_PARTITIONS:
            raise ConfigError(f"partitions must be an int in 1..{_MAX_PARTITIONS}, not {self.count!r}")
        object.__setattr__(self, "_radix", tuple(_factor(self.count)))

    def partition(self, foreign_id: str) -> int:
        """The partition of ``foreign_id``: ``xxh3_64(foreign_id) % count``."""
        return key_hash(foreign_id) % self.count

    def tokens(self, partition: int) -> str:
        """The subject tokens that spell ``partition`` (empty for a single partition)."""
        digits = []
        for q, e in self._radix:
            p = partition
            for _ in range(e):
                digits.append(str(p % q))
                p //= q
        return ".".join(digits)

    def subject(self, prefix: str, foreign_id: str) -> str:
        """The subject an event about ``foreign_id`` is stored on."""
        tokens = self.tokens(self.partition(foreign_id))
        return f"{prefix}.{tokens}" if tokens else prefix

    def divides(self, n: int) -> bool:
        """Whether ``n`` shards can each read their events with a server-side filter."""
        return n >= 1 and self.count % n == 0

    def filter_subject(self, prefix: str, m: int, n: int) -> str:
        """The one subject filter that matches exactly the events of shard ``m`` of ``n``.

        Raises :class:`rjet.ConfigError` unless ``n`` divides the partition count.
        """
        if not self.divides(n):
            raise ConfigError(
                f"{n} shards cannot split a stream of {self.count} partitions evenly; use a number of"
                f" shards that divides {self.count}: {', '.join(map(str, self.shard_counts()))}"
            )
        if not 0 <= m < n:
            raise ConfigError(f"shard {m} is not one of 0..{n - 1}")
        tokens: list[str] = []
        for q, e in self._radix:
            k = 0
            while n % q ** (k + 1) == 0:
                k += 1
            r = m % q**k
            tokens.extend(str(r // q**i % q) if i < k else "*" for i in range(e))
        return ".".join([prefix, *tokens]) if tokens else prefix

    def shard_counts(self) -> list[int]:
        """Every shard count that divides the partitions (server-side filtering works for these)."""
        return [n for n in range(1, self.count + 1) if self.count % n == 0]
