"""One read of a cursor bucket, and what it shows: the frozen records :mod:`rjet.parallel.admin`
returns, each derived from the same read by the same rules (liveness: :func:`rjet.parallel._keys.fresh`)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from rjet._progress import decode_done
from rjet.cursors import CursorRecord, decode_key, kv_keys
from rjet.errors import ConfigError
from rjet.parallel._errors import GroupNotFound
from rjet.parallel._keys import (
    DEFAULT_TTL,
    GENERATION,
    PREFIX,
    Heartbeat,
    Lease,
    decode_record,
    fresh,
    generation_key,
    get,
    lease_group,
    parse_heartbeat_key,
    parse_shard_cursor,
)
from rjet.parallel._shard import shard_name

if TYPE_CHECKING:
    from rjet.cursors import JetStreamCursorStore

__all__ = [
    "ConsumerInfo", "CursorChange", "CursorMove", "GroupInfo", "MemberInfo", "ResetPlan", "ResetTarget", "RunnerInfo",
    "ShardInfo", "Snapshot", "StreamState", "done_count", "expired", "snapshot",
]  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class RunnerInfo:
    """A heartbeat: one run of a group (``run_id``: one ``Parallel.run``, on ``host``, ``pid``) holds
    ``shard``; written ``age`` seconds ago, judged by ``ttl``; ``live`` while younger than it."""

    shard: str
    group: str
    run_id: str
    host: str
    pid: int
    member: str | None  # the elastic member that runs it
    age: float
    ttl: float
    live: bool

    @property
    def where(self) -> str:
        """``member M (host pid P)`` or ``host pid P``."""
        return f"member {self.member} ({self.host} pid {self.pid})" if self.member else f"{self.host} pid {self.pid}"


@dataclasses.dataclass(frozen=True, slots=True)
class MemberInfo:
    """An elastic member's lease: written ``age`` seconds ago, ``live`` by its TTL (a member whose
    stable id outlived a graceful stop is ``stopped`` and stays live until then); ``shards`` are the
    shards its live heartbeats say it runs."""

    group: str
    member: str
    host: str
    pid: int
    max_shards: int | None
    since: float  # wall time the member started
    n: int | None
    age: float
    live: bool
    stopped: bool
    shards: tuple[str, ...]
    ttl: float = DEFAULT_TTL  # the lease's own TTL: how long it counts as live after it was written
    removed_in: float | None = None  # an expired lease: seconds until the group's live members delete it

    @property
    def state(self) -> str:
        """``live``; ``stopped`` (a member with a stable id that stopped gracefully: the group keeps its
        shards for it until its lease expires); or ``expired`` (gone: the group ignores the lease,
        which stays stored until the group's live members delete it, ``removed_in`` seconds from
        now, the member comes back, or ``rjet group prune`` removes it)."""
        if not self.live:
            return "expired"
        return "stopped" if self.stopped else "live"


@dataclasses.dataclass(frozen=True, slots=True)
class ShardInfo:
    """A shard of a group's current ``n``: its cursor (0 for none), the events a concurrent consumer
    recorded as done above it, its lag (the stream's last sequence minus the cursor; None without a
    stream), and its heartbeats, freshest first."""

    name: str
    m: int  # 0-based, as in shard_name(group, m, n)
    n: int
    cursor: int
    done_above: int
    lag_events: int | None
    runners: tuple[RunnerInfo, ...]

    @property
    def running_on(self) -> tuple[RunnerInfo, ...]:
        """The live heartbeats: who runs the shard."""
        return tuple(r for r in self.runners if r.live)


@dataclasses.dataclass(frozen=True, slots=True)
class GroupInfo:
    """A group in a namespace: its current ``n`` (the group record's, else the only one with cursors;
    None when unknown), its shards, the other shard counts that left cursors, its members; where its
    shard cursors are (``cursors``: ``bucket`` or ``sql``, a group run with ``Parallel(...,
    cursors=URL)``) and whether they were read (an SQL group looked at without its database was not:
    its shards' cursors, lag and old generations are unknown); the streams its cursors name."""

    name: str
    namespace: str
    n: int | None
    shards: tuple[ShardInfo, ...]
    old_generations: tuple[int, ...]
    members: tuple[MemberInfo, ...]
    cursors: str = "bucket"
    cursors_read: bool = True
    streams: tuple[str, ...] = ()  # names of the streams its shard cursors' records name

    @property
    def lag_events(self) -> int | None:
        """The shards' lag together (None when no shard's is known)."""
        lags = [s.lag_events for s in self.shards if s.lag_events is not None]
        return sum(lags) if lags else None

    @property
    def running(self) -> bool:
        """Whether a shard of the group runs (a live heartbeat)."""
        return any(s.running_on for s in self.shards)

    @property
    def live_members(self) -> tuple[MemberInfo, ...]:
        """The members whose lease is live."""
        return tuple(m for m in self.members if m.live)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamState:
    """A stream as read once: its events, retained sequences, and when its last event was stored."""

    name: str
    events: int
    first_seq: int
    last_seq: int
    last_stored: float | None  # seconds since the epoch; None when empty
    identity: str | None = None  # name@created, what cursor records name (None: not known)


@dataclasses.dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """A cursor of a stream's consumer (a shard's too): lag in events (None when the cursor is past
    the stream's end, or counts in no known stream) and in time (the age of the oldest event after
    it; 0 when caught up; None when unknown), seconds since it was written, a note, the shard's
    heartbeats, and the stream its record names (``recorded_in``: ``name@created``; None for a record
    that names none: written by a tool such as ``JetStreamCursorStore.set_cursor``, or by an older
    rjet, so it may count in any stream and its lag is not computed)."""

    namespace: str
    name: str
    cursor: int
    lag_events: int | None
    lag_seconds: float | None
    idle_seconds: float | None
    note: str = ""
    runners: tuple[RunnerInfo, ...] = ()
    recorded_in: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ResetTarget:
    """Where :func:`reset_group` moves every cursor: exactly one of ``earliest`` (before the first
    retained event), ``latest`` (after the last), ``seq`` (the next event handled is ``seq``), ``when``
    (the next is the first stored at or after it) or ``shift`` (by that many events, clamped)."""

    earliest: bool = False
    latest: bool = False
    seq: int | None = None
    when: datetime | None = None
    shift: int | None = None

    def __post_init__(self) -> None:
        given = (self.earliest, self.latest, self.seq is not None, self.when is not None, self.shift is not None)
        if sum(given) != 1:
            raise ConfigError("ResetTarget: give exactly one of earliest, latest, seq, when, shift")
        if self.seq is not None and self.seq < 1:
            raise ConfigError(f"ResetTarget: seq must be >= 1, not {self.seq}")
        if self.when is not None and self.when.tzinfo is None:
            raise ConfigError(f"ResetTarget: when must have a time zone, not {self.when!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class CursorMove:
    """One cursor of a reset: from ``old`` to ``new`` (stream sequences; 0 for none)."""

    name: str
    old: int
    new: int


@dataclasses.dataclass(frozen=True, slots=True)
class ResetPlan:
    """What :func:`reset_group` did (``executed``) or would do, and what the caller should be told."""

    group: str
    stream: str
    moves: tuple[CursorMove, ...]
    notes: tuple[str, ...]
    executed: bool


@dataclasses.dataclass(frozen=True, slots=True)
class CursorChange:
    """What :func:`set_cursor` replaced (``old``: None when there was no record) and wrote."""

    name: str
    old: CursorRecord | None
    new: CursorRecord
    notes: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """A bucket's values as read at ``now`` (wall time), and what they show."""

    namespace: str
    values: Mapping[str, bytes]  # every key that holds a value (deleted and purged keys left out)
    now: float

    def runners(self) -> dict[str, tuple[RunnerInfo, ...]]:
        found: dict[str, list[RunnerInfo]] = {}
        for key, value in self.values.items():
            parsed = parse_heartbeat_key(key)
            if parsed is None or (hb := Heartbeat.decode(value)) is None:
                continue
            group, m, n = parsed
            try:
                shard = shard_name(group, m, n)
            except ValueError:  # not a key rjet wrote
                continue
            age = self.now - hb.time
            runner = RunnerInfo(
                shard, group, hb.group, hb.host, hb.pid, hb.member, age, hb.ttl or DEFAULT_TTL, fresh(age, hb.ttl)
            )
            found.setdefault(shard, []).append(runner)
        return {shard: tuple(sorted(rs, key=lambda r: r.age)) for shard, rs in found.items()}

    def members(self, runners: Mapping[str, tuple[RunnerInfo, ...]], group: str | None = None) -> list[MemberInfo]:
        out = []
        for key, value in self.values.items():
            name = lease_group(key)
            if name is None or (group is not None and name != group):
                continue
            lease = Lease.decode(value)
            if lease is None or lease.time is None:
                continue
            age = max(0.0, self.now - lease.time)
            mine = {r.shard for rs in runners.values() for r in rs if r.live and r.group == name}
            runs = tuple(sorted(s for s in mine if any(r.member == lease.member for r in runners[s] if r.live)))
            live = fresh(age, lease.ttl)
            info = MemberInfo(
                name, lease.member, lease.host, lease.pid, lease.max_shards, lease.since, lease.n, age, live,
                lease.stopped, runs, lease.ttl or DEFAULT_TTL,
            )  # fmt: skip
            out.append(info)
        return sorted(out, key=lambda m: (m.group, m.member))

    def expired_keys(self, name: str) -> list[str]:
        """The keys of group ``name``'s expired member leases and stale heartbeats, sorted."""
        return sorted(key for key, value in self.values.items() if expired(key, value, self.now, name))

    def generations(self) -> dict[str, dict[int, dict[int, str]]]:
        """group name -> n -> m -> the shard cursor's key."""
        out: dict[str, dict[int, dict[int, str]]] = {}
        for key in self.values:
            if (shard := parse_shard_cursor(key)) is not None:
                name, m, n = shard
                out.setdefault(name, {}).setdefault(n, {})[m] = key
        return out

    def group_names(self) -> list[str]:
        """The groups with shard cursors, member leases or a group record."""
        leases = {name for key in self.values if (name := lease_group(key)) is not None}
        records = {name for key in self.values if (name := _record_group(key)) is not None}
        return sorted(set(self.generations()) | leases | records)

    def group(self, name: str, last_seq: int | None) -> GroupInfo:
        generations = self.generations().get(name, {})
        if not generations and name not in self.group_names():
            raise GroupNotFound(
                f"no Parallel group {name!r} in namespace {self.namespace!r}"
                f" (`rjet group list --namespace {self.namespace}`)"
            )
        n = self._current_n(name, generations)
        runners = self.runners()
        shards = []
        for m in range(n or 0):
            assert n is not None
            shard = shard_name(name, m, n)
            key = generations.get(n, {}).get(m)
            record = CursorRecord.decode(self.values[key]) if key is not None else CursorRecord()
            cursor = int(record.cursor) if record.cursor.isdigit() else 0
            lag = None if last_seq is None else max(0, last_seq - cursor)
            shards.append(ShardInfo(shard, m, n, cursor, done_count(record) or 0, lag, runners.get(shard, ())))
        old = tuple(sorted(g for g in generations if g != n))
        return GroupInfo(name, self.namespace, n, tuple(shards), old, tuple(self.members(runners, name)))

    def _current_n(self, name: str, generations: Mapping[int, object]) -> int | None:
        try:
            record = decode_record(self.values.get(generation_key(name)))
        except ValueError:
            record = None
        if record is not None:
            return int(record["n"])
        return max(generations) if len(generations) == 1 else None


async def snapshot(store: JetStreamCursorStore, *, cursors: bool = True) -> Snapshot:
    """Every value of ``store``'s bucket (only rjet's own records unless ``cursors``), read now."""
    kv = store.kv
    keys = [k for k in await kv_keys(kv) if cursors or k.startswith(PREFIX)]
    got = await asyncio.gather(*(get(kv, k) for k in keys))
    values = {k: v[0] for k, v in zip(keys, got, strict=True) if v is not None}
    return Snapshot(store.namespace, values, time.time())


def _record_group(key: str) -> str | None:
    """The group name of a group record's key; None for any other key."""
    if not key.startswith(GENERATION):
        return None
    try:
        return decode_key(key[len(GENERATION) :])
    except ValueError:
        return None


def expired(key: str, value: bytes, now: float, group: str) -> bool:
    """Whether ``key`` is a heartbeat or member lease of ``group`` that is no longer live at ``now``."""
    if (parsed := parse_heartbeat_key(key)) is not None:
        hb = Heartbeat.decode(value)
        return parsed[0] == group and hb is not None and not fresh(now - hb.time, hb.ttl)
    if lease_group(key) == group:
        lease = Lease.decode(value)
        return lease is not None and lease.time is not None and not fresh(max(0.0, now - lease.time), lease.ttl)
    return False


def done_count(record: CursorRecord) -> int | None:
    """How many events ``record`` holds as done above its cursor (exact progress); None when unreadable."""
    try:
        return len(decode_done(int(record.cursor or 0), record.done or ""))
    except ValueError:
        return None
