"""Resharding and the group record: what lets ``n`` change without loss and without a full replay.

Everything lives in the namespace's cursor bucket (``rjet_cursors_<namespace>``), next to the cursors,
under keys that start with ``_rjet.`` (a prefix rjet reserves; the layout and the encodings are in
``rjet/parallel/_keys.py``):

- ``_rjet.hb.<m+1>_of_<n>.<group>.<name>``: a heartbeat per shard a group (one ``Parallel.run``)
  runs, rewritten every ``heartbeat_interval`` seconds and deleted on a clean stop. A shard is
  *running* while a heartbeat of it is younger than ``heartbeat_ttl`` (wall clocks of the hosts are
  compared: keep them in sync). Heartbeats left by groups that died are deleted once they are old
  (``rjet/parallel/_heartbeats.py``).
- ``_rjet.gen.<name>``: the group record: which ``n`` runs (is current), the cursor a reshard
  seeded, and the group that last confirmed it. Every group, fixed or elastic, writes it with
  compare-and-swap before any of its workers starts, so two groups that start at once agree.

Why seeding from the minimum is safe: shard ``m`` of an old generation of ``n'`` shards handled every
event of its keys up to its cursor, and skipped only other shards' events. So every event up to
``min(m) cursor(m)`` was handled by the shard its key belonged to. Starting every new shard right
after that minimum loses nothing; events between the minimum and an old shard's own cursor are
handled again (at-least-once). With cursors of several old generations, each gives such a bound, and
the highest is used. A missing old cursor counts as "" (nothing handled), so the bound falls to the
start of the stream for that generation: correct, if costly.

One ``n`` at a time. The record names the ``n`` that runs; it is *held* while a holder of that ``n``
is live: a fresh shard heartbeat of it, or a fresh lease (``_rjet.member.<name>.<member>``) of an
elastic member that runs it and has not stopped. A group of another ``n`` is refused while the
record is held, and takes it over (compare-and-swap on its revision) once every holder stopped (a
graceful stop deletes heartbeats and leases, or marks a stable member's lease stopped) or died (its
heartbeats and leases are then ``heartbeat_ttl`` old). Every group makes itself live (heartbeats, or
its lease) *before* it reads the record, and every group rewrites the record, even when it names
its own ``n``: of two groups of different ``n`` starting at once, the second compare-and-swap fails,
and the one that made it reads the record again and finds the winner live. So exactly one ``n``
goes ahead, never both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import socket
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import nats.js.errors

from rjet._nats.denials import guard_kv
from rjet._progress import decode_done, encode_done
from rjet.cursors import CursorRecord, encode_key, kv_keys
from rjet.errors import PermissionDenied
from rjet.parallel._errors import ParallelError, ReshardRefused
from rjet.parallel._heartbeats import Beat, live_heartbeats
from rjet.parallel._keys import (
    KV_ERRORS,
    Lease,
    decode_record,
    encode_record,
    fresh,
    generation_key,
    get,
    kv_error,
    lease_prefix,
    parse_shard_cursor,
)
from rjet.parallel._shard import shard_name
from rjet.stream import parse_cursor

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

__all__ = [
    "ReshardReport", "best_bound", "decode_group_record", "plan", "prepare", "read_holders", "recorded_n", "refusal",
    "write_record",
]  # fmt: skip

log = logging.getLogger("rjet.parallel")

_ATTEMPTS: Final = 30  # members of one n starting at once take turns at the record


@dataclasses.dataclass(frozen=True, slots=True)
class ReshardReport:
    """What a reshard did: every shard of the new ``n`` got ``seed`` as its cursor.

    ``old_n`` lists the old shard counts. ``source_n`` is the one the seed came from (None when no old
    shard had flushed a cursor, so the seed is "": the new shards start at the beginning of the
    stream). ``old_cursors`` holds every old cursor considered, by cursor name. ``seeded`` names the
    cursors written. ``done_carried`` counts the events above the seed that the old shards of
    ``source_n`` had recorded as done (concurrent consumers' exact progress): the new shards do not
    hand them to the handler again.
    The old cursors are left in place.
    """

    name: str
    n: int
    old_n: tuple[int, ...]
    seed: str
    source_n: int | None
    old_cursors: Mapping[str, str]
    seeded: tuple[str, ...]
    done_carried: int = 0
    exact: bool = False
    """The group's cursors are in SQL (``rjet/parallel/_sql.py``): the new shards skip every event an
    old shard handled, by the old cursors, which stay in place (nothing is handled twice)."""

    def describe(self) -> str:
        """One line that says what was done, for logs and for people."""
        src = f"n={self.source_n}" if self.source_n is not None else "no old cursor"
        return (
            f"parallel {self.name!r}: resharded from n={'/'.join(map(str, self.old_n)) or '?'} to n={self.n}:"
            f" seeded {len(self.seeded)} cursor(s) ({', '.join(self.seeded)}) with {self.seed or '(start)'!s},"
            f" the lowest cursor of {src} (old cursors: {dict(sorted(self.old_cursors.items()))});"
            + (
                f" {self.done_carried} event(s) after it recorded as done are not handled again;"
                if self.done_carried
                else ""
            )
            + (
                " events after it that old shards handled already are skipped (by the old cursors);"
                if self.exact
                else " other events after it that old shards already handled are handled again (at-least-once);"
            )
            + " the old cursors are left in place"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _Lease:
    """An elastic member's lease as a holder of the group record: fresh, not stopped, with its ``n``."""

    member: str
    n: int
    host: str
    pid: int
    age: float

    def describe(self) -> str:
        return f"member {self.member} (host {self.host}, pid {self.pid}, lease {self.age:.1f}s ago)"


async def _live_leases(kv: KeyValue, keys: Iterable[str], name: str, ttl: float) -> list[_Lease]:
    """The leases of ``name``'s elastic members that hold an ``n``: written by this rjet (they name
    their ``n``), fresh (:func:`fresh`, cautious: within ``ttl`` too), not marked stopped."""
    now = time.time()
    prefix = lease_prefix(name)
    out = []
    for key in keys:
        if not key.startswith(prefix) or (got := await get(kv, key)) is None:
            continue
        lease = Lease.decode(got[0])
        if lease is None or lease.n is None or lease.time is None:
            continue  # not a lease, or one that names no n (written before leases did)
        age = now - lease.time
        if fresh(age, lease.ttl, ttl, cautious=True) and not lease.stopped:
            out.append(_Lease(lease.member, lease.n, lease.host, lease.pid, age))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class _State:
    """What :func:`prepare` decides on, read in this order: the group record (its value and
    revision), then other groups' fresh heartbeats and the fresh leases of elastic members that hold
    an ``n``, then every generation's cursors (cursor, revision by shard), the streams the old cursors
    count in, and the old cursors' exact progress (their ``done``, by generation and shard)."""

    record: tuple[bytes, int] | None
    beats: list[Beat]
    leases: list[_Lease]
    generations: dict[int, dict[int, tuple[str, int]]]
    streams: set[str | None]
    dones: dict[int, dict[int, str]]


async def read_holders(
    kv: KeyValue, name: str, group: str, ttl: float
) -> tuple[tuple[bytes, int] | None, list[str], list[Beat], list[_Lease]]:
    """The group record (value, revision), every key of the bucket, other groups' fresh heartbeats of
    ``name``, and the fresh leases of its elastic members that hold an ``n``: read in this order."""
    # The record first: a holder makes itself live before it writes the record, so whoever wrote the
    # record read here is live in the keys listed after it.
    record = await get(kv, generation_key(name))
    keys = await kv_keys(kv)
    beats = [b for b in await live_heartbeats(kv, keys, name, ttl) if b.group != group]
    leases = await _live_leases(kv, keys, name, ttl)
    return record, keys, beats, leases


async def _read_state(kv: KeyValue, name: str, n: int, group: str, ttl: float) -> _State:
    try:
        record, keys, beats, leases = await read_holders(kv, name, group, ttl)
        generations: dict[int, dict[int, tuple[str, int]]] = {}
        dones: dict[int, dict[int, str]] = {}
        streams: set[str | None] = set()
        for key in keys:
            shard = parse_shard_cursor(key)
            got = await get(kv, key) if shard is not None and shard[0] == name else None
            if shard is None or got is None:
                continue
            mn = shard[1:]
            stored = CursorRecord.decode(got[0])
            generations.setdefault(mn[1], {})[mn[0]] = (stored.cursor, got[1])
            if stored.done:
                dones.setdefault(mn[1], {})[mn[0]] = stored.done
            if mn[1] != n:
                streams.add(stored.stream)
    except KV_ERRORS as e:
        raise kv_error(f"cannot read the cursors of {name!r}", e) from e
    return _State(record, beats, leases, generations, streams, dones)


def refusal(name: str, n: int, held: int, beats: list[Beat], leases: list[_Lease], ttl: float) -> ReshardRefused:
    """Why a group of ``n`` cannot start: the record names ``held``, and these holders of it are live."""
    running = {shard_name(name, b.m, b.n): b.describe(name) for b in beats}
    running.update({f"member {lease.member}": lease.describe() for lease in leases})
    return ReshardRefused(
        f"parallel {name!r}: cannot start with n={n}: the group runs with n={held}"
        f" ({'; '.join(running.values())}); one n runs at a time. Stop every shard and member of n={held}"
        f" first, then start n={n}: it reshards (a group that died counts as running until its heartbeats"
        f" and leases are {ttl:g}s old). `rjet group describe {name} --namespace NS --stream STREAM` shows who"
        " runs it",
        running,
    )


async def prepare(
    kv: KeyValue,
    name: str,
    n: int,
    *,
    group: str,
    ttl: float,
    shards: Iterable[int] = (),
    member: str | None = None,
) -> ReshardReport | None:
    """Take the group record for ``n`` and make the cursors of ``name``'s ``n`` shards ready to run,
    resharding when ``n`` changed.

    Call it after this group made itself live: its shard heartbeats written (a fixed group), or its
    lease naming ``n`` (an elastic ``member``). Returns what a reshard did, or None when there was
    nothing to reshard. Raises :class:`ReshardRefused`, naming the ``n`` that runs and who runs it,
    when the record names another ``n`` with a live holder. Warns (and goes on) when another group
    runs some of ``shards`` with the same ``n``: the cursor store fences the older runner.
    """
    for attempt in range(_ATTEMPTS):
        if attempt:
            await asyncio.sleep(random.uniform(0.0, 0.02 * min(attempt, 5)))  # others of this n take turns
        state = await _read_state(kv, name, n, group, ttl)
        recorded = decode_group_record(state.record, name)
        if recorded is not None and int(recorded["n"]) != n:
            held = int(recorded["n"])
            beats = [b for b in state.beats if b.n == held]
            leases = [lease for lease in state.leases if lease.n == held]
            if beats or leases:
                raise refusal(name, n, held, beats, leases, ttl)
        generations, current = state.generations, state.generations.pop(n, {})
        step = plan(name, n, recorded, generations, current, state.streams, now=time.time(), dones=state.dones)
        # Written on every start, even when it names this n already: of two groups of different n that
        # start at once, the one whose compare-and-swap comes second reads the record again.
        body = dict(step.record if step.record is not None else recorded or {})
        body.pop("cursors", None)  # the shard cursors are in this bucket (not in SQL: rjet/parallel/_sql.py)
        body["holder"] = {"group": group, "member": member, "host": socket.gethostname(), "pid": os.getpid()}
        body["held_at"] = time.time()
        if not await write_record(kv, name, state.record, body):
            continue  # another process changed the record first: read again
        if step.todo and not await _seed(kv, name, n, step.todo, step.seed, current):
            continue
        mine = set(shards)
        for b in state.beats:
            if b.n == n and b.m in mine:
                log.warning(
                    "parallel %r: %s is already run by another group; starting it anyway: the newest runner"
                    " claims the cursor and the older one is fenced out (it stops with CursorConflict)",
                    name,
                    b.describe(name),
                )
        if step.report is not None:
            log.warning("%s", step.report.describe())
        elif step.todo:
            log.info(
                "parallel %r: seeded %d missing cursor(s) of n=%d with %r", name, len(step.todo), n, step.seed.cursor
            )
        elif step.unrecorded:
            log.warning(
                "parallel %r: found cursors of other shard counts (%s) but no generation record; kept the"
                " cursors of n=%d as they are",
                name, ", ".join(f"{k}={v!r}" for k, v in sorted(step.unrecorded.items())), n,
            )  # fmt: skip
        return step.report
    raise ParallelError(
        f"parallel {name!r}: could not settle the cursors of n={n} after {_ATTEMPTS} attempts: other"
        " processes keep changing them"
    )


async def recorded_n(kv: KeyValue, name: str) -> int | None:
    """The ``n`` the group record of ``name`` names (None when there is none, or it is unreadable)."""
    try:
        got = await get(kv, generation_key(name))
    except KV_ERRORS as e:
        raise kv_error(f"cannot read the group record of {name!r}", e) from e
    state = decode_group_record(got, name)
    return None if state is None else int(state["n"])


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What :func:`prepare` does once it has read the state: write the generation ``record`` (None:
    leave it), seed the cursors of shards ``todo`` with ``seed``, and report ``report`` (a reshard);
    ``unrecorded`` names old-n cursors found without a record (kept as they are, with a warning)."""

    record: dict[str, Any] | None
    todo: tuple[int, ...]
    seed: CursorRecord
    report: ReshardReport | None
    unrecorded: dict[str, str] = dataclasses.field(default_factory=dict)


def plan(
    name: str,
    n: int,
    state: Mapping[str, Any] | None,
    generations: Mapping[int, Mapping[int, tuple[str, int]]],
    current: Mapping[int, tuple[str, int]],
    streams: set[str | None],
    *,
    now: float,
    dones: Mapping[int, Mapping[int, str]] | None = None,
) -> Plan:
    """The pure part of resharding: from the generation record ``state``, the cursors of other shard
    counts ``generations`` and of this one ``current`` (cursor, revision by shard), decide what to do.
    ``dones`` holds the old cursors' exact progress (``CursorRecord.done``, by generation and shard)."""
    if state is not None and state["n"] == n:
        # Steady state. Finish a reshard another process started (cursors it did not seed yet).
        fresh_from = int(state.get("fresh_from", 0))
        todo = tuple(m for m in range(n) if m not in current or current[m][1] < fresh_from)
        done = state.get("done")
        seeded = CursorRecord(str(state.get("seed", "")), done=done if isinstance(done, str) and done else None)
        return Plan(None, todo, seeded, None)
    if state is None and not generations:
        # A first run: record n, so that a later change of n is recognised.
        return Plan({"n": n, "seed": "", "fresh_from": 0}, (), CursorRecord(), None)
    seed, source = best_bound(name, generations)
    if state is None:
        # No record but cursors of other n (made before rjet recorded generations): keep the
        # current shards' cursors that exist, and seed the missing ones.
        todo = tuple(m for m in range(n) if m not in current)
        fresh_from = 0
    else:
        # The record names another n: every cursor of this n is from an earlier generation.
        todo = tuple(range(n))
        fresh_from = max((rev for _, rev in current.values()), default=0) + 1
    done, carried = _carried_done(
        seed, generations.get(source, {}) if source is not None else {}, (dones or {}).get(source or 0, {}), source or 0
    )
    body = {
        "n": n,
        "seed": seed,
        "fresh_from": fresh_from,
        "from": source,
        "at": now,
        **({"done": done} if done else {}),
    }
    # The seeds count in the stream the old cursors were recorded in, when that is one stream.
    record = CursorRecord(seed, next(iter(streams)) if len(streams) == 1 else None, done=done or None)
    old = {shard_name(name, m, g): cursor for g, cursors in generations.items() for m, (cursor, _) in cursors.items()}
    if not todo:
        return Plan(body, (), record, None, unrecorded=old)
    old_n = set(generations) | ({int(state["n"])} if state is not None else set())
    report = ReshardReport(
        name, n, tuple(sorted(old_n)), seed, source, old, tuple(shard_name(name, m, n) for m in todo), carried
    )
    return Plan(body, todo, record, report)


def decode_group_record(record: tuple[bytes, int] | None, name: str) -> dict[str, Any] | None:
    if record is None or not record[0]:
        return None
    try:
        return decode_record(record[0])
    except ValueError:
        log.warning("parallel %r: ignoring an unreadable generation record %r", name, record[0][:200])
        return None


def _carried_done(
    seed: str, cursors: Mapping[int, tuple[str, int]], dones: Mapping[int, str], old_n: int
) -> tuple[str, int]:
    """The events above ``seed`` that the old shards (of ``old_n``) recorded as done, encoded relative to it, and how
    many. Each old shard's done set holds only events it handled, so their union is exact for every
    new shard (one whose keys an event is not for never reads it). A done set that cannot be read,
    or a union too large to store, is left out: those events are handled again (at-least-once)."""
    base = int(seed or 0)
    union: set[int] = set()
    for m, text in dones.items():
        if m not in cursors:
            continue
        try:
            union.update(s for s in decode_done(int(cursors[m][0] or 0), text) if s > base)
        except ValueError as e:
            log.warning(
                "reshard: the exact progress of old shard %d of %d is unreadable (%s); its events are replayed",
                m + 1, old_n, e,
            )  # fmt: skip
    if not union:
        return "", 0
    try:
        return encode_done(base, union), len(union)
    except ValueError as e:
        log.warning("reshard: %d events done above the seed are too many to carry over (%s)", len(union), e)
        return "", 0


def best_bound(name: str, generations: Mapping[int, Mapping[int, tuple[str, int]]]) -> tuple[str, int | None]:
    """The highest, over old generations, of the lowest cursor of the generation ("" is 0)."""
    best: tuple[int, int | None] = (0, None)
    for g, cursors in sorted(generations.items()):
        low = None
        for m in range(g):
            cursor = cursors[m][0] if m in cursors else ""
            value = parse_cursor(cursor, f"parallel {name!r}: old cursor {shard_name(name, m, g)!r}")
            low = value if low is None else min(low, value)
        if low is not None and (best[1] is None or low > best[0]):
            best = (low, g)
    return (str(best[0]) if best[0] else "", best[1])


async def write_record(kv: KeyValue, name: str, record: tuple[bytes, int] | None, body: Mapping[str, Any]) -> bool:
    """Compare-and-swap the generation record; False when another process changed it first."""
    value = encode_record(body)
    key = generation_key(name)
    try:
        if record is None:
            await guard_kv(kv, kv.create(key, value), key)
        else:
            await guard_kv(kv, kv.update(key, value, last=record[1]), key)
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    except KV_ERRORS as e:
        raise kv_error(f"cannot write the generation record of {name!r}", e) from e
    return True


async def _seed(
    kv: KeyValue, name: str, n: int, todo: Iterable[int], seed: CursorRecord, current: Mapping[int, tuple[str, int]]
) -> bool:
    """Write ``seed`` into each shard cursor of ``todo`` (compare-and-swap); False on a lost race."""

    async def one(m: int) -> None:
        key = encode_key(shard_name(name, m, n))
        if m in current:
            await guard_kv(kv, kv.update(key, seed.encode(), last=current[m][1]), key)
        else:
            await guard_kv(kv, kv.create(key, seed.encode()), key)

    results = await asyncio.gather(*(one(m) for m in todo), return_exceptions=True)
    for r in results:
        if isinstance(r, nats.js.errors.KeyWrongLastSequenceError):
            return False
        if isinstance(r, PermissionDenied):
            raise r
        if isinstance(r, BaseException):
            raise kv_error(f"cannot seed the cursors of {name!r}", r) from r
    return True
