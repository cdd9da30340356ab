"""Liveness (heartbeats) and resharding: what lets ``n`` change without loss and without a full replay.

Everything lives in the namespace's cursor bucket (``rjet_cursors_<namespace>``), next to the cursors,
under keys that start with ``_rjet.`` (a prefix rjet reserves):

- ``_rjet.hb.<m+1>_of_<n>.<group>.<name>``: a heartbeat per shard a group (one ``Parallel.run``)
  runs, rewritten every ``heartbeat_interval`` seconds and deleted on a clean stop. A shard is
  *running* while a heartbeat of it is younger than ``heartbeat_ttl`` (wall clocks of the hosts are
  compared: keep them in sync). Heartbeats left by groups that died are deleted once they are old.
- ``_rjet.gen.<name>``: the generation record, which ``n`` is current, and the cursor a reshard
  seeded. It is written with compare-and-swap, so two groups that start at once agree.

Why seeding from the minimum is safe: shard ``m`` of an old generation of ``n'`` shards handled every
event of its keys up to its cursor, and skipped only other shards' events. So every event up to
``min(m) cursor(m)`` was handled by the shard its key belonged to. Starting every new shard right
after that minimum loses nothing; events between the minimum and an old shard's own cursor are
handled again (at-least-once). With cursors of several old generations, each gives such a bound, and
the highest is used. A missing old cursor counts as "" (nothing handled), so the bound falls to the
start of the stream for that generation: correct, if costly.

A reshard is refused while any shard of another ``n`` of the same name is running. Every group writes
its heartbeats *before* it looks at the others', so two groups of different ``n`` that start at once
both see each other and both refuse, rather than both going ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import nats.errors
import nats.js.errors

from rjet._denials import denials, exactly
from rjet._natsio import connection, kv_names
from rjet._progress import decode_done, encode_done
from rjet.cursors import RESERVED_PREFIX, CursorRecord, decode_key, encode_key, kv_keys
from rjet.errors import CursorStoreError, PermissionDenied
from rjet.parallel._errors import ParallelError, ReshardRefused
from rjet.parallel._shard import shard_name
from rjet.stream import parse_cursor

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

__all__ = ["META_PREFIX", "Heartbeats", "ReshardReport", "heartbeats", "prepare"]

log = logging.getLogger("rjet.parallel")

META_PREFIX: Final = RESERVED_PREFIX
"""Keys in a cursor bucket that start with this belong to rjet itself (heartbeats, generations)."""

_HB: Final = META_PREFIX + "hb."
_GEN: Final = META_PREFIX + "gen."
_SHARD_RE: Final = re.compile(r"^(\d+)_of_(\d+)$")
_KV_ERRORS: Final = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)
_ATTEMPTS: Final = 10


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
            + " other events after it that old shards already handled are handled again (at-least-once);"
            " the old cursors are left in place"
        )


def _gen_key(name: str) -> str:
    return _GEN + encode_key(name)


def _hb_key(name: str, m: int, n: int, group: str) -> str:
    return f"{_HB}{m + 1}_of_{n}.{group}.{encode_key(name)}"


def _hb_parts(key: str) -> tuple[str, int, int] | None:
    """(encoded name, m, n) of a heartbeat key, or None."""
    if not key.startswith(_HB):
        return None
    shard, _, rest = key[len(_HB) :].partition(".")
    _, _, encoded = rest.partition(".")
    match = _SHARD_RE.match(shard)
    if match is None or not encoded:
        return None
    m, n = int(match.group(1)) - 1, int(match.group(2))
    return (encoded, m, n) if 0 <= m < n else None


def _parse_hb_key(key: str, name: str) -> tuple[int, int] | None:
    """(m, n) of a heartbeat key of ``name``, or None."""
    parts = _hb_parts(key)
    return None if parts is None or parts[0] != encode_key(name) else parts[1:]


def _parse_cursor_key(key: str, pattern: re.Pattern[str]) -> tuple[int, int] | None:
    if key.startswith(META_PREFIX):
        return None
    match = pattern.match(decode_key(key))
    if match is None:
        return None
    m, n = int(match.group(1)) - 1, int(match.group(2))
    return (m, n) if 0 <= m < n else None


async def _keys(kv: KeyValue) -> list[str]:
    return await kv_keys(kv)


async def _get(kv: KeyValue, key: str) -> tuple[bytes, int] | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    assert entry.revision is not None
    return entry.value or b"", entry.revision


def _kv_error(what: str, err: BaseException) -> CursorStoreError:
    return CursorStoreError(f"parallel: {what}: {err!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Beat:
    m: int
    n: int
    group: str
    host: str
    pid: int
    age: float
    ttl: float | None  # the group's heartbeat_ttl; None in heartbeats written before it was stored
    member: str | None = None  # the elastic member running it

    def describe(self, name: str) -> str:
        return f"{shard_name(name, self.m, self.n)} (host {self.host}, pid {self.pid}, heartbeat {self.age:.1f}s ago)"


async def _read_beat(kv: KeyValue, key: str, m: int, n: int, now: float) -> tuple[_Beat, int] | None:
    """The heartbeat stored at ``key`` and its revision; None when gone or not one rjet wrote."""
    got = await _get(kv, key)
    if got is None:
        return None
    try:
        info = json.loads(got[0])
        age = now - float(info["time"])
        ttl = None if info.get("ttl") is None else float(info["ttl"])
        member = info.get("member")
        beat = _Beat(
            m, n, str(info["group"]), str(info.get("host", "?")), int(info.get("pid", 0)), age, ttl,
            member if isinstance(member, str) else None,
        )  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None
    return beat, got[1]


async def _live(kv: KeyValue, keys: Iterable[str], name: str, ttl: float) -> list[_Beat]:
    """Every fresh heartbeat of ``name``'s shards, of any group and any n; deletes long-dead ones."""
    now = time.time()
    beats = []
    dead = max(60.0, 10 * ttl)
    for key in keys:
        mn = _parse_hb_key(key, name)
        if mn is None or (got := await _read_beat(kv, key, *mn, now)) is None:
            continue
        beat, revision = got
        if beat.age < ttl:
            beats.append(beat)
        elif beat.age > dead:
            with contextlib.suppress(*_KV_ERRORS):
                await kv.delete(key, last=revision)
    return beats


