"""rjet.sql: cursors in SQLite and PostgreSQL (a real server: tests/sql_fixtures.py), and
transactional consumers whose writes commit with their progress. Each test runs on both databases."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import aiosqlite
import psycopg
import pytest
from sql_fixtures import PASSWORD, PostgresServer, SqlDb, free_port, postgres_server, sql_db

import rjet
import rjet._progress
from rjet.sql import SqlCursorStore
from rjet.sql._backends import IDLE_IN_TRANSACTION_TIMEOUT, backend_for
from rjet.testing import KeyOrder, check_cursor_store

__all__ = ["postgres_server", "sql_db"]  # the fixtures, imported for pytest


async def _store(db: SqlDb, **options: Any) -> SqlCursorStore:
    store = await SqlCursorStore.open(db.url, **options)
    db.create_effects()
    return store


def _effect(db: SqlDb) -> Any:
    insert = db.sql("INSERT INTO effects (seq, fid) VALUES (?, ?)")

    async def effect(tx: Any, event: rjet.Event) -> None:
        await tx.execute(insert, (event.id_int, event.foreign_id))

    return effect


# Handlers both ways where the store runs both: async everywhere, sync on SQLite (run with the whole
# transaction on the connection's thread; PostgreSQL refuses them: test_a_sync_handler_...).
SHAPES = pytest.mark.parametrize(
    ("sql_db", "sync"),
    [("sqlite", False), ("sqlite", True), ("postgresql", False), ("postgresql-pipeline", False)],
    ids=["sqlite", "sqlite-sync", "postgresql", "postgresql-pipeline"],
    indirect=["sql_db"],
)


def _sync_effect(event: rjet.Event, tx: sqlite3.Connection) -> None:
    tx.execute("INSERT INTO effects (seq, fid) VALUES (?, ?)", (event.id_int, event.foreign_id))


@pytest.mark.parametrize(
    ("concurrency", "batch"), [(1, None), (8, None), (1, rjet.Batch(10, max_wait=0.01)), (4, rjet.Batch(10, 0.01))]
)
@SHAPES
async def test_each_event_is_applied_exactly_once_with_its_progress(
    stream: rjet.Stream, sql_db: SqlDb, sync: bool, concurrency: int, batch: rjet.Batch | None
) -> None:
    await stream.insert_many([(f"k{i % 13}", 1, b"") for i in range(300)])
    failed: set[int] = set()
    effect = _effect(sql_db)

    def fail_once(event: rjet.Event) -> None:
        if event.id_int % 37 == 0 and event.id_int not in failed:  # wrote, then failed: rolled back
            failed.add(event.id_int)
            raise RuntimeError("after its write")

    async def one(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await effect(tx, event)
        fail_once(event)

    async def many(fate: rjet.Fate, events: list[rjet.Event], tx: Any) -> None:
        for event in events:
            await one(fate, event, tx)

    def sync_one(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        _sync_effect(event, tx)
        fail_once(event)

    def sync_many(fate: rjet.Fate, events: list[rjet.Event], tx: sqlite3.Connection) -> None:
        for event in events:
            sync_one(fate, event, tx)

    fn: Any = (sync_many if batch else sync_one) if sync else (many if batch else one)
    async with await _store(sql_db) as store:
        consumer = rjet.Consumer(
            "c", fn, transactional=True, concurrency=concurrency, batch=batch, retry=rjet.RetryPolicy(backoff=0.01)
        )
        spec = rjet.Spec(stream.stream, store, consumer, to_head=True)
        await asyncio.wait_for(rjet.run_forever(spec, retry_delay=0.01), 60)
        assert await store.peek("c") == "300"
    assert failed == {37 * i for i in range(1, 9)}
    rows = sql_db.effects()
    assert sorted(seq for seq, _ in rows) == list(range(1, 301))  # each once: no duplicate, no gap
    order = KeyOrder()
    for seq, fid in rows:
        order.record(seq, fid)
    order.check(range(1, 301))  # each key's rows in stream order


async def test_a_restart_resumes_after_what_was_committed(stream: rjet.Stream, sql_db: SqlDb) -> None:
    """A run cancelled mid-way (as a killed process would be) and run again: each event once."""
    await stream.insert_many([(f"k{i % 7}", 1, b"") for i in range(400)])
    effect = _effect(sql_db)

    async def slow(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await effect(tx, event)
        await asyncio.sleep(0.001)

    for concurrency in (1, 8):
        name = f"c{concurrency}"
        for _ in range(4):
            async with await _store(sql_db, flush_interval=3600) as store:
                consumer = rjet.Consumer(name, slow, transactional=True, concurrency=concurrency)
                task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer)))
                await asyncio.sleep(0.15)
                task.cancel()  # no flush of the buffered cursor: only what the transactions committed counts
                with pytest.raises(asyncio.CancelledError):
                    await task
        async with await _store(sql_db) as store:
            consumer = rjet.Consumer(name, slow, transactional=True, concurrency=concurrency)
            with pytest.raises(rjet.HeadReached):
                await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
    rows = sql_db.effects()
    assert sorted(seq for seq, _ in rows) == sorted(list(range(1, 401)) * 2)  # once per consumer


@SHAPES
async def test_a_runner_that_lost_its_claim_commits_nothing(stream: rjet.Stream, sql_db: SqlDb, sync: bool) -> None:
    """The fence is checked inside the transaction: once another runner claimed the cursor (a member
    paused past its lease, say), the old runner's transactions commit nothing, and its run stops."""
    await stream.insert_many([("k", 1, b"")] * 20)
    async with await _store(sql_db) as first, await _store(sql_db) as second:
        for sequential in (True, False):
            old = await first.claim("c")
            transact = old.transact_sync if sync else old.transact
            insert = _sync_insert if sync else _insert
            seq = len(sql_db.effects()) + 1
            await transact([seq], insert(seq), sequential=True)
            await second.claim("c")  # taken over between two transactions
            with pytest.raises(rjet.CursorConflict, match="another runner claimed it"):
                await _read_out(old, transact([seq + 1], insert(seq + 1), sequential=sequential))
            assert old.lost is not None
            assert [s for s, _ in sql_db.effects()] == list(range(1, seq + 1))
            assert await second.peek("c") == str(seq)


