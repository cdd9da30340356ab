"""The two databases an :class:`rjet.sql.SqlCursorStore` runs on, behind one small interface.

SQLite through aiosqlite (each connection a thread of its own running the standard library's
``sqlite3``: the handler gets an ``aiosqlite.Connection`` it awaits, and the event loop never blocks
on the file), PostgreSQL through psycopg 3's ``AsyncConnection``. rjet's own statements are written
with ``?`` placeholders; the PostgreSQL backend turns them into ``%s``.

A handler's transaction costs as few trips as each driver allows (:meth:`Backend.begin_handler`,
:meth:`Backend.finish`), the claim still checked inside it:

- SQLite: ``BEGIN IMMEDIATE`` is queued on the connection's thread ahead of the handler's statements
  with no answer to wait for (it notes its outcome, read once a later call came back), and the
  progress, the fence check and ``COMMIT`` run in one call on that thread: 2 trips where the handler
  writes once (was 4). One at a time (:meth:`Backend.finish_soon`), that call is queued and not
  waited for either: the next event's ``BEGIN`` and statements go to the thread behind it, so a
  transaction costs the handler's trip alone, and the commit's outcome is read with the next
  transaction's before that one commits. This reaches into aiosqlite (its queue ``_tx`` and
  ``_execute``, looked for on each connection); where they are missing, or with
  ``RJET_FAST_PATHS=0``, the same statements are awaited one by one.
- PostgreSQL: ``BEGIN``, the handler's statements, and one message holding the progress, the fence
  check and ``COMMIT`` (a single statement that fails when the claim is not this runner's, so that
  the ``COMMIT`` after it never runs): 3 round trips where the handler writes once (was 4, and 5 with
  ``rjet_done`` rows). The claim's row stays locked from that statement to the commit, inside the
  server: a frozen client can no longer hold it.
- PostgreSQL with ``?pipeline=on`` (:class:`_Postgres`): the whole transaction in one round trip,
  through psycopg's pipeline mode.
- SQLite, a sync handler (:meth:`Backend.transact_sync`): ``BEGIN IMMEDIATE``, the handler (its ``tx``
  the ``sqlite3.Connection`` itself), the progress, the fence check and ``COMMIT`` (or ``ROLLBACK``)
  in one call. At concurrency 1 (``inline``) that call runs on the calling thread, the event loop's,
  as rjet calls any sync handler of a one-at-a-time consumer: no trip at all, the loop waiting for
  the commit's fsync as it waits for such a handler's own. It runs on a plain ``sqlite3``
  connection of the backend's own, outside the pool (one serves the whole loop: a transaction on
  it never gives the loop back before its end), whose busy timeout is 0: where another connection
  holds the file's write lock (a transaction of another consumer's, which may be waiting for this
  very loop) its ``BEGIN IMMEDIATE`` fails at once and the call goes to a pooled connection's
  thread as at concurrency > 1, which waits there. At concurrency > 1: on the connection's thread, 1
  trip; with ``RJET_FAST_PATHS=0`` (or an aiosqlite without ``_tx``/``_execute``) in
  ``asyncio.to_thread`` instead, on the same connection (its own thread idle): one trip still,
  through a thread pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import os
import queue
import select
import sqlite3
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, cast

from rjet.errors import ConfigError, CursorStoreError

__all__ = ["IDLE_IN_TRANSACTION_TIMEOUT", "Backend", "Outcome", "Progress", "Step", "backend_for", "url_for_tools"]

Params = Sequence[object]

Outcome = Literal["committed", "fenced", "ended"]
"""How :meth:`Backend.finish` left a handler's transaction: committed with its progress; rolled back
because the claim's row is not this runner's (or its cursor is at or past the events already); or
untouched, because the handler committed or rolled it back itself."""

Step = Literal["begin", "handler", "record", "commit"]
"""Where a sync handler's transaction (:meth:`Backend.transact_sync`) failed, rolled back: its
``BEGIN``, the handler, the progress (nothing committed), or the ``COMMIT`` itself (applied or not)."""

IDLE_IN_TRANSACTION_TIMEOUT: Final = "30s"
"""PostgreSQL's ``idle_in_transaction_session_timeout`` on rjet's connections, unless the server, the
database, the role or the URL (``?options=-c%20idle_in_transaction_session_timeout%3D...``) sets one:
a runner frozen inside a transaction (SIGSTOPped, its host suspended) has its session ended after
that long, its locks released, so that a takeover waits that long at most instead of for ever."""

# A handler's progress, fenced by the claim (``?`` placeholders; SQLite's BEGIN IMMEDIATE holds the file).
_MOVE: Final = (
    "UPDATE rjet_cursors SET cursor = ?, done = '', stream = COALESCE(?, stream)"
    " WHERE name = ? AND owner = ? AND (cursor IS NULL OR cursor < ?)"
)
# Events recorded one by one (concurrency > 1, batches): the claim holds and none of them is done
# already, at or below the cursor, or recorded before (_DONE's rows count every one inserted). An event
# recorded twice would commit its effects twice: the transaction is rolled back instead (fenced), and
# the store's read-back says which it was.
_HELD: Final = "SELECT 1 FROM rjet_cursors WHERE name = ? AND owner = ? AND (cursor IS NULL OR cursor < ?)"
_WAIT: Final = "PRAGMA busy_timeout=30000"  # every SQLite connection's: a locked file waited for 30 s
_DONE: Final = "INSERT INTO rjet_done (name, seq) VALUES (?, ?) ON CONFLICT DO NOTHING"

# PostgreSQL: the same, each one statement that divides by zero when the claim does not hold (or the
# cursor is past the events), and COMMIT in the same message: after an error the server skips the
# rest of a message, so nothing commits. The row is locked (updated, or read FOR SHARE) until the
# commit: a takeover's claim waits for it, and every later transaction sees the new owner.
_PG_MOVE: Final = (
    "WITH moved AS (UPDATE rjet_cursors SET cursor = %s, done = '', stream = COALESCE(%s, stream)"
    " WHERE name = %s AND owner = %s AND (cursor IS NULL OR cursor < %s) RETURNING 1)"
    " SELECT 1 / count(*) /* rjet: 0 rows, the claim is not this runner's: nothing commits */ FROM moved;"
    " COMMIT"
)
_PG_DONE: Final = (
    "WITH held AS (SELECT 1 FROM rjet_cursors WHERE name = %s AND owner = %s AND (cursor IS NULL OR cursor < %s)"
    " FOR SHARE), done AS (INSERT INTO rjet_done (name, seq) SELECT %s, unnest(%s::bigint[]) ON CONFLICT DO NOTHING"
    " RETURNING 1) SELECT 1 / (count(*) * CASE WHEN (SELECT count(*) FROM done) = %s THEN 1 ELSE 0 END)"
    " /* rjet: 0, the claim is not this runner's or an event is done already: nothing commits */ FROM held;"
    " COMMIT"
)
# Pipeline mode: no simple-query message with two statements (each statement is a message of the
# extended protocol), so the claim's statement fails with an error of its own, which the server turns
# into skipping the rest of the pipeline up to the sync, the COMMIT queued after it included; its
# message (a text cast to int) says why: the claim is not this runner's (or its cursor is past the
# events), or the transaction rjet began is over (the handler ran COMMIT or ROLLBACK through tx, and
# the statement would otherwise commit on its own at the sync). BEGIN marks its transaction (_PG_MARK).
# Both statements are prepared once per connection (_PG_PREPARE), so the server plans neither again.
_FENCED: Final = "rjet: fenced, the claim is not held or an event is done already"
_ENDED: Final = "rjet: the handler ended the transaction"
_PG_MARK: Final = "SELECT set_config('rjet.tx', 'on', true)"
_PG_CHECK: Final = (
    f"SELECT CAST(CASE WHEN current_setting('rjet.tx', true) IS DISTINCT FROM 'on' THEN '{_ENDED}'"
    f" WHEN count(*) = 0{{}} THEN '{_FENCED}' ELSE '1' END AS int)"
)
_PG_PREPARE: Final = (
    "PREPARE rjet_move (bigint, text, text, text) AS WITH moved AS (UPDATE rjet_cursors SET cursor = $1,"
    " done = '', stream = COALESCE($2, stream) WHERE name = $3 AND owner = $4 AND (cursor IS NULL OR cursor < $1)"
    f" RETURNING 1) {_PG_CHECK.format('')} FROM moved;"
    " PREPARE rjet_done (text, text, bigint[]) AS WITH held AS (SELECT 1 FROM rjet_cursors WHERE name = $1"
    " AND owner = $2 AND (cursor IS NULL OR cursor < (SELECT min(s) FROM unnest($3) AS s)) FOR SHARE),"
    " done AS (INSERT INTO rjet_done (name, seq) SELECT $1, unnest($3) ON CONFLICT DO NOTHING RETURNING 1)"
    f" {_PG_CHECK.format(' OR (SELECT count(*) FROM done) < cardinality($3)')} FROM held"
)
_NOT_PREPARED: Final = "26000"  # SQLSTATE invalid_sql_statement_name (a DEALLOCATE or DISCARD since)
_SWITCH: Final = {"on": True, "off": False}
_IDLE_TIMEOUT_ENDED: Final = "25P03"  # SQLSTATE idle_in_transaction_session_timeout
_PG_IDLE: Final = (
    "SELECT set_config('idle_in_transaction_session_timeout', %s, false)"
    " WHERE current_setting('idle_in_transaction_session_timeout') = '0'"
)


@dataclass(frozen=True, slots=True)
class Progress:
    """What a handler's transaction records: its events ``seqs`` as done under ``name``
    (``sequential``: the last of them as the cursor; else one ``rjet_done`` row each), committed only
    while ``owner`` holds the claim."""

    name: str
    owner: str
    stream: str | None
    seqs: tuple[int, ...]
    sequential: bool

    @property
    def span(self) -> str:
        return f"{self.seqs[0]}..{self.seqs[-1]}"


class Backend(Protocol):
    """One database: how to connect, and how rjet's statements run on a connection."""

    kind: str  # "sqlite" or "postgresql"
    where: str  # for messages: the file, or host/database (never a password)
    sync_transactions: bool  # whether transact_sync runs a sync handler (a thread of the connection's)
    # Whether one transaction at a time may write (SQLite): a store's concurrent handler transactions
    # then take turns in its own queue, not in the driver's busy handler, which sleeps and polls.
    one_writer: bool

    async def connect(self) -> Any: ...

    def usable(self, conn: Any) -> bool:
        """Whether a pooled connection may be handed out (not one the server closed meanwhile)."""
        ...

    async def begin(self, conn: Any) -> None: ...

    async def commit(self, conn: Any) -> None: ...

    async def rollback(self, conn: Any) -> None: ...

    async def begin_handler(self, conn: Any) -> Any:
        """Begin the transaction a handler writes in; returns what :meth:`started`, :meth:`finish`
        and :meth:`abandon` take of it (SQLite: what the queued ``BEGIN`` notes of itself; PostgreSQL
        in pipeline mode: the pipeline; else None)."""
        ...

    async def started(self, conn: Any, begun: Any) -> None:
        """Wait for :meth:`begin_handler`'s ``BEGIN``; its failure as :class:`rjet.CursorStoreError`."""
        ...

    async def finish(self, conn: Any, begun: Any, progress: Progress) -> Outcome:
        """Record ``progress`` in the open transaction and commit it if the claim holds, else roll it
        back; failures as :class:`rjet.CursorStoreError` (one that may have committed says so). In
        PostgreSQL's pipeline mode an error of the handler's own statements arrives here, raised as it
        is, nothing committed."""
        ...

    def finish_soon(self, conn: Any, begun: Any, progress: Progress) -> asyncio.Future[Outcome] | None:
        """:meth:`finish`, queued on ``conn`` and not waited for, where the connection runs what it
        is given in order on a thread of its own (SQLite's fast path): statements queued on it later
        run after the commit, whatever its outcome (a failure rolled back there), so ``conn`` may go
        back to the pool at once. The future has :meth:`finish`'s outcome or error. None where it
        cannot: the caller awaits :meth:`finish`."""
        ...

    async def abandon(self, conn: Any, begun: Any) -> bool:
        """Roll back the handler's transaction after a failure; whether ``conn`` came out of it idle
        and sound, fit to be pooled again (never raises: False when in doubt)."""
        ...

    async def transact_sync(
        self, conn: Any, call: Callable[[Any], object], progress: Progress
    ) -> tuple[Outcome | Step, BaseException | None, bool]:
        """A sync handler's whole transaction in one call on a thread, never the event loop's:
        ``BEGIN``, ``call(tx)``, ``progress`` recorded and the claim checked, ``COMMIT`` (or a
        ``ROLLBACK`` after any failure, in the same call). Returns the outcome, or the step that failed
        with its error, and whether ``conn`` came out idle and sound (fit to be pooled again). Only
        where :attr:`sync_transactions` says so."""
        ...

    def transact_inline(
        self, call: Callable[[Any], object], progress: Progress
    ) -> tuple[Outcome | Step, BaseException | None, bool] | None:
        """:meth:`transact_sync` on the calling thread (the consumer's one transaction in flight, so
        the loop may wait for it as for any sync handler of a one-at-a-time consumer), with a
        connection of the backend's own for it; None where it would have to wait for a lock held
        elsewhere (nothing began: the caller goes to :meth:`transact_sync`)."""
        ...

    def close_inline(self) -> None:
        """Close :meth:`transact_inline`'s connection, if open (a later call opens another)."""
        ...

    async def plain(self, conn: Any) -> bool:
        """Ready a pooled connection for rjet's own statements (PostgreSQL: out of pipeline mode, where
        a handler's transaction left it); False: it failed doing so, and is to be closed."""
        ...

    async def execute(self, conn: Any, sql: str, params: Params = ()) -> int: ...

    async def executemany(self, conn: Any, sql: str, rows: Sequence[Params]) -> int:
        """Run ``sql`` once for each of ``rows``; the rows changed, in all."""
        ...

    async def fetchall(self, conn: Any, sql: str, params: Params = ()) -> list[tuple[Any, ...]]: ...

    async def close(self, conn: Any) -> None: ...

    def errors(self) -> tuple[type[BaseException], ...]:
        """The driver's errors (what a store turns into :class:`rjet.CursorStoreError`)."""
        ...


