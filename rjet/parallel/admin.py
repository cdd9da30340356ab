"""Look at and change what consumers and :class:`rjet.parallel.Parallel` groups keep in a cursor
namespace: cursors, groups, their shards, heartbeats and elastic members; reset or delete a group,
remove what its dead members left (prune), move one cursor. ``rjet group``, ``rjet status`` and
``rjet cursor`` are views over these functions.

Every function reads the namespace's bucket once (one listing, then its values) and derives what it
returns from that one read, so the views agree: a heartbeat or lease is live by one rule (younger
than the TTL its writer stored, 10 s for one that stored none; wall clocks of writer and reader are
compared), a shard *runs* while one of its heartbeats is live, and a member *runs* the shards whose
live heartbeats name it. Reading never writes: running consumers and groups are not disturbed.

::

    from rjet.parallel import admin

    store = await admin.open_namespace(js, "shop")  # admin.NamespaceNotFound when it has no bucket
    for group in await admin.list_groups(store):
        print(group.name, group.n, group.running, [m.member for m in group.live_members])
    orders = await admin.stream_state(js, "orders")
    billing = await admin.describe_group(store, "billing", stream=orders)
    for shard in billing.shards:
        print(shard.name, shard.cursor, shard.lag_events, [r.where for r in shard.running_on])
    plan = await admin.reset_group(store, "billing", "orders", admin.ResetTarget(shift=-1000))  # a dry run
    print([(move.name, move.old, move.new) for move in plan.moves])
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
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
)
from rjet.cursors import CursorRecord, JetStreamCursorStore, decode_key, encode_key
from rjet.errors import ConfigError
from rjet.parallel._errors import GroupNotFound, GroupRunning, NamespaceNotFound
from rjet.parallel._keys import DEFAULT_TTL, PREFIX, get, is_group_record
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

    from rjet.sql import SqlCursorStore

__all__ = [
    "DEFAULT_TTL", "ConsumerInfo", "CursorChange", "CursorMove", "GroupInfo", "GroupNotFound", "GroupRunning",
    "MemberInfo", "NamespaceNotFound", "NeedsStream", "Refused", "ResetPlan", "ResetTarget", "RunnerInfo",
    "ShardInfo", "StreamState", "consumers", "delete_group", "describe_group", "done_count", "heartbeats",
    "list_groups", "members", "namespaces", "open_namespace", "prune_group", "reset_group", "sequence_at", "set_cursor",
    "stream_state",
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
    return snap.members(snap.runners(), group)


async def list_groups(store: JetStreamCursorStore, *, cursors: SqlCursorStore | None = None) -> list[GroupInfo]:
    """Every group with shard cursors or member leases in the namespace (without lag), by name.
    ``cursors``: the SQL store of groups that keep their shard cursors there (``Parallel(...,
    cursors=URL)``), read instead of the bucket's cursors (so for every other view below)."""
    snap = await sql_snapshot(store, cursors)
    return [snap.group(name, None) for name in snap.group_names()]


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
    snap = await sql_snapshot(store, cursors)
    if cursors is None and in_sql(snap, name):
        raise GroupNotFound(
            f"group {name!r} keeps its shard cursors in an SQL database, not in namespace {store.namespace!r}:"
            " give its URL (--cursors URL; admin: cursors=SqlCursorStore)"
        )
    return snap.group(name, None if stream is None else stream.last_seq)


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
    snap = await sql_snapshot(store, cursors)
    runners = snap.runners()
    js = kv_names(store.kv).js
    bucket = store.bucket

    async def one(name: str, record: CursorRecord) -> ConsumerInfo | None:
        value = record.cursor
        if value and not (value.isascii() and value.isdigit()):
            return None  # not a cursor: someone else's key
        cursor = int(value or 0)
        written = None
        if cursors is None:
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