@SHAPES
async def test_an_event_recorded_as_done_already_is_not_committed_again(sql_db: SqlDb, sync: bool) -> None:
    """Events recorded one by one (concurrency > 1, batches) are recorded once, whatever the run
    believes: a transaction of an event done already, in ``rjet_done`` or at or below the cursor,
    rolls back with its effects. The run ends with a CursorStoreError naming the events (the claim
    lost, so that the next claim reads the database's progress), not a CursorConflict: no other
    runner was seen. Before, such a transaction committed its effects a second time."""
    sql_db.create_effects()
    async with await _store(sql_db) as store:
        claim = await store.claim("c")
        transact = claim.transact_sync if sync else claim.transact
        insert = _sync_insert if sync else _insert
        await transact([5, 7], insert(5), sequential=False)
        with pytest.raises(rjet.CursorStoreError, match=r"events 7 were recorded as done already") as e:
            await transact([7, 9], insert(9), sequential=False)
        assert not isinstance(e.value, rjet.CursorConflict)
        assert claim.lost is e.value
        again = await store.claim("c")
        assert again.done is not None
        assert sorted(rjet._progress.decode_done(0, again.done)) == [5, 7]
        await again.set_cursor("10")
        await again.flush()
        transact = again.transact_sync if sync else again.transact
        with pytest.raises(rjet.CursorStoreError, match=r"\(at 10\): events 8 were recorded as done already"):
            await transact([8, 11], insert(8), sequential=False)
    assert [s for s, _ in sql_db.effects()] == [5]


async def _read_out(claim: Any, transaction: Any) -> None:
    """Await ``transaction``, then its outcome: a one-at-a-time transaction's commit may be queued
    (SQLite), read by the claim's next flush."""
    await transaction
    await claim.flush()


def _insert(seq: int) -> Any:
    async def insert(tx: Any) -> None:
        await tx.execute(f"INSERT INTO effects (seq, fid) VALUES ({seq}, 'k')")

    return insert


def _sync_insert(seq: int) -> Any:
    def insert(tx: sqlite3.Connection) -> None:
        tx.execute(f"INSERT INTO effects (seq, fid) VALUES ({seq}, 'k')")

    return insert


async def test_transactional_needs_a_store_that_can_and_a_handler_that_leaves_tx_alone(
    stream: rjet.Stream, sql_db: SqlDb
) -> None:
    await stream.insert_many([("k", 1, b"")])

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.commit()

    async def rolls_back(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.rollback()

    consumer = rjet.Consumer("c", handle, transactional=True)
    with pytest.raises(rjet.ConfigError, match=r"cannot commit a handler's writes.*SqlCursorStore"):
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer))
    with pytest.raises(rjet.ConfigError, match=r"cannot be called as fn\(fate, event, tx\)"):
        rjet.Consumer("c", lambda f, e: None, transactional=True)
    insert = _insert(1)

    async def commit_statement(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute("COMMIT")  # no sync in pipeline mode: rjet's statement sees its transaction over

    async def rollback_statement(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await insert(tx)
        await tx.execute("ROLLBACK")

    async with await _store(sql_db) as store:
        for name, fn in [("c", handle), ("d", rolls_back), ("e", commit_statement), ("f", rollback_statement)]:
            consumer = rjet.Consumer(name, fn, transactional=True)
            with pytest.raises(rjet.ConfigError, match="committed or rolled back tx itself"):
                await rjet.run(rjet.Spec(stream.stream, store, consumer))
            assert await store.peek(name) == ""
    assert sql_db.effects() == []


async def test_nothing_commits_or_is_written_past_a_transaction_that_did_not_commit(
    stream: rjet.Stream, sql_db: SqlDb
) -> None:
    """A one-at-a-time consumer's commit may be queued (SQLite) and the next event's handler start
    before its outcome is read: when it did not commit (here the handler committed tx itself, at
    event 5), the next transaction rolls back, no flush writes the cursor past it (one runs while
    event 6's handler sleeps), and the run ends with its error."""
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(8)])
    effect = _effect(sql_db)
    called: list[int] = []

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        called.append(event.id_int)
        await effect(tx, event)
        if event.id_int == 5:
            await tx.commit()
        if event.id_int == 6:
            await asyncio.sleep(0.3)

    async with await _store(sql_db, flush_interval=0.01) as store:
        consumer = rjet.Consumer("c", handle, transactional=True)
        with pytest.raises(rjet.ConfigError, match="committed or rolled back tx itself"):
            await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, store, consumer)), 30)
        assert await store.peek("c") == "4"
    assert [seq for seq, _ in sql_db.effects()] == [1, 2, 3, 4, 5]  # 5 by the handler's own commit
    assert called in ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6])  # 6: started before 5's outcome was read


