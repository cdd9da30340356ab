"""Operator tools: ``rjet status --watch``, the worker's health endpoints, JSON log fields, hints that
name the real consumer, 1-based shard numbers, and what "skipped" counts."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from test_cli import _env, _free_port, rjet_cmd

import rjet
from rjet.cli._common import JsonFormatter, cursor_hint
from rjet.cli._worker import readiness
from rjet.parallel import ShardStats, admin, shard_of
from rjet.parallel._reshard import _carried_done
from rjet.server import EmbeddedServer
from rjet.stats import ConsumerStats
from rjet.testing import wait_until


async def _spawn(*args: str, cwd: Path | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "rjet", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=cwd,
    )  # fmt: skip


async def _stop(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    """SIGINT, then what it printed; killed if it does not end in time."""
    try:
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        return out.decode(), err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _get(url: str) -> tuple[int, dict[str, object]]:
    """Status and JSON body of a GET, 503s included; (0, {}) while nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return 0, {}


async def test_status_watch_prints_one_json_document_per_look_until_ctrl_c(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 3)
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        await store.set_cursor("tool", "1")  # a record that names no stream: listed apart
    await admin.set_cursor(await admin.open_namespace(js, ns), "mailer", "2", stream=name)
    proc = await _spawn("status", name, "--namespace", ns, "--watch", "0.2", "--json", "-s", server.url)
    try:
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        await stream.insert("late", 1)
        for _ in range(50):  # the next looks see the new event
            later = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
            if later["last_seq"] == 4:
                break
    finally:
        out, err = await _stop(proc)
    assert proc.returncode == 0, err  # Ctrl-C is how a watch ends
    assert err == ""
    assert (first["stream"], first["events"], first["last_seq"]) == (name, 3, 3)
    assert [(c["name"], c["cursor"], c["lag_events"]) for c in first["consumers"]] == [("mailer", 2, 1)]
    assert [(c["name"], c["lag_events"]) for c in later["consumers"]] == [("mailer", 2)]
    assert [(c["name"], c["cursor"], c["lag_events"]) for c in later["no_stream"]] == [("tool", 1, None)]
    assert later["time"] > first["time"]
    for line in out.splitlines():  # whatever came after: whole documents, one per line
        assert set(json.loads(line)) == set(first)


@pytest.mark.timeout(90)
async def test_worker_probes_and_json_log_fields(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"key-{i}", 7, b"") for i in range(6)])
    await stream.insert("poison", 9)  # sequence 7: its handler fails once
    (tmp_path / "once.py").write_text(
        "import os\n"
        "def handle(fate, event):\n"
        "    if event.foreign_id == 'poison' and not os.path.exists('failed'):\n"
        "        open('failed', 'w').close()\n"
        "        raise RuntimeError('poison')\n"
    )
    ns, port = f"ns_{name}"[:60], _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await _spawn(
        "--log-json", "worker", name, "once:handle", "--name", "g", "-n", "2", "--namespace", ns,
        "--metrics-port", str(port), "-s", server.url, cwd=tmp_path,
    )  # fmt: skip
    try:
        await wait_until(lambda: _get(base + "/readyz")[0] == 200, timeout=30, what="the worker to be ready")
        assert _get(base + "/readyz")[1] == {"status": "ok", "reason": "2 shard(s) running"}
        assert _get(base + "/healthz")[0] == 200
        await wait_until(lambda: (tmp_path / "failed").exists(), timeout=20, what="the handler to fail")

        # Another runner takes shard 1: this worker's shard is fenced out, so it is no longer ready.
        store = await rjet.JetStreamCursorStore.create(js, ns)
        try:
            await store.claim("g_1_of_2")
            await wait_until(lambda: _get(base + "/readyz")[0] == 503, timeout=20, what="readiness to drop")
            assert _get(base + "/readyz")[1] == {"status": "unavailable", "reason": "g_1_of_2 fenced"}
            assert _get(base + "/healthz")[0] == 200  # alive all the same: a restart would not help
        finally:
            await store.close()
    finally:
        _, err = await _stop(proc)
    assert proc.returncode == 1, err
    assert err.splitlines()[-1].startswith("rjet: error: parallel 'g': 1 shard(s) stopped for good: g_1_of_2: fenced")
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    poison = shard_of("poison", 2) + 1
    [failed] = [r for r in records if "failed; running again" in r["message"]]
    assert {k: failed[k] for k in ("consumer", "group", "shard", "n", "stream", "seq", "event_type", "foreign_id")} == {
        "consumer": f"g_{poison}_of_2", "group": "g", "shard": poison, "n": 2, "stream": name,
        "seq": 7, "event_type": 9, "foreign_id": "poison",
    }  # fmt: skip
    assert "RuntimeError: poison" in failed["message"]  # a worker's traceback travels in its message
    [fenced] = [r for r in records if "fenced out by a newer runner" in r["message"]]
    assert (fenced["group"], fenced["shard"], fenced["n"], fenced["consumer"]) == ("g", 1, 2, "g_1_of_2")
    [start] = [r for r in records if "starting shards" in r["message"]]
    assert "starting shards [1, 2] of n=2" in start["message"]  # numbered as in the names and --shard