class _Begun:
    """The ``BEGIN IMMEDIATE`` queued on a SQLite connection's thread ahead of the handler's statements,
    with no future to answer (an answer is one more wake-up of the event loop per transaction): it
    notes here when it ran, and how it failed. The thread runs its queue in order, so it has run once
    any later call came back."""

    __slots__ = ("error", "ran")

    def __init__(self) -> None:
        self.ran = False
        self.error: BaseException | None = None


def _begin_or_close(conn: Any, begun: _Begun) -> None:
    """On the connection's thread, ahead of the handler's statements: ``BEGIN IMMEDIATE``, or close
    the ``sqlite3`` connection when it fails, so that none of those statements runs outside a
    transaction (each fails on the closed connection; the store discards it)."""
    db = conn._conn  # noqa: SLF001
    try:
        db.execute("BEGIN IMMEDIATE")
    except BaseException as e:
        begun.error = e
        db.close()
    finally:
        begun.ran = True


def _nothing() -> None:
    return None


def _finish_on_thread(conn: Any, p: Progress) -> tuple[Outcome | Literal["record", "commit"], BaseException | None]:
    """:meth:`_Sqlite.finish` in one call on the connection's thread; a failure comes back with the
    step it happened in (the record: nothing committed; the commit: applied or not)."""
    return _finish_db(conn._conn, p)  # noqa: SLF001


