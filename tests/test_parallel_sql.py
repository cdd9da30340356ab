"""rjet.parallel with its shard cursors in SQL (``Parallel(..., cursors=URL)``), against a real
nats-server, real worker processes and a real database (tests/sql_fixtures.py): a transactional
handler writes one row per event, which commits with the shard's progress; the rows show each event
once, per key in stream order, across a restart and a reshard."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from sql_fixtures import SqlDb, postgres_server, sql_db
from test_cli import rjet_cmd
from test_parallel import insert, remember_shard

import rjet
from rjet.cursors._bucket import kv_keys
from rjet.parallel import Parallel, admin, shard_name, shard_of
from rjet.parallel._sql import Handled, prepare
from rjet.server import EmbeddedServer
from rjet.sql import SqlCursorStore
from rjet.testing import KeyOrder

__all__ = ["postgres_server", "sql_db"]  # the fixtures, imported for pytest


def sqlite_db(tmp_path: Path) -> SqlDb:
    path = tmp_path / "app.db"
    db = SqlDb("sqlite", f"sqlite:///{path}", path)
    db.create_effects()
    return db


def recorder(db: SqlDb) -> Any:
    """A transactional handler: one row per event, naming the shard and the process that wrote it."""
    statement = db.sql("INSERT INTO effects (seq, fid, who) VALUES (?, ?, ?)")

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        await tx.execute(statement, (event.id_int, event.foreign_id, f"{os.environ['RJET_TEST_SHARD']}:{os.getpid()}"))

    return handle


def sync_recorder(db: SqlDb) -> Any:
    """:func:`recorder` as a sync handler (SQLite: run on the connection's thread, tx a sqlite3.Connection)."""
    statement = db.sql("INSERT INTO effects (seq, fid, who) VALUES (?, ?, ?)")

    def handle(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
        tx.execute(statement, (event.id_int, event.foreign_id, f"{os.environ['RJET_TEST_SHARD']}:{os.getpid()}"))

    return handle


def group(server: EmbeddedServer, name: str, n: int, db: SqlDb, fn: Any = None, **options: Any) -> Parallel:
    options.setdefault("flush_interval", 0.1)
    options.setdefault("restart_delay", 0.2)
    options.setdefault("heartbeat_interval", 0.5)
    options.setdefault("heartbeat_ttl", 3.0)
    return Parallel(
        name, n, fn or recorder(db), servers=server.url, stream=name, namespace=name,
        cursors=db.url, transactional=True, on_start=remember_shard, **options,
    )  # fmt: skip


def check_rows(db: SqlDb, events: dict[int, str]) -> list[tuple[int, str, str]]:
    """Each event once, each key's rows in stream order; the rows (seq, foreign id, who)."""
    rows = [(int(s), str(f), str(w)) for s, f, w in db.query("SELECT seq, fid, who FROM effects ORDER BY id")]
    seqs = sorted(seq for seq, _, _ in rows)
    assert len(seqs) == len(set(seqs)), f"{len(seqs) - len(set(seqs))} events applied twice"
    assert seqs == sorted(events), f"missing: {sorted(set(events) - set(seqs))[:10]}"
    order = KeyOrder()
    for seq, fid, _ in rows:
        assert events[seq] == fid
        order.record(seq, fid)
    order.check(sorted(events))
    return rows


# ----------------------------------------------------------------- configuration


def test_the_database_url_and_the_handler_are_checked_when_the_group_is_built(tmp_path: Path) -> None:
    ok: dict[str, Any] = {"servers": "nats://127.0.0.1:1", "stream": "s", "namespace": "ns"}

    async def tx_handler(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None: ...

    def plain(fate: rjet.Fate, event: rjet.Event) -> None: ...

    with pytest.raises(rjet.ConfigError, match=r"Parallel: cursors: unsupported database URL 'h/db'"):
        Parallel("p", 2, plain, cursors="mysql://u:secret@h/db", **ok)
    with pytest.raises(rjet.ConfigError, match=r"cursors: 'sqlite:///:memory:' names no file"):
        Parallel("p", 2, plain, cursors="sqlite:///:memory:", **ok)
    with pytest.raises(rjet.ConfigError, match=r'give the database too, cursors="sqlite:///PATH"'):
        Parallel("p", 2, tx_handler, transactional=True, **ok)
    with pytest.raises(rjet.ConfigError, match=r"cannot be called as fn\(fate, event, tx\)"):
        Parallel("p", 2, plain, transactional=True, cursors=f"sqlite:///{tmp_path}/a.db", **ok)
    sync: Any = lambda f, e, tx: None  # noqa: E731
    with pytest.raises(rjet.ConfigError, match="a sync transactional handler runs on SQLite only"):
        Parallel("p", 2, sync, transactional=True, cursors="postgresql://u:secret@h/db", **ok)
    Parallel("p", 2, sync, transactional=True, cursors=f"sqlite:///{tmp_path}/a.db", **ok)  # run on its thread
    p = Parallel("p", 2, tx_handler, transactional=True, cursors=f"sqlite:///{tmp_path}/a.db", **ok)
    assert (p.options.target.cursors, p.options.consumer.transactional) == (f"sqlite:///{tmp_path}/a.db", True)
    assert p.options.consumer.consumer("p_1_of_2", tx_handler).transactional


def test_handled_skips_what_an_old_shard_handled() -> None:
    old = {2: {0: rjet.CursorRecord("10"), 1: rjet.CursorRecord("20")}}
    handled = Handled("g", old)
    keys = {m: next(f"k{i}" for i in range(100) if shard_of(f"k{i}", 2) == m) for m in (0, 1)}

    def event(seq: int, fid: str) -> rjet.Event:
        return rjet.Event(str(seq), 1, fid, timestamp_us=0)

    assert handled.top == 20
    assert [handled(event(s, keys[0])) for s in (10, 11, 15)] == [True, False, False]
    assert [handled(event(s, keys[1])) for s in (15, 20, 21)] == [True, True, False]


async def test_members_resharding_at_once_seed_once_and_a_later_start_rewinds_nothing(
    js: JetStreamContext, name: str, sql_db: SqlDb
) -> None:
    kv = (await rjet.JetStreamCursorStore.create(js, name)).kv
    async with await SqlCursorStore.open(sql_db.url) as store:

        async def write(cursor_name: str, cursor: str) -> None:
            claim = await store.claim(cursor_name)
            await claim.set_cursor(cursor)
            await claim.release()

        assert await prepare(kv, store, name, 2, group="g", ttl=5.0) is None  # a first run: nothing to seed
        await write(shard_name(name, 0, 2), "100")
        await write(shard_name(name, 1, 2), "90")
        results = await asyncio.gather(*(prepare(kv, store, name, 4, group=g, ttl=5.0, member=g) for g in "abc"))
        reports = [r for r in results if r is not None]
        assert len(reports) == 1  # one of them seeded, once
        assert (reports[0].seed, reports[0].source_n, reports[0].exact) == ("90", 2, True)
        rows = await store.records(prefix=name + "_")
        assert {k: (r.cursor, r.owner) for k, r in rows.items()} == {
            **{shard_name(name, m, 4): ("90", None) for m in range(4)},
            shard_name(name, 0, 2): ("100", None),  # the old cursors stay, their owners cleared: fenced
            shard_name(name, 1, 2): ("90", None),
        }
        # A worker of n=4 runs; another member starting later seeds nothing over it.
        held = await store.claim(shard_name(name, 0, 4))
        await held.set_cursor("95")
        await held.flush()
        assert await prepare(kv, store, name, 4, group="d", ttl=5.0, member="d") is None
        await held.confirm()  # still held: not fenced
        assert await store.peek(shard_name(name, 0, 4)) == "95"
        await held.release()
        # Back to n=2: seeded from n=4 (lowest 90); an old cursor above the seed is kept, never moved back.
        report = await prepare(kv, store, name, 2, group="e", ttl=5.0)
        assert report is not None
        assert (report.seed, report.source_n) == ("90", 4)
        assert [await store.peek(shard_name(name, m, 2)) for m in range(2)] == ["100", "90"]


# ----------------------------------------------------------------- a group on SQLite


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_group_with_sql_cursors_handles_each_event_once_and_resumes(
    server: EmbeddedServer, stream: rjet.Stream, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    db = sqlite_db(tmp_path)
    events = await insert(stream, 600)
    summary = await group(server, name, 2, db).run_async(to_head=True)
    rows = check_rows(db, events)
    assert summary.handled == len(events)
    for _, fid, who in rows:  # the shard its key belongs to wrote it
        assert int(who.split(":")[0]) == shard_of(fid, 2)
    async with await SqlCursorStore.open(db.url) as store:
        assert await store.cursors() == {shard_name(name, m, 2): str(max(events)) for m in range(2)}
        assert all(r.owner for r in (await store.records()).values())  # each claimed by its worker
    assert [s.cursor for s in summary.shards] == [str(max(events))] * 2
    # The bucket keeps the group record and no cursor.
    kv = await js.key_value(f"rjet_cursors_{name}")
    assert [k for k in await kv_keys(kv) if not k.startswith("_rjet.")] == []
    ns = await admin.open_namespace(js, name)
    async with await SqlCursorStore.open(db.url) as store:  # the views read the cursors from the database
        info = await admin.describe_group(ns, name, cursors=store)
        assert (info.n, [s.cursor for s in info.shards]) == (2, [max(events)] * 2)
        assert [g.name for g in await admin.list_groups(ns, cursors=store)] == [name]
        state = await admin.stream_state(js, name)
        assert {c.name: c.lag_events for c in await admin.consumers(ns, state, cursors=store)} == {
            shard_name(name, m, 2): 0 for m in range(2)
        }
    with pytest.raises(admin.GroupNotFound, match="keeps its shard cursors in an SQL database"):
        await admin.describe_group(ns, name)  # the bucket holds none

    more = await insert(stream, 200)
    again = await group(server, name, 2, db).run_async(to_head=True)
    assert again.handled == len(more)
    check_rows(db, events | more)


@pytest.mark.timeout(120)
async def test_a_group_with_a_sync_handler_on_sqlite_handles_each_event_once(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    db = sqlite_db(tmp_path)
    events = await insert(stream, 300)
    summary = await group(server, name, 2, db, sync_recorder(db), concurrency=4).run_async(to_head=True)
    assert summary.handled == len(events)
    for _, fid, who in check_rows(db, events):
        assert int(who.split(":")[0]) == shard_of(fid, 2)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_the_command_line_runs_and_shows_a_group_with_sql_cursors(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    db = sqlite_db(tmp_path)
    events = await insert(stream, 300)
    (tmp_path / "sql_handler.py").write_text(
        "import os\n"
        "async def handle(fate, event, tx):\n"
        "    await tx.execute('INSERT INTO effects (seq, fid, who) VALUES (?, ?, ?)',"
        " (event.id_int, event.foreign_id, f'cli:{os.getpid()}'))\n"
    )
    common = ("--namespace", name, "-s", server.url)
    run = ("worker", name, "sql_handler:handle", "--group", name, "-n", "2", "--to-head", "-q", *common)
    refused = await asyncio.to_thread(rjet_cmd, *run, "--transactional", cwd=tmp_path)
    assert refused.returncode == 2
    assert "--transactional needs --cursors URL" in refused.stderr
    done = await asyncio.to_thread(rjet_cmd, *run, "--cursors", db.url, "--transactional", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    check_rows(db, events)

    describe = ("group", "describe", name, "--stream", name, "--json", *common)
    shown = await asyncio.to_thread(rjet_cmd, *describe, "--cursors", db.url)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert [(s["name"], s["cursor"], s["lag_events"]) for s in doc["shards"]] == [
        (shard_name(name, m, 2), max(events), 0) for m in range(2)
    ]
    without = await asyncio.to_thread(rjet_cmd, *describe)
    assert without.returncode == 1
    assert "keeps its shard cursors in an SQL database" in without.stderr
    assert "--cursors URL" in without.stderr
    listed = await asyncio.to_thread(rjet_cmd, "group", "list", "--json", *common, "--cursors", db.url)
    assert [json.loads(line)["group"] for line in listed.stdout.splitlines()] == [name]

    status = await asyncio.to_thread(rjet_cmd, "status", name, "--json", *common, "--cursors", db.url)
    assert status.returncode == 0, status.stderr
    consumers = [json.loads(line) for line in status.stdout.splitlines()]
    assert {(c["name"], c["cursor"], c["lag_events"]) for c in consumers if "cursor" in c} == {
        (shard_name(name, m, 2), max(events), 0) for m in range(2)
    }
    one = await asyncio.to_thread(rjet_cmd, "cursor", shard_name(name, 0, 2), "--cursors", db.url, "-s", server.url)
    assert (one.returncode, one.stdout.strip()) == (0, str(max(events)))


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_reshard_from_2_to_3_seeds_from_the_sql_cursors_and_handles_nothing_twice(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    db = sqlite_db(tmp_path)
    events = await insert(stream, 600, keys=60)
    await group(server, name, 2, db).run_async(to_head=True)
    events |= await insert(stream, 400, keys=60)
    await group(server, name, 2, db, shards=[0]).run_async(to_head=True)  # shard 1 of 2 stays behind
    count = int(db.query("SELECT count(*) FROM effects")[0][0])
    async with await SqlCursorStore.open(db.url) as store:
        old = {k: int(v) for k, v in (await store.cursors()).items()}
    assert old == {shard_name(name, 0, 2): 1000, shard_name(name, 1, 2): 600}
    events |= await insert(stream, 300, keys=60)

    summary = await group(server, name, 3, db).run_async(to_head=True)
    report = summary.reshard
    assert report is not None
    assert report.exact
    assert (report.old_n, report.source_n, report.seed) == ((2,), 2, "600")
    assert report.seeded == tuple(shard_name(name, m, 3) for m in range(3))
    assert "skipped (by the old cursors)" in report.describe()
    rows = check_rows(db, events)  # each event once, across the reshard
    assert summary.handled == len(rows) - count
    skipped_events = sum(1 for seq, fid in events.items() if 600 < seq <= 1000 and shard_of(fid, 2) == 0)
    assert skipped_events > 0
    async with await SqlCursorStore.open(db.url) as store:
        after = await store.records()
    assert {k: int(after[k].cursor) for k in old} == old  # the old cursors stay, unclaimed
    assert all(after[k].owner is None for k in old)
    # A restart of n=3 is no reshard.
    assert (await group(server, name, 3, db).run_async(to_head=True)).reshard is None


@pytest.mark.slow
@pytest.mark.timeout(150)
@pytest.mark.parametrize("sql_db", ["postgresql"], indirect=True)
async def test_a_group_on_postgresql(server: EmbeddedServer, stream: rjet.Stream, name: str, sql_db: SqlDb) -> None:
    sql_db.create_effects()
    events = await insert(stream, 400)
    await group(server, name, 2, sql_db, concurrency=4).run_async(to_head=True)
    check_rows(sql_db, events)
    events |= await insert(stream, 300)
    summary = await group(server, name, 3, sql_db, concurrency=4).run_async(to_head=True)
    assert summary.reshard is not None
    assert summary.reshard.seed == str(max(events) - 300)
    check_rows(sql_db, events)
