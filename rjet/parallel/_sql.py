"""A group whose shard cursors live in an SQL database: ``Parallel(..., cursors="sqlite:///..." |
"postgresql://...")``.

Each worker claims its shard's cursor in an :class:`rjet.sql.SqlCursorStore` of its own (so a
transactional handler commits its writes with the shard's progress); what the group coordinates by
stays in the namespace's bucket: heartbeats, elastic members' leases and the group record
(``rjet/parallel/_keys.py``), with the same one-``n``-at-a-time rule (``rjet/parallel/_reshard.py``).

Resharding (:func:`prepare`) differs from the bucket's in two ways, both because a database can hold
several rows in one transaction:

- The new shards' cursors are seeded in one transaction (:meth:`rjet.sql.SqlCursorStore.rewrite`)
  that also writes ``_rjet.gen.<name>``, a row of the same table whose cursor column holds the
  *epoch* of the reshard: the revision of the group record it replaced, plus one (later reshards
  read later revisions, so epochs grow). The group record names the epoch; every start of that
  ``n`` runs the transaction again, which seeds only when the row holds an older epoch (the first
  start to get there) and otherwise only makes the cursors that are missing. A start that wrote
  the record and died before seeding leaves the seeding to the next start; a start that seeds
  never rewinds a shard some worker claimed since.
- It is exact. Every shard cursor of every ``n`` the table holds is a true bound: shard ``m`` of
  ``g`` handled every event of its keys up to its cursor (and the events of its ``done`` set). The
  seed is the highest lowest cursor over the old ``n`` (as for the bucket), and each new shard skips
  the events above it that an old shard handled (:class:`Handled`, read from the old cursors when a
  worker starts: they stay in place; a shard whose cursor a tool moved back below the seed, to
  handle events again, skips nothing). The seeding transaction clears the owner of every old cursor
  of the group, so an old shard's worker that was paused past its TTL (a zombie) commits nothing
  more: its next transaction finds the claim gone. A current shard's own older cursor (the group
  ran this ``n`` before) is only ever moved forward, keeping the events done above the seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from rjet._keyhash import key_hash
from rjet._progress import decode_done, encode_done
from rjet.cursors import CursorRecord, encode_key
from rjet.event import Event
from rjet.parallel._errors import ParallelError
from rjet.parallel._keys import KV_ERRORS, decode_record, generation_key, kv_error, parse_shard_cursor
from rjet.parallel._reshard import (
    ReshardReport,
    best_bound,
    decode_group_record,
    read_holders,
    refusal,
    write_record,
)
from rjet.parallel._shard import shard_name
from rjet.parallel._snapshot import Snapshot, snapshot

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

    from rjet.cursors import JetStreamCursorStore
    from rjet.sql import SqlCursorStore

__all__ = ["Handled", "generations", "handled_before", "in_sql", "prepare", "sql_snapshot"]

log = logging.getLogger("rjet.parallel")

_ATTEMPTS: Final = 30


def generations(records: Mapping[str, CursorRecord], name: str) -> dict[int, dict[int, CursorRecord]]:
    """The shard cursors of group ``name`` among ``records`` (by cursor name): n -> m -> record."""
    out: dict[int, dict[int, CursorRecord]] = {}
    for cursor_name, record in records.items():
        parsed = parse_shard_cursor(encode_key(cursor_name))
        if parsed is not None and parsed[0] == name:
            out.setdefault(parsed[2], {})[parsed[1]] = record
    return out


def _done(name: str, record: CursorRecord) -> frozenset[int]:
    if not record.done:
        return frozenset()
    try:
        return decode_done(int(record.cursor or 0), record.done)
    except ValueError as e:
        log.warning("cursor %r: its exact progress is unreadable (%s); those events count as not handled", name, e)
        return frozenset()


class Handled:
    """``handled(event)``: whether a shard of an earlier ``n`` of the group handled ``event`` already:
    its sequence is at or below the cursor of the old shard its key belonged to, or in that cursor's
    done set. Built from the old cursors (``n`` -> m -> record); events above every one of them
    cost one comparison."""

    __slots__ = ("_generations", "top")

    def __init__(self, name: str, old: Mapping[int, Mapping[int, CursorRecord]]) -> None:
        gens = []
        top = 0
        for g, records in sorted(old.items()):
            cursors = [int(records[m].cursor or 0) if m in records else 0 for m in range(g)]
            dones = [_done(shard_name(name, m, g), records[m]) if m in records else frozenset() for m in range(g)]
            top = max(top, *cursors, *(max(d) for d in dones if d))
            gens.append((g, cursors, dones))
        self._generations: tuple[tuple[int, list[int], list[frozenset[int]]], ...] = tuple(gens)
        self.top = top

    def __call__(self, event: Event) -> bool:
        seq = event.id_int
        if seq > self.top:
            return False
        h = key_hash(event.foreign_id)
        for g, cursors, dones in self._generations:
            m = h % g
            if seq <= cursors[m] or seq in dones[m]:
                return True
        return False

    def __repr__(self) -> str:
        return f"Handled(n={[g for g, _, _ in self._generations]}, top={self.top})"


async def handled_before(store: SqlCursorStore, name: str, m: int, n: int) -> Handled | None:
    """The :class:`Handled` filter of shard ``m`` of ``n`` of group ``name``: from the cursors of the
    group's other ``n`` in ``store``. None when there are none, when they handled nothing, or when the
    shard's own cursor is below their seed: a tool moved it back there (``rjet cursor --set``), to
    handle those events again."""
    old = generations(await store.records(prefix=name + "_"), name)
    own = old.pop(n, {}).get(m)
    if not old:
        return None
    seed, _ = best_bound(name, {g: {k: (r.cursor, 0) for k, r in records.items()} for g, records in old.items()})
    if own is None or int(own.cursor or 0) < int(seed or 0):
        return None
    handled = Handled(name, old)
    return handled if handled.top else None


@dataclasses.dataclass(slots=True)
class _Seeding:
    """What one run of the seeding transaction did (:func:`_seed`)."""

    seeded: tuple[str, ...] = ()
    replaced: bool = False
    seed: str = ""
    source: int | None = None
    old_cursors: dict[str, str] = dataclasses.field(default_factory=dict)


def _advance(name: str, old: CursorRecord | None, seed: str, stream: str | None) -> CursorRecord:
    """Shard cursor ``name`` seeded with ``seed``: moved forward to it, never back (keeping the events
    done above it), its owner cleared (whoever held it is fenced)."""
    base = int(seed or 0)
    if old is not None and int(old.cursor or 0) >= base:
        return CursorRecord(old.cursor, old.stream, None, old.done)
    carried = {s for s in _done(name, old) if s > base} if old is not None else set()
    try:
        done = encode_done(base, carried) if carried else ""
    except ValueError as e:
        log.warning("cursor %r: %d events done above the seed are too many to carry (%s)", name, len(carried), e)
        done = ""
    return CursorRecord(seed, stream or (old.stream if old is not None else None), None, done or None)


def _change(
    rows: dict[str, CursorRecord], name: str, n: int, epoch: int | None, out: _Seeding
) -> dict[str, CursorRecord]:
    """The seeding transaction's writes, from the rows it read (``rows``); fills ``out``."""
    mark = generation_key(name)
    marked = int(rows[mark].cursor or 0) if mark in rows else 0
    gens = generations(rows, name)
    current = gens.pop(n, {})
    bounds = {g: {m: (r.cursor, 0) for m, r in records.items()} for g, records in gens.items()}
    out.seed, out.source = best_bound(name, bounds)
    out.old_cursors = {shard_name(name, m, g): r.cursor for g, records in gens.items() for m, r in records.items()}
    streams = {r.stream for records in gens.values() for r in records.values()}
    stream = next(iter(streams)) if len(streams) == 1 else None
    writes: dict[str, CursorRecord] = {}
    if epoch is not None and marked < epoch:
        out.replaced = True
        for m in range(n):
            writes[shard_name(name, m, n)] = _advance(shard_name(name, m, n), current.get(m), out.seed, stream)
        for g, records in gens.items():  # fenced: a paused worker of an old n commits nothing more
            for m, r in records.items():
                if r.owner is not None:
                    writes[shard_name(name, m, g)] = dataclasses.replace(r, owner=None)
        writes[mark] = CursorRecord(str(epoch))
    elif out.seed:
        for m in range(n):
            if m not in current:
                writes[shard_name(name, m, n)] = CursorRecord(out.seed, stream)
    out.seeded = tuple(sorted(shard_name(name, m, n) for m in range(n) if shard_name(name, m, n) in writes))
    return writes


