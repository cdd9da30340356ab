"""Look at and change what consumers and :class:`rjet.parallel.Parallel` groups keep in a cursor
namespace: cursors, groups, their shards, heartbeats and elastic members; reset or delete a group,
remove what its dead members left (prune), move one cursor. ``rjet group``, ``rjet status`` and
``rjet cursor`` are views over these functions.

Every function reads the namespace's bucket once (one listing, then its values) and derives what it
returns from that one read (:func:`overview`: the consumers and the groups from one), so the views
agree: a heartbeat or lease is live by one rule (younger than the TTL its writer stored, 10 s for
one that stored none; wall clocks of writer and reader are compared), a shard *runs* while one of
its heartbeats is live, and a member *runs* the shards whose live heartbeats name it. Reading never
writes: running consumers and groups are not disturbed.

A group run with ``Parallel(..., cursors=URL)`` keeps its shard cursors in that SQL database (its
group record says ``cursors: sql``; heartbeats, leases and the record stay in the bucket): the
functions take its :class:`rjet.sql.SqlCursorStore` as ``cursors=`` and read its rows there (reset
and delete them too, with the bucket's checks and owners); without it such a group is listed with
its cursors unknown, and refused where they are needed.

::

    from rjet.parallel import admin
    from rjet.sql import SqlCursorStore

    store = await admin.open_namespace(js, "shop")  # admin.NamespaceNotFound when it has no bucket
    for group in await admin.list_groups(store):
        print(group.name, group.n, group.running, [m.member for m in group.live_members])
    orders = await admin.stream_state(js, "orders")
    billing = await admin.describe_group(store, "billing", stream=orders)
    for shard in billing.shards:
        print(shard.name, shard.cursor, shard.lag_events, [r.where for r in shard.running_on])
    plan = await admin.reset_group(store, "billing", "orders", admin.ResetTarget(shift=-1000))  # a dry run
    print([(move.name, move.old, move.new) for move in plan.moves])
    async with await SqlCursorStore.open("sqlite:///app.db") as sql:  # a group run with cursors=URL
        print((await admin.delete_group(store, "payments", cursors=sql)).rows)  # a dry run
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import nats.js.errors

from rjet._nats.client import api_prefix, connection, kv_names
from rjet._nats.denials import denials, exactly, guard_api, guard_kv
from rjet._tool_write import (
    NeedsStream,
    Refused,
    check_position,
    check_stream,
    read_record,
    reset_to,
    set_to,
    stream_name,
    stream_now,
    tool_owner,
    write_record,
    write_sql,
    write_sql_record,
)
from rjet.cursors import CursorRecord, JetStreamCursorStore, decode_key, encode_key
from rjet.errors import ConfigError
from rjet.parallel._elastic import lease_removal_age
from rjet.parallel._errors import GroupNotFound, GroupRunning, NamespaceNotFound
from rjet.parallel._keys import DEFAULT_TTL, PREFIX, generation_key, get, is_group_record, parse_shard_cursor
from rjet.parallel._snapshot import (
    ConsumerInfo,
    CursorChange,
    CursorMove,
    GroupInfo,
    MemberInfo,
    ResetPlan,
    ResetTarget,
    RunnerInfo,
    ShardInfo,
    Snapshot,
    StreamState,
    done_count,
    expired,
    snapshot,
)
from rjet.parallel._sql import in_sql, sql_snapshot
from rjet.reader import stream_identity as _identity
from rjet.stream import Stream

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from rjet._tool_write import StreamNow
    from rjet.sql import SqlCursorStore

__all__ = [
    "DEFAULT_TTL", "ConsumerInfo", "CursorChange", "CursorMove", "DeletePlan", "GroupInfo", "GroupNotFound",
    "GroupRunning", "MemberInfo", "NamespaceNotFound", "NeedsStream", "Overview", "Refused", "ResetPlan",
    "ResetTarget", "RunnerInfo", "ShardInfo", "StreamState", "consumers", "delete_group", "describe_group",
    "done_count", "heartbeats", "lease_removal_age", "list_groups", "members", "namespaces", "open_namespace",
    "overview", "prune_group", "reset_group", "sequence_at", "set_cursor", "stream_state",
]  # fmt: skip

_BUCKET_PREFIX: Final = "rjet_cursors_"


# ----------------------------------------------------------------- reading


async def namespaces(js: JetStreamContext) -> list[str]:
    """Every rjet cursor namespace on the server (a bucket ``rjet_cursors_<namespace>``), sorted."""
    found: list[str] = []
    offset = 0
    kv_stream = "KV_" + _BUCKET_PREFIX
    while True:
        listing = f"{api_prefix(js)}.STREAM.LIST"
        page = await denials(connection(js)).guard(exactly(listing), js.streams_info(offset))
        if not page:
            return sorted(found)
        offset += len(page)
        names = [i.config.name or "" for i in page]
        found += [n[len(kv_stream) :] for n in names if n.startswith(kv_stream)]


async def open_namespace(js: JetStreamContext, namespace: str) -> JetStreamCursorStore:
    """The cursor store of an existing ``namespace`` (never created here); :class:`NamespaceNotFound`
    when it has no bucket. Only read through it, or write through this module's functions."""
    bucket = _BUCKET_PREFIX + namespace
    try:
        kv = await guard_api(js, "KV_" + bucket, js.key_value(bucket))
    except nats.js.errors.BucketNotFoundError:
        raise NamespaceNotFound(f"cursor namespace {namespace!r} not found (no KV bucket {bucket!r})") from None
    return JetStreamCursorStore(kv, namespace)