async def heartbeats(kv: KeyValue, keys: Iterable[str]) -> dict[str, list[_Beat]]:
    """Every heartbeat among a cursor bucket's ``keys``, fresh or stale, by its shard's cursor name."""
    now = time.time()
    shards: list[tuple[str, str, int, int]] = []  # (key, shard's cursor name, m, n)
    for key in keys:
        parts = _hb_parts(key)
        if parts is None:
            continue
        encoded, m, n = parts
        try:
            shards.append((key, shard_name(decode_key(encoded), m, n), m, n))
        except ValueError:  # not a key rjet wrote
            continue
    beats = await asyncio.gather(*(_read_beat(kv, key, m, n, now) for key, _, m, n in shards))
    found: dict[str, list[_Beat]] = {}
    for (_, shard, _, _), got in zip(shards, beats, strict=True):
        if got is not None:
            found.setdefault(shard, []).append(got[0])
    return found


async def guarded_put(kv: KeyValue, key: str, value: bytes) -> int:
    """``kv.put(key, value)``, or :class:`rjet.PermissionDenied` naming the key's subject as soon as
    the server refuses the write (a heartbeat or lease write the user may not make)."""
    names = kv_names(kv)
    subject = names.prefix + key
    return await denials(connection(names.js)).guard(exactly(subject), kv.put(key, value))


