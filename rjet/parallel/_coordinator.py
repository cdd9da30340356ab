"""Coordination between the runs of one group: who holds the group record, and an elastic member's
shards.

- :func:`hold`: a run makes itself live (its shard heartbeats, or an elastic member's lease naming
  ``n``), then takes the group record for ``n`` and readies the cursors (``rjet/parallel/_reshard.py``:
  resharding when ``n`` changed), in that order, which lets exactly one ``n`` of the group run.
- :func:`watch_record`: a run stops when the record comes to name another ``n`` (taken over while
  this run looked gone).
- :class:`Coordinator`: an elastic member's loop (its lease, its view of the members, the
  assignment; it deletes the leases of members long gone) and its moves
  (:meth:`Coordinator.rebalance`): take a shard once it is free, let one go when it moves
  (``rjet/parallel/_elastic.py`` says why this hands over without loss or overlap).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from rjet.errors import CursorStoreError, PermissionDenied, is_permanent
from rjet.parallel._elastic import Membership, busy_shards
from rjet.parallel._messages import Stop
from rjet.parallel._reshard import ReshardReport, prepare, recorded_n
from rjet.parallel._shard import log_fields
from rjet.parallel._sql import prepare as prepare_sql

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from rjet.parallel._heartbeats import Heartbeats
    from rjet.parallel._options import ParallelOptions
    from rjet.parallel._supervisor import ShardProcess, Supervisor
    from rjet.sql import SqlCursorStore

__all__ = ["Coordinator", "hold", "watch_record"]

log = logging.getLogger("rjet.parallel")


async def hold(
    kv: KeyValue,
    name: str,
    n: int,
    beats: Heartbeats,
    options: ParallelOptions,
    member: str | None,
    cursors: SqlCursorStore | None = None,
) -> tuple[Membership | None, ReshardReport | None]:
    """Make this run live (its shard heartbeats, or ``member``'s lease naming ``n``), then take the
    group record for ``n`` and make the cursors ready (:func:`rjet.parallel._reshard.prepare`; with
    ``cursors``, the group's SQL store, :func:`rjet.parallel._sql.prepare`). Returns the elastic
    membership (None for fixed shards) and what a reshard did. On any error it leaves nothing behind:
    heartbeats cleared, lease deleted."""
    ttl = options.heartbeats.ttl
    membership: Membership | None = None
    if options.elastic is not None:
        assert member is not None
        membership = Membership(
            kv, name, member, ttl=ttl, max_shards=options.elastic.max_shards,
            static=options.elastic.member_id is not None, n=n,
        )  # fmt: skip
    await beats.beat()
    try:
        if membership is not None:
            await membership.beat()
        if cursors is not None:
            report = await prepare_sql(
                kv, cursors, name, n, group=beats.group, ttl=ttl, shards=beats.shards, member=member
            )
        else:
            report = await prepare(kv, name, n, group=beats.group, ttl=ttl, shards=beats.shards, member=member)
    except BaseException:
        await beats.clear()
        if membership is not None:
            await membership.leave()  # refused: this member holds nothing, whatever its id
        raise
    return membership, report


async def watch_record(kv: KeyValue, name: str, n: int, options: ParallelOptions, supervisor: Supervisor) -> None:
    """Stop the run if the group record comes to name another ``n``: a group of that ``n`` took it
    over because this one looked gone (paused or cut off past ``heartbeat_ttl``)."""
    while not supervisor.stops:
        await asyncio.sleep(options.heartbeats.interval)
        try:
            recorded = await recorded_n(kv, name)
        except CursorStoreError as e:
            if is_permanent(e):
                raise
            log.warning("parallel %r: %s (retrying)", name, e)
            continue
        if recorded is not None and recorded != n:
            supervisor.superseded = (
                f"parallel {name!r}: n={recorded} took the group over while this group of n={n} looked"
                f" gone (no heartbeat or lease for {options.heartbeats.ttl:g}s); it stopped. One n runs"
                f" at a time: stop n={recorded} first to run n={n} again"
            )
            log.error("%s", supervisor.superseded)
            supervisor.request_stop(False)
            return


class Coordinator:
    """An elastic member of ``name``'s group of ``n``: :meth:`run` keeps its lease fresh and works out
    which shards it should run; :meth:`rebalance` (called by the supervisor for each shard) takes and
    lets go accordingly."""

    def __init__(
        self, membership: Membership, n: int, beats: Heartbeats, supervisor: Supervisor, *, interval: float, ttl: float
    ) -> None:
        self.membership = membership
        self.name = membership.name
        self.member = membership.member
        self.n = n
        self.beats = beats
        self.supervisor = supervisor
        self.interval = interval
        self.ttl = ttl
        self.wanted: frozenset[int] = frozenset()  # the shards the assignment gives this member
        self.busy: frozenset[int] = frozenset()  # shards another group still holds
        self.letting_go: frozenset[int] = frozenset()  # shards the assignment gives to others

    async def run(self) -> None:
        """Beat the lease and look at the members every ``interval``; retries what retrying can fix."""
        previous: tuple[int, ...] | None = None
        last_view: frozenset[int] = frozenset()
        last_owner: dict[int, str] = {}  # shard -> its member in the previous view
        last_members: frozenset[str] = frozenset()  # the live members of the previous view
        while True:
            try:
                await self.membership.beat()
                mine, whole = await self.membership.view(self.n)
                busy = await busy_shards(self.membership.kv, self.name, self.n, self.beats.group, self.ttl)
            except CursorStoreError as e:  # a PermissionDenied is no CursorStoreError: it ends the group
                if is_permanent(e):
                    raise
                log.warning("parallel %r: member %s: %s (retrying)", self.name, self.member, e)
            else:
                if mine != previous:
                    self._log_assignment(mine, previous, whole)
                    previous = mine
                # A shard is taken once two views in a row give it to this member: members that joined
                # at the same moment see each other by then, and the member that had it is seen
                # holding it (its heartbeat) until it has handed it over. A shard whose member is gone
                # (its lease expired or deleted) is taken at the first view that gives it here, by a
                # member that was in the previous view: every member that sees the departure computes
                # the same new owner, so waiting one more heartbeat would only lengthen the takeover.
                owner = {m: member for member, shards in whole.items() for m in shards}
                orphans = (
                    {m for m in mine if m in last_owner and last_owner[m] not in whole}
                    if self.member in last_members
                    else set()
                )
                self.wanted, self.busy = frozenset(mine) & (last_view | orphans), frozenset(busy)
                self.letting_go = frozenset(range(self.n)) - frozenset(mine)
                last_view, last_owner, last_members = frozenset(mine), owner, frozenset(whole)
                self.supervisor.wake()
                await self.membership.prune()  # the leases of members long gone: views stop listing them
            await asyncio.sleep(self.interval)

    def _log_assignment(
        self, mine: tuple[int, ...], previous: tuple[int, ...] | None, whole: dict[str, tuple[int, ...]]
    ) -> None:
        gained = sorted(set(mine) - set(previous or ()))
        lost = sorted(set(previous or ()) - set(mine))
        log.info(
            "parallel %r: member %s: assignment %s (+%s -%s) of n=%d over %d live member(s): %s",
            self.name, self.member, [m + 1 for m in mine], [m + 1 for m in gained],
            [m + 1 for m in lost], self.n, len(whole),
            "; ".join(f"{k} {[m + 1 for m in v]}" for k, v in sorted(whole.items())),
        )  # fmt: skip

    def rebalance(self, s: ShardProcess, now: float) -> None:
        """This member's moves for one shard: take it once it is free, let it go when it moves."""
        wanted = s.m in self.wanted
        if s.state == "elsewhere" and wanted and s.m not in self.busy and now >= s.next_start:
            s.state = "taking"  # its heartbeat goes out first: a member deciding later sees it taken
            self.supervisor.chore(self._take(s))
        elif s.state in ("running", "starting") and s.m in self.letting_go and not s.leaving:
            s.leaving = True
            self.supervisor.send(s, Stop())
            log.info(
                "parallel %r: member %s hands %s over (its worker finishes and flushes)",
                self.name, self.member, s.name,
                extra=log_fields(self.name, s.m, self.n, self.member),
            )  # fmt: skip
        elif s.state == "waiting" and s.m in self.letting_go:
            s.state = "elsewhere"
            self.supervisor.chore(self.beats.remove(s.m))

    async def _take(self, s: ShardProcess) -> None:
        fields = log_fields(self.name, s.m, self.n, self.member)
        try:
            await self.beats.add(s.m)
        except (CursorStoreError, PermissionDenied) as e:
            if is_permanent(e):  # the shard's heartbeat refused, say: this member cannot run it
                self.beats.drop(s.m)
                s.state = "elsewhere"
                self.supervisor.fail(e)
                return
            log.warning(
                "parallel %r: member %s cannot take %s yet: %s", self.name, self.member, s.name, e, extra=fields
            )
            s.state = "elsewhere"
            return
        if s.state == "taking" and self.supervisor.stops:
            s.state = "elsewhere"
        elif s.state == "taking":
            s.state, s.next_start = "waiting", 0.0
            log.info("parallel %r: member %s takes %s", self.name, self.member, s.name, extra=fields)
            self.supervisor.wake()
