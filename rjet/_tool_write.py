"""How operator tools (``rjet cursor --set``, ``rjet group reset``) write a cursor record.

A tool's write keeps the promises a runner's writes keep:

- it names the stream the cursor counts in (``CursorRecord.stream``, the identity ``name@created``
  that the reader calls ``stream_id``), so a stream deleted and created again after the write
  raises :class:`rjet.StreamRecreated` instead of being read from the tool's sequence;
- the position is checked against that stream as it is now: the stream exists, the cursor is not
  past its last sequence (the consumer would stop with :class:`rjet.CursorAhead`), and one before
  its first retained event only when the caller accepts that the removed events are skipped;
- a cursor recorded in one stream is never moved "for" another (a sequence of one stream means
  nothing in another);
- it is a compare-and-swap on the revision it read, with an owner that names the tool, so a
  running consumer's next write fails and its :class:`rjet.CursorConflict` names the tool; a write
  whose answer was lost is settled by reading the record back (our owner and cursor: applied).

The same writes to an SQL store's rows (a group run with ``Parallel(..., cursors=URL)``, a consumer
of an :class:`rjet.sql.SqlCursorStore`) go through :meth:`rjet.sql.SqlCursorStore.rewrite`: one
transaction that holds the rows it reads, checks them again and writes the tool's owner into them, so a
running consumer's next transaction or flush finds the claim gone and its :class:`rjet.CursorConflict`
names the tool.

:mod:`rjet.parallel.admin` (``set_cursor``, ``reset_group``, ``delete_group``) is the public face of
these writes.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final

import nats.errors
import nats.js.errors
from nats.nuid import NUID

from rjet._nats.denials import guard_kv
from rjet.cursors import CursorRecord, encode_key
from rjet.errors import CursorError, CursorStoreError, RjetError, StreamNotFound
from rjet.reader import stream_identity as _identity
from rjet.stream import Stream

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

    from rjet.sql import SqlCursorStore

_STORE_ERRORS: Final = (nats.errors.Error, TimeoutError, OSError)
_NUID: Final = NUID()


class Refused(CursorError):
    """A tool refused to write a cursor (the message says why); nothing was written."""


class NeedsStream(Refused):
    """A sequence was given for a cursor whose record names no stream, and no stream was named."""


def tool_owner(tool: str) -> str:
    """The owner a tool writes into the records it writes: the tool's name, host, pid and a random
    part (a running consumer fenced by the write names it in its :class:`rjet.CursorConflict`)."""
    return f"{tool} ({socket.gethostname()}:{os.getpid()}:{_NUID.next().decode()[-10:]})"


def stream_name(identity: str) -> str:
    """The stream name of an identity ``name@created``."""
    name, at, _ = identity.rpartition("@")
    return name if at else identity


@dataclasses.dataclass(frozen=True, slots=True)
class StreamNow:
    """A stream as it is now: its name, identity (``name@created``) and retained sequences."""

    name: str
    identity: str
    first_seq: int
    last_seq: int


async def stream_now(js: JetStreamContext, name: str, what: str) -> StreamNow:
    """The stream ``name`` now; :class:`rjet.StreamNotFound` naming it and ``what`` was not done."""
    try:
        info = await Stream(js, name).info()
    except StreamNotFound as e:
        raise StreamNotFound(name, what) from e
    return StreamNow(info.config.name or name, _identity(info), info.state.first_seq, info.state.last_seq)


def check_stream(cursor: str, recorded: str | None, now: StreamNow, *, named: bool, over: str) -> str:
    """Whether a cursor recorded in ``recorded`` (an identity, None when unknown) may be set to a
    sequence of ``now``; ``named``: the caller named the stream itself (not read from the record).

    Refused when the record names another stream. When it names an earlier stream of the same name
    (deleted and created again), a sequence of the new one is taken only when the stream was named:
    the number may have been read from the old cursor. ``over``: how to start the consumer over on
    ``now`` instead. Returns a note for the caller's report ("" for none)."""
    if recorded is None or recorded == now.identity:
        return ""
    old = stream_name(recorded)
    if old != now.name:
        raise Refused(
            f"cursor {cursor!r} counts in stream {old!r} ({recorded}), not in {now.name!r}: a sequence of one"
            f" stream means nothing in another; nothing written (to start it over on {now.name!r}: {over})"
        )
    if not named:
        raise Refused(
            f"cursor {cursor!r} was recorded in stream {recorded}, but stream {now.name!r} now is {now.identity}"
            " (deleted and created again): a sequence of the old stream means nothing in the new one;"
            f" nothing written (name the stream, --stream {now.name}, to set a sequence of the new one)"
        )
    return f"stream {now.name!r} was created again since the cursor was written: it counts in {now.identity} now"


