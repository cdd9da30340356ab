"""SqlCursorStore: cursors in the application's own database, and transactions that commit a
handler's effects together with the event's progress (exactly-once effects)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self, cast

from rjet._progress import decode_done, encode_done
from rjet.cursors import RESERVED_PREFIX, Capabilities, CursorRecord, ProgressSource, runner_id
from rjet.errors import ConfigError, CursorBucketGone, CursorConflict, CursorStoreError, RjetError
from rjet.sql._backends import Backend, Outcome, Progress, Step, backend_for, store_error, url_for_tools
from rjet.sql._schema import migrate

__all__ = ["SqlClaim", "SqlCursorStore"]

log = logging.getLogger("rjet.sql")

_ROW: Final = "SELECT cursor, done, stream, owner FROM rjet_cursors WHERE name = ?"
# A flush never moves a cursor back: a transaction of a newer event may have committed meanwhile.
_ADVANCE: Final = (
    "UPDATE rjet_cursors SET done = CASE WHEN cursor IS NULL OR cursor <= ? THEN ? ELSE done END,"
    " cursor = CASE WHEN cursor IS NULL OR cursor <= ? THEN ? ELSE cursor END,"
    " stream = COALESCE(?, stream) WHERE name = ? AND owner = ?"
)


def _text(cursor: int | None) -> str:
    return "" if cursor is None or cursor == 0 else str(cursor)


def _like(prefix: str) -> str:
    """A LIKE pattern (escape ``!``) for the names that start with ``prefix``."""
    return prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


async def _committed_above(b: Backend, conn: Any, name: str, cursor: int | None) -> set[int]:
    """The events of cursor ``name`` that handler transactions committed above ``cursor`` (rjet_done)."""
    rows = await b.fetchall(conn, "SELECT seq FROM rjet_done WHERE name = ? AND seq > ?", (name, cursor or 0))
    return {int(r[0]) for r in rows}


def _merged(cursor: int | None, done: str, committed: set[int]) -> str | None:
    """The done set of a row (its ``done`` text) with the ``rjet_done`` rows above its cursor, encoded."""
    base = cursor or 0
    merged = (set(decode_done(base, done)) | committed) if (done or committed) else set()
    return encode_done(base, merged) or None


class SqlCursorStore:
    """A :class:`rjet.cursors.ClaimingCursorStore` in SQLite or PostgreSQL, and the only store that
    can run a ``Consumer(..., transactional=True)``: its handler ``fn(fate, event, tx)`` gets ``tx``,
    the driver's own connection inside an open transaction, and the event's progress is written in
    that same transaction, fenced by the claim. A crash can neither lose an event nor apply it twice.

    ::

        async with await rjet.sql.SqlCursorStore.open("sqlite:///app.db") as cursors:
            async def bill(fate, event, tx):
                await tx.execute("INSERT INTO bills (id) VALUES (?)", (event.id,))

            consumer = rjet.Consumer("billing", bill, transactional=True)
            await rjet.run(rjet.Spec(stream.stream, cursors, consumer))

    URLs: ``sqlite:///PATH`` (the standard library's sqlite3 through aiosqlite; WAL,
    ``synchronous=FULL``; a handler may also be a plain ``def fn(fate, event, tx)`` there, ``tx`` a
    ``sqlite3.Connection``, its whole transaction run in one call: at concurrency 1 on the event
    loop's thread, as any sync handler, else on the connection's own thread),
    ``postgresql://user:pw@host/db`` (psycopg 3, ``pip install 'rjet[postgres]'``;
    ``idle_in_transaction_session_timeout`` 30 s unless set: ``rjet/sql/_backends.py``; with
    ``?pipeline=on`` a handler's transaction takes one round trip in psycopg's pipeline mode, where
    ``rowcount`` right after ``execute`` is -1 and a statement's error comes later: the README's
    "Exactly-once effects").
    The tables (``rjet_schema``, ``rjet_cursors``, ``rjet_done``; see ``rjet/sql/_schema.py``) are
    created when absent and migrated from older versions. ``pool_size`` bounds the connections
    (one per transaction in flight: at least a consumer's ``concurrency``); a pooled one the server
    ended meanwhile is dropped, not handed out. ``set_cursor`` through a claim is buffered and
    written every ``flush_interval`` seconds and on :meth:`close`.
    """

    def __init__(self, backend: Backend, *, flush_interval: float = 1.0, pool_size: int = 16) -> None:
        if flush_interval < 0:
            raise ConfigError(f"flush_interval must be >= 0, not {flush_interval}")
        if type(pool_size) is not int or pool_size < 1:
            raise ConfigError(f"pool_size must be an int >= 1, not {pool_size!r}")
        self.backend = backend
        # SQLite runs a sync handler's transaction on its connection's thread; PostgreSQL's tx is awaited.
        self.capabilities: Final = Capabilities(
            fencing=True, exact_progress=True, transactional=True, sync_transactional=backend.sync_transactions
        )
        self.flush_interval = flush_interval
        self.cursors_url: str | None = None
        """The store's URL without its password (a SQLite path absolute), as ``rjet cursor --cursors``
        takes it: ``run`` puts it in the cursor errors it raises, for the command line's hint."""
        self._errors = backend.errors()
        self._idle: list[Any] = []
        # Connections being closed after a failure, each by a task of the store's own, which close()
        # waits for: the closing goes on when the caller is cancelled (again and again, as the keyed
        # scheduler's workers are), where it would leave the connection open with work queued.
        self._closing: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(pool_size)
        # SQLite's one writer: handler transactions that may be in flight together (concurrency > 1,
        # batches) begin one after the other, each as soon as the last ended. Left to SQLite's busy
        # handler they would poll for the file's write lock, sleeping 1, 2, 5, 10... ms between tries
        # while the lock stood free (K=16 ran at 0.70-0.78x K=1). One at a time, a consumer's next
        # transaction queues behind its last on the connection (see SqlClaim.transact) and takes no turn.
        self._turns = asyncio.Lock() if backend.one_writer else None
        self._claims: dict[str, SqlClaim] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._written: dict[str, str] = {}  # name -> the cursor last read by a claim or written
        self.flushes = 0
        """Cursor writes by flushes so far (as :attr:`rjet.JetStreamCursorStore.flushes`)."""

    @classmethod
    async def open(cls, url: str, *, flush_interval: float = 1.0, pool_size: int = 16) -> Self:
        """Connect to ``url`` and create (or migrate) the tables; errors name the database."""
        store = cls(backend_for(url), flush_interval=flush_interval, pool_size=pool_size)
        store.cursors_url = url_for_tools(url)
        async with store._connection("open the database") as conn:
            await migrate(store.backend, conn)
        return store

    # ----------------------------------------------------------------- connections

    @contextlib.asynccontextmanager
    async def _connection(self, what: str, *, handler: bool = False) -> AsyncIterator[Any]:
        """A pooled connection (for a handler's transaction, or else for rjet's own statements); one
        that failed is closed, not pooled again."""
        conn = await self._take(what, handler=handler)
        ok = False
        try:
            yield conn
            ok = True
        finally:
            await self._give(conn, ok=ok)

    async def _take(self, what: str | Progress, *, handler: bool = False) -> Any:
        """:meth:`_connection`'s connection, held until :meth:`_give` (a handler's transaction takes
        it this way: no context manager to make per transaction). ``what`` (a handler's
        :class:`Progress`: its message made only when needed) names it in errors."""
        if self._closed:
            raise self._closed_error()
        await self._slots.acquire()
        try:
            conn = None
            while self._idle and conn is None:
                conn = self._idle.pop()
                # The server ended it (a restart): not one failed run each.
                if not self.backend.usable(conn) or not (handler or await self.backend.plain(conn)):
                    with contextlib.suppress(Exception):
                        await self.backend.close(conn)
                    conn = None
            if conn is None:
                try:
                    conn = await self.backend.connect()
                except self._errors as e:
                    doing = f"handle events {what.span}" if isinstance(what, Progress) else what
                    raise store_error(self.backend, f"cannot {doing}", e) from e
        except BaseException:
            self._slots.release()
            raise
        return conn

    async def _give(self, conn: Any, *, ok: bool) -> None:
        """Pool ``conn`` again (``ok``), or close it: one that failed is not pooled again."""
        try:
            if ok and not self._closed:
                self._idle.append(conn)
            else:
                closing = asyncio.ensure_future(self._close_quietly(conn))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
                await asyncio.shield(closing)
        finally:
            self._slots.release()

    async def _close_quietly(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            await self.backend.close(conn)

    async def _run(self, what: str, work: Callable[[Any], Awaitable[Any]]) -> Any:
        """``work(conn)`` in a transaction of its own; driver errors as :class:`rjet.CursorStoreError`."""
        b = self.backend
        try:
            async with self._connection(what) as conn:
                await b.begin(conn)
                try:
                    result = await work(conn)
                    await b.commit(conn)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await b.rollback(conn)
                    raise
                return result
        except self._errors as e:
            raise store_error(b, f"cannot {what}", e) from e

    # ----------------------------------------------------------------- CursorStore

    async def get_cursor(self, name: str) -> str:
        """The cursor for ``name`` ("" when none), without claiming it."""
        row = await self._run(f"read cursor {name!r}", lambda c: self.backend.fetchall(c, _ROW, (name,)))
        return _text(row[0][0]) if row else ""

    async def set_cursor(self, name: str, cursor: str) -> None:
        """Write ``cursor`` for ``name`` now, without a claim (a running consumer of it is fenced)."""
        value = int(cursor) if cursor else None

        async def work(conn: Any) -> None:
            b = self.backend
            if not await b.execute(
                conn, "UPDATE rjet_cursors SET cursor = ?, done = '', owner = NULL WHERE name = ?", (value, name)
            ):
                await b.execute(conn, "INSERT INTO rjet_cursors (name, cursor) VALUES (?, ?)", (name, value))
            await b.execute(conn, "DELETE FROM rjet_done WHERE name = ?", (name,))

        await self._run(f"write cursor {name!r}", work)

    async def flush(self) -> None:
        """Write what every claim has buffered."""
        for claim in list(self._claims.values()):
            await claim.flush()

    async def peek(self, name: str) -> str:
        """The stored cursor for ``name`` ("" when none)."""
        return await self.get_cursor(name)

    async def peek_record(self, name: str) -> CursorRecord | None:
        """The stored row of ``name`` as a :class:`rjet.CursorRecord` (its ``done`` with the events a
        transactional consumer committed above the cursor), without claiming it; None when none."""
        return (await self.records(prefix=name)).get(name)

    async def records(self, *, prefix: str = "") -> dict[str, CursorRecord]:
        """Every stored cursor whose name starts with ``prefix``, by name, as :class:`rjet.CursorRecord`
        (cursor, stream, owner, and ``done``: the exact progress above the cursor, ``rjet_done``'s rows
        included), without claiming any. Names under rjet's reserved prefix (``_rjet.``) are left out
        unless ``prefix`` is one of them."""

        async def work(conn: Any) -> dict[str, CursorRecord]:
            b = self.backend
            rows = await b.fetchall(
                conn, "SELECT name, cursor, done, stream, owner FROM rjet_cursors WHERE name LIKE ? ESCAPE '!'",
                (_like(prefix),),
            )  # fmt: skip
            committed: dict[str, set[int]] = {}
            for name, seq in await b.fetchall(
                conn,
                "SELECT d.name, d.seq FROM rjet_done d JOIN rjet_cursors c ON c.name = d.name"
                " WHERE d.name LIKE ? ESCAPE '!' AND d.seq > COALESCE(c.cursor, 0)",
                (_like(prefix),),
            ):
                committed.setdefault(name, set()).add(int(seq))
            return {
                name: CursorRecord(_text(c), stream, owner, _merged(c, done or "", committed.get(name, set())))
                for name, c, done, stream, owner in rows
                if name.startswith(prefix)  # SQLite's LIKE ignores case
                and (prefix.startswith(RESERVED_PREFIX) or not name.startswith(RESERVED_PREFIX))
            }

        found: dict[str, CursorRecord] = await self._run("list cursors", work)
        return found

    async def cursors(self) -> dict[str, str]:
        """Every stored cursor, by name, without claiming any (as :meth:`rjet.JetStreamCursorStore.cursors`)."""
        return {name: record.cursor for name, record in (await self.records()).items()}

    def last_written(self, name: str) -> str | None:
        """The cursor this store last read (claiming it) or wrote for ``name`` (None: neither)."""
        return self._written.get(name)

    async def rewrite(
        self,
        prefixes: Sequence[str],
        change: Callable[[dict[str, CursorRecord]], Mapping[str, CursorRecord | None]],
    ) -> dict[str, CursorRecord]:
        """Change several cursors at once, in one transaction that holds them: read every row whose
        name starts with one of ``prefixes`` (as :meth:`records` reads them, reserved names included;
        the first prefix is made a row when none starts with it, so that two callers take turns), call
        ``change(rows)``, and write what it returns: each name's new cursor, ``done`` (the whole exact
        progress above it: events committed above the old cursor that it leaves out count as not
        handled), stream and owner (None clears it: whoever held the claim is fenced, and the next
        claim takes it), a row made where there is none; None for a name deletes its row. Returns what
        was read. What ``Parallel`` reshards a group with, and the operator's tools move and delete
        cursors with (``rjet.parallel.admin``)."""
        b = self.backend
        lock = " FOR UPDATE" if b.kind == "postgresql" else ""  # SQLite: BEGIN IMMEDIATE holds the file

        async def work(conn: Any) -> dict[str, CursorRecord]:
            await b.execute(conn, "INSERT INTO rjet_cursors (name) VALUES (?) ON CONFLICT DO NOTHING", (prefixes[0],))
            where = " OR ".join("name LIKE ? ESCAPE '!'" for _ in prefixes)
            rows = await b.fetchall(
                conn, f"SELECT name, cursor, done, stream, owner FROM rjet_cursors WHERE {where}{lock}",
                [_like(p) for p in prefixes],
            )  # fmt: skip
            read: dict[str, CursorRecord] = {}
            for name, cursor, done, stream, owner in rows:
                if not name.startswith(tuple(prefixes)):  # SQLite's LIKE ignores case
                    continue
                merged = _merged(cursor, done or "", await _committed_above(b, conn, name, cursor))
                read[name] = CursorRecord(_text(cursor), stream, owner, merged)
            for name, record in change(dict(read)).items():
                if record is None:
                    await b.execute(conn, "DELETE FROM rjet_cursors WHERE name = ?", (name,))
                    await b.execute(conn, "DELETE FROM rjet_done WHERE name = ?", (name,))
                    continue
                value = int(record.cursor) if record.cursor else None
                params = (value, record.done or "", record.stream, record.owner, name)
                if not await b.execute(
                    conn, "UPDATE rjet_cursors SET cursor = ?, done = ?, stream = ?, owner = ? WHERE name = ?", params
                ):
                    await b.execute(
                        conn, "INSERT INTO rjet_cursors (cursor, done, stream, owner, name) VALUES (?, ?, ?, ?, ?)",
                        params,
                    )  # fmt: skip
                # What was committed above the old cursor was read into the rows: the record's done is
                # the whole of it that stays (a cursor moved back forgets what was done above it).
                await b.execute(conn, "DELETE FROM rjet_done WHERE name = ?", (name,))
            return read

        read: dict[str, CursorRecord] = await self._run("rewrite cursors", work)
        return read

    # ----------------------------------------------------------------- claims

    async def claim(self, name: str, *, owner: str | None = None, after: str | None = None) -> SqlClaim:
        """Claim ``name`` (see :meth:`rjet.cursors.ClaimingCursorStore.claim`): the row is written with
        ``owner`` in one transaction that read it; events committed above the watermark come back as
        the claim's ``done``."""
        me = owner or runner_id()
        b = self.backend
        lock = " FOR UPDATE" if b.kind == "postgresql" else ""

        async def work(conn: Any) -> tuple[int | None, str, str | None, set[int]]:
            rows = await b.fetchall(conn, _ROW + lock, (name,))
            if after is not None:
                if not rows:
                    raise self._vanished(name, None, None)
                if rows[0][3] != after:
                    raise CursorConflict(
                        name,
                        f"another runner claimed it in {b.kind} cursor store at {b.where} while this one was"
                        f" between runs (owner {rows[0][3] or 'unknown: a write without a claim'}): two runners"
                        " share this consumer name; this one stops",
                    )
            if rows:
                cursor, done, stream = rows[0][0], rows[0][1] or "", rows[0][2]
                await b.execute(conn, "UPDATE rjet_cursors SET owner = ? WHERE name = ?", (me, name))
            else:
                cursor, done, stream = None, "", None
                await b.execute(conn, "INSERT INTO rjet_cursors (name, owner) VALUES (?, ?)", (name, me))
            return cursor, done, stream, await _committed_above(b, conn, name, cursor)

        async def read_back(conn: Any) -> tuple[int | None, str, str | None, set[int]] | None:
            rows = await b.fetchall(conn, _ROW + lock, (name,))
            if not rows or rows[0][3] != me:
                return None
            cursor = rows[0][0]
            return cursor, rows[0][1] or "", rows[0][2], await _committed_above(b, conn, name, cursor)

        try:
            cursor, done, stream, committed = await self._run(f"claim cursor {name!r}", work)
        except CursorStoreError:
            # Applied or not? The row says: ours when it carries this runner's identity (written by
            # this attempt, or by an earlier run of the same runner). Read as the claim reads it: the
            # events committed above the cursor (rjet_done) are done too, or they would run again.
            state = await self._run(f"read cursor {name!r}", read_back)
            if state is None:
                raise
            cursor, done, stream, committed = state
        base = cursor or 0
        merged = (set(decode_done(base, done)) | committed) if (done or committed) else set()
        claim = SqlClaim(self, name, me, _text(cursor), encode_done(base, merged) or None, stream)
        old = self._claims.get(name)
        if old is not None:
            old.lose(CursorConflict(name, f"another runner claimed it through the same store (owner {me})"))
        self._claims[name] = claim
        self._written[name] = claim.cursor
        return claim

    def _vanished(self, name: str, cursor: str | None, stream: str | None) -> CursorBucketGone:
        b = self.backend
        return CursorBucketGone(
            f"{b.kind} cursor store at {b.where}: cursor {name!r}"
            f"{f' (its last cursor here: {cursor})' if cursor else ''} vanished while this runner held it (its"
            " row deleted); no other runner was seen; this runner stops rather than start over from the"
            " stream's beginning",
            name=name,
            bucket=b.where,
            cursor=cursor or "",
            stream=stream,
        )

    async def _why_not_mine(self, claim: SqlClaim) -> RjetError:
        """Why ``claim``'s row is not its own any more: another owner, or no row."""
        return (await self._why_fenced(claim))[0]

    async def _why_fenced(
        self, claim: SqlClaim, handled: int | None = None, recorded: Sequence[int] = ()
    ) -> tuple[RjetError, bool]:
        """Why a write of ``claim``'s found its row not its own, and whether that loses the claim: another
        owner or no row (lost); or, the row still its own, ``handled`` (a one-at-a-time transaction's
        event) at or below its cursor already (not lost: nothing committed), or one of ``recorded`` (a
        transaction's events recorded one by one) done already (lost: the database's progress is ahead
        of the run's, which the next claim reads)."""
        b = self.backend

        async def read(conn: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            rows = await b.fetchall(conn, _ROW, (claim.name,))
            if not recorded or not rows or rows[0][3] != claim.owner:
                return rows, []
            done = await b.fetchall(
                conn,
                "SELECT seq FROM rjet_done WHERE name = ? AND seq >= ? AND seq <= ?",
                (claim.name, min(recorded), max(recorded)),
            )
            return rows, done

        rows, done = await self._run(f"read cursor {claim.name!r}", read)
        if not rows:
            return self._vanished(claim.name, claim.written, claim.stream), True
        if handled is not None and rows[0][3] == claim.owner:
            return CursorStoreError(
                f"{b.kind} cursor store at {b.where}: cursor {claim.name!r} is at {rows[0][0]}, at or past"
                f" event {handled}: it was handled already; nothing committed"
            ), False
        if recorded and rows[0][3] == claim.owner:
            cursor = rows[0][0] or 0
            already = sorted({s for s in recorded if s <= cursor} | ({int(r[0]) for r in done} & set(recorded)))
            what = (
                f"events {', '.join(map(str, already[:5]))}{', ...' if len(already) > 5 else ''} were recorded as"
                " done already (the database's progress is ahead of this run's)"
                if already
                else "the transaction was refused"
            )
            return CursorStoreError(
                f"{b.kind} cursor store at {b.where}: cursor {claim.name!r} (at {cursor}): {what}; nothing"
                " committed, and this run ends so that the next one reads the database's progress"
            ), True
        return CursorConflict(
            claim.name,
            f"another runner claimed it in {b.kind} cursor store at {b.where} (owner"
            f" {rows[0][3] or 'unknown: a write without a claim'}): two runners share this consumer name;"
            " this one stops",
        ), True

    def _start_flusher(self) -> None:
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        try:
            while not self._closed and any(c.dirty for c in self._claims.values()):
                await asyncio.sleep(self.flush_interval)
                for claim in list(self._claims.values()):
                    try:
                        await claim.flush()
                    except RjetError as e:
                        log.error("%s: background flush failed: %s", self.backend.where, e)
        finally:
            self._flusher = None

    def _closed_error(self) -> CursorStoreError:
        """What a store that was closed raises when asked to do anything."""
        return CursorStoreError(f"{self.backend.kind} cursor store at {self.backend.where}: the store is closed")

    async def close(self) -> None:
        """Flush, stop the flusher and close every connection. Safe to call twice."""
        if self._closed:
            return
        try:
            await self.flush()
        finally:
            self._closed = True
            self.backend.close_inline()
            if self._flusher is not None:
                self._flusher.cancel()
                await asyncio.wait([self._flusher])
            idle, self._idle = self._idle, []
            for conn in idle:
                await self._close_quietly(conn)
            if self._closing:
                await asyncio.wait(self._closing)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


@dataclass(frozen=True, slots=True)
class _Queued:
    """A transaction whose commit was queued (:meth:`Backend.finish_soon`), and what it records."""

    future: asyncio.Future[Outcome]
    progress: Progress


class SqlClaim:
    """A runner's hold on one cursor of a :class:`SqlCursorStore` (a :class:`rjet.cursors.Claim`)."""

    def __init__(
        self, store: SqlCursorStore, name: str, owner: str, cursor: str, done: str | None, stream: str | None
    ) -> None:
        self._store = store
        self.name = name
        self.owner = owner
        self.cursor = cursor
        self.done = done
        self.stream = stream
        self.written = cursor
        self.expires = math.inf
        self.lost: RjetError | None = None
        self.forgotten = False
        self._lost = asyncio.Event()
        self._pending: str | ProgressSource | None = None
        self._lock = asyncio.Lock()
        # A one-at-a-time consumer's last transaction: its commit queued on a connection, its outcome
        # not read yet (read by the next transaction, a flush or the release: see transact).
        self._queued: _Queued | None = None

    @property
    def dirty(self) -> bool:
        return self._pending is not None and self.lost is None

    def lose(self, err: RjetError) -> None:
        if self.lost is None:
            self.lost = err
            self._lost.set()

    def check(self) -> None:
        if self.lost is not None:
            raise self.lost

    async def set_cursor(self, cursor: str | ProgressSource) -> None:
        """Buffer ``cursor`` (or a progress source, read when written)."""
        self.check()
        self._pending = cursor
        self._store._start_flusher()  # noqa: SLF001

    async def flush(self) -> None:
        """Write what is buffered: never moving the cursor back, fenced by the claim."""
        async with self._lock:
            pending, self._pending = self._pending, None
            if self.lost is not None:
                return
            if (queued := self._queued) is not None:  # set when pending was, or later: it covers pending
                await self._confirm(queued)  # nothing is written past a transaction that did not commit
            if pending is None:
                return
            cursor, done = (pending, "") if isinstance(pending, str) else pending.snapshot()
            seq = int(cursor) if cursor else 0
            store, b = self._store, self._store.backend

            async def work(conn: Any) -> int:
                n = await b.execute(
                    conn, _ADVANCE, (seq, done or "", seq, seq or None, self.stream, self.name, self.owner)
                )
                if n:
                    await b.execute(conn, "DELETE FROM rjet_done WHERE name = ? AND seq <= ?", (self.name, seq))
                return n

            try:
                written = await store._run(f"write cursor {self.name!r}", work)  # noqa: SLF001
            except CursorStoreError:
                if self._pending is None:
                    self._pending = pending  # tried again at the next flush
                raise
            if not written:
                err = await store._why_not_mine(self)  # noqa: SLF001
                self.lose(err)
                raise err
            self.written = cursor
            store.flushes += 1
            if int(store._written.get(self.name) or 0) < seq:  # noqa: SLF001
                store._written[self.name] = cursor  # noqa: SLF001

    async def transact(
        self, seqs: Sequence[int], call: Callable[[Any], Awaitable[object]], *, sequential: bool
    ) -> None:
        """Run ``call(tx)`` in a transaction that also records ``seqs`` as done (``sequential``: the
        last of them as the cursor; else one ``rjet_done`` row each) and commits only while this
        claim holds the cursor. A handler error rolls everything back; a lost claim commits nothing."""
        self.check()
        turns = self._store._turns  # noqa: SLF001
        if turns is None or sequential:
            return await self._transact(seqs, call, sequential)
        async with turns:
            await self._transact(seqs, call, sequential)

    async def _transact(self, seqs: Sequence[int], call: Callable[[Any], Awaitable[object]], sequential: bool) -> None:
        store, b = self._store, self._store.backend
        progress = Progress(self.name, self.owner, self.stream, tuple(seqs), sequential)
        failure: Exception | None = None
        queued = self._queued  # the last transaction's commit, not confirmed yet
        conn = await store._take(progress, handler=True)  # noqa: SLF001
        ok = False
        try:
            begun: Any = None
            try:
                try:
                    begun = await b.begin_handler(conn)
                except store._errors as e:  # noqa: SLF001
                    raise store_error(b, "cannot begin a transaction", e) from e
                try:
                    await call(conn)
                except Exception:
                    await b.started(conn, begun)  # a BEGIN that failed is why the handler's statements did
                    raise
                await b.started(conn, begun)
                if queued is not None:  # it ran before this BEGIN: its failure rolls this one back
                    q, queued = queued, None
                    await self._confirm(q)
                # One at a time: the commit is queued, and the next event's handler starts while it
                # runs (its BEGIN, queued on the same connection, or waiting on the file's write lock
                # on another, comes after it); the next transaction reads its outcome before its own
                # commit, and rolls back after a failure, so nothing commits past one that did not.
                if sequential and (future := b.finish_soon(conn, begun, progress)) is not None:
                    self._queued = _Queued(future, progress)
                else:
                    await self._finish(conn, begun, progress)
            except Exception as e:
                # Rolled back; the connection stays pooled when that left it sound (a handler's error
                # is not the connection's: a retry need not connect again).
                sound = await b.abandon(conn, begun)
                if queued is not None:  # the last transaction's failure comes first (it ran first)
                    await self._confirm(queued)
                if not sound:
                    raise
                failure = e
            except BaseException:
                with contextlib.suppress(Exception):
                    await b.abandon(conn, begun)
                raise
            ok = True
        finally:
            await store._give(conn, ok=ok)  # noqa: SLF001
        if failure is not None:
            raise failure

    async def transact_sync(
        self, seqs: Sequence[int], call: Callable[[Any], object], *, sequential: bool, inline: bool = False
    ) -> None:
        """:meth:`transact` for a sync ``call(tx)`` (SQLite: ``tx`` the ``sqlite3.Connection``): the
        whole transaction, ``BEGIN IMMEDIATE`` to ``COMMIT``, in one call (``store.capabilities.
        sync_transactional``); ``inline`` (one transaction in flight: concurrency 1) on the calling
        thread, the event loop's, else on the connection's own thread."""
        self.check()
        store, b = self._store, self._store.backend
        progress = Progress(self.name, self.owner, self.stream, tuple(seqs), sequential)
        done = None
        if inline:
            if store._closed:  # noqa: SLF001
                raise store._closed_error()  # noqa: SLF001
            done = b.transact_inline(call, progress)  # None: a lock held elsewhere, waited for on a thread
        if done is not None:
            step, err, _ = done
        else:
            turns = store._turns if not sequential else None  # noqa: SLF001 (see SqlCursorStore.__init__)
            if turns is not None:
                await turns.acquire()
            try:
                step, err = await self._transact_on_thread(call, progress)
            finally:
                if turns is not None:
                    turns.release()
        if err is not None:  # rolled back; pooled again where that left it sound (a retry need not connect)
            raise self._failed(step, err, progress)
        await self._settle(cast("Outcome", step), progress)

    async def _transact_on_thread(
        self, call: Callable[[Any], object], progress: Progress
    ) -> tuple[Outcome | Step, BaseException | None]:
        store = self._store
        conn = await store._take(progress, handler=True)  # noqa: SLF001
        ok = False
        try:
            step, err, sound = await store.backend.transact_sync(conn, call, progress)
            ok = err is None or sound  # else the store closes the connection, not pooled
        finally:
            await store._give(conn, ok=ok)  # noqa: SLF001
        return step, err

    def _failed(self, step: str, err: BaseException, progress: Progress) -> BaseException:
        """What a sync handler's transaction that failed at ``step`` raises (the claim lost where the
        progress could not be recorded or committed, as in :meth:`_finish`)."""
        b, span = self._store.backend, progress.span
        if step == "handler":
            return err
        if step == "begin":
            return store_error(b, "cannot begin a transaction", err)
        e = store_error(
            b,
            f"the commit of events {span} may or may not be applied" if step == "commit"
            else f"cannot record events {span} as done",
            err,
        )  # fmt: skip
        self.lose(e)
        return e

    async def _finish(self, conn: Any, begun: Any, progress: Progress) -> None:
        b = self._store.backend
        try:
            outcome = await b.finish(conn, begun, progress)
        except CursorStoreError as e:
            self.lose(e)
            raise
        await self._settle(outcome, progress)

    async def _confirm(self, queued: _Queued) -> None:
        """Read the outcome of a transaction whose commit was queued (:meth:`transact`): anything but
        a commit loses the claim (the run cannot go on past that event, and no flush writes past it)
        and is raised."""
        try:
            outcome = queued.future.result() if queued.future.done() else await asyncio.shield(queued.future)
            await self._settle(outcome, queued.progress)
        except RjetError as e:
            self.lose(e)
            raise
        if self._queued is queued:
            self._queued = None

    async def _settle(self, outcome: Outcome, progress: Progress) -> None:
        """What a handler's transaction that ended as ``outcome`` means for the run."""
        store, seqs = self._store, progress.seqs
        if outcome == "ended":
            raise ConfigError(
                f"consumer {self.name!r}: the handler committed or rolled back tx itself; rjet commits it"
                " (with the event's progress) when the handler returns, and rolls it back when it raises"
            )
        if outcome == "fenced":
            if progress.sequential:
                err, lost = await store._why_fenced(self, max(seqs))  # noqa: SLF001
            else:
                err, lost = await store._why_fenced(self, recorded=seqs)  # noqa: SLF001
            if lost:
                self.lose(err)
            raise err
        if progress.sequential and int(store._written.get(self.name) or 0) < max(seqs):  # noqa: SLF001
            store._written[self.name] = str(max(seqs))  # noqa: SLF001

    async def wait_lost(self) -> None:
        await self._lost.wait()

    async def confirm(self) -> None:
        if self.lost is None:
            rows = await self._store._run(  # noqa: SLF001
                f"read cursor {self.name!r}", lambda c: self._store.backend.fetchall(c, _ROW, (self.name,))
            )
            if not rows or rows[0][3] != self.owner:
                self.lose(await self._store._why_not_mine(self))  # noqa: SLF001
        self.check()

    async def release(self, *, forget_new: bool = False) -> None:
        try:
            if (queued := self._queued) is not None:
                lost = self.lost
                try:
                    await self._confirm(queued)
                except RjetError:
                    if lost is None:  # found now: raised as a flush's failure is (after a loss: safe)
                        raise
            if self.lost is None:
                await self.flush()
                if forget_new and not self.written:  # the row this claim made, still empty: not left behind
                    self.forgotten = bool(
                        await self._store._run(  # noqa: SLF001
                            f"forget cursor {self.name!r}",
                            lambda c: self._store.backend.execute(
                                c,
                                "DELETE FROM rjet_cursors WHERE name = ? AND owner = ? AND cursor IS NULL"
                                " AND NOT EXISTS (SELECT 1 FROM rjet_done WHERE rjet_done.name = rjet_cursors.name)",
                                (self.name, self.owner),
                            ),
                        )
                    )
        finally:
            if self._store._claims.get(self.name) is self:  # noqa: SLF001
                del self._store._claims[self.name]  # noqa: SLF001
            self._pending = None