async def _stored_at(js: JetStreamContext, stream: str, **kwargs: Any) -> float | None:
    try:
        msg = await guard_api(js, stream, js.get_msg(stream, **kwargs))
    except nats.js.errors.NotFoundError:
        return None
    return msg.time.timestamp() if msg.time else None


async def stream_state(js: JetStreamContext, name: str) -> StreamState:
    """Stream ``name`` now; :class:`rjet.StreamNotFound` when there is none."""
    info = await Stream(js, name).info()
    first, last = info.state.first_seq, info.state.last_seq
    last_stored = await _stored_at(js, name, seq=last) if last else None
    return StreamState(info.config.name or name, info.state.messages, first, last, last_stored, _identity(info))


async def heartbeats(store: JetStreamCursorStore) -> dict[str, tuple[RunnerInfo, ...]]:
    """Every stored heartbeat, live or stale, freshest first, by its shard's cursor name."""
    return (await snapshot(store, cursors=False)).runners()


async def members(store: JetStreamCursorStore, group: str | None = None) -> list[MemberInfo]:
    """The elastic members of ``group`` (of every group when None), live or not, with the shards they run."""
    snap = await snapshot(store, cursors=False)
    return _removal(snap.members(snap.runners(), group))


def _removal(found: list[MemberInfo]) -> list[MemberInfo]:
    """``found`` with, for each expired lease of a group that has a live member, when that member
    deletes it (:func:`lease_removal_age`; the members of a group with none delete nothing)."""
    live = {m.group for m in found if m.state == "live"}
    return [
        dataclasses.replace(m, removed_in=max(0.0, lease_removal_age(m.ttl) - m.age))
        if m.state == "expired" and m.group in live
        else m
        for m in found
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class _Read:
    """One read of a namespace's bucket and, when given, of an SQL store's cursors: ``snap`` holds the
    bucket's values with each SQL group's shard cursors as the database has them (none without it)."""

    snap: Snapshot
    sql: frozenset[str]  # the groups whose shard cursors are in the SQL database
    with_sql: bool  # whether the database was read
    bucket: Snapshot  # the bucket as read, every cursor in it
    db: dict[str, CursorRecord]  # every cursor of the database, as read (none without it)

    def cursor_view(self) -> Snapshot:
        """What :func:`consumers` lists: the bucket's cursors, or with a database the database's
        cursors beside the bucket's rjet records (``rjet.parallel._sql.sql_snapshot``)."""
        if not self.with_sql:
            return self.bucket
        values = {k: v for k, v in self.bucket.values.items() if k.startswith(PREFIX)}
        values.update({encode_key(name): record.encode() for name, record in self.db.items()})
        return Snapshot(self.bucket.namespace, values, self.bucket.now)


async def _read(store: JetStreamCursorStore, cursors: SqlCursorStore | None) -> _Read:
    """A group's shard cursors are where its record says (``cursors: sql``: a group run with
    ``Parallel(..., cursors=URL)``); a group without a record, in the database when it has cursors
    there and ``cursors`` is given. Cursors of a group in the other store (left from before it moved)
    are not its cursors, and left out."""
    snap = await snapshot(store)
    sql = {name for name in snap.group_names() if in_sql(snap, name)}
    rows: dict[str, CursorRecord] = {}
    db = {} if cursors is None else await cursors.records()
    if cursors is not None:
        for row, record in db.items():
            parsed = parse_shard_cursor(encode_key(row))
            if parsed is not None and (parsed[0] in sql or generation_key(parsed[0]) not in snap.values):
                rows[row] = record
        sql |= {parsed[0] for row in rows if (parsed := parse_shard_cursor(encode_key(row))) is not None}
    values = {k: v for k, v in snap.values.items() if (parsed := parse_shard_cursor(k)) is None or parsed[0] not in sql}
    values.update({encode_key(row): record.encode() for row, record in rows.items()})
    return _Read(Snapshot(snap.namespace, values, snap.now), frozenset(sql), cursors is not None, snap, db)


def _info(read: _Read, name: str, last_seq: int | None) -> GroupInfo:
    group = read.snap.group(name, last_seq)
    in_db = name in read.sql
    generations = read.snap.generations().get(name, {})
    keys = list(generations.get(group.n or 0, {}).values()) or [k for g in generations.values() for k in g.values()]
    recorded = {CursorRecord.decode(read.snap.values[k]).stream for k in keys}
    return dataclasses.replace(
        group,
        members=tuple(_removal(list(group.members))),
        cursors="sql" if in_db else "bucket",
        cursors_read=read.with_sql or not in_db,
        streams=tuple(sorted({stream_name(s) for s in recorded if s})),
    )


def _sql_hint(store: JetStreamCursorStore, name: str) -> GroupNotFound:
    return GroupNotFound(
        f"group {name!r} keeps its shard cursors in an SQL database, not in namespace {store.namespace!r}:"
        " give its URL (--cursors URL; admin: cursors=SqlCursorStore)"
    )


async def list_groups(store: JetStreamCursorStore, *, cursors: SqlCursorStore | None = None) -> list[GroupInfo]:
    """Every group with shard cursors, a group record or member leases in the namespace (without
    lag), by name. A group whose record says that its shard cursors are in an SQL database
    (``Parallel(..., cursors=URL)``) is listed with ``cursors`` ``sql``; its cursors are read from
    ``cursors``, that database's store, when given (``cursors_read``: else they are unknown)."""
    read = await _read(store, cursors)
    return [_info(read, name, None) for name in read.snap.group_names()]


async def describe_group(
    store: JetStreamCursorStore,
    name: str,
    *,
    stream: StreamState | None = None,
    cursors: SqlCursorStore | None = None,
) -> GroupInfo:
    """Group ``name``: its shards (with their lag in ``stream``, when given), heartbeats and members;
    :class:`GroupNotFound` when the namespace has nothing of it, or when its shard cursors are in an
    SQL database and ``cursors`` is not that database's store."""
    read = await _read(store, cursors)
    if cursors is None and name in read.sql:
        raise _sql_hint(store, name)
    return _info(read, name, None if stream is None else stream.last_seq)


async def consumers(
    store: JetStreamCursorStore,
    stream: StreamState,
    *,
    pattern: str | None = None,
    cursors: SqlCursorStore | None = None,
) -> list[ConsumerInfo]:
    """The cursors of ``stream``'s consumers in the namespace, by name (``pattern``: a glob of the
    names to keep), and the cursors whose record names no stream (``recorded_in`` None: they may
    count in any stream, so their lag is not computed; a view lists them apart). A cursor recorded
    in another stream is left out: its lag here would be fake; one recorded in an earlier stream of
    the same name (deleted and created again) is kept, without lag, with a note that says so. With
    ``cursors`` (an SQL store), its cursors instead of the bucket's (their idle time unknown: None)."""
    return await _consumers(await sql_snapshot(store, cursors), store, stream, pattern, with_sql=cursors is not None)


@dataclasses.dataclass(frozen=True, slots=True)
class Overview:
    """What :func:`overview` read: :func:`consumers` and :func:`list_groups` of one namespace."""

    consumers: tuple[ConsumerInfo, ...]
    groups: tuple[GroupInfo, ...]


async def overview(
    store: JetStreamCursorStore,
    stream: StreamState,
    *,
    pattern: str | None = None,
    cursors: SqlCursorStore | None = None,
) -> Overview:
    """:func:`consumers` and :func:`list_groups` from one read of the bucket (and of ``cursors``,
    the SQL store, when given), as ``rjet status`` shows them: half the reads of calling both, and
    the groups' members and the consumers' runners from the same moment.

    Example::

        seen = await admin.overview(store, await admin.stream_state(js, "billing"))
        for c in seen.consumers:
            print(c.name, c.cursor, c.lag_events)
    """
    read = await _read(store, cursors)
    found = await _consumers(read.cursor_view(), store, stream, pattern, with_sql=cursors is not None)
    return Overview(tuple(found), tuple(_info(read, name, None) for name in read.snap.group_names()))


async def _consumers(
    snap: Snapshot, store: JetStreamCursorStore, stream: StreamState, pattern: str | None, *, with_sql: bool
) -> list[ConsumerInfo]:
    runners = snap.runners()
    js = kv_names(store.kv).js
    bucket = store.bucket

    async def one(name: str, record: CursorRecord) -> ConsumerInfo | None:
        value = record.cursor
        if value and not (value.isascii() and value.isdigit()):
            return None  # not a cursor: someone else's key
        cursor = int(value or 0)
        written = None
        if not with_sql:
            written = await _stored_at(js, "KV_" + bucket, subject=f"$KV.{bucket}.{encode_key(name)}")
        idle = None if written is None else snap.now - written
        shard = runners.get(name, ())
        here = record.stream
        if here is None:
            return ConsumerInfo(snap.namespace, name, cursor, None, None, idle, "", shard, None)
        if stream.identity is not None and here != stream.identity:
            note = f"recorded in an earlier stream {stream.name!r} ({here}), deleted and created again since"
            return ConsumerInfo(snap.namespace, name, cursor, None, None, idle, note, shard, here)
        if cursor > stream.last_seq:
            note = f"past the stream's last sequence {stream.last_seq}"
            return ConsumerInfo(snap.namespace, name, cursor, None, None, idle, note, shard, here)
        lag = stream.last_seq - cursor
        if not lag:
            return ConsumerInfo(snap.namespace, name, cursor, 0, 0.0, idle, "", shard, here)
        if cursor + 1 < stream.first_seq:
            note = f"expired: events {cursor + 1}..{stream.first_seq - 1} are gone"
            return ConsumerInfo(snap.namespace, name, cursor, lag, None, idle, note, shard, here)
        oldest = await _stored_at(js, stream.name, seq=cursor + 1, subject=">", next=True)
        lag_seconds = None if oldest is None else max(0.0, snap.now - oldest)
        return ConsumerInfo(snap.namespace, name, cursor, lag, lag_seconds, idle, "", shard, here)

    picked = []
    for key, value in sorted(snap.values.items(), key=lambda kv: decode_key(kv[0])):
        if key.startswith(PREFIX):
            continue
        name, record = decode_key(key), CursorRecord.decode(value)
        if record.stream is not None and stream_name(record.stream) != stream.name:
            continue
        if pattern is None or fnmatch.fnmatchcase(name, pattern):
            picked.append((name, record))
    found = await asyncio.gather(*(one(name, record) for name, record in picked))
    return [c for c in found if c is not None]


async def sequence_at(js: JetStreamContext, stream: str, when: datetime, first: int, last: int) -> int:
    """The first sequence of ``stream`` (between ``first`` and ``last``) stored at or after ``when``;
    ``last + 1`` when none is (a binary search)."""
    lo, hi = first, last + 1
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            msg = await guard_api(js, stream, js.get_msg(stream, seq=mid, subject=">", next=True))
        except nats.js.errors.NotFoundError:
            hi = mid
            continue
        seq = msg.seq or mid
        if msg.time is not None and msg.time >= when:
            hi = mid
        else:
            lo = seq + 1
    return lo


# ----------------------------------------------------------------- changing


def _refuse_if_running(group: GroupInfo, what: str) -> None:
    if group.running:
        where = "; ".join(
            f"{s.name} on {', '.join(r.where for r in s.running_on)}" for s in group.shards if s.running_on
        )
        raise GroupRunning(f"group {group.name!r} is running ({where}): stop it everywhere before you {what} it")


def _where(read: _Read, store: JetStreamCursorStore, name: str, cursors: SqlCursorStore | None, what: str) -> None:
    """Refuse to change group ``name`` anywhere but where its shard cursors are."""
    if cursors is None and name in read.sql:
        raise _sql_hint(store, name)
    if cursors is not None and name not in read.sql:
        raise Refused(
            f"group {name!r} keeps its shard cursors in namespace {store.namespace!r}, not in the SQL database:"
            f" {what} it without --cursors (admin: cursors=None); nothing written"
        )


async def reset_group(
    store: JetStreamCursorStore,
    name: str,
    stream: str,
    target: ResetTarget,
    *,
    execute: bool = False,
    skip_removed: bool = False,
    cursors: SqlCursorStore | None = None,
) -> ResetPlan:
    """Move every shard cursor of group ``name``'s current ``n`` to ``target`` in ``stream``; with
    ``execute`` only (else a dry run that checks the same). ``cursors``: the SQL store of a group
    that keeps its shard cursors there (``Parallel(..., cursors=URL)``; refused without it for such a
    group, and with it for a group whose cursors are in the bucket).

    Checked as :func:`set_cursor` is: the stream must exist, a position past its last sequence is
    refused, one before its first retained event only with ``skip_removed``, a cursor recorded in
    another stream is refused (:class:`Refused`). ``execute`` is refused while a shard of the group
    runs (:class:`GroupRunning`) and writes each record with ``stream``'s identity and an owner naming
    ``rjet group reset``: by compare-and-swap in the bucket, in one transaction in SQL; exact progress
    above the old cursors is dropped.
    """
    js = kv_names(store.kv).js
    now = await stream_now(js, stream, f"group {name!r} not reset")
    read = await _read(store, cursors)
    group = _info(read, name, now.last_seq)
    _where(read, store, name, cursors, "reset")
    if not group.shards:
        raise GroupNotFound(f"group {name!r}: no current shard count recorded; nothing to reset")
    if execute:
        _refuse_if_running(group, "reset")
    start = None
    if target.earliest:
        start = now.first_seq
    elif target.seq is not None:
        start = target.seq
    elif target.when is not None:
        start = await sequence_at(js, stream, target.when, now.first_seq, now.last_seq)
    sql = " --cursors URL" if cursors is not None else ""
    over = f"`rjet group delete {name} --namespace {store.namespace}{sql} --execute`, then run it on {now.name!r}"
    moves: list[CursorMove] = []
    notes: list[str] = []
    for s in group.shards:
        if cursors is not None:
            stored = read.snap.values.get(encode_key(s.name))
            recorded = CursorRecord.decode(stored).stream if stored is not None else None
        else:
            record, _ = await read_record(store.kv, s.name, store.bucket)
            recorded = record.stream if record else None
        recreated = check_stream(s.name, recorded, now, named=True, over=over)
        note = ""
        if target.latest:
            new = now.last_seq
        elif target.shift is not None:
            if recreated:
                raise Refused(
                    f"cursor {s.name!r} was recorded in {recorded}, an earlier stream {now.name!r} (deleted and"
                    f" created again since): shifting it means nothing in {now.identity}; nothing written (give a"
                    " position: --to-earliest, --to-seq, ...)"
                )
            new = min(max(0, s.cursor + target.shift), now.last_seq)
            if new < now.first_seq - 1 <= s.cursor:
                new = now.first_seq - 1  # replaying: stops at the first retained event, nothing skipped
            new, note = check_position(s.name, new, now, skip_removed=skip_removed, flag="--skip-removed")
        else:
            assert start is not None
            new, note = check_position(s.name, max(0, start - 1), now, skip_removed=skip_removed, flag="--skip-removed")
        notes += [n for n in (recreated, note) if n and n not in notes]
        moves.append(CursorMove(s.name, s.cursor, new))
    if execute:
        owner = tool_owner("rjet group reset")
        if cursors is not None:
            await write_sql(cursors, {move.name: _reset_row(move, now, owner, over) for move in moves})
        else:
            for move in moves:
                await write_record(store.kv, store.bucket, move.name, reset_to(move.name, move.new, now, owner, over))
    return ResetPlan(name, now.name, tuple(moves), tuple(notes), execute)


def _reset_row(
    move: CursorMove, now: StreamNow, owner: str, over: str
) -> Callable[[CursorRecord | None], CursorRecord]:
    """What ``rjet group reset`` writes over an SQL row, its stream checked again in the transaction."""

    def row(old: CursorRecord | None) -> CursorRecord:
        check_stream(move.name, old.stream if old else None, now, named=True, over=over)
        return CursorRecord(str(move.new) if move.new else "", now.identity, owner)

    return row


@dataclasses.dataclass(frozen=True, slots=True)
class DeletePlan:
    """What :func:`delete_group` deleted (``executed``) or would delete: the bucket's ``keys`` (shard
    cursors, group record, heartbeats, member leases) and the SQL database's ``rows`` (the shard
    cursors of a group that keeps them there, and its reshard mark ``_rjet.gen.<name>``)."""

    group: str
    keys: tuple[str, ...]
    rows: tuple[str, ...]
    executed: bool


async def delete_group(
    store: JetStreamCursorStore, name: str, *, execute: bool = False, cursors: SqlCursorStore | None = None
) -> DeletePlan:
    """The keys of group ``name``: its shard cursors (of every ``n``), group record, heartbeats and
    member leases; with ``cursors``, the SQL store of a group that keeps its shard cursors there, its
    rows there too (refused without it for such a group, and with it for a group whose cursors are in
    the bucket). Deleted with ``execute`` only (refused while a shard runs: :class:`GroupRunning`);
    the rows in one transaction. The next run of the group starts from the beginning."""
    read = await _read(store, cursors)
    group = _info(read, name, None)
    _where(read, store, name, cursors, "delete")
    if execute:
        _refuse_if_running(group, "delete")
    bucket = read.bucket  # the group's cursors in the bucket go too, those it left there before it moved included
    keys = [k for generation in bucket.generations().get(name, {}).values() for k in generation.values()]
    records = [k for k in bucket.values if is_group_record(k, name)]
    doomed = tuple(sorted(keys) + sorted(records))
    rows: tuple[str, ...] = ()
    if cursors is not None:
        found = await cursors.records(prefix=name + "_")
        found.update(await cursors.records(prefix=generation_key(name)))
        rows = tuple(sorted(r for r in found if r == generation_key(name) or _shard_of(r, name)))
    if execute:
        if rows:
            assert cursors is not None
            await write_sql(cursors, dict.fromkeys(rows, _gone))
        await asyncio.gather(*(guard_kv(store.kv, store.kv.purge(k), k) for k in doomed))
    return DeletePlan(name, doomed, rows, execute)


def _shard_of(row: str, name: str) -> bool:
    parsed = parse_shard_cursor(encode_key(row))
    return parsed is not None and parsed[0] == name


def _gone(old: CursorRecord | None) -> None:
    return None


async def prune_group(store: JetStreamCursorStore, name: str, *, execute: bool = False) -> tuple[str, ...]:
    """The keys of group ``name``'s expired member leases and stale heartbeats: what members that
    stopped without a clean shutdown (killed, their host lost) or with a stable id left behind. The
    group ignores them; views list them until they go (an elastic group's live members delete the
    leases once long expired: :func:`lease_removal_age`). Deleted with ``execute`` only, each after
    reading it again: one written again since (its member came back) is live and stays. Cursors and
    the group record are never touched; a running group need not stop."""
    snap = await snapshot(store)
    snap.group(name, None)  # GroupNotFound
    doomed = snap.expired_keys(name)
    if not execute:
        return tuple(doomed)

    async def drop(key: str) -> str | None:
        got = await get(store.kv, key)
        if got is None or not expired(key, got[0], time.time(), name):
            return None
        try:
            await guard_kv(store.kv, store.kv.delete(key, last=got[1]), key)
        except nats.js.errors.BadRequestError as e:
            if isinstance(e, nats.js.errors.KeyWrongLastSequenceError) or e.err_code in (10071, 10164):
                return None  # written again meanwhile: live
            raise
        return key

    return tuple(k for k in await asyncio.gather(*(drop(k) for k in doomed)) if k is not None)


async def set_cursor(
    store: JetStreamCursorStore | SqlCursorStore,
    name: str,
    to: str,
    *,
    stream: str | None = None,
    skip_removed: bool = False,
    js: JetStreamContext | None = None,
) -> CursorChange:
    """Move consumer ``name``'s cursor ``to`` a stream sequence (digits), ``first`` (before the
    stream's first retained event), ``last`` (after its last) or ``beginning`` (no cursor).

    ``store``: the namespace's bucket, or an :class:`rjet.sql.SqlCursorStore` (then ``js``, where the
    streams are, is needed). ``stream`` is the stream it counts in (needed for ``first`` and
    ``last``, and for a sequence when the record names none: :class:`NeedsStream`), else the one its
    record names. Refused with :class:`Refused`, nothing written: a stream that does not exist, a
    sequence past its last, one before its first retained event (unless ``skip_removed``), a cursor
    recorded in another stream. The write has an owner naming ``rjet cursor --set`` (a
    compare-and-swap in the bucket; in SQL, a transaction that holds the row and finds the stream it
    was checked against): a consumer still running stops with :class:`rjet.CursorConflict` naming it.
    """
    if to not in ("first", "last", "beginning") and not (to.isascii() and to.isdigit()):
        raise ConfigError(f"set_cursor: give a stream sequence, 'first', 'last' or 'beginning', not {to!r}")
    notes: list[str] = []
    owner = tool_owner("rjet cursor --set")
    if isinstance(store, JetStreamCursorStore):
        where = f"--namespace {store.namespace}"
        build = set_to(
            kv_names(store.kv).js, name, where, to, stream, skip_removed=skip_removed, owner=owner, notes=notes
        )
        old, new = await write_record(store.kv, store.bucket, name, build)
    else:
        if js is None:
            raise ConfigError("set_cursor: a cursor in an SQL store needs js, the JetStream context of its stream")
        build = set_to(js, name, "--cursors URL", to, stream, skip_removed=skip_removed, owner=owner, notes=notes)
        old, new = await write_sql_record(store, name, build)
    return CursorChange(name, old, new, tuple(notes))