class Heartbeats:
    """The heartbeats of one group's shards: :meth:`beat` writes them, :meth:`run` keeps them fresh.

    A group writes them for as long as it holds its shards (a crashed worker being restarted still
    counts as running); :meth:`drop` stops one (a fenced shard), :meth:`clear` deletes them all.
    """

    def __init__(
        self,
        kv: KeyValue,
        name: str,
        n: int,
        shards: Iterable[int],
        group: str,
        *,
        interval: float,
        ttl: float | None = None,
        member: str | None = None,
    ) -> None:
        self.kv = kv
        self.member = member
        self.name = name
        self.n = n
        self.group = group
        self.interval = interval
        self.ttl = ttl  # stored in each heartbeat, so that readers (rjet status) judge it by the group's own
        self._shards = set(shards)
        self._revs: dict[int, int] = {}
        self._host = socket.gethostname()

    async def beat(self) -> None:
        """Write every heartbeat of the group now."""
        beat = {"group": self.group, "host": self._host, "pid": os.getpid(), "n": self.n, "time": time.time()}
        if self.ttl is not None:
            beat["ttl"] = self.ttl
        if self.member is not None:
            beat["member"] = self.member
        value = json.dumps(beat).encode()
        shards = sorted(self._shards)
        revs = await asyncio.gather(
            *(guarded_put(self.kv, _hb_key(self.name, m, self.n, self.group), value) for m in shards),
            return_exceptions=True,
        )
        for m, rev in zip(shards, revs, strict=True):
            if isinstance(rev, PermissionDenied):
                raise rev
            if isinstance(rev, BaseException):
                raise _kv_error("cannot write a heartbeat", rev) from rev
            if m in self._shards:
                self._revs[m] = rev

    async def run(self) -> None:
        """Beat every ``interval`` seconds until cancelled; failures are logged, not raised."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except CursorStoreError as e:
                log.warning("parallel %r: %s (retrying)", self.name, e)
            except PermissionDenied as e:  # taken away mid-run: said loudly, retried (it may be granted again)
                log.error("parallel %r: cannot write a heartbeat: %s (retrying)", self.name, e)

    def drop(self, m: int) -> None:
        """Stop writing shard ``m``'s heartbeat (another runner owns the shard now)."""
        self._shards.discard(m)

    async def add(self, m: int) -> None:
        """Write shard ``m``'s heartbeat now and from now on (an elastic group took the shard)."""
        self._shards.add(m)
        await self.beat()

    async def remove(self, m: int) -> None:
        """Stop writing shard ``m``'s heartbeat and delete it, so that the member the shard goes to
        sees at once that this group let it go. Never raises (a heartbeat left behind goes stale)."""
        self._shards.discard(m)
        if self._revs.pop(m, None) is not None:
            with contextlib.suppress(*_KV_ERRORS):
                await self.kv.delete(_hb_key(self.name, m, self.n, self.group))

    @property
    def shards(self) -> frozenset[int]:
        """The shards whose heartbeats this group writes."""
        return frozenset(self._shards)

    async def clear(self) -> None:
        """Delete this group's heartbeats. Never raises (a heartbeat left behind goes stale)."""
        written, self._revs = list(self._revs), {}
        self._shards.clear()
        await asyncio.gather(
            *(self.kv.delete(_hb_key(self.name, m, self.n, self.group)) for m in written), return_exceptions=True
        )


async def _read_state(
    kv: KeyValue, name: str, n: int, group: str, ttl: float
) -> tuple[
    list[_Beat],
    tuple[bytes, int] | None,
    dict[int, dict[int, tuple[str, int]]],
    set[str | None],
    dict[int, dict[int, str]],
]:
    """What a reshard decides on: other groups' live heartbeats, the generation record, every
    generation's cursors (cursor, revision) by shard, the streams the old cursors count in, and the
    old cursors' exact progress (their ``done``, by generation and shard)."""
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)_of_(\d+)$")
    try:
        keys = await _keys(kv)
        beats = [b for b in await _live(kv, keys, name, ttl) if b.group != group]
        record = await _get(kv, _gen_key(name))
        generations: dict[int, dict[int, tuple[str, int]]] = {}
        dones: dict[int, dict[int, str]] = {}
        streams: set[str | None] = set()
        for key in keys:
            mn = _parse_cursor_key(key, pattern)
            got = await _get(kv, key) if mn is not None else None
            if mn is None or got is None:
                continue
            stored = CursorRecord.decode(got[0])
            generations.setdefault(mn[1], {})[mn[0]] = (stored.cursor, got[1])
            if stored.done:
                dones.setdefault(mn[1], {})[mn[0]] = stored.done
            if mn[1] != n:
                streams.add(stored.stream)
    except _KV_ERRORS as e:
        raise _kv_error(f"cannot read the cursors of {name!r}", e) from e
    return beats, record, generations, streams, dones


