"""rjet.sql: cursors in SQLite, and transactional consumers whose writes commit with their progress."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import rjet
from rjet.sql import SqlCursorStore
from rjet.testing import KeyOrder


def _rows(path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as db:
        return [(int(a), str(b)) for a, b in db.execute("SELECT seq, fid FROM effects ORDER BY rowid")]


async def _store(path: Path, **options: Any) -> SqlCursorStore:
    store = await SqlCursorStore.open(f"sqlite:///{path}", **options)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS effects (seq INTEGER, fid TEXT)")
    return store


async def _effect(tx: Any, event: rjet.Event) -> None:
    await tx.execute("INSERT INTO effects (seq, fid) VALUES (?, ?)", (event.id_int, event.foreign_id))


@pytest.mark.parametrize(
    ("concurrency", "batch"), [(1, None), (8, None), (1, rjet.Batch(10, max_wait=0.01)), (4, rjet.Batch(10, 0.01))]
)
async def test_each_event_is_applied_exactly_once_with_its_progress(
    stream: rjet.Stream, tmp_path: Path, concurrency: int, batch: rjet.Batch | None
) -> None:
    await stream.insert_many([(f"k{i % 13}", 1, b"") for i in range(300)])
    db = tmp_path / "app.db"
    failed: set[int] = set()

    async def one(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await _effect(tx, event)
        if event.id_int % 37 == 0 and event.id_int not in failed:  # wrote, then failed: rolled back
            failed.add(event.id_int)
            raise RuntimeError("after its write")

    async def many(fate: rjet.Fate, events: list[rjet.Event], tx: Any) -> None:
        for event in events:
            await one(fate, event, tx)

    fn = many if batch else one
    async with await _store(db) as store:
        consumer = rjet.Consumer(
            "c", fn, transactional=True, concurrency=concurrency, batch=batch, retry=rjet.RetryPolicy(backoff=0.01)
        )
        spec = rjet.Spec(stream.stream, store, consumer, to_head=True)
        await asyncio.wait_for(rjet.run_forever(spec, retry_delay=0.01), 60)
        assert await store.peek("c") == "300"
    rows = _rows(db)
    assert sorted(seq for seq, _ in rows) == list(range(1, 301))  # each once: no duplicate, no gap
    order = KeyOrder()
    for seq, fid in rows:
        order.record(seq, fid)
    order.check(range(1, 301))  # each key's rows in stream order


async def test_a_restart_resumes_after_what_was_committed(stream: rjet.Stream, tmp_path: Path) -> None:
    """A run cancelled mid-way (as a killed process would be) and run again: each event once."""
    await stream.insert_many([(f"k{i % 7}", 1, b"") for i in range(400)])
    db = tmp_path / "app.db"

    async def slow(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await _effect(tx, event)
        await asyncio.sleep(0.001)

    for concurrency in (1, 8):
        name = f"c{concurrency}"
        for _ in range(4):
            async with await _store(db, flush_interval=3600) as store:
                consumer = rjet.Consumer(name, slow, transactional=True, concurrency=concurrency)
                task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer)))
                await asyncio.sleep(0.15)
                task.cancel()  # no flush of the buffered cursor: only what the transactions committed counts
                with pytest.raises(asyncio.CancelledError):
                    await task
        async with await _store(db) as store:
            consumer = rjet.Consumer(name, slow, transactional=True, concurrency=concurrency)
            with pytest.raises(rjet.HeadReached):
                await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
    rows = _rows(db)
    assert sorted(seq for seq, _ in rows) == sorted(list(range(1, 401)) * 2)  # once per consumer


async def test_a_runner_that_lost_its_claim_commits_nothing(stream: rjet.Stream, tmp_path: Path) -> None:
    """The fence is checked inside the transaction: once another runner claimed the cursor (a member
    paused past its lease, say), the old runner's transactions commit nothing, and its run stops."""
    await stream.insert_many([("k", 1, b"")] * 20)
    db = tmp_path / "app.db"
    async with await _store(db) as first, await _store(db) as second:
        old = await first.claim("c")
        await old.transact([1], lambda tx: tx.execute("INSERT INTO effects VALUES (1, 'k')"), sequential=True)
        await second.claim("c")  # taken over between two transactions
        with pytest.raises(rjet.CursorConflict, match="another runner claimed it"):
            await old.transact([2], lambda tx: tx.execute("INSERT INTO effects VALUES (2, 'k')"), sequential=True)
        assert old.lost is not None
        assert [seq for seq, _ in _rows(db)] == [1]
        assert await second.peek("c") == "1"


async def test_transactional_needs_a_store_that_can_and_a_handler_that_leaves_tx_alone(
    stream: rjet.Stream, tmp_path: Path
) -> None:
    await stream.insert_many([("k", 1, b"")])

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.commit()

    consumer = rjet.Consumer("c", handle, transactional=True)
    with pytest.raises(rjet.ConfigError, match=r"cannot commit a handler's writes.*SqlCursorStore"):
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer))
    with pytest.raises(rjet.ConfigError, match=r"cannot be called as fn\(fate, event, tx\)"):
        rjet.Consumer("c", lambda f, e: None, transactional=True)
    with pytest.raises(rjet.ConfigError, match="a transactional handler is async"):
        rjet.Consumer("c", lambda f, e, tx: None, transactional=True)
    async with await _store(tmp_path / "app.db") as store:
        with pytest.raises(rjet.ConfigError, match="committed or rolled back tx itself"):
            await rjet.run(rjet.Spec(stream.stream, store, consumer))
        assert await store.peek("c") == ""


async def test_bad_databases_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(rjet.ConfigError, match="unsupported database URL"):
        await SqlCursorStore.open("mysql://x/y")
    with pytest.raises(rjet.ConfigError, match="names no file"):
        await SqlCursorStore.open("sqlite:///:memory:")
    with pytest.raises(rjet.CursorStoreError, match=r"sqlite cursor store at .*missing/app.db: cannot open"):
        await SqlCursorStore.open(f"sqlite:///{tmp_path}/missing/app.db")
    readonly = tmp_path / "ro.db"
    sqlite3.connect(readonly).close()
    readonly.chmod(0o444)
    if not _writable(readonly):
        with pytest.raises(rjet.CursorStoreError, match="readonly"):
            await SqlCursorStore.open(f"sqlite:///{readonly}")


def _writable(path: Path) -> bool:
    try:
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE probe (x)")
            db.execute("DROP TABLE probe")
        return True
    except sqlite3.OperationalError:
        return False


async def test_a_missing_table_in_the_handlers_sql_is_the_handlers_error(stream: rjet.Stream, tmp_path: Path) -> None:
    await stream.insert_many([("k", 1, b"")])

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute("INSERT INTO nosuch (x) VALUES (1)")

    async with await _store(tmp_path / "app.db") as store:
        with pytest.raises(sqlite3.OperationalError, match="no such table: nosuch") as caught:
            await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", handle, transactional=True)))
        assert "its cursor stays before it" in "".join(caught.value.__notes__)
        assert await store.peek("c") == ""


async def test_the_tables_are_versioned(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    async with await SqlCursorStore.open(f"sqlite:///{db}"):
        pass
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM rjet_schema").fetchall() == [(1,)]
        conn.execute("UPDATE rjet_schema SET version = 99")
    with pytest.raises(rjet.CursorStoreError, match="version 99, newer than this rjet knows"):
        await SqlCursorStore.open(f"sqlite:///{db}")