def check_position(cursor: str, n: int, now: StreamNow, *, skip_removed: bool, flag: str) -> tuple[int, str]:
    """The cursor to store for position ``n`` of ``now``, and a note ("" for none).

    ``n`` past the stream's last sequence is refused; one before its first retained event only with
    ``skip_removed`` (then the cursor is the sequence before the first retained event, and the note
    says which events are skipped); ``flag`` names the option that sets it."""
    if n < 0:
        raise Refused(f"cursor {cursor!r}: {n} is not a stream sequence; nothing written")
    if n > now.last_seq:
        raise Refused(
            f"cursor {cursor!r}: {n} is past the last sequence of stream {now.name!r} ({now.last_seq}): the"
            " consumer would stop with CursorAhead; nothing written"
        )
    before = now.first_seq - 1
    if n >= before:
        return n, ""
    gone = (
        f"events {n + 1}..{before} were removed from stream {now.name!r} (its first retained sequence is"
        f" {now.first_seq})"
    )
    if not skip_removed:
        raise Refused(
            f"cursor {cursor!r}: {gone}: they cannot be handled; nothing written (add {flag} to set the cursor"
            f" to {before} and skip them, or go on from the first retained event)"
        )
    return before, f"{gone}: skipped"


async def read_record(kv: KeyValue, name: str, bucket: str) -> tuple[CursorRecord | None, int]:
    """(record, revision) of cursor ``name``: (None, 0) when it has none, (None, r) for a delete
    marker at revision r (what a write that creates the key names)."""
    try:
        entry = await guard_kv(kv, kv.get(encode_key(name)))  # a refused read is named at once
    except nats.js.errors.KeyNotFoundError as e:
        marker = getattr(getattr(e, "entry", None), "revision", None)
        return None, marker or 0
    except _STORE_ERRORS as e:
        raise CursorStoreError(f"cursor bucket {bucket!r}: cannot read cursor {name!r}: {e!r}") from e
    assert entry.revision is not None
    return CursorRecord.decode(entry.value or b""), entry.revision


Build = Callable[[CursorRecord | None], Awaitable[CursorRecord]]
"""What a tool writes over the record it read (None: none), checked anew each time it is read."""


def set_to(
    js: JetStreamContext,
    name: str,
    where: str,
    value: str,
    stream: str | None,
    *,
    skip_removed: bool,
    owner: str,
    notes: list[str],
) -> Build:
    """What ``rjet cursor --set value`` writes: ``value`` is a stream sequence, ``first``, ``last`` or
    ``beginning``; ``stream`` the stream named by the caller (else the one the record names);
    ``where`` the option that names its store (``--namespace NS``, ``--cursors URL``), for messages.
    ``notes`` gets what the caller should be told (the last build's)."""

    async def build(old: CursorRecord | None) -> CursorRecord:
        notes.clear()
        recorded = old.stream if old is not None else None
        target = stream or (stream_name(recorded) if recorded else None)
        if value == "beginning":  # an empty cursor counts in no stream: it may start the consumer over on another
            if target is None:
                return CursorRecord("", None, owner)
            try:
                return CursorRecord("", (await stream_now(js, target, f"cursor {name!r} not moved")).identity, owner)
            except StreamNotFound:
                if stream is not None:
                    raise
                return CursorRecord("", None, owner)  # the recorded stream is gone: nothing to name
        if target is None:
            raise NeedsStream(
                f"--set {value} needs --stream: cursor {name!r} records no stream it counts in, and a sequence"
                " means nothing without one"
            )
        now = await stream_now(js, target, f"cursor {name!r} not moved")
        over = f"`rjet cursor {name} {where} --set beginning --stream {now.name}`"
        notes.append(check_stream(name, recorded, now, named=stream is not None, over=over))
        if value == "first":
            n = max(now.first_seq - 1, 0)
        elif value == "last":
            n = now.last_seq
        else:
            n, skipped = check_position(name, int(value), now, skip_removed=skip_removed, flag="--skip-removed")
            notes.append(skipped)
        notes[:] = [note for note in notes if note]
        return CursorRecord(str(n), now.identity, owner)

    return build


def reset_to(shard: str, new: int, now: StreamNow, owner: str, over: str) -> Build:
    """What ``rjet group reset`` writes over shard ``shard``'s record (its stream checked again as written)."""

    async def build(old: CursorRecord | None) -> CursorRecord:
        check_stream(shard, old.stream if old else None, now, named=True, over=over)
        return CursorRecord(str(new) if new else "", now.identity, owner)

    return build