async def prepare(
    kv: KeyValue, name: str, n: int, *, group: str, ttl: float, shards: Iterable[int] = ()
) -> ReshardReport | None:
    """Make the cursors of ``name``'s ``n`` shards ready to run, resharding when ``n`` changed.

    Call it after this group's heartbeats are written. Returns what a reshard did, or None when
    there was nothing to reshard. Raises :class:`ReshardRefused` when shards of another ``n`` run.
    Warns (and goes on) when another group runs some of ``shards`` with the same ``n``: the cursor
    store fences the older runner.
    """
    for _ in range(_ATTEMPTS):
        beats, record, generations, streams, dones = await _read_state(kv, name, n, group, ttl)

        others = [b for b in beats if b.n != n]
        if others:
            running = {shard_name(name, b.m, b.n): b.describe(name) for b in others}
            raise ReshardRefused(
                f"parallel {name!r}: cannot start with n={n}: shards of n="
                f"{'/'.join(str(x) for x in sorted({b.n for b in others}))} of the same name are running: "
                f"{'; '.join(b.describe(name) for b in others)}. Stop them first (a group that died counts"
                f" as running until its heartbeat is {ttl:g}s old)",
                running,
            )
        mine = set(shards)
        for b in beats:
            if b.n == n and b.m in mine:
                log.warning(
                    "parallel %r: %s is already run by another group; starting it anyway: the newest runner"
                    " claims the cursor and the older one is fenced out (it stops with CursorConflict)",
                    name,
                    b.describe(name),
                )
        current = generations.pop(n, {})
        step = plan(name, n, _decode_record(record, name), generations, current, streams, now=time.time(), dones=dones)
        if step.record is not None and not await _write_record(kv, name, record, step.record):
            continue  # another process changed the record first: read again
        if step.todo and not await _seed(kv, name, n, step.todo, step.seed, current):
            continue
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
    seed, source = _best_bound(name, generations)
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


def _decode_record(record: tuple[bytes, int] | None, name: str) -> dict[str, Any] | None:
    if record is None or not record[0]:
        return None
    try:
        state = json.loads(record[0])
        int(state["n"])
    except (ValueError, KeyError, TypeError):
        log.warning("parallel %r: ignoring an unreadable generation record %r", name, record[0][:200])
        return None
    return dict(state)


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


def _best_bound(name: str, generations: Mapping[int, Mapping[int, tuple[str, int]]]) -> tuple[str, int | None]:
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


async def _write_record(kv: KeyValue, name: str, record: tuple[bytes, int] | None, body: Mapping[str, Any]) -> bool:
    """Compare-and-swap the generation record; False when another process changed it first."""
    value = json.dumps(body).encode()
    try:
        if record is None:
            await kv.create(_gen_key(name), value)
        else:
            await kv.update(_gen_key(name), value, last=record[1])
    except nats.js.errors.KeyWrongLastSequenceError:
        return False
    except _KV_ERRORS as e:
        raise _kv_error(f"cannot write the generation record of {name!r}", e) from e
    return True


async def _seed(
    kv: KeyValue, name: str, n: int, todo: Iterable[int], seed: CursorRecord, current: Mapping[int, tuple[str, int]]
) -> bool:
    """Write ``seed`` into each shard cursor of ``todo`` (compare-and-swap); False on a lost race."""

    async def one(m: int) -> None:
        key = encode_key(shard_name(name, m, n))
        if m in current:
            await kv.update(key, seed.encode(), last=current[m][1])
        else:
            await kv.create(key, seed.encode())

    results = await asyncio.gather(*(one(m) for m in todo), return_exceptions=True)
    for r in results:
        if isinstance(r, nats.js.errors.KeyWrongLastSequenceError):
            return False
        if isinstance(r, BaseException):
            raise _kv_error(f"cannot seed the cursors of {name!r}", r) from r
    return True