async def test_after_a_takeover_while_handlers_run_nothing_more_commits(stream: rjet.Stream, sql_db: SqlDb) -> None:
    """Another runner claims the cursor while event 5's handler runs (on PostgreSQL at once; SQLite
    lets it in between two transactions, once the lock is free): the old runner's transactions from
    then on commit nothing, whether their handler started before or after the last commit's outcome
    was read, and what did commit is exactly the events up to the cursor the new runner took."""
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(8)])
    effect = _effect(sql_db)
    async with await _store(sql_db, flush_interval=0.05) as store, await _store(sql_db) as other:
        takeover: list[asyncio.Task[Any]] = []

        async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
            await effect(tx, event)
            if event.id_int == 5:
                takeover.append(asyncio.create_task(other.claim("c")))
                await asyncio.sleep(0.05)

        consumer = rjet.Consumer("c", handle, transactional=True)
        with pytest.raises(rjet.CursorConflict, match="another runner claimed it"):
            await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, store, consumer)), 30)
        taken = int((await takeover[0]).cursor)
        assert 4 <= taken <= 8
        assert await other.peek("c") == str(taken)
    assert [seq for seq, _ in sql_db.effects()] == list(range(1, taken + 1))


@pytest.mark.parametrize("sql_db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_concurrent_sqlite_transactions_take_turns_instead_of_waiting_for_the_lock(
    stream: rjet.Stream, sql_db: SqlDb, sync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite lets one transaction write at a time: at concurrency 8 a store's handler transactions
    take turns, each beginning once the last one ended, so none waits on the file's write lock (here
    none could: every connection's busy_timeout is 0, and a BEGIN that found the lock held would fail
    with "database is locked")."""
    monkeypatch.setattr(rjet.sql._backends, "_WAIT", "PRAGMA busy_timeout=0")
    await stream.insert_many([(f"k{i % 16}", 1, b"") for i in range(200)])
    effect = _effect(sql_db)

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await effect(tx, event)
        await asyncio.sleep(0.001)  # the transaction held open a while: the others would find the lock taken

    def handle_sync(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        _sync_effect(event, tx)
        time.sleep(0.001)

    async with await _store(sql_db, flush_interval=3600) as store:
        consumer = rjet.Consumer("c", handle_sync if sync else handle, transactional=True, concurrency=8)
        with pytest.raises(rjet.HeadReached):
            await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True)), 60)
        assert await store.peek("c") == "200"
    assert sorted(seq for seq, _ in sql_db.effects()) == list(range(1, 201))


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_stop_lets_the_transactions_in_flight_commit_and_starts_no_handler_call(
    stream: rjet.Stream, sql_db: SqlDb, concurrency: int
) -> None:
    """An async handler sets the stop at event 10: every call made commits (at K=1 on SQLite the
    last one's commit was queued, and the run's end reads it), and no handler call starts after the
    stop (K=1: none after event 10; K=4: none after the calls already made then, although up to 3
    more had been handed over, on SQLite waiting for their turn: they roll back unstarted). The next
    run goes on from there, each event once."""
    await stream.insert_many([(f"k{i % 5}", 1, b"") for i in range(40)])
    effect = _effect(sql_db)
    stop = asyncio.Event()
    calls: list[int] = []
    stopped_after: list[int] = []

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        calls.append(event.id_int)
        await effect(tx, event)
        if event.id_int == 10:
            stopped_after.append(len(calls))
            stop.set()

    async with await _store(sql_db) as store:
        consumer = rjet.Consumer("c", handle, transactional=True, concurrency=concurrency)
        with pytest.raises(rjet.Stopped):
            await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, store, consumer), stop=stop), 30)
        assert len(calls) == stopped_after[0], (calls, stopped_after)  # 0 calls started after the stop
        if concurrency == 1:
            assert calls == list(range(1, 11))
        assert sorted(seq for seq, _ in sql_db.effects()) == sorted(calls)  # each call's transaction committed
        with pytest.raises(rjet.HeadReached):
            await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
    assert sorted(seq for seq, _ in sql_db.effects()) == list(range(1, 41))


@pytest.mark.parametrize("sql_db", ["sqlite"], indirect=True)
async def test_bad_sqlite_files_are_one_line_errors(sql_db: SqlDb, tmp_path: Path) -> None:
    with pytest.raises(rjet.ConfigError, match="unsupported database URL"):
        await SqlCursorStore.open("mysql://x/y")
    with pytest.raises(rjet.ConfigError, match="names no file"):
        await SqlCursorStore.open("sqlite:///:memory:")
    with pytest.raises(rjet.CursorStoreError, match=r"sqlite cursor store at .*missing/app.db: cannot open") as e:
        await SqlCursorStore.open(f"sqlite:///{tmp_path}/missing/app.db")
    assert "\n" not in str(e.value)
    readonly = tmp_path / "ro.db"
    sqlite3.connect(readonly).close()
    readonly.chmod(0o444)
    if not _writable(readonly):  # root writes a file whatever its mode
        with pytest.raises(rjet.CursorStoreError, match="readonly"):
            await SqlCursorStore.open(f"sqlite:///{readonly}")


def _writable(path: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(path)) as db, db:  # closed: sqlite3's `with` only commits
            db.execute("CREATE TABLE probe (x)")
            db.execute("DROP TABLE probe")
        return True
    except sqlite3.OperationalError:
        return False


@pytest.mark.parametrize("sql_db", ["postgresql"], indirect=True)
async def test_bad_postgresql_servers_are_one_line_errors_without_the_password(
    sql_db: SqlDb, postgres_server: PostgresServer, stream: rjet.Stream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    database = sql_db.url.rsplit("/", 1)[1]
    port = free_port()  # nothing listens there
    messages: list[str] = []
    with pytest.raises(rjet.CursorStoreError, match=rf"postgresql cursor store at 127\.0\.0\.1:{port}/") as e:
        await SqlCursorStore.open(postgres_server.url(database, port=port))
    messages.append(str(e.value))
    assert "cannot open the database" in str(e.value)
    with pytest.raises(rjet.CursorStoreError, match="password authentication failed") as e:
        await SqlCursorStore.open(postgres_server.url(database, password=PASSWORD + "-wrong"))
    messages.append(str(e.value))
    with pytest.raises(rjet.CursorStoreError, match='database "nosuch" does not exist') as e:
        await SqlCursorStore.open(postgres_server.url("nosuch"))
    messages.append(str(e.value))
    with pytest.raises(rjet.ConfigError) as c:
        await SqlCursorStore.open(postgres_server.url(database, port=99999))
    messages.append(str(c.value))
    # A run that cannot reach its store: run_forever logs its retries.
    await stream.insert_many([("k", 1, b"")])
    store = SqlCursorStore(backend_for(postgres_server.url(database, port=port)))  # opens nothing yet

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        pass

    spec = rjet.Spec(stream.stream, store, rjet.Consumer("c", handle, transactional=True))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(rjet.run_forever(spec, retry_delay=0.05), 0.5)
    await store.close()
    for message in messages:
        assert "\n" not in message, message
        assert PASSWORD not in message, message
    assert caplog.records, "run_forever logged nothing of its failed runs"
    assert PASSWORD not in caplog.text
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()
        assert not record.exc_info or PASSWORD not in repr(record.exc_info[1])


async def test_a_missing_table_in_the_handlers_sql_is_the_handlers_error(stream: rjet.Stream, sql_db: SqlDb) -> None:
    await stream.insert_many([("k", 1, b"")])

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute("INSERT INTO nosuch (x) VALUES (1)")

    error: type[Exception] = sqlite3.OperationalError if sql_db.kind == "sqlite" else psycopg.errors.UndefinedTable
    match = "no such table: nosuch" if sql_db.kind == "sqlite" else 'relation "nosuch" does not exist'
    async with await _store(sql_db) as store:
        with pytest.raises(error, match=match) as caught:
            await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", handle, transactional=True)))
        assert "its cursor stays before it" in "".join(caught.value.__notes__)
        assert await store.peek("c") == ""


async def test_the_tables_are_versioned(sql_db: SqlDb) -> None:
    async with await SqlCursorStore.open(sql_db.url):
        pass
    async with await SqlCursorStore.open(sql_db.url):  # opened again: nothing to migrate
        pass
    assert sql_db.query("SELECT version FROM rjet_schema") == [(1,)]
    sql_db.query("UPDATE rjet_schema SET version = 99")
    with pytest.raises(rjet.CursorStoreError, match="version 99, newer than this rjet knows") as e:
        await SqlCursorStore.open(sql_db.url)
    assert "\n" not in str(e.value)


async def test_the_store_keeps_the_cursor_store_contract(sql_db: SqlDb) -> None:
    await check_cursor_store(lambda: SqlCursorStore.open(sql_db.url, flush_interval=0.05))


@pytest.mark.parametrize("sql_db", ["postgresql"], indirect=True)
async def test_postgresql_sessions_end_a_transaction_left_idle_unless_the_user_set_how(sql_db: SqlDb) -> None:
    """rjet's connections end a session that sits idle inside a transaction after
    IDLE_IN_TRANSACTION_TIMEOUT (a frozen runner cannot hold the cursor's row for ever: see
    tests/faults/test_sql_faults.py), unless the URL, the role, the database or the server sets a
    timeout of its own."""
    show = "SHOW idle_in_transaction_session_timeout"
    async with await SqlCursorStore.open(sql_db.url) as store, store._connection("look") as conn:
        assert await store.backend.fetchall(conn, show) == [(IDLE_IN_TRANSACTION_TIMEOUT,)] == [("30s",)]
    url = sql_db.url + "?options=-c%20idle_in_transaction_session_timeout%3D7s"
    async with await SqlCursorStore.open(url) as store, store._connection("look") as conn:
        assert await store.backend.fetchall(conn, show) == [("7s",)]
    database = sql_db.url.rsplit("/", 1)[1]
    sql_db.query(f"ALTER DATABASE {database} SET idle_in_transaction_session_timeout = '1min'")
    async with await SqlCursorStore.open(sql_db.url) as store, store._connection("look") as conn:
        assert await store.backend.fetchall(conn, show) == [("1min",)]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("sql_db", ["sqlite"], indirect=True)
async def test_a_begin_that_fails_lets_no_statement_of_the_handlers_commit_on_its_own(
    sql_db: SqlDb, sync: bool
) -> None:
    """SQLite's BEGIN IMMEDIATE is queued ahead of the handler's statements instead of waited for (the
    fast path; RJET_FAST_PATHS=0 waits): when it fails (the file's write lock held elsewhere past
    busy_timeout), the connection is closed before they run, so that none of them commits on its own,
    and the transaction fails with the BEGIN's error, the claim kept; the next one runs on a new
    connection. ``sync``: a sync handler's transaction, in one call on the thread, calls no handler
    after a failed BEGIN."""
    async with await _store(sql_db) as store:
        claim = await store.claim("c")
        async with store._connection("shorten the wait") as conn:  # the pool's one connection
            await store.backend.execute(conn, "PRAGMA busy_timeout=50")
        insert = _insert(1)

        async def later(tx: Any) -> None:  # once the file is free again: run on its own, it would commit
            await asyncio.sleep(2.0)
            await insert(tx)

        called: list[int] = []

        def sync_later(tx: sqlite3.Connection) -> None:
            called.append(1)
            _sync_insert(1)(tx)

        with contextlib.closing(sqlite3.connect(sql_db.path or "", isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            call = (
                claim.transact_sync([1], sync_later, sequential=True)
                if sync
                else claim.transact([1], later, sequential=True)
            )
            transaction = asyncio.create_task(call)
            await asyncio.sleep(1.0)  # the BEGIN gave up after 50 ms
            other.execute("ROLLBACK")
            with pytest.raises(rjet.CursorStoreError, match="cannot begin a transaction: database is locked"):
                await transaction
        assert sql_db.effects() == []
        assert called == []
        assert claim.lost is None
        await (
            claim.transact_sync([1], _sync_insert(1), sequential=True)
            if sync
            else claim.transact([1], _insert(1), sequential=True)
        )
        await claim.flush()
        assert [seq for seq, _ in sql_db.effects()] == [1]
        assert await store.peek("c") == "1"


@SHAPES
async def test_a_handlers_error_rolls_back_and_keeps_the_connection(
    stream: rjet.Stream, sql_db: SqlDb, sync: bool
) -> None:
    """A handler that wrote and then raised: nothing of it commits, and the retry runs on the same
    pooled connection (rolled back, not closed: no reconnect per retry)."""
    await stream.insert_many([("k", 1, b"")] * 3)
    effect = _effect(sql_db)
    seen: list[Any] = []

    async def flaky(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        seen.append(tx)
        await effect(tx, event)
        if len(seen) <= 3:
            raise RuntimeError("after its write")

    def sync_flaky(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        seen.append(tx)
        _sync_effect(event, tx)
        if len(seen) <= 3:
            raise RuntimeError("after its write")

    async with await _store(sql_db) as store:
        fn: Any = sync_flaky if sync else flaky
        consumer = rjet.Consumer("c", fn, transactional=True, retry=rjet.RetryPolicy(backoff=0.01))
        await asyncio.wait_for(rjet.run_forever(rjet.Spec(stream.stream, store, consumer, to_head=True)), 30)
        assert await store.peek("c") == "3"
    assert [seq for seq, _ in sql_db.effects()] == [1, 2, 3]
    assert len(seen) == 6
    assert all(tx is seen[0] for tx in seen)


@pytest.mark.parametrize("sql_db", ["postgresql", "postgresql-pipeline"], indirect=True)
async def test_what_a_handler_sees_of_its_statements_in_pipeline_mode(sql_db: SqlDb) -> None:
    """With ?pipeline=on a statement's result comes with the commit's sync: ``rowcount`` read right
    after ``execute`` is -1 (psycopg's "not known"), never a count; ``fetch*`` waits for the rows
    (seeing the transaction's own writes), and so does the end of an ``async with tx.pipeline()``
    block, after which ``rowcount`` is right. Without pipeline mode every result is there at once."""
    sql_db.create_effects()
    sql_db.query("INSERT INTO effects (seq, fid) VALUES (1, 'a'), (2, 'b')")
    counts: dict[str, int] = {}

    async def call(tx: Any) -> None:
        update = await tx.execute("UPDATE effects SET who = 'x' WHERE seq <= 2")
        counts["at once"] = update.rowcount
        await tx.execute("INSERT INTO effects (seq, fid) VALUES (3, 'c')")
        row = await (await tx.execute("SELECT count(*) FROM effects")).fetchone()
        counts["read"] = row[0]
        counts["update after the read"] = update.rowcount
        async with tx.pipeline():
            update = await tx.execute("UPDATE effects SET who = 'y' WHERE seq >= 2")
        counts["after a pipeline block"] = update.rowcount

    async with await _store(sql_db) as store:
        assert store.backend.pipeline is sql_db.pipeline  # type: ignore[attr-defined]
        claim = await store.claim("c")
        await claim.transact([1], call, sequential=True)
        assert await store.peek("c") == "1"
    expected = {"at once": 2, "read": 3, "update after the read": 2, "after a pipeline block": 2}
    if sql_db.pipeline:
        expected["at once"] = -1
    assert counts == expected
    assert sql_db.query("SELECT seq, who FROM effects ORDER BY seq") == [(1, "x"), (2, "y"), (3, "y")]


@pytest.mark.parametrize("sql_db", ["postgresql-pipeline"], indirect=True)
async def test_pipeline_mode_syncs_a_transaction_once(sql_db: SqlDb, tmp_path: Path) -> None:
    """In pipeline mode a handler's transaction (BEGIN, its insert, the progress, COMMIT) is sent
    with one Sync: one round trip, read from libpq's trace of the protocol."""
    async with await _store(sql_db) as store:
        claim = await store.claim("c")
        await claim.transact([1], _insert(1), sequential=True)  # the pool's connection, made
        trace = tmp_path / "trace"
        async with store._connection("trace") as conn:
            pass
        with trace.open("w") as out:
            conn.pgconn.trace(out.fileno())
            conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                await claim.transact([2], _insert(2), sequential=True)
            finally:
                conn.pgconn.untrace()  # flushes libpq's copy of the file
        assert await store.peek("c") == "2"
    sent = [line.split("\t")[2].split()[0] for line in trace.read_text().splitlines() if line.startswith("F\t")]
    assert sent.count("Sync") == 1, sent
    assert sent.count("Execute") == 5, sent  # BEGIN, rjet's mark, the insert, the progress, COMMIT
    # The fast path queues into psycopg's private pipeline queues; a psycopg without them would quietly
    # get the public path (as RJET_FAST_PATHS=0 does): this psycopg must still have them.
    assert store.backend.fast == (os.environ.get("RJET_FAST_PATHS", "1") != "0")  # type: ignore[attr-defined]


def test_the_pipeline_parameter_is_checked_and_not_passed_to_libpq() -> None:
    on = backend_for("postgresql://u:secret@h:5/db?sslmode=disable&pipeline=on&application_name=a")
    assert on.pipeline  # type: ignore[attr-defined]
    assert on.url == "postgresql://u:secret@h:5/db?sslmode=disable&application_name=a"  # type: ignore[attr-defined]
    off = backend_for("postgresql://h/db?pipeline=off")
    assert not off.pipeline  # type: ignore[attr-defined]
    assert off.url == "postgresql://h/db"  # type: ignore[attr-defined]
    assert not backend_for("postgresql://h/db").pipeline  # type: ignore[attr-defined]
    with pytest.raises(rjet.ConfigError, match="pipeline parameter is on or off, not 'yes'") as caught:
        backend_for("postgresql://u:secret@h/db?pipeline=yes")
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("sql_db", ["postgresql-pipeline"], indirect=True)
async def test_pipeline_mode_survives_its_prepared_statements_deallocated(sql_db: SqlDb) -> None:
    """rjet's progress statements are prepared once per connection: rjet's own ROLLBACKs are not
    seen by psycopg (which answers one with DEALLOCATE ALL once it prepared statements of its own), and
    a handler that deallocates them anyway fails its transaction, nothing committed; the next
    transaction on that connection prepares them again."""
    async with await _store(sql_db) as store:
        claim = await store.claim("c")
        for seq in range(1, 8):  # psycopg prepares the insert at its 5th run
            await claim.transact([seq], _insert_param(seq), sequential=True)
        for seq in (8, 9):  # the first ROLLBACK psycopg sees after that, it answers with DEALLOCATE ALL
            with pytest.raises(psycopg.errors.UndefinedTable):
                await claim.transact([seq], _failing(_insert_param(seq)), sequential=True)
            await claim.transact([seq], _insert_param(seq), sequential=True)
        deallocates = _insert_param(10)

        async def deallocating(tx: Any) -> None:
            await deallocates(tx)
            await tx.execute("DEALLOCATE ALL")

        with pytest.raises(rjet.CursorStoreError, match=r'events 10\.\.10 as done \(nothing committed.*"rjet_move"'):
            await claim.transact([10], deallocating, sequential=True)
        claim = await store.claim("c")
        await claim.transact([10], _insert(10), sequential=True)
        assert await store.peek("c") == "10"
        assert len(store._idle) == 1  # one connection all along
    assert [seq for seq, _ in sql_db.effects()] == list(range(1, 11))


def _insert_param(seq: int) -> Any:
    async def insert(tx: Any) -> None:
        await tx.execute("INSERT INTO effects (seq, fid) VALUES (%s, 'k')", (seq,))

    return insert


def _failing(call: Any) -> Any:
    async def fails(tx: Any) -> None:
        await call(tx)
        await tx.execute("INSERT INTO nosuch (x) VALUES (1)")  # its error comes with the sync

    return fails


async def test_a_handler_that_writes_nothing_or_only_reads_commits_its_progress(
    stream: rjet.Stream, sql_db: SqlDb
) -> None:
    """Nothing sent by the handler (pipeline mode: rjet's BEGIN still unsent), or only a read whose rows
    it fetched (pipeline mode: every answer read, and no sync yet): the event is done all the same."""
    await stream.insert_many([("k", 1, b"")] * 4)

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        if event.id_int % 2 == 0:
            cursor = await tx.execute("SELECT count(*) FROM effects")
            assert (await cursor.fetchone())[0] == 0

    async with await _store(sql_db) as store:
        consumer = rjet.Consumer("c", handle, transactional=True)
        with pytest.raises(rjet.HeadReached):
            await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
        assert await store.peek("c") == "4"


@pytest.mark.parametrize("sql_db", ["postgresql-pipeline"], indirect=True)
async def test_a_session_lost_before_the_sync_answered_is_reported_as_maybe_applied(sql_db: SqlDb) -> None:
    """Pipeline mode: the server's session ends while the transaction's statements are on their way
    (here: one of them ends it), so the sync is never answered: the commit is reported as one that
    may or may not be applied, the claim is lost, and the next claim reads what the database holds
    (here: nothing was, so the event is handled again, once)."""
    async with await _store(sql_db) as store:
        claim = await store.claim("c")

        async def ends_its_session(tx: Any) -> None:
            await _insert(1)(tx)
            await tx.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        with pytest.raises(rjet.CursorStoreError, match=r"the commit of events 1\.\.1 may or may not be applied"):
            await claim.transact([1], ends_its_session, sequential=True)
        assert claim.lost is not None
        assert store._idle == []  # the broken connection is not pooled
        claim = await store.claim("c")
        assert claim.cursor == ""  # the database's answer: not applied
        await claim.transact([1], _insert(1), sequential=True)
        assert await store.peek("c") == "1"
    assert [seq for seq, _ in sql_db.effects()] == [1]


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("sql_db", ["sqlite"], indirect=True)
async def test_a_sync_handler_runs_its_whole_transaction_in_one_call_on_one_thread(
    stream: rjet.Stream, sql_db: SqlDb, concurrency: int
) -> None:
    """SQLite, ``def fn(fate, event, tx)``: ``tx`` is the ``sqlite3.Connection`` itself, inside rjet's
    open transaction; BEGIN IMMEDIATE, the handler's insert, the progress and COMMIT run on one
    thread, the handler between BEGIN and the progress. K=1: the event loop's (as any sync handler
    of a one-at-a-time consumer), its BEGIN waiting for no lock; K>1: the connection's, never the
    loop's."""
    await stream.insert_many([("k", 1, b"")] * 3)
    loop_thread = threading.get_ident()
    seen: list[tuple[type, bool, int]] = []
    statements: list[tuple[int, str]] = []

    def handle(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        if not seen:
            tx.set_trace_callback(lambda sql: statements.append((threading.get_ident(), sql)))
        seen.append((type(tx), tx.in_transaction, threading.get_ident()))
        _sync_effect(event, tx)

    async with await _store(sql_db) as store:
        assert store.capabilities.sync_transactional
        consumer = rjet.Consumer("c", handle, transactional=True, concurrency=concurrency)
        with pytest.raises(rjet.HeadReached):
            await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
        await store.flush()
        assert await store.peek("c") == "3"
    assert [seq for seq, _ in sql_db.effects()] == [1, 2, 3]
    assert [(t, in_tx) for t, in_tx, _ in seen] == [(sqlite3.Connection, True)] * 3
    threads = {thread for _, _, thread in seen}
    assert threads == {loop_thread} if concurrency == 1 else loop_thread not in threads
    # The first call set the trace after its BEGIN: its insert, its progress, its COMMIT; then the
    # next two transactions whole, each on its handler's thread (K>1: the connection's own; without
    # the fast path one of asyncio's pool). After them: the run's last cursor flush.
    if concurrency == 1:  # the cursor moved (on a connection that waits for no lock: no PRAGMA)
        whole = ["BEGIN IMMEDIATE", "INSERT", "UPDATE", "COMMIT"]
    else:  # the claim checked, one rjet_done row
        whole = ["BEGIN IMMEDIATE", "INSERT", "SELECT", "INSERT", "COMMIT"]
    first = whole[whole.index("INSERT") :]
    size = [len(first), len(whole), len(whole)]
    transactions = [
        statements[: size[0]],
        statements[size[0] : size[0] + size[1]],
        statements[sum(size[:2]) : sum(size)],
    ]
    assert [[sql if sql.startswith(("BEGIN", "PRAGMA")) else sql.split()[0] for _, sql in t] for t in transactions] == [
        first,
        whole,
        whole,
    ]
    for t, (_, _, thread) in zip(transactions, seen, strict=True):
        assert {th for th, _ in t} == {thread}


@pytest.mark.parametrize("sql_db", ["sqlite"], indirect=True)
async def test_a_sync_handler_at_k1_waits_for_a_write_lock_off_the_loop(stream: rjet.Stream, sql_db: SqlDb) -> None:
    """K=1 runs a sync handler's transaction on the loop's thread, but its BEGIN IMMEDIATE waits for no
    lock: where a transaction on this very loop holds the file's write lock (here an aiosqlite one,
    as an async consumer's would), waiting for it on the loop would wait for ever (30 s, then fail).
    The transaction goes to the connection's thread instead, which waits there while the loop goes
    on; once the lock is free the next ones run on the loop's thread again."""
    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
    threads: list[int] = []
    stop = asyncio.Event()

    def handle(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        threads.append(threading.get_ident())
        _sync_effect(event, tx)
        if len(threads) == 3:
            loop.call_soon_threadsafe(stop.set)

    async with await _store(sql_db) as store:
        assert sql_db.path is not None
        consumer = rjet.Consumer("c", handle, transactional=True)
        run = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer), stop=stop))
        await _claimed(store, "c")
        async with aiosqlite.connect(sql_db.path, isolation_level=None) as holder:
            await holder.execute("BEGIN IMMEDIATE")
            await holder.execute("INSERT INTO effects (seq, fid) VALUES (0, 'holder')")
            await stream.insert_many([("k", 1, b"")] * 3)
            t0 = loop.time()
            await asyncio.sleep(0.5)  # the loop runs meanwhile: it is not blocked on the lock
            assert loop.time() - t0 < 2.0
            assert threads == []
            assert not run.done()
            await holder.execute("COMMIT")
        with pytest.raises(rjet.Stopped):
            await asyncio.wait_for(run, 30)
        assert await store.peek("c") == "3"
    assert [seq for seq, _ in sql_db.effects()] == [0, 1, 2, 3]
    assert threads[0] != loop_thread
    assert threads[1:] == [loop_thread, loop_thread]


@pytest.mark.fast_paths
@pytest.mark.parametrize("sql_db", ["sqlite"], indirect=True)
async def test_a_sync_handler_at_k1_runs_on_a_connection_of_its_own_not_a_pooled_one(
    stream: rjet.Stream, sql_db: SqlDb
) -> None:
    """The K=1 transaction runs on the loop's thread with a connection outside the pool: work still
    queued on a pooled connection's aiosqlite thread (rjet awaits all it sends before pooling one; an
    async handler's call left unawaited would not be) neither runs beside it on that connection nor
    holds it up."""
    loop, loop_thread = asyncio.get_running_loop(), threading.get_ident()
    order: list[tuple[int, object, float]] = []
    stop = asyncio.Event()

    def handle(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        order.append((threading.get_ident(), tx, loop.time()))
        _sync_effect(event, tx)
        loop.call_soon_threadsafe(stop.set)

    async with await _store(sql_db) as store:
        consumer = rjet.Consumer("c", handle, transactional=True)
        run = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer), stop=stop))
        await _claimed(store, "c")
        assert store._idle
        backend: Any = store.backend
        pooled = {backend._dbs[conn] for conn in store._idle}
        for conn in store._idle:
            conn._tx.put_nowait((None, lambda: time.sleep(1.0)))  # each pooled connection busy for 1 s
        started = loop.time()
        await stream.insert_many([("k", 1, b"")])
        with pytest.raises(rjet.Stopped):
            await asyncio.wait_for(run, 30)
        assert await store.peek("c") == "1"
        [(thread, tx, called)] = order
        assert thread == loop_thread
        assert tx not in pooled
        assert called - started < 1.0  # not after the pooled connections' queued work (the flush is)
    assert [seq for seq, _ in sql_db.effects()] == [1]