async def write_record(
    kv: KeyValue, bucket: str, name: str, build: Build, *, tries: int = 10
) -> tuple[CursorRecord | None, CursorRecord]:
    """Replace cursor ``name``'s record with ``await build(old)`` (``old``: the record read, None when
    none) by a compare-and-swap on the revision read; ``build`` checks and may raise. Read, built and
    written again when another writer changed it in between. A write that failed or whose answer was
    lost is settled by reading back: the record built (its owner names this write) means applied.
    Returns (old, new)."""
    key = encode_key(name)
    for _ in range(tries):
        old, rev = await read_record(kv, name, bucket)
        new = await build(old)
        try:
            await guard_kv(kv, kv.update(key, new.encode(), last=rev), key)  # refused: not applied, raised
            return old, new
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # written by another meanwhile (a running consumer, another tool): read again
        except _STORE_ERRORS as e:
            back, back_rev = await read_record(kv, name, bucket)
            if back == new:
                return old, new  # ours: applied, its answer lost
            if back_rev == rev:
                raise CursorStoreError(
                    f"cursor bucket {bucket!r}: cannot write cursor {name!r}: {e!r}; nothing written"
                ) from e
    raise Refused(
        f"cursor {name!r} in bucket {bucket!r} changed {tries} times in a row while it was written: is a"
        " consumer running it? Stop it and try again; nothing written"
    )


class _Moved(RjetError):
    """The row changed between the read a tool built its write on and the transaction (retried)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"cursor {name!r} changed while it was written")
        self.name = name


def _none_if_empty(record: CursorRecord | None) -> CursorRecord | None:
    """An empty row (no cursor, stream, owner or done: a claim's fresh row, or the one
    :meth:`rjet.sql.SqlCursorStore.rewrite` makes to hold the name) is no record."""
    return None if record == CursorRecord() else record


async def write_sql(
    store: SqlCursorStore, changes: Mapping[str, Callable[[CursorRecord | None], CursorRecord | None]]
) -> dict[str, CursorRecord | None]:
    """Replace each row ``name`` of ``changes`` with ``changes[name](old)`` (``old``: the row as read
    in the transaction, None when none; a None result deletes the row), all in one transaction that
    holds the rows; a change may raise (nothing is written). A transaction whose answer was lost is
    settled by reading the rows back: what was written (its owner names this write) means applied.
    Returns the rows as they were."""
    names = sorted(changes)
    before: dict[str, CursorRecord | None] = {}
    after: dict[str, CursorRecord | None] = {}

    def change(rows: dict[str, CursorRecord]) -> dict[str, CursorRecord | None]:
        before.clear()
        after.clear()
        for name in names:
            before[name] = _none_if_empty(rows.get(name))
            after[name] = changes[name](before[name])
        return dict(after)

    try:
        await store.rewrite(names, change)
    except CursorStoreError:
        if not after:
            raise
        back = {name: await store.peek_record(name) for name in names}
        if any(not _same(back[name], after[name]) for name in names):
            raise
    return before


def _same(stored: CursorRecord | None, written: CursorRecord | None) -> bool:
    if stored is None or written is None:
        return stored is written
    return (stored.cursor, stored.stream, stored.owner) == (written.cursor, written.stream, written.owner)


async def write_sql_record(
    store: SqlCursorStore, name: str, build: Build, *, tries: int = 10
) -> tuple[CursorRecord | None, CursorRecord]:
    """:func:`write_record` for a row of an SQL store: ``await build(old)`` is written in a
    transaction that finds the row naming the stream ``build`` was checked against (else it is read,
    built and written again: another writer named another stream meanwhile). A running consumer's
    progress does not count as a change: the tool's row replaces it, and fences the consumer.
    Returns (old, new)."""
    for _ in range(tries):
        seen = _none_if_empty(await store.peek_record(name))
        new = await build(seen)

        def checked(
            old: CursorRecord | None, seen: CursorRecord | None = seen, new: CursorRecord = new
        ) -> CursorRecord:
            if (old.stream if old else None) != (seen.stream if seen else None):
                raise _Moved(name)
            return new

        try:
            before = await write_sql(store, {name: checked})
        except _Moved:
            continue
        return before[name], new
    raise Refused(
        f"cursor {name!r} in {store.backend.kind} cursor store at {store.backend.where} named another stream"
        f" {tries} times in a row while it was written: is another tool moving it? Nothing written"
    )