async def reset_group(
    store: JetStreamCursorStore,
    name: str,
    stream: str,
    target: ResetTarget,
    *,
    execute: bool = False,
    skip_removed: bool = False,
) -> ResetPlan:
    """Move every shard cursor of group ``name``'s current ``n`` to ``target`` in ``stream``; with
    ``execute`` only (else a dry run that checks the same).

    Checked as :func:`set_cursor` is: the stream must exist, a position past its last sequence is
    refused, one before its first retained event only with ``skip_removed``, a cursor recorded in
    another stream is refused (:class:`Refused`). ``execute`` is refused while a shard of the group
    runs (:class:`GroupRunning`) and writes each record by compare-and-swap, with ``stream``'s
    identity and an owner naming ``rjet group reset``; exact progress above the old cursors is dropped.
    """
    js = kv_names(store.kv).js
    now = await stream_now(js, stream, f"group {name!r} not reset")
    group = (await snapshot(store)).group(name, now.last_seq)
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
    over = f"`rjet group delete {name} --namespace {store.namespace} --execute`, then run it on {now.name!r}"
    moves: list[CursorMove] = []
    notes: list[str] = []
    for s in group.shards:
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
        for move in moves:
            await write_record(store.kv, store.bucket, move.name, reset_to(move.name, move.new, now, owner, over))
    return ResetPlan(name, now.name, tuple(moves), tuple(notes), execute)


async def delete_group(store: JetStreamCursorStore, name: str, *, execute: bool = False) -> tuple[str, ...]:
    """The keys of group ``name``: its shard cursors (of every ``n``), group record, heartbeats and
    member leases; purged with ``execute`` only (refused while a shard runs: :class:`GroupRunning`).
    The next run of the group starts from the beginning."""
    snap = await snapshot(store)
    group = snap.group(name, None)
    if execute:
        _refuse_if_running(group, "delete")
    cursors = [k for generation in snap.generations().get(name, {}).values() for k in generation.values()]
    records = [k for k in snap.values if is_group_record(k, name)]
    doomed = tuple(sorted(cursors) + sorted(records))
    if execute:
        await asyncio.gather(*(guard_kv(store.kv, store.kv.purge(k), k) for k in doomed))
    return doomed


async def prune_group(store: JetStreamCursorStore, name: str, *, execute: bool = False) -> tuple[str, ...]:
    """The keys of group ``name``'s expired member leases and stale heartbeats: what members that
    stopped without a clean shutdown (killed, their host lost) or with a stable id left behind. The
    group ignores them; views list them until they go. Deleted with ``execute`` only, each after
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
    store: JetStreamCursorStore, name: str, to: str, *, stream: str | None = None, skip_removed: bool = False
) -> CursorChange:
    """Move consumer ``name``'s cursor ``to`` a stream sequence (digits), ``first`` (before the
    stream's first retained event), ``last`` (after its last) or ``beginning`` (no cursor).

    ``stream`` is the stream it counts in (needed for ``first`` and ``last``, and for a sequence when
    the record names none: :class:`NeedsStream`), else the one its record names. Refused with
    :class:`Refused`, nothing written: a stream that does not exist, a sequence past its last, one
    before its first retained event (unless ``skip_removed``), a cursor recorded in another stream.
    The write is a compare-and-swap with an owner naming ``rjet cursor --set``: a consumer still
    running stops with :class:`rjet.CursorConflict` naming it.
    """
    if to not in ("first", "last", "beginning") and not (to.isascii() and to.isdigit()):
        raise ConfigError(f"set_cursor: give a stream sequence, 'first', 'last' or 'beginning', not {to!r}")
    notes: list[str] = []
    owner = tool_owner("rjet cursor --set")
    build = set_to(
        kv_names(store.kv).js, name, store.namespace, to, stream, skip_removed=skip_removed, owner=owner, notes=notes
    )
    old, new = await write_record(store.kv, store.bucket, name, build)
    return CursorChange(name, old, new, tuple(notes))