async def _claimed(store: SqlCursorStore, name: str) -> None:
    """Once a run holds ``name``'s claim (the claim takes the file's write lock and a connection)."""
    for _ in range(1000):
        if name in await store.records():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name!r} never claimed")


@pytest.mark.parametrize("sql_db", ["sqlite"], indirect=True)
async def test_a_sync_handler_that_ends_tx_itself_or_returns_an_awaitable_is_refused(
    stream: rjet.Stream, sql_db: SqlDb
) -> None:
    await stream.insert_many([("k", 1, b"")])

    def commits(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        _sync_effect(event, tx)
        tx.commit()

    def rolls_back(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        _sync_effect(event, tx)
        tx.execute("ROLLBACK")

    class AsyncCallable:  # not a coroutine function: taken for a sync handler
        async def __call__(self, fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
            await tx.execute("INSERT INTO effects (seq, fid) VALUES (1, 'k')")

    async with await _store(sql_db) as store:
        for name, fn in [("c", commits), ("d", rolls_back)]:
            with pytest.raises(rjet.ConfigError, match="committed or rolled back tx itself"):
                await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer(name, fn, transactional=True)))
            assert await store.peek(name) == ""
        with pytest.raises(rjet.ConfigError, match="returned an awaitable, so it was taken for a sync one"):
            await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("e", AsyncCallable(), transactional=True)))
        assert await store.peek("e") == ""
    assert [seq for seq, _ in sql_db.effects()] == [1]  # the one that committed it itself


