"""rjet.sql under faults, on real servers and processes: PostgreSQL restarted under a running
consumer, a paused runner ("zombie") whose claim is taken over, and worker processes SIGKILLed at
random points. In each, the user's table holds each event exactly once, each key's rows in stream
order. (Slow: every test under tests/faults/ is.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sql_fixtures import PASSWORD, PostgresServer, SqlDb, postgres_server, sql_db

import rjet
import rjet._progress
import rjet.sql._backends
from rjet.server import EmbeddedServer
from rjet.sql import SqlCursorStore
from rjet.testing import KeyOrder

from .conftest import CuttingProxy

__all__ = ["postgres_server", "sql_db"]  # the fixtures, imported for pytest

WORKER = Path(__file__).with_name("sql_worker.py")


def check_exactly_once(db: SqlDb, count: int) -> list[tuple[int, str]]:
    """The table holds events 1..count once each, each key's rows in stream order."""
    rows = db.effects()
    seqs = sorted(seq for seq, _ in rows)
    duplicates = len(seqs) - len(set(seqs))
    assert duplicates == 0, f"{duplicates} events applied twice"
    assert seqs == list(range(1, count + 1)), f"missing: {sorted(set(range(1, count + 1)) - set(seqs))[:10]}"
    order = KeyOrder()
    for seq, fid in rows:
        order.record(seq, fid)
    order.check(range(1, count + 1))
    return rows


class Counter:
    """Counts the rows of ``effects`` on a connection of its own (held open: polled often)."""

    def __init__(self, db: SqlDb) -> None:
        self.db = db
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.AsyncConnection[Any] | None = None

    async def count(self) -> int:
        if self.db.kind == "sqlite":
            if self._sqlite is None:
                self._sqlite = sqlite3.connect(self.db.path or "", timeout=30)
            return int(self._sqlite.execute("SELECT count(*) FROM effects").fetchone()[0])
        if self._pg is None:
            self._pg = await psycopg.AsyncConnection.connect(self.db.plain_url, autocommit=True)
        cursor = await self._pg.execute("SELECT count(*) FROM effects")
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            await self._pg.close()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, free to be stopped and started."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def nats_stream(server: EmbeddedServer, name: str) -> AsyncIterator[rjet.Stream]:
    nc = await rjet.connect(server.url)
    try:
        yield await rjet.Stream.create(nc.jetstream(), name)
    finally:
        await nc.close()


async def insert(stream: rjet.Stream, count: int, keys: int) -> None:
    for start in range(0, count, 5000):
        await stream.insert_many([(f"k{i % keys}", 1, b"") for i in range(start, min(count, start + 5000))])


# ----------------------------------------------------------------- PostgreSQL restarted