def _finish_db(
    db: sqlite3.Connection, p: Progress
) -> tuple[Outcome | Literal["record", "commit"], BaseException | None]:
    try:
        if not db.in_transaction:
            return "ended", None
        if p.sequential:
            last = max(p.seqs)
            held = db.execute(_MOVE, (last, p.stream, p.name, p.owner, last)).rowcount > 0
        else:
            held = db.execute(_HELD, (p.name, p.owner, min(p.seqs))).fetchone() is not None
            if held:
                held = db.executemany(_DONE, [(p.name, s) for s in p.seqs]).rowcount == len(p.seqs)
        if not held:
            db.execute("ROLLBACK")
            return "fenced", None
    except Exception as e:
        return "record", e
    try:
        db.execute("COMMIT")
    except Exception as e:
        return "commit", e
    return "committed", None


def _finish_queued(backend: _Sqlite, conn: Any, p: Progress) -> Outcome:
    """:meth:`_Sqlite.finish_soon`'s call on the connection's thread: a failure rolled back there,
    since the connection was pooled again before anyone read it (a ``ROLLBACK`` that fails too
    leaves it for the next statement on it to find)."""
    db = conn._conn  # noqa: SLF001
    outcome, err = _finish_db(db, p)
    if err is not None:
        _idle(db)
    return backend._outcome(p, outcome, err)  # noqa: SLF001