def test_readiness_counts_the_shards_this_process_runs() -> None:
    ready = dataclasses.replace(ConsumerStats("g").snapshot(), runs=1)  # a worker running its consumer

    def shard(m: int, state: str, live: rjet.StatsSnapshot | None = ready, restarts: int = 0) -> ShardStats:
        return ShardStats(m, f"g_{m + 1}_of_3", 0, 0, "", restarts, state, live, 0)

    assert readiness((shard(0, "running"), shard(1, "elsewhere"), shard(2, "done"))) == (True, "2 shard(s) running")
    assert readiness((shard(0, "elsewhere"),)) == (True, "no shard assigned to this member")
    assert readiness((shard(0, "running", live=None), shard(1, "waiting", restarts=2), shard(2, "failed"))) == (
        False,
        "g_1_of_3 connecting; g_2_of_3 waiting to restart (restart #2); g_3_of_3 failed",
    )


async def test_hints_name_the_real_consumer_and_shards_count_from_1(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 5)
    await js.purge_stream(name, keep=1)  # events 1..4 removed
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        await store.set_cursor("x_1_of_2", "2")  # in the removed range: events 3..4 are gone
        await store.set_cursor("x_2_of_2", "50")  # past the end: was the stream recreated?
    (tmp_path / "noop.py").write_text("def handle(fate, event):\n    pass\n")
    proc = rjet_cmd(
        "worker", name, "noop:handle", "--name", "x", "-n", "2", "--namespace", ns, "--to-head", "-q",
        "-s", server.url, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1
    *_, line, first_hint, second_hint = proc.stderr.splitlines()  # after the shards' own error logs
    assert line.startswith("rjet: error: "), proc.stderr
    assert "stopped for good: x_1_of_2: failed: CursorExpired" in line  # was "shard 0: failed"
    assert "; x_2_of_2: failed: CursorAhead" in line
    # The shards' errors in words name each shard's consumer and namespace...
    assert f"Move the cursor of consumer 'x_2_of_2' (cursor namespace {ns!r}) on purpose to go on" in line
    # ... and each crossed its process as data: one hint per failed shard, rendered from its fields.
    assert first_hint == f"rjet: hint: rjet cursor x_1_of_2 --namespace {ns} --set first --stream {name}"
    assert second_hint == f"rjet: hint: rjet cursor x_2_of_2 --namespace {ns} --set beginning"

    # Expired by a purge, through the library: the error carries the consumer and namespace too.
    await stream.insert_many([("k", 1, b"")] * 2)
    await js.purge_stream(name, keep=1)
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        await store.set_cursor("billing", "2")
        with pytest.raises(rjet.CursorExpired) as expired:
            await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("billing", lambda f, e: None)))
    assert (expired.value.consumer, expired.value.namespace, expired.value.move) == ("billing", ns, "first")
    assert "rjet cursor" not in str(expired.value)  # the command line renders the hint from the fields
    assert cursor_hint(expired.value) == f"rjet cursor billing --namespace {ns} --set first --stream {name}"
    # Where the raiser knows neither, the command line puts placeholders.
    assert cursor_hint(rjet.EventsRemoved("s", 3, 9)) == "rjet cursor NAME --namespace NS --set 9 --stream s"


def test_log_lines_of_reshards_and_the_json_formatter(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "rjet.parallel"):
        assert _carried_done("5", {2: ("5", 1)}, {2: "not a done set"}, 4) == ("", 0)
    assert "exact progress of old shard 3 of 4 is unreadable" in caplog.text  # was "old shard 2"

    record = logging.makeLogRecord(
        {"msg": "consumer %r", "args": ("c",), "levelno": logging.ERROR, "levelname": "ERROR", "name": "rjet.run"}
    )
    record.__dict__.update(consumer="c", seq=7, shards=[1, 2], odd=object())
    line = json.loads(JsonFormatter().format(record))
    assert (line["message"], line["level"], line["consumer"], line["seq"], line["shards"]) == (
        "consumer 'c'", "error", "c", 7, [1, 2],
    )  # fmt: skip
    assert line["odd"].startswith("<object object")


async def test_skipped_counts_only_events_the_cursor_moved_past(stream: rjet.Stream) -> None:
    await stream.insert_many([("mine-1", 1, b""), ("mine-2", 1, b""), *[(f"other-{i}", 1, b"") for i in range(30)]])
    stats = rjet.ConsumerStats("c")
    store = rjet.MemCursorStore()
    entered, release, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.id == "1":
            entered.set()
            await release.wait()

    consumer = rjet.Consumer("c", handle, key_filter=lambda fid: fid.startswith("mine"))
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer), stats=stats, stop=stop))
    await entered.wait()
    # Everything has arrived: event 2 waits in the buffer, the 30 others' events behind it were read ahead.
    await wait_until(lambda: stats.snapshot().lag_events == 1, what="the stream read ahead")
    stop.set()
    release.set()
    with pytest.raises(rjet.Stopped):
        await task
    snap = stats.snapshot()
    assert (snap.handled, snap.cursor, snap.skipped) == (1, "1", 0)  # was 30: read ahead, not passed

    with pytest.raises(rjet.HeadReached):  # the next run passes over them, and counts them once
        await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True), stats=stats)
    snap = stats.snapshot()
    assert (snap.handled, snap.cursor, snap.skipped) == (2, "32", 30)  # was 60