@pytest.mark.timeout(120)
@pytest.mark.parametrize("concurrency", [1, 8])
@pytest.mark.parametrize("pipeline", [False, True], ids=["", "pipeline"])
async def test_postgresql_restarted_mid_run(
    nats_stream: rjet.Stream,
    own_postgres: PostgresServer,
    concurrency: int,
    pipeline: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server stopped as by a crash (``pg_ctl -m immediate``) twice under run_forever, and
    started again: the run goes on, each event once, each key's rows in stream order; what it logs
    meanwhile never shows the URL's password."""
    caplog.set_level(logging.INFO)
    count = 4000
    await insert(nats_stream, count, keys=100)
    url = own_postgres.create_database()
    db = SqlDb("postgresql", url + "?pipeline=on" if pipeline else url, pipeline=pipeline)
    db.create_effects()
    effect = db.sql("INSERT INTO effects (seq, fid) VALUES (?, ?)")

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute(effect, (event.id_int, event.foreign_id))

    counter = Counter(db)
    async with await SqlCursorStore.open(db.url, flush_interval=0.05) as store:
        consumer = rjet.Consumer("c", handle, transactional=True, concurrency=concurrency)
        spec = rjet.Spec(nats_stream.stream, store, consumer, to_head=True)
        task = asyncio.create_task(rjet.run_forever(spec, retry_delay=0.05, max_backoff=0.5))
        try:
            for mark in (count // 4, count // 2):
                while await counter.count() < mark:
                    assert not task.done(), task
                    await asyncio.sleep(0.01)
                await counter.close()
                counter = Counter(db)
                await asyncio.to_thread(own_postgres.stop, "immediate")
                await asyncio.sleep(0.5)
                await asyncio.to_thread(own_postgres.start)
            await asyncio.wait_for(task, 90)
        finally:
            task.cancel()
            await counter.close()
        assert await store.peek("c") == str(count)
    check_exactly_once(db, count)
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert failures, "no run failed: the restarts went unnoticed"
    assert PASSWORD not in caplog.text
    print(f"K={concurrency}: {count} events, 2 server restarts, {len(failures)} failures logged")


@pytest.mark.timeout(120)
async def test_a_postgresql_restart_between_events_costs_no_failure(
    nats_stream: rjet.Stream, own_postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The server restarted (``pg_ctl -m immediate``) while a consumer with K=8, its pool full of
    idle connections, waits for the next events: each of those connections is seen ended and
    dropped before it is handed out, so the next events are handled without a single failure
    (before: one failed transaction per pooled connection, each finding its own dead: 9 of 9 here)."""
    caplog.set_level(logging.INFO)
    db = SqlDb("postgresql", own_postgres.create_database())
    db.create_effects()
    effect = db.sql("INSERT INTO effects (seq, fid) VALUES (?, ?)")

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute(effect, (event.id_int, event.foreign_id))

    counter = Counter(db)
    async with await SqlCursorStore.open(db.url, flush_interval=0.05) as store:
        spec = rjet.Spec(nats_stream.stream, store, rjet.Consumer("c", handle, transactional=True, concurrency=8))
        task = asyncio.create_task(rjet.run_forever(spec, retry_delay=0.05, max_backoff=0.5))
        try:
            for part in (1, 2):
                await insert(nats_stream, 1000, keys=100)
                while await counter.count() < 1000 * part or await store.peek("c") != str(1000 * part):
                    assert not task.done(), task
                    await asyncio.sleep(0.01)
                if part == 1:
                    # The last progress handed over (the saver's last turn may follow the flush that
                    # wrote 1000) is written now, so that no background flush is due while the server
                    # is down: such a flush fails, is logged and is tried again, which is not what
                    # this test is about (the pooled connections are).
                    await asyncio.sleep(0.2)
                    await store.flush()
                    pooled = len(store._idle)
                    assert pooled >= 4, f"only {pooled} pooled connections: the test shows nothing"
                    await counter.close()
                    counter = Counter(db)
                    await asyncio.to_thread(own_postgres.stop, "immediate")
                    await asyncio.to_thread(own_postgres.start)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await counter.close()
    check_exactly_once(db, 2000)
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not failures, f"{len(failures)} failures after the restart, {pooled} connections pooled: {failures}"


# ----------------------------------------------------------------- a commit whose answer is lost


async def cut_commits(proxy: CuttingProxy, counter: Counter, task: asyncio.Task[Any], count: int) -> None:
    """Six cuts at the next ``COMMIT`` (delivered or not, in turns), one after each eighth of
    ``count`` rows committed (or at once, where the rows are there already)."""
    for i, deliver in enumerate([True, False] * 3):
        while await counter.count() < (i + 1) * count // 8:
            assert not task.done(), task
            await asyncio.sleep(0.005)
        done = sum(proxy.cut_at_marker.values())
        proxy.cut_at(b"COMMIT", deliver=deliver)
        while sum(proxy.cut_at_marker.values()) == done:
            assert not task.done(), task
            await asyncio.sleep(0.005)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("concurrency", "batch"), [(1, 0), (8, 0), (8, 20)], ids=["K1", "K8", "K8-batch20"])
@pytest.mark.parametrize("pipeline", [False, True], ids=["", "pipeline"])
async def test_a_commit_whose_answer_is_lost_is_settled_by_reading_back(
    nats_stream: rjet.Stream,
    postgres_server: PostgresServer,
    concurrency: int,
    batch: int,
    pipeline: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The store reaches PostgreSQL through a proxy that cuts the connection that next sends a
    ``COMMIT``, six times: three after the server had it (applied) and three before (not applied);
    the client hears neither. A cut lands on a handler's transaction (its row and its progress) or,
    armed again at once, on the claim of the run after a cut, whose answer is then read back. Each
    ends its run with a CursorStoreError; run_forever's next claim reads the database's answer:
    each event once, each key's rows in stream order, the cursor at the head, and the runner never
    blamed another (no CursorConflict: none ran). One event a transaction, or batches of 20.

    Before the read-back of a claim took the events committed above the cursor (``rjet_done``,
    where K>1 records them), K=8 handled 50-200 events twice here."""
    caplog.set_level(logging.INFO)
    count = 1200
    await insert(nats_stream, count, keys=50)
    direct = postgres_server.create_database()
    proxy = CuttingProxy(postgres_server.port)
    await proxy.start()
    url = postgres_server.url(direct.rsplit("/", 1)[1], port=proxy.port)
    db = SqlDb("postgresql", direct + "?pipeline=on" if pipeline else direct, pipeline=pipeline)
    db.create_effects()
    effect = db.sql("INSERT INTO effects (seq, fid) VALUES (?, ?)")

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute(effect, (event.id_int, event.foreign_id))
        await asyncio.sleep(0.001)

    async def handle_batch(fate: rjet.Fate, events: list[rjet.Event], tx: Any) -> None:
        for event in events:
            await tx.execute(effect, (event.id_int, event.foreign_id))
        await asyncio.sleep(0.001)

    counter = Counter(db)
    try:
        async with await SqlCursorStore.open(url + "?pipeline=on" if pipeline else url, flush_interval=0.05) as store:
            if batch:
                consumer = rjet.Consumer(
                    "c", handle_batch, transactional=True, concurrency=concurrency, batch=rjet.Batch(batch, 0.005)
                )
            else:
                consumer = rjet.Consumer("c", handle, transactional=True, concurrency=concurrency)
            spec = rjet.Spec(nats_stream.stream, store, consumer, to_head=True)
            task = asyncio.create_task(rjet.run_forever(spec, retry_delay=0.05, max_backoff=0.2))
            try:
                await cut_commits(proxy, counter, task, count)
                await asyncio.wait_for(task, 60)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert await store.peek("c") == str(count)
    finally:
        await counter.close()
        await proxy.close()
    assert proxy.cut_at_marker == {True: 3, False: 3}
    check_exactly_once(db, count)
    failures = [
        f"{r.getMessage()}: {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING
    ]
    unsure = [f for f in failures if "may or may not be applied" in f]
    assert unsure, f"no commit was left unanswered: {failures}"
    blamed = [f for f in failures if "another runner" in f or "CursorConflict" in f]
    assert not blamed, f"the runner blamed another runner after its own lost answers: {blamed}"
    print(f"K={concurrency} batch={batch}: {len(failures)} failures logged, {len(unsure)} commits unanswered")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("deliver", [True, False], ids=["applied", "not-applied"])
async def test_a_claim_whose_answer_is_lost_reads_back_the_events_done_above_the_cursor(
    postgres_server: PostgresServer, deliver: bool
) -> None:
    """Events 5 and 7 committed above the cursor (``rjet_done``, as K>1 transactions record them);
    the same runner claims again and its claim's ``COMMIT`` is cut (delivered or not): the claim it
    reads back holds the cursor and those two events as done, as the claim itself would."""
    direct = postgres_server.create_database()
    proxy = CuttingProxy(postgres_server.port)
    await proxy.start()
    try:
        url = postgres_server.url(direct.rsplit("/", 1)[1], port=proxy.port)
        async with await SqlCursorStore.open(url) as store:
            claim = await store.claim("c", owner="me")
            claim.stream = "s"

            async def nothing(tx: Any) -> None:
                pass

            await claim.transact([5, 7], nothing, sequential=False)
            proxy.cut_at(b"COMMIT", deliver=deliver)
            again = await store.claim("c", owner="me", after="me")
            assert proxy.cut_at_marker[deliver] == 1, "the claim's COMMIT was not cut"
            assert again.cursor == ""
            assert again.done is not None
            assert sorted(rjet._progress.decode_done(0, again.done)) == [5, 7]
    finally:
        await proxy.close()


@pytest.mark.timeout(150)
async def test_a_group_on_postgresql_goes_on_through_lost_commit_answers(
    server: EmbeddedServer, stream: rjet.Stream, name: str, postgres_server: PostgresServer
) -> None:
    """A ``Parallel`` group (n=2, K=4, transactional) whose workers reach PostgreSQL through a proxy
    that cuts the connection sending a ``COMMIT``, six times (applied or not, in turns), wherever
    it lands: a worker's transaction, claim or flush. The workers go on by themselves (none is
    fenced, none restarted for a conflict), and the rows hold each event once, per key in order."""
    from test_parallel import insert as insert_events
    from test_parallel_sql import check_rows, group

    direct = postgres_server.create_database()
    proxy = CuttingProxy(postgres_server.port)
    await proxy.start()
    try:
        via = SqlDb("postgresql", postgres_server.url(direct.rsplit("/", 1)[1], port=proxy.port))
        db = SqlDb("postgresql", direct)
        db.create_effects()
        events = await insert_events(stream, 1600)
        task = asyncio.create_task(group(server, name, 2, via, concurrency=4).run_async(to_head=True))
        counter = Counter(db)
        try:
            await cut_commits(proxy, counter, task, len(events))
            summary = await asyncio.wait_for(task, 120)
        finally:
            task.cancel()
            await counter.close()
    finally:
        await proxy.close()
    assert proxy.cut_at_marker == {True: 3, False: 3}
    check_rows(db, events)
    assert [(s.state, s.cursor) for s in summary.shards] == [("done", str(max(events)))] * 2
    print(f"worker restarts by shard: {[s.restarts for s in summary.shards]}")


# ----------------------------------------------------------------- the zombie


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("concurrency", "holds_row"), [(1, False), (8, False), (1, True)], ids=["K1", "K8", "K1-holding-the-row"]
)
@pytest.mark.parametrize("sql_db", ["postgresql", "postgresql-pipeline"], indirect=True)
async def test_a_paused_runner_commits_nothing_after_a_takeover(
    nats_stream: rjet.Stream, sql_db: SqlDb, concurrency: int, holds_row: bool
) -> None:
    """The first runner pauses inside its handlers, each holding a transaction open (as a process
    SIGSTOPped past its lease would); a second runner claims the cursor and runs to the head; the
    first resumes: it commits nothing more, and its run stops with CursorConflict.

    Paused inside the handler, the first holds no lock on the cursor's row: the takeover goes
    through at once. ``holds_row``: the handler read the row ``FOR SHARE`` first (as rjet's own
    fence read does at the end of every transaction): the takeover waits for the first's
    transaction, which then commits before it, and nothing after."""
    count = 300
    await insert(nats_stream, count, keys=20)
    sql_db.create_effects()
    effect = sql_db.sql("INSERT INTO effects (seq, fid, who) VALUES (?, ?, ?)")
    resume = asyncio.Event()
    paused: list[int] = []
    pause_at = 60

    async def first_handler(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute(effect, (event.id_int, event.foreign_id, "first"))
        if event.id_int >= pause_at:
            if holds_row:
                await tx.execute("SELECT 1 FROM rjet_cursors WHERE name = 'c' FOR SHARE")
            paused.append(event.id_int)
            await resume.wait()

    second_started = asyncio.Event()

    async def second_handler(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        second_started.set()
        await tx.execute(effect, (event.id_int, event.foreign_id, "second"))

    def first_rows() -> int:
        return int(sql_db.query("SELECT count(*) FROM effects WHERE who = 'first'")[0][0])

    async with (
        await SqlCursorStore.open(sql_db.url, flush_interval=0.05) as one,
        await SqlCursorStore.open(sql_db.url, flush_interval=0.05) as two,
    ):
        first = asyncio.create_task(
            rjet.run(rjet.Spec(nats_stream.stream, one, rjet.Consumer("c", first_handler, transactional=True,
                                                                      concurrency=concurrency)))
        )  # fmt: skip
        while len(paused) < concurrency:  # every slot paused, each inside an open transaction
            assert not first.done(), first
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        before = first_rows()
        owner = sql_db.query("SELECT owner FROM rjet_cursors WHERE name = 'c'")
        second = asyncio.create_task(
            rjet.run(rjet.Spec(nats_stream.stream, two, rjet.Consumer("c", second_handler, transactional=True,
                                                                      concurrency=concurrency), to_head=True))
        )  # fmt: skip
        if holds_row:
            await asyncio.sleep(0.5)
            assert not second_started.is_set(), "the takeover did not wait for the transaction holding the row"
            assert sql_db.query("SELECT owner FROM rjet_cursors WHERE name = 'c'") == owner, "taken over already"
            resume.set()  # the first commits what it holds, then loses the claim
            await asyncio.wait_for(second_started.wait(), 10)
            before = first_rows()  # the takeover is done: the first commits nothing from here on
        with pytest.raises(rjet.HeadReached):
            await asyncio.wait_for(second, 30)
        assert first_rows() == before
        resume.set()
        with pytest.raises(rjet.CursorConflict, match="another runner claimed it"):
            await asyncio.wait_for(first, 10)
        assert first_rows() == before, "the paused runner committed after the takeover"
    rows = check_exactly_once(sql_db, count)
    assert len(rows) - before == int(sql_db.query("SELECT count(*) FROM effects WHERE who = 'second'")[0][0])
    print(f"first committed {before} rows before the takeover, 0 after; paused at {sorted(paused)}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sql_db", ["postgresql"], indirect=True)
async def test_a_runner_frozen_holding_the_cursor_row_delays_a_takeover_by_the_idle_timeout_at_most(
    nats_stream: rjet.Stream, sql_db: SqlDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first runner's handler reads the cursor's row ``FOR SHARE`` and then waits for ever, its
    transaction open (as a process SIGSTOPped there would leave it). Its session ends after rjet's
    ``idle_in_transaction_session_timeout`` (1 s here instead of 30), which releases the row: the
    second runner's claim, waiting for it, goes through, and it runs to the head. Woken, the first
    commits nothing more."""
    monkeypatch.setattr(rjet.sql._backends, "IDLE_IN_TRANSACTION_TIMEOUT", "1s")
    count, pause_at = 100, 30
    await insert(nats_stream, count, keys=10)
    sql_db.create_effects()
    effect = sql_db.sql("INSERT INTO effects (seq, fid, who) VALUES (?, ?, ?)")
    frozen, resume = asyncio.Event(), asyncio.Event()

    async def first_handler(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute(effect, (event.id_int, event.foreign_id, "first"))
        if event.id_int == pause_at:
            await tx.execute("SELECT 1 FROM rjet_cursors WHERE name = 'c' FOR SHARE")
            frozen.set()
            await resume.wait()

    async def second_handler(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute(effect, (event.id_int, event.foreign_id, "second"))

    async with (
        await SqlCursorStore.open(sql_db.url, flush_interval=0.05) as one,
        await SqlCursorStore.open(sql_db.url, flush_interval=0.05) as two,
    ):
        first = asyncio.create_task(
            rjet.run(rjet.Spec(nats_stream.stream, one, rjet.Consumer("c", first_handler, transactional=True)))
        )
        await asyncio.wait_for(frozen.wait(), 20)
        started = time.monotonic()
        takeover = rjet.Consumer("c", second_handler, transactional=True)
        second = rjet.Spec(nats_stream.stream, two, takeover, to_head=True)
        with pytest.raises(rjet.HeadReached):
            await asyncio.wait_for(rjet.run(second), 20)  # for ever without the timeout
        took = time.monotonic() - started
        resume.set()
        with pytest.raises((rjet.CursorStoreError, rjet.CursorConflict)) as ended:
            await asyncio.wait_for(first, 10)
        # Its session ended before its commit was sent: nothing committed, and it says so.
        why = f"{ended.value} (after: {ended.value.__context__})"
        assert "may or may not" not in why
    rows = check_exactly_once(sql_db, count)
    assert [seq for seq, _ in rows][: pause_at - 1] == list(range(1, pause_at))
    assert int(sql_db.query("SELECT count(*) FROM effects WHERE who = 'first'")[0][0]) == pause_at - 1
    print(f"the takeover went through {took:.1f} s after the first froze holding the row; then: {why}")


# ----------------------------------------------------------------- worker processes SIGKILLed

KILLS = 20  # at random points of the run, spread over it by the table's row count
# Events of the K=1 and K=8 rows: the proof asks for 20,000 on 1,000 keys, CI runs 5,000 for
# time (RJET_PROOF_EVENTS=20000 runs the full proof; the batch row runs 20,000 either way).
PROOF_EVENTS = int(os.environ.get("RJET_PROOF_EVENTS", "5000"))
_MORE = max(0, PROOF_EVENTS - 5000)  # events above CI's count: more time for them
EARLY_KILLS = 3  # and more in the first 0.6 s of a start (imports, the store's open) or just after it


async def _spawn(
    nats_url: str, stream: str, db: SqlDb, concurrency: int, batch: int, sync: bool = False
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), nats_url, stream, db.url, str(concurrency), str(batch),
        "sync" if sync else "async", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


@pytest.mark.timeout(150 + _MORE // 50)
@pytest.mark.parametrize(
    ("concurrency", "batch", "count"),
    [(1, 0, PROOF_EVENTS), (8, 0, PROOF_EVENTS), (8, 50, max(PROOF_EVENTS, 20_000))],
    ids=["K1", "K8", "K8-batch50"],
)
@pytest.mark.parametrize(
    ("sql_db", "sync"),
    [("sqlite", False), ("sqlite", True), ("postgresql", False), ("postgresql-pipeline", False)],
    ids=["sqlite", "sqlite-sync", "postgresql", "postgresql-pipeline"],
    indirect=["sql_db"],
)
async def test_worker_sigkilled_at_random_points(
    server: EmbeddedServer,
    nats_stream: rjet.Stream,
    name: str,
    sql_db: SqlDb,
    sync: bool,
    concurrency: int,
    batch: int,
    count: int,
) -> None:
    """A worker process over ``count`` events on 1,000 keys, SIGKILLed at 23 random points and
    started again until it reaches the head: each event exactly once, each key's rows in order.
    ``sync``: a sync handler (SQLite), each transaction whole on the connection's thread."""
    await insert(nats_stream, count, keys=1000)
    sql_db.create_effects()
    rng = random.Random()
    early = set(rng.sample(range(10), EARLY_KILLS))  # while much is left: none lets the worker finish
    counter = Counter(sql_db)
    at: list[str] = []  # where each kill landed: the rows committed then ("early": by time)
    try:
        for attempt in range(KILLS + EARLY_KILLS):
            # Each kill a random number of rows after the start (on average count/30: the 20 kills
            # spread over two thirds of the run), and always before the last row.
            start = await counter.count()
            left = count - start
            target = start + min(left - 1, rng.randint(1, count // 15))
            proc = await _spawn(server.url, name, sql_db, concurrency, batch, sync)
            try:
                if attempt in early or left < 2:  # before its store is open, or just after: in the claim
                    assert proc.stdout is not None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.stdout.readline(), rng.uniform(0, 0.6))
                        await asyncio.sleep(rng.uniform(0, 0.02))
                    at.append("early")
                else:
                    while (n := await counter.count()) < target:
                        assert proc.returncode is None, f"the worker exited ({proc.returncode}) before row {target}"
                        await asyncio.sleep(0.005)
                    await asyncio.sleep(rng.uniform(0, 0.01))
                    at.append(str(n))
            finally:
                await _kill(proc)
            assert proc.returncode == -9, f"the worker exited by itself ({proc.returncode})"
        proc = await _spawn(server.url, name, sql_db, concurrency, batch, sync)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 90 + _MORE // 100)
        finally:
            await _kill(proc)
        assert proc.returncode == 0
        assert out.split() == [b"ready", b"head"]
    finally:
        await counter.close()
    check_exactly_once(sql_db, count)
    # Every one a SIGKILL (returncode -9 above); near the end a kill may land in the claim instead.
    assert len(at) == KILLS + EARLY_KILLS >= 20
    async with await SqlCursorStore.open(sql_db.url) as store:
        assert await store.peek("c") == str(count)
    shape = "sync" if sync else "async"
    print(f"{sql_db.kind} {shape} K={concurrency} batch={batch}: {count} events, {len(at)} SIGKILLs at rows", *at)