def _rollback_on_thread(conn: Any) -> None:
    db = conn._conn  # noqa: SLF001
    if db.in_transaction:
        db.execute("ROLLBACK")


class _Job:
    """A sync handler's transaction handed to a thread. ``dropped``: its caller was cancelled before
    the thread took it up, which then starts nothing (a run that ended calls no handler after)."""

    __slots__ = ("call", "db", "dropped", "progress")

    def __init__(self, db: sqlite3.Connection, call: Callable[[Any], object], progress: Progress) -> None:
        self.db = db
        self.call = call
        self.progress = progress
        self.dropped = False


def _idle(db: sqlite3.Connection) -> bool:
    """Roll back whatever transaction ``db`` is in; whether it is left idle and open."""
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
        return not db.in_transaction
    except Exception:
        return False


def _transact_on_thread(job: _Job) -> tuple[Outcome | Step | Literal["dropped"], BaseException | None, bool]:
    """:meth:`_Sqlite.transact_sync`'s one call, on the thread that owns the connection now."""
    if job.dropped:
        return "dropped", None, True
    db = job.db
    try:
        db.execute("BEGIN IMMEDIATE")
    except Exception as e:
        return "begin", e, _idle(db)
    return _handle_and_finish(job)


def _transact_inline(job: _Job) -> tuple[Outcome | Step, BaseException | None, bool] | None:
    """:meth:`_Sqlite.transact_inline`'s transaction on the calling thread, or None where the file's
    write lock is held elsewhere (``job.db`` waits for no lock; nothing began)."""
    db = job.db
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        if e.sqlite_errorcode == sqlite3.SQLITE_BUSY and not db.in_transaction:
            return None
        return "begin", e, _idle(db)
    except Exception as e:
        return "begin", e, _idle(db)
    return _handle_and_finish(job)


def _handle_and_finish(job: _Job) -> tuple[Outcome | Step, BaseException | None, bool]:
    """The handler and the progress of a transaction begun on ``job.db``; anything that failed rolled back."""
    db = job.db
    try:
        if inspect.isawaitable(returned := job.call(db)):  # an async callable not made with async def
            if inspect.iscoroutine(returned):
                returned.close()
            raise ConfigError(
                f"consumer {job.progress.name!r}: its transactional handler returned an awaitable, so it was"
                " taken for a sync one (its whole transaction runs in one call, where nothing is awaited):"
                " make it an async def function"
            )
    except BaseException as e:  # the handler's, raised where it was awaited; KeyboardInterrupt included
        return "handler", e, _idle(db)
    outcome, err = _finish_db(db, job.progress)
    if err is not None:
        return outcome, err, _idle(db)
    return outcome, None, True


def _aiosqlite_queues(conn: Any) -> bool:
    """Whether ``conn`` has the aiosqlite internals the SQLite fast path uses (see the module's doc)."""
    tx = getattr(conn, "_tx", None)
    return isinstance(tx, queue.SimpleQueue | queue.Queue) and callable(getattr(conn, "_execute", None))