async def _seed(store: SqlCursorStore, name: str, n: int, epoch: int | None) -> _Seeding:
    out = _Seeding()
    await store.rewrite([generation_key(name), name + "_"], lambda rows: _change(rows, name, n, epoch, out))
    return out


def _needs_seeding(rows: Mapping[str, CursorRecord], name: str, n: int, epoch: int | None) -> bool:
    """Whether the seeding transaction has anything to do, from a plain read of ``rows``."""
    mark = rows.get(generation_key(name))
    if epoch is not None and (mark is None or int(mark.cursor or 0) < epoch):
        return True
    gens = generations(rows, name)
    current = gens.pop(n, {})
    return bool(gens) and len(current) < n


async def prepare(
    kv: KeyValue,
    store: SqlCursorStore,
    name: str,
    n: int,
    *,
    group: str,
    ttl: float,
    shards: Iterable[int] = (),
    member: str | None = None,
) -> ReshardReport | None:
    """:func:`rjet.parallel._reshard.prepare` for a group whose shard cursors are in ``store``: take the
    group record for ``n`` (the same refusals), then seed the cursors (see this module's docstring)."""
    for _ in range(_ATTEMPTS):
        try:
            record, _keys, beats, leases = await read_holders(kv, name, group, ttl)
        except KV_ERRORS as e:
            raise kv_error(f"cannot read the group record of {name!r}", e) from e
        recorded = decode_group_record(record, name)
        held = None if recorded is None else int(recorded["n"])
        if held is not None and held != n:
            live_beats = [b for b in beats if b.n == held]
            live_leases = [lease for lease in leases if lease.n == held]
            if live_beats or live_leases:
                raise refusal(name, n, held, live_beats, live_leases, ttl)
        rows = await store.records(prefix=name + "_")
        rows.update(await store.records(prefix=generation_key(name)))
        body: dict[str, Any]
        if recorded is not None and held == n:
            body = dict(recorded)
        elif recorded is not None:  # another n ran: a reshard, its epoch from the record's revision
            assert record is not None
            body = {"n": n, "seed": "", "fresh_from": 0, "from": held, "at": time.time(), "epoch": record[1] + 1}
        else:  # a first run (or cursors without a record: the missing ones are seeded)
            body = {"n": n, "seed": "", "fresh_from": 0}
        body["cursors"] = "sql"
        body["holder"] = {"group": group, "member": member, "host": socket.gethostname(), "pid": os.getpid()}
        body["held_at"] = time.time()
        if not await write_record(kv, name, record, body):
            continue
        epoch = body.get("epoch")
        epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None
        mine = set(shards)
        for b in beats:
            if b.n == n and b.m in mine:
                log.warning(
                    "parallel %r: %s is already run by another group; starting it anyway: the newest runner"
                    " claims the cursor and the older one is fenced out (it stops with CursorConflict)",
                    name, b.describe(name),
                )  # fmt: skip
        if not _needs_seeding(rows, name, n, epoch):
            return None
        done = await _seed(store, name, n, epoch)
        if not done.replaced:
            if done.seeded:
                log.info(
                    "parallel %r: seeded %d missing cursor(s) of n=%d with %r", name, len(done.seeded), n, done.seed
                )
            return None
        old_n = tuple(sorted({g for g in generations(rows, name) if g != n} | ({held} if held else set())))
        report = ReshardReport(name, n, old_n, done.seed, done.source, done.old_cursors, done.seeded, exact=True)
        log.warning("%s", report.describe())
        return report
    raise ParallelError(
        f"parallel {name!r}: could not settle the cursors of n={n} after {_ATTEMPTS} attempts: other"
        " processes keep changing them"
    )


async def sql_snapshot(store: JetStreamCursorStore, cursors: SqlCursorStore | None) -> Snapshot:
    """:func:`rjet.parallel._snapshot.snapshot` of a namespace whose cursors are in ``cursors`` (when
    given): the bucket's rjet records (group records, heartbeats, leases) beside the database's
    cursors, so that every view of :mod:`rjet.parallel.admin` reads them as it reads the bucket's."""
    if cursors is None:
        return await snapshot(store)
    snap = await snapshot(store, cursors=False)
    values = dict(snap.values)
    values.update({encode_key(name): record.encode() for name, record in (await cursors.records()).items()})
    return Snapshot(snap.namespace, values, snap.now)


def in_sql(snap: Snapshot, name: str) -> bool:
    """Whether group ``name``'s record (in ``snap``) says that its shard cursors are in SQL."""
    try:
        record = decode_record(snap.values.get(generation_key(name)))
    except ValueError:
        return False
    return record is not None and record.get("cursors") == "sql"