@pytest.mark.parametrize("sql_db", ["postgresql", "postgresql-pipeline"], indirect=True)
async def test_a_sync_handler_on_postgresql_is_a_config_error_at_start(stream: rjet.Stream, sql_db: SqlDb) -> None:
    """PostgreSQL's tx is a psycopg AsyncConnection: a sync transactional handler is refused when the
    run starts, before it claims anything, in one line that says what to do."""
    await stream.insert_many([("k", 1, b"")])

    def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        raise AssertionError("never called")

    async with await _store(sql_db) as store:
        assert not store.capabilities.sync_transactional
        with pytest.raises(rjet.ConfigError, match=r"transactional handler is sync.*make it async def fn") as e:
            await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", handle, transactional=True)))
        assert "\n" not in str(e.value)
        assert await store.records() == {}  # nothing claimed
    with pytest.raises(rjet.ConfigError, match="cannot commit a handler's writes"):  # no transactions at all
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", handle, transactional=True)))


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("sql_db", ["sqlite"], indirect=True)
async def test_a_stop_lets_a_sync_handlers_transaction_commit_and_starts_no_other(
    stream: rjet.Stream, sql_db: SqlDb, concurrency: int
) -> None:
    """The stop request comes from a handler (through the loop, from whichever thread runs it); the
    transactions in flight commit, with their progress, and no handler call starts after it was set
    (K=1: exactly the events before it, however many the loop handled before it ran the callback, as
    with any sync handler; K=4: the calls in flight then at most). The next run goes on from there."""
    await stream.insert_many([(f"k{i % 5}", 1, b"") for i in range(40)])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    calls: list[int] = []
    stopped_after: list[int] = []

    def stop_now() -> None:
        stopped_after.append(len(calls))
        stop.set()

    def handle(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        calls.append(event.id_int)
        _sync_effect(event, tx)
        if event.id_int == 10:
            loop.call_soon_threadsafe(stop_now)

    async with await _store(sql_db) as store:
        consumer = rjet.Consumer("c", handle, transactional=True, concurrency=concurrency)
        with pytest.raises(rjet.Stopped):
            await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, store, consumer), stop=stop), 30)
        if concurrency == 1:  # on the loop's thread: the stop is set once the loop runs its callback
            assert stopped_after[0] >= 10
            assert calls == list(range(1, stopped_after[0] + 1))
        else:
            assert len(calls) <= stopped_after[0] + concurrency - 1, (calls, stopped_after)
        assert sorted(seq for seq, _ in sql_db.effects()) == sorted(calls)  # each call's transaction committed
        await store.flush()
        with pytest.raises(rjet.HeadReached):
            await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
    assert sorted(seq for seq, _ in sql_db.effects()) == list(range(1, 41))