class _Sqlite:
    """SQLite: WAL, ``synchronous=FULL`` (a committed transaction survives a power loss, not only a
    crash of the process), ``busy_timeout`` 30 s, and ``BEGIN IMMEDIATE`` so that a transaction holds
    the write lock from its start (no deadlock on a read lock upgraded late)."""

    kind = "sqlite"
    sync_transactions = True
    one_writer = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = path
        self.fast = os.environ.get("RJET_FAST_PATHS", "1") != "0"
        # Each aiosqlite connection's sqlite3.Connection, taken from the factory that made it (public
        # API, where aiosqlite's own attribute is private): the sync handler's tx.
        self._dbs: weakref.WeakKeyDictionary[Any, sqlite3.Connection] = weakref.WeakKeyDictionary()
        self._inline: sqlite3.Connection | None = None  # transact_inline's, opened at its first call

    async def connect(self) -> Any:
        import aiosqlite

        made: list[sqlite3.Connection] = []

        def factory(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            db = sqlite3.Connection(*args, **kwargs)
            made.append(db)
            return db

        # check_same_thread off: without the fast path a sync handler's transaction runs on a thread
        # of asyncio's pool, the connection held by that transaction alone (its own thread idle).
        conn = await aiosqlite.connect(
            self.path, isolation_level=None, timeout=30.0, factory=factory, check_same_thread=False
        )
        self._dbs[conn] = made[0]
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute(_WAIT)
        except BaseException:
            await conn.close()
            raise
        self.fast = self.fast and _aiosqlite_queues(conn)
        return conn

    def usable(self, conn: Any) -> bool:
        return True

    async def begin(self, conn: Any) -> None:
        await conn.execute("BEGIN IMMEDIATE")

    async def commit(self, conn: Any) -> None:
        await conn.execute("COMMIT")

    async def rollback(self, conn: Any) -> None:
        if self.fast:  # on the thread: a queued BEGIN may not have run yet
            await conn._execute(_rollback_on_thread, conn)  # noqa: SLF001
        elif conn.in_transaction:
            await conn.execute("ROLLBACK")

    async def begin_handler(self, conn: Any) -> _Begun | None:
        if not self.fast:
            await self.begin(conn)
            return None
        begun = _Begun()
        conn._tx.put_nowait((None, functools.partial(_begin_or_close, conn, begun)))  # noqa: SLF001
        return begun

    async def started(self, conn: Any, begun: Any) -> None:
        if isinstance(begun, _Begun):
            if not begun.ran:  # the handler sent nothing yet: a trip behind the BEGIN
                await conn._execute(_nothing)  # noqa: SLF001
            if isinstance(begun.error, self.errors()):
                raise store_error(self, "cannot begin a transaction", begun.error) from begun.error
            if begun.error is not None:
                raise begun.error

    async def finish(self, conn: Any, begun: Any, progress: Progress) -> Outcome:
        p = progress
        if self.fast:
            outcome, err = await conn._execute(_finish_on_thread, conn, p)  # noqa: SLF001
        else:
            outcome, err = await self._finish_awaited(conn, p)
        return self._outcome(p, outcome, err)

    def _outcome(
        self, p: Progress, outcome: Outcome | Literal["record", "commit"], err: BaseException | None
    ) -> Outcome:
        """:meth:`finish`'s outcome, or the failure of its step (``err``) as :class:`rjet.CursorStoreError`."""
        if outcome == "record" or outcome == "commit":
            what = (
                f"cannot record events {p.span} as done" if outcome == "record"
                else f"the commit of events {p.span} may or may not be applied"
            )  # fmt: skip
            raise store_error(self, what, cast("BaseException", err)) from err
        return outcome

    def finish_soon(self, conn: Any, begun: Any, progress: Progress) -> asyncio.Future[Outcome] | None:
        if not self.fast:
            return None
        # As aiosqlite's own _execute does, without the coroutine that would wait for it.
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        conn._tx.put_nowait((future, functools.partial(_finish_queued, self, conn, progress)))  # noqa: SLF001
        return future

    async def plain(self, conn: Any) -> bool:
        return True

    async def abandon(self, conn: Any, begun: Any) -> bool:
        try:
            await self.rollback(conn)  # fails on a connection its failed BEGIN closed
        except Exception:
            return False
        return True

    def transact_inline(
        self, call: Callable[[Any], object], progress: Progress
    ) -> tuple[Outcome | Step, BaseException | None, bool] | None:
        # A connection of the calling thread's own, outside the pool: an inline transaction runs from
        # BEGIN to COMMIT without giving the loop back, so one serves every consumer of this store on
        # the loop, never two transactions at once. Its busy timeout is 0, so that BEGIN IMMEDIATE
        # never waits on the loop for a lock another transaction of this loop may hold; the write lock
        # taken, nothing after it waits in WAL mode (readers never block the writer, the commit's
        # checkpoint is passive). No PRAGMA per transaction to switch it: 15-20 us of CPU each time.
        db = self._inline
        if db is None:
            try:
                db = self._inline = self._open_inline()
            except sqlite3.Error as e:
                return "begin", e, False
        done = _transact_inline(_Job(db, call, progress))
        if done is not None and not done[2]:
            self.close_inline()
        return done

    def _open_inline(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=0.0, check_same_thread=False)  # no wait
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        return db

    def close_inline(self) -> None:
        db, self._inline = self._inline, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    async def transact_sync(
        self, conn: Any, call: Callable[[Any], object], progress: Progress
    ) -> tuple[Outcome | Step, BaseException | None, bool]:
        job = _Job(self._dbs[conn], call, progress)
        try:
            if self.fast:  # one trip to the connection's own thread, and one wake-up of the loop
                result = await conn._execute(_transact_on_thread, job)  # noqa: SLF001
            else:
                result = await asyncio.to_thread(_transact_on_thread, job)
        except BaseException:
            job.dropped = True  # not taken up yet: never started (once started, it ends on its own)
            raise
        step, err, sound = result
        if step == "dropped":  # not reached: only a cancelled caller drops its job
            raise RuntimeError("rjet: a sync handler's transaction was dropped")
        done: Outcome | Step = step
        return done, err, sound

    async def _finish_awaited(
        self, conn: Any, p: Progress
    ) -> tuple[Outcome | Literal["record", "commit"], BaseException | None]:
        """:func:`_finish_on_thread` through aiosqlite's public API, a trip per statement."""
        if not conn.in_transaction:
            return "ended", None
        try:
            if p.sequential:
                last = max(p.seqs)
                held = await self.execute(conn, _MOVE, (last, p.stream, p.name, p.owner, last)) > 0
            else:
                held = bool(await self.fetchall(conn, _HELD, (p.name, p.owner, min(p.seqs))))
                if held:
                    held = await self.executemany(conn, _DONE, [(p.name, s) for s in p.seqs]) == len(p.seqs)
            if not held:
                await self.rollback(conn)
                return "fenced", None
        except self.errors() as e:
            return "record", e
        try:
            await self.commit(conn)
        except self.errors() as e:
            return "commit", e
        return "committed", None

    async def execute(self, conn: Any, sql: str, params: Params = ()) -> int:
        # The cursor is not closed: closing is one more round trip to the connection's thread, and
        # sqlite3 finalises the statement when the cursor goes (its rowcount is read here, no trip).
        cursor = await conn.execute(sql, tuple(params))
        return int(cursor.rowcount)

    async def executemany(self, conn: Any, sql: str, rows: Sequence[Params]) -> int:
        cursor = await conn.executemany(sql, [tuple(r) for r in rows])
        return int(cursor.rowcount)

    async def fetchall(self, conn: Any, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        async with conn.execute(sql, tuple(params)) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def close(self, conn: Any) -> None:
        await conn.close()

    def errors(self) -> tuple[type[BaseException], ...]:
        import sqlite3

        return (sqlite3.Error, OSError, ValueError)


def _readable(fd: int) -> bool:
    """Whether the socket ``fd`` has something to read now (an idle connection's: the server closed it)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


class _Piped:
    """A connection held in psycopg's pipeline mode from one handler's transaction to the next (each
    ends with a sync), left when the connection serves anything else (:meth:`Backend.plain`)."""

    __slots__ = ("context", "pipeline")

    def __init__(self, context: contextlib.AbstractAsyncContextManager[Any], pipeline: Any) -> None:
        self.context = context
        self.pipeline = pipeline

    async def leave(self) -> None:
        """Sync (a round trip) and leave pipeline mode; the first error of what was queued is raised."""
        await self.context.__aexit__(None, None, None)


def _psycopg_queues(pipeline: Any) -> bool:
    """Whether ``pipeline`` has the command and result queues :func:`_queue` writes to (psycopg 3.2,
    3.3)."""
    return isinstance(getattr(pipeline, "command_queue", None), collections.deque) and isinstance(
        getattr(pipeline, "result_queue", None), collections.deque
    )


def _queue(pipeline: Any, send: Callable[..., None], *args: object) -> None:
    """Send a statement in psycopg's ``pipeline`` as psycopg sends its own commands (``BEGIN``,
    ``COMMIT``), its result checked for an error only: into libpq's buffer at once (libpq writes it out
    at the next flush: no I/O here), behind what psycopg still holds back, if anything."""
    if pipeline.command_queue:
        pipeline.command_queue.append(functools.partial(send, *args))
    else:
        send(*args)  # libpq sees a statement under way (a handler's commit() must find one)
    pipeline.result_queue.append(None)


async def _settle(conn: Any, piped: _Piped) -> None:
    """Sync and read every answer still due, their errors ignored (the first was seen already): psycopg
    raises the first error of what it reads at once, and may leave later answers of the same sync
    unread, which the next sync reads first. Raises only when the connection broke."""
    import psycopg

    for _ in range(4):
        try:
            await piped.pipeline.sync()
        except psycopg.Error:
            if conn.closed or conn.broken:
                raise
            continue
        if not getattr(piped.pipeline, "result_queue", None):
            return
    raise psycopg.OperationalError("rjet: the pipeline did not settle")


def _progress_params(p: Progress) -> tuple[str, list[object]]:
    """The prepared statement (_PG_PREPARE) that records ``p``, and its parameters."""
    if p.sequential:
        return "rjet_move", [max(p.seqs), p.stream, p.name, p.owner]
    return "rjet_done", [p.name, p.owner, list(p.seqs)]


def _text(value: object) -> bytes | None:
    """A parameter of :func:`_progress_params` in PostgreSQL's text format."""
    if value is None:
        return None
    if isinstance(value, list):
        return ("{" + ",".join(map(str, value)) + "}").encode()
    return str(value).encode()


