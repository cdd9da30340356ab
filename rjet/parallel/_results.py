"""What a :class:`rjet.parallel.Parallel` group reports: per-shard figures and the group's summary."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rjet.parallel._reshard import ReshardReport
    from rjet.stats import StatsSnapshot

__all__ = ["ShardStats", "Summary"]


@dataclasses.dataclass(frozen=True, slots=True)
class ShardStats:
    """One shard of a :class:`Summary`.

    ``handled`` counts handler calls that succeeded and ``skipped`` the events left to other shards,
    over every worker that ran the shard (replays after a crash count again; a worker killed outright
    loses its last quarter second of counts). ``cursor`` is the shard's stored cursor at the end.
    ``state`` is ``done`` (head reached), ``stopped``, ``fenced`` (another runner took the shard),
    ``failed`` (a permanent error), ``idle`` (not started yet), ``elsewhere`` (an elastic member's
    shard that another member runs, or that it waits to take over), or, while running, ``starting``,
    ``running`` or ``waiting`` (to be restarted). ``live`` is the current worker's own
    :class:`rjet.StatsSnapshot` (errors, dead letters, lag, handler latency; it starts over when the
    worker is restarted) and ``flushes`` its cursor store's flush count, as last reported.
    """

    shard: int
    name: str
    handled: int
    skipped: int
    cursor: str
    restarts: int
    state: str
    live: StatsSnapshot | None = None
    flushes: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    """What a :class:`Parallel` group did, per shard; ``reshard`` says what a reshard did, if any."""

    name: str
    n: int
    shards: tuple[ShardStats, ...]
    reshard: ReshardReport | None = None

    @property
    def handled(self) -> int:
        """Events handled, over all shards."""
        return sum(s.handled for s in self.shards)

    @property
    def skipped(self) -> int:
        """Events skipped as other shards', over all shards."""
        return sum(s.skipped for s in self.shards)

    def shard(self, m: int) -> ShardStats:
        """The stats of shard ``m`` (0-based); ``KeyError`` when this group did not run it."""
        for s in self.shards:
            if s.shard == m:
                return s
        raise KeyError(m)
