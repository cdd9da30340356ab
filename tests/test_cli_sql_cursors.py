"""The operator's tools on a group (or a consumer) whose cursors are in SQL (``--cursors URL``): ``rjet
cursor --set``, ``rjet group reset`` and ``rjet group delete`` change the database's rows with the
bucket's checks (the stream recorded, the position checked, refused while a shard runs, a running
consumer fenced by a conflict naming the tool, dry runs); ``rjet group list`` and ``rjet status`` show
an SQL group without ``--cursors`` too, saying where its cursors are (#26, #28). Real nats-server,
SQLite and PostgreSQL (tests/sql_fixtures.py), the command line as a process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from sql_fixtures import PASSWORD, SqlDb, postgres_server, sql_db
from test_cli import _env, _one_line_error, rjet_cmd
from test_cli_columns import _fits, _in_a_pipe

import rjet
from rjet._progress import encode_done
from rjet.cli._common import cursor_hint
from rjet.cursors._bucket import kv_keys
from rjet.parallel import admin, shard_name
from rjet.parallel._keys import Heartbeat, Lease, generation_key, heartbeat_key, lease_key
from rjet.reader import stream_identity as _identity
from rjet.server import EmbeddedServer
from rjet.sql import SqlCursorStore
from rjet.testing import wait_until

__all__ = ["postgres_server", "sql_db"]  # the fixtures, imported for pytest


def _run(*args: str) -> tuple[int, str, str]:
    proc: subprocess.CompletedProcess[str] = rjet_cmd(*args)
    return proc.returncode, proc.stdout, proc.stderr


async def _row(url: str, name: str) -> rjet.CursorRecord | None:
    async with await SqlCursorStore.open(url) as store:
        return await store.peek_record(name)


async def _rows(url: str, prefix: str = "") -> dict[str, rjet.CursorRecord]:
    async with await SqlCursorStore.open(url) as store:
        return await store.records(prefix=prefix)


async def test_cursor_set_moves_a_row_with_the_buckets_checks_and_fences_its_consumer(
    server: EmbeddedServer, js: JetStreamContext, name: str, sql_db: SqlDb
) -> None:
    stream = await rjet.Stream.create(js, name, max_msgs=5)
    await stream.insert_many([("k", 1, b"")] * 10)  # 1..5 removed: first 6, last 10
    other = await rjet.Stream.create(js, f"{name}_b")
    await other.insert_many([("k", 1, b"")] * 3)
    identity = _identity(await stream.info())
    url, srv = sql_db.url, server.url
    async with await SqlCursorStore.open(url) as store:
        await store.set_cursor("plain", "8")  # a row that names no stream (written without a claim)

    def cursor(*args: str) -> tuple[int, str, str]:
        return _run("cursor", "plain", "--cursors", url, *args, "-s", srv)

    code, _, err = cursor("--set", "9")  # was: a usage error, whatever the position ("without --set")
    assert code == 2
    assert "--set 9 needs --stream" in err
    code, _, err = _run("cursor", "plain", "--cursors", url, "--namespace", "x", "--set", "9", "-s", srv)
    assert (code, "without --namespace" in err) == (2, True)
    code, _, err = cursor("--set", "999", "--stream", name)
    assert code == 1
    assert f"999 is past the last sequence of stream {name!r} (10)" in err
    code, _, err = cursor("--set", "2", "--stream", name)
    assert code == 1
    assert "events 3..5 were removed" in err
    assert "--skip-removed" in err
    assert (rec := await _row(url, "plain")) is not None
    assert (rec.cursor, rec.stream, rec.owner) == ("8", None, None)  # nothing written
    code, out, err = cursor("--set", "2", "--stream", name, "--skip-removed")
    assert (code, out.split(" (")[0]) == (0, "plain: 8 -> 5"), err
    code, out, err = cursor("--set", "7", "--stream", name)
    assert (code, out.strip()) == (0, "plain: 5 -> 7"), err
    assert (rec := await _row(url, "plain")) is not None
    assert (rec.cursor, rec.stream) == ("7", identity)
    assert (rec.owner or "").startswith("rjet cursor --set (")
    code, out, err = cursor("--set", "last")  # the row names its stream now
    assert code == 2  # 'last' needs --stream, as for the bucket
    code, out, err = cursor("--set", "9")
    assert (code, out.strip()) == (0, "plain: 7 -> 9"), err
    code, _, err = cursor("--set", "1", "--stream", f"{name}_b")  # a cursor of one stream is not set "for" another
    assert code == 1
    assert f"counts in stream {name!r}" in err
    assert "--cursors URL --set beginning" in err  # how to start it over, addressed as it was
    assert PASSWORD not in err
    code, out, err = cursor("--set", "beginning", "--stream", f"{name}_b")
    assert (code, out.strip()) == (0, "plain: 9 -> (none: from the beginning)"), err
    assert (rec := await _row(url, "plain")) is not None
    assert (rec.cursor, rec.stream) == ("", _identity(await other.info()))
    code, out, _ = cursor()
    assert (code, out.strip()) == (0, "(none: from the beginning)")  # reading needs no server, as before

    # A consumer running on the row: the tool's write takes the claim, and the runner's next write is
    # refused with a conflict that names the tool.
    handled: list[str] = []
    runner = await SqlCursorStore.open(url, flush_interval=0.05)
    consumer = rjet.Consumer("c", lambda fate, event: handled.append(event.id))
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, runner, consumer)))
    try:
        await wait_until(lambda: len(handled) == 5, 20, "5 events handled")
        await wait_until(lambda: runner.last_written("c") == "10", 20, "cursor 10 written")
        code, out, err = await asyncio.to_thread(
            _run, "cursor", "c", "--cursors", url, "--set", "6", "--stream", name, "-s", srv
        )
        assert (code, out.strip()) == (0, "c: 10 -> 6"), err
        await stream.insert("k", 1, b"")
        with pytest.raises(rjet.CursorConflict, match=r"owner rjet cursor --set \("):
            await asyncio.wait_for(task, 20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.close()
    assert (rec := await _row(url, "c")) is not None
    assert (rec.cursor, rec.stream) == ("6", identity)  # the tool's write stands


async def _sql_group(js: JetStreamContext, ns: str, url: str, identity: str, *, elastic: bool = False) -> None:
    """Group g of n=2 run with --cursors URL: its record in the bucket says so; its rows: shards at 25,
    the second with events 27 and 29 done above (one in its row, one committed by a transactional
    consumer), an old n=3's cursor and the reshard mark; another group's row beside them."""
    async with await rjet.JetStreamCursorStore.create(js, ns):
        pass
    store = await admin.open_namespace(js, ns)
    record = {"n": 2, "seed": "", "fresh_from": 0, "cursors": "sql", "epoch": 7}
    await store.kv.put(generation_key("g"), json.dumps(record).encode())
    if elastic:
        now = time.time()
        await store.kv.put(lease_key("g", "a"), Lease("a", "host-a", 11, None, now - 60, now, 300.0, 2).encode())
    async with await SqlCursorStore.open(url) as sql:
        rows = {
            "g_1_of_2": rjet.CursorRecord("25", identity, "worker-1"),
            "g_2_of_2": rjet.CursorRecord("25", identity, "worker-2", encode_done(25, [27])),
            "g_1_of_3": rjet.CursorRecord("20", identity),
            "other_1_of_1": rjet.CursorRecord("3", identity),
            generation_key("g"): rjet.CursorRecord("7"),
        }
        await sql.rewrite([generation_key("g"), "g_", "other_"], lambda read: rows)
        claim = await sql.claim("g_2_of_2", owner="worker-2")
        await claim.transact([29], lambda tx: asyncio.sleep(0), sequential=False)
        await claim.release()


async def test_group_reset_and_delete_change_the_rows_of_a_group_with_sql_cursors(
    server: EmbeddedServer, js: JetStreamContext, name: str, sql_db: SqlDb
) -> None:
    stream = await rjet.Stream.create(js, name, max_msgs=20)
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(30)])  # first 11, last 30
    identity = _identity(await stream.info())
    ns, url, srv = f"ns_{name}"[:60], sql_db.url, server.url
    await _sql_group(js, ns, url, identity)
    assert (await _rows(url, "g_2_of_2"))["g_2_of_2"].done == encode_done(25, [27, 29])

    def group(*args: str) -> tuple[int, str, str]:
        return _run("group", *args, "--namespace", ns, "-s", srv)

    # Without --cursors: refused, and nothing is written to the bucket (was: shard cursors 0 read and
    # reset in the bucket, delete left the rows behind and the next run resumed from them).
    for args in (("reset", "g", "--stream", name, "--to-latest", "--execute"), ("delete", "g", "--execute")):
        code, _, err = group(*args)
        assert code == 1
        assert "keeps its shard cursors in an SQL database" in err
        assert "--cursors URL" in err
    store = await admin.open_namespace(js, ns)
    assert [k for k in await kv_keys(store.kv) if not k.startswith("_rjet.")] == []

    # A dry run shows the moves and writes nothing.
    code, out, err = group("reset", "g", "--stream", name, "--shift-by", "-100", "--cursors", url)
    assert code == 0, err
    assert out.splitlines() == [
        "g_1_of_2: 25 -> 10",
        "g_2_of_2: 25 -> 10",
        "2 cursor(s) would move (a dry run: add --execute)",
    ]
    assert {k: r.cursor for k, r in (await _rows(url, "g_")).items()} == {
        "g_1_of_2": "25", "g_2_of_2": "25", "g_1_of_3": "20",
    }  # fmt: skip
    code, _, err = group("reset", "g", "--stream", name, "--to-seq", "40", "--execute", "--cursors", url)
    assert code == 1
    assert f"is past the last sequence of stream {name!r} (30)" in err
    code, _, err = group("reset", "g", "--stream", name, "--to-seq", "3", "--execute", "--cursors", url)
    assert code == 1
    assert "events 3..10 were removed" in err

    # Refused while a shard runs (a live heartbeat in the bucket).
    beat = heartbeat_key("g", 0, 2, "run-1")
    await store.kv.put(beat, Heartbeat("run-1", "host-1", 7, 2, time.time(), 300.0).encode())
    for args in (("reset", "g", "--stream", name, "--to-latest", "--execute"), ("delete", "g", "--execute")):
        code, _, err = group(*args, "--cursors", url)
        assert code == 1
        assert "group 'g' is running (g_1_of_2 on host-1 pid 7)" in err
    await store.kv.delete(beat)

    # A runner of shard 1 outside the group's heartbeats: fenced by the reset, which names itself.
    sql_db.create_effects()
    insert = sql_db.sql("INSERT INTO effects (seq, fid, who) VALUES (?, ?, ?)")
    handled: list[int] = []

    async def handle(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
        handled.append(event.id_int)
        await tx.execute(insert, (event.id_int, event.foreign_id, "runner"))

    runner = await SqlCursorStore.open(url)
    consumer = rjet.Consumer("g_1_of_2", handle, transactional=True)
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, runner, consumer)))
    try:
        await wait_until(lambda: handled[-1:] == [30], 20, "events 26..30 handled")
        code, out, err = await asyncio.to_thread(
            group, "reset", "g", "--stream", name, "--to-seq", "3", "--skip-removed", "--execute", "--cursors", url
        )
        assert code == 0, err
        assert out.splitlines()[:2] == ["g_1_of_2: 30 -> 10", "g_2_of_2: 25 -> 10"]
        assert "events 3..10 were removed" in err
        await stream.insert("k", 1, b"")
        with pytest.raises(rjet.CursorConflict, match=r"owner rjet group reset \("):
            await asyncio.wait_for(task, 20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.close()
    # 31 never committed: fenced, whether the runner called its handler first or saw the reset first
    # (its claim's own write of the cursor meets the tool's owner; on a loaded machine that comes first).
    assert [seq for seq, _ in sql_db.effects()] == [26, 27, 28, 29, 30]
    rows = await _rows(url, "g_")
    for shard in ("g_1_of_2", "g_2_of_2"):
        assert (rows[shard].cursor, rows[shard].stream, rows[shard].done) == ("10", identity, None)
        assert (rows[shard].owner or "").startswith("rjet group reset (")  # was: done 29 kept, skipped on replay
    assert rows["g_1_of_3"].cursor == "20"  # an old n is not reset
    assert sql_db.query("SELECT count(*) FROM rjet_done WHERE name = 'g_2_of_2'") == [(0,)]

    # Cursors in the bucket are not reset "in" a database.
    async with await rjet.JetStreamCursorStore.create(js, ns) as bucket:
        await bucket.set_cursor("h_1_of_1", "4")
    code, _, err = group("reset", "h", "--stream", name, "--to-latest", "--cursors", url)
    assert code == 1
    assert "keeps its shard cursors in namespace" in err

    # Delete: a dry run lists the bucket's keys and the database's rows; --execute removes both.
    code, out, err = group("delete", "g", "--cursors", url)
    assert code == 0, err
    assert out.splitlines() == [
        generation_key("g"), f"{generation_key('g')} (row in the SQL database)", "g_1_of_2 (row in the SQL database)",
        "g_1_of_3 (row in the SQL database)", "g_2_of_2 (row in the SQL database)",
        "1 key(s) and 4 row(s) would be deleted (a dry run: add --execute)",
    ]  # fmt: skip
    code, out, err = group("delete", "g", "--execute", "--cursors", url)
    assert code == 0, err
    assert out.splitlines()[-1] == "1 key(s) and 4 row(s) deleted"
    assert set(await _rows(url, "g_")) == set()
    assert await _rows(url, generation_key("g")) == {}
    assert set(await _rows(url)) == {"other_1_of_1"}  # another group's row stays
    assert [g.name for g in await admin.list_groups(store, cursors=None)] == ["h"]


async def test_group_list_status_and_describe_show_a_group_with_sql_cursors_without_its_url(
    server: EmbeddedServer, js: JetStreamContext, name: str, tmp_path: Any
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(40)])
    identity = _identity(await stream.info())
    ns, srv = f"ns_{name}"[:60], server.url
    url = f"sqlite:///{tmp_path}/app.db"
    await _sql_group(js, ns, url, identity, elastic=True)
    store = await admin.open_namespace(js, ns)
    now = time.time()
    # An elastic group of the bucket that has no cursor yet (its members have not claimed one).
    await store.kv.put(lease_key("fresh", "f"), Lease("f", "host-f", 12, None, now - 60, now, 300.0, 2).encode())

    # group list without --cursors: the SQL group is listed (was: left out), saying where its cursors are.
    listed = {g["group"]: g for g in map(json.loads, _run("group", "list", "--namespace", ns, "--json", "-s", srv)[1]
                                          .splitlines())}  # fmt: skip
    assert set(listed) == {"g", "fresh"}
    g = listed["g"]
    assert (g["n"], g["cursors"], g["cursors_read"], g["old_generations"]) == (2, "sql", False, None)
    assert [(s["name"], s["cursor"]) for s in g["shards"]] == [("g_1_of_2", None), ("g_2_of_2", None)]
    assert [m["member"] for m in g["members"]] == ["a"]
    text = _in_a_pipe(["group", "list", "--namespace", ns, "-s", srv])
    _fits(text, "group list", ("g", "fresh"))
    assert re.search(r"^g\s+2\s+\?\s+no\s+sql\b", text, re.MULTILINE), text
    assert "shard cursors in an SQL database (g): add --cursors URL to read them" in " ".join(text.split())
    # With --cursors: read from the database (and the bucket's group as well).
    listed = {g["group"]: g for g in map(json.loads, _run("group", "list", "--namespace", ns, "--json", "--cursors",
                                                          url, "-s", srv)[1].splitlines())}  # fmt: skip
    g = listed["g"]
    assert (g["cursors"], g["cursors_read"], g["old_generations"], g["streams"]) == ("sql", True, [3], [name])
    assert [(s["name"], s["cursor"], s["done_above"]) for s in g["shards"]] == [
        ("g_1_of_2", 25, 0),
        ("g_2_of_2", 25, 2),
    ]
    assert (listed["fresh"]["cursors"], listed["fresh"]["streams"]) == ("bucket", [])
    described = json.loads(_run("group", "describe", "g", "--namespace", ns, "--stream", name, "--json",
                                "--cursors", url, "-s", srv)[1])  # fmt: skip
    assert (described["lag_events"], described["cursors"]) == (30, "sql")
    text = _in_a_pipe(["group", "describe", "g", "--namespace", ns, "--stream", name, "--cursors", url, "-s", srv])
    assert "lag 30 event(s); old generations n=3; shard cursors in the SQL database" in " ".join(text.split())

    # status: the members of a group whose stream is not known are shown under their group (was: not at
    # all), saying why; with --cursors the SQL group's go under its stream.
    text = _in_a_pipe(["status", name, "--namespace", ns, "-s", srv])
    _fits(text, "status", ("g", "fresh"))
    said = " ".join(text.split())
    assert "elastic group g (namespace " in said
    assert "1 member(s); stream unknown: its shard cursors are in an SQL database" in said
    assert f"(rjet status STREAM --namespace {ns} --cursors URL)" in said
    assert "elastic group fresh (namespace " in said
    assert "stream unknown: no shard cursor yet" in said
    assert re.search(r"^  member f on host-f pid 12, lease renewed \S+ ago; runs no shard$", text, re.MULTILINE)
    rows = [json.loads(line) for line in _run("status", name, "--namespace", ns, "--json", "-s", srv)[1].splitlines()]
    members = {r["member"]: r for r in rows if "member" in r}
    assert {m: (r["group"], r["stream"], r["cursors"], r["cursors_read"]) for m, r in members.items()} == {
        "a": ("g", None, "sql", False), "f": ("fresh", None, "bucket", True),
    }  # fmt: skip
    rows = [json.loads(line) for line in _run("status", name, "--namespace", ns, "--json", "--cursors", url,
                                                  "-s", srv)[1].splitlines()]  # fmt: skip
    members = {r["member"]: r for r in rows if "member" in r}
    assert (members["a"]["stream"], members["f"]["stream"]) == (name, None)
    assert {r["name"] for r in rows if "cursor" in r} == {"g_1_of_2", "g_2_of_2", "g_1_of_3", "other_1_of_1"}
    # --name follows the group's shards there too.
    text = _in_a_pipe(["status", name, "--namespace", ns, "--name", "fresh*", "-s", srv])
    assert "elastic group fresh" in text
    assert "elastic group g " not in text


@pytest.mark.timeout(120)
async def test_worker_transactional_takes_a_sync_handler_on_sqlite_and_refuses_it_on_postgresql(
    server: EmbeddedServer, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    """``rjet worker --transactional`` with ``def handle(fate, event, tx)``: on SQLite each event's row
    committed with its shard's cursor, once; on PostgreSQL (whose tx is awaited) a one-line error
    before anything starts."""
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"k{i % 7}", 1, b"") for i in range(60)])
    path = tmp_path / "effects.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE effects (seq INTEGER PRIMARY KEY, fid TEXT)")
    (tmp_path / "sync_handler.py").write_text(
        "def handle(fate, event, tx):\n"
        "    tx.execute('INSERT INTO effects (seq, fid) VALUES (?, ?)', (event.id_int, event.foreign_id))\n"
    )
    run = ("worker", name, "sync_handler:handle", "--group", name, "-n", "2", "--to-head", "-q")
    common = ("--namespace", name, "-s", server.url, "--transactional")
    done = await asyncio.to_thread(rjet_cmd, *run, *common, "--cursors", f"sqlite:///{path}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert [seq for (seq,) in db.execute("SELECT seq FROM effects ORDER BY seq")] == list(range(1, 61))
    async with await SqlCursorStore.open(f"sqlite:///{path}") as store:  # each shard at the head
        assert [await store.peek(shard_name(name, m, 2)) for m in range(2)] == ["60", "60"]

    url = f"postgresql://rjet:{PASSWORD}@127.0.0.1:1/nowhere"  # refused before it would connect
    refused = await asyncio.to_thread(rjet_cmd, *run, *common, "--cursors", url, cwd=tmp_path)
    assert refused.returncode == 1
    line = _one_line_error(refused)
    assert "a sync transactional handler runs on SQLite only" in line
    assert "async def fn(fate, event, tx)" in line
    assert PASSWORD not in line


async def test_a_cursor_error_of_a_consumer_with_sql_cursors_hints_the_command_that_moves_it(
    server: EmbeddedServer, js: JetStreamContext, name: str, sql_db: SqlDb
) -> None:
    """A consumer whose cursor is in SQL stops on expired events with the ``rjet cursor`` command that
    moves it: ``--cursors`` and the store's URL without its password (psycopg reads PGPASSWORD), a
    SQLite path absolute; that command, run as hinted, lets the consumer go on."""
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 5)
    await js.purge_stream(name, keep=1)  # events 1..4 removed
    async with await SqlCursorStore.open(sql_db.url) as store:
        assert store.cursors_url is not None
        assert PASSWORD not in store.cursors_url
        await store.set_cursor("billing", "2")
        with pytest.raises(rjet.CursorExpired) as expired:
            await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("billing", lambda f, e: None)))
    err = expired.value
    assert (err.consumer, err.namespace, err.cursors) == ("billing", None, store.cursors_url)
    assert f"(cursors in {store.cursors_url})" in str(err)
    hint = cursor_hint(err)
    assert hint == f"rjet cursor billing --cursors {shlex.quote(store.cursors_url)} --set first --stream {name}"
    if sql_db.kind == "sqlite":
        assert store.cursors_url == f"sqlite:///{sql_db.path}"
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "rjet", *shlex.split(hint)[1:], "-s", server.url],
        capture_output=True, text=True, timeout=60, env={**_env(), "PGPASSWORD": PASSWORD},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    async with await SqlCursorStore.open(sql_db.url) as store:
        assert await store.peek("billing") == "4"
        handled: list[int] = []
        with pytest.raises(rjet.HeadReached):
            await rjet.run(
                rjet.Spec(stream.stream, store, rjet.Consumer("billing", lambda f, e: handled.append(e.id_int)),
                          to_head=True)
            )  # fmt: skip
    assert handled == [5]