class _Postgres:
    """PostgreSQL: autocommit connections on which rjet sends ``BEGIN`` and ``COMMIT`` itself (the
    handler's ``tx`` is inside that transaction), ``idle_in_transaction_session_timeout``
    (:data:`IDLE_IN_TRANSACTION_TIMEOUT`) unless one is set; a handler's progress is written, and the
    claim's row locked, by the one statement that also checks the claim, sent with the ``COMMIT``.

    With ``?pipeline=on`` in the URL a handler's transaction runs in psycopg's pipeline mode: ``BEGIN``,
    the handler's statements, the progress and ``COMMIT`` are sent without waiting for an answer and
    synced once, a single round trip (the handler's ``fetch*`` calls wait for theirs)."""

    kind = "postgresql"
    sync_transactions = False  # tx is an AsyncConnection: a handler awaits it on the event loop
    one_writer = False

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError as e:  # never the URL itself in the message: it may carry a password
            raise ConfigError(f"rjet.sql: bad PostgreSQL URL {url.split('@')[-1]!r}: {e}") from None
        self.where = f"{parts.hostname or 'localhost'}:{port or 5432}{parts.path or '/'}"
        self.pipeline = False
        kept = []
        for item in parts.query.split("&") if parts.query else ():
            key, _, value = item.partition("=")
            if urllib.parse.unquote_plus(key) != "pipeline":
                kept.append(item)  # libpq's own parameters, passed on as written
            elif (flag := urllib.parse.unquote_plus(value)) in _SWITCH:
                self.pipeline = _SWITCH[flag]
            else:
                raise ConfigError(
                    f"rjet.sql: the PostgreSQL URL's pipeline parameter is on or off, not {flag!r}"
                    f" ({url.split('@')[-1]!r})"
                )
        self.url = urllib.parse.urlunsplit(parts._replace(query="&".join(kept)))
        # Pipeline mode queues rjet's own statements straight into psycopg's pipeline (its command and
        # result queues: no cursor, no I/O of their own); RJET_FAST_PATHS=0 goes through conn.execute.
        self.fast = os.environ.get("RJET_FAST_PATHS", "1") != "0"
        self._prepared: weakref.WeakSet[Any] = weakref.WeakSet()
        self._pipes: dict[Any, _Piped] = {}  # connections in pipeline mode (none without ?pipeline=on)

    async def connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                "rjet.sql: postgresql:// needs psycopg 3: pip install 'rjet[postgres]' (in a checkout:"
                " pip install -e '.[postgres]')"
            ) from None
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5)
        try:
            await conn.execute(_PG_IDLE, (IDLE_IN_TRANSACTION_TIMEOUT,))
        except BaseException:
            await conn.close()
            raise
        return conn

    def usable(self, conn: Any) -> bool:
        # An idle connection has nothing to read: when it has, the server ended the session (a
        # restart, a timeout, an administrator) and the next statement would fail on it.
        if conn.closed or conn.broken:
            return False
        try:
            return not _readable(conn.pgconn.socket)
        except Exception:  # no socket any more
            return False

    async def begin(self, conn: Any) -> None:
        await conn.execute("BEGIN")

    async def commit(self, conn: Any) -> None:
        await conn.execute("COMMIT")

    async def rollback(self, conn: Any) -> None:
        import psycopg

        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await conn.execute("ROLLBACK")

    async def begin_handler(self, conn: Any) -> _Piped | None:
        if not self.pipeline:
            await self.begin(conn)
            return None
        piped = self._pipes.get(conn)
        if piped is None:
            if conn not in self._prepared:  # once per connection, a round trip
                await conn.execute(_PG_PREPARE)
                self._prepared.add(conn)
            context = conn.pipeline()
            piped = self._pipes[conn] = _Piped(context, await context.__aenter__())
            # The fast path writes to psycopg's own (private) queues: a psycopg that keeps them under
            # other names gets the public path (conn.execute), decided before anything is queued.
            self.fast = self.fast and _psycopg_queues(piped.pipeline)
        if self.fast:  # queued, sent with the handler's first statement (or the sync)
            _queue(piped.pipeline, conn.pgconn.send_query_params, b"BEGIN", None)
            _queue(piped.pipeline, conn.pgconn.send_query_params, _PG_MARK.encode(), None)
        else:  # never prepared by psycopg: its rollback() would deallocate rjet's statements with them
            await conn.execute("BEGIN", prepare=False)
            await conn.execute(_PG_MARK, prepare=False)
        return piped

    async def started(self, conn: Any, begun: Any) -> None:
        return None

    def finish_soon(self, conn: Any, begun: Any, progress: Progress) -> asyncio.Future[Outcome] | None:
        return None  # an AsyncConnection answers one caller at a time

    async def finish(self, conn: Any, begun: Any, progress: Progress) -> Outcome:
        import psycopg

        p = progress
        if isinstance(begun, _Piped):
            return await self._finish_piped(conn, begun, p)
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
            return "ended"
        params: tuple[object, ...]
        if p.sequential:
            last = max(p.seqs)
            sql, params = _PG_MOVE, (last, p.stream, p.name, p.owner, last)
        else:
            sql, params = _PG_DONE, (p.name, p.owner, min(p.seqs), p.name, list(p.seqs), len(p.seqs))
        try:
            # Bound on the client: several statements in one message take no server-side parameters.
            await psycopg.AsyncClientCursor(conn).execute(sql, params)
        except psycopg.errors.DivisionByZero:
            await self.rollback(conn)
            return "fenced"
        except psycopg.Error as e:
            raise self._unanswered(conn, p, e) from e
        return "committed"

    async def _finish_piped(self, conn: Any, piped: _Piped, p: Progress) -> Outcome:
        import psycopg

        # No look at the transaction's status here: in pipeline mode libpq learns it at a sync only.
        # Whether the handler ended rjet's transaction is for the progress statement to tell (_ENDED).
        name, params = _progress_params(p)
        try:
            # Queued behind the handler's statements; after an error the server skips the rest until
            # the sync, this COMMIT included, and the transaction is left failed (rolled back below).
            if self.fast:
                _queue(piped.pipeline, conn.pgconn.send_query_prepared, name.encode(), [_text(v) for v in params])
                _queue(piped.pipeline, conn.pgconn.send_query_params, b"COMMIT", None)
            else:  # bound on the client: EXECUTE takes no server-side parameters
                placeholders = ", ".join(["%s"] * len(params))
                await psycopg.AsyncClientCursor(conn).execute(f"EXECUTE {name} ({placeholders})", params, prepare=False)
                await conn.execute("COMMIT", prepare=False)
            await piped.pipeline.sync()
        except psycopg.Error as e:
            if not conn.closed and not conn.broken:
                # Raises only where the connection broke meanwhile: a session ended by the server
                # answers the sync with its error (57P01) and closes the socket after it, which the
                # settling then reads. Either order is the same unanswered commit, told below.
                try:
                    await _settle(conn, piped)
                except psycopg.Error:
                    if not (conn.closed or conn.broken):
                        raise
            if conn.closed or conn.broken:
                raise self._unanswered(conn, p, e) from e
            message = str(e)
            if _FENCED in message or _ENDED in message:
                await self._rollback_piped(conn, piped)
                return "fenced" if _FENCED in message else "ended"
            if e.sqlstate == _NOT_PREPARED and name in message:
                self._prepared.discard(conn)  # prepared again by the next transaction
                raise store_error(
                    self,
                    f"cannot record events {p.span} as done (nothing committed; rjet's statements are prepared"
                    " again for the next transaction: a DEALLOCATE, a DISCARD or a rollback() through tx"
                    " deallocated them)",
                    e,
                ) from e
            raise  # the first statement that failed: the handler's (its error as if it had raised it)
        return "committed"

    def _unanswered(self, conn: Any, p: Progress, e: BaseException) -> CursorStoreError:
        """The error of a progress statement that failed, saying whether its COMMIT may have been applied."""
        # No answer (the connection lost): the COMMIT may have been applied. The session ended for
        # sitting idle in its transaction (25P03) never read this message: nothing was.
        if (conn.closed or conn.broken) and getattr(e, "sqlstate", None) != _IDLE_TIMEOUT_ENDED:
            return store_error(self, f"the commit of events {p.span} may or may not be applied", e)
        return store_error(self, f"cannot record events {p.span} as done (nothing committed)", e)

    async def abandon(self, conn: Any, begun: Any) -> bool:
        import psycopg

        try:
            if conn.closed or conn.broken:
                return False
            piped = self._pipes.get(conn)
            if piped is None:
                await self.rollback(conn)
            else:
                _queue(piped.pipeline, conn.pgconn.send_query_params, b"ROLLBACK", None)
                await _settle(conn, piped)  # the handler's statements' errors: reported already
                await self._rollback_piped(conn, piped)  # where that ROLLBACK came after an error: skipped
            return not conn.broken and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        except Exception:
            return False

    async def transact_sync(
        self, conn: Any, call: Callable[[Any], object], progress: Progress
    ) -> tuple[Outcome | Step, BaseException | None, bool]:
        raise self._no_sync()

    def transact_inline(
        self, call: Callable[[Any], object], progress: Progress
    ) -> tuple[Outcome | Step, BaseException | None, bool] | None:
        raise self._no_sync()

    def close_inline(self) -> None:
        pass

    def _no_sync(self) -> ConfigError:
        return ConfigError(
            f"postgresql cursor store at {self.where}: a transactional handler is async here (tx is a psycopg"
            " AsyncConnection): async def fn(fate, event, tx)"
        )

    async def _rollback_piped(self, conn: Any, piped: _Piped) -> None:
        """``ROLLBACK`` where psycopg does not see it: seeing one, psycopg deallocates every prepared
        statement of the session (``DEALLOCATE ALL``), rjet's own (_PG_PREPARE) with its."""
        import psycopg

        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:  # known: right after a sync
            _queue(piped.pipeline, conn.pgconn.send_query_params, b"ROLLBACK", None)
            await piped.pipeline.sync()

    async def plain(self, conn: Any) -> bool:
        piped = self._pipes.pop(conn, None)
        if piped is not None:
            try:
                await piped.leave()
            except Exception:
                return False
        return True

    async def execute(self, conn: Any, sql: str, params: Params = ()) -> int:
        cursor = await conn.execute(sql.replace("?", "%s"), tuple(params))
        return int(cursor.rowcount)

    async def executemany(self, conn: Any, sql: str, rows: Sequence[Params]) -> int:
        async with conn.cursor() as cursor:
            await cursor.executemany(sql.replace("?", "%s"), [tuple(r) for r in rows])
            return int(cursor.rowcount)

    async def fetchall(self, conn: Any, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        cursor = await conn.execute(sql.replace("?", "%s"), tuple(params))
        return [tuple(row) for row in await cursor.fetchall()]

    async def close(self, conn: Any) -> None:
        piped = self._pipes.pop(conn, None)
        if piped is not None:
            with contextlib.suppress(Exception):  # a connection that broke cannot sync: closed all the same
                await piped.leave()
        await conn.close()

    def errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error, OSError)


def backend_for(url: str) -> Backend:
    """The backend of ``url``: ``sqlite:///PATH`` (``sqlite:///:memory:`` is refused: a store in
    memory would forget its cursors), ``postgresql://...`` (or ``postgres://``)."""
    if not isinstance(url, str):
        raise ConfigError(f"rjet.sql: the database URL must be a str, not {url!r}")
    scheme, sep, rest = url.partition("://")
    if scheme == "sqlite" and sep:
        path = rest[1:] if rest.startswith("/") else rest
        if not path or path == ":memory:":
            raise ConfigError(
                f"rjet.sql: {url!r} names no file: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        return _Sqlite(path)
    if scheme in ("postgresql", "postgres") and sep:
        return _Postgres(url)
    raise ConfigError(
        f"rjet.sql: unsupported database URL {url.split('@')[-1]!r}: use sqlite:///PATH or postgresql://..."
    )


def url_for_tools(url: str) -> str:
    """``url`` as the command line's ``--cursors`` may take it back in a hint: without its password
    (psycopg finds one in ``PGPASSWORD`` or ``~/.pgpass``), a SQLite path made absolute."""
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else rest
        return f"sqlite:///{os.path.abspath(path)}" if not os.path.isabs(path) else f"sqlite:///{path}"
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))


def store_error(backend: Backend, what: str, err: BaseException) -> CursorStoreError:
    """``err`` of the driver as a one-line :class:`rjet.CursorStoreError` naming the database."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CursorStoreError(f"{backend.kind} cursor store at {backend.where}: {what}: {detail}")
