"""The ``rjet`` command line, run as a new user would: real commands in subprocesses, real servers."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

import rjet
from rjet._progress import Progress
from rjet.parallel._heartbeats import Heartbeats
from rjet.parallel._keys import heartbeat_key
from rjet.server import EmbeddedServer
from rjet.testing import KeyOrder, wait_until

# The commands read no nats CLI context of the machine's: no NATS_* settings, and a config home of
# their own (an empty one) instead of ~/.config/nats, whose selected context they would use.
_NO_NATS_CONFIG = tempfile.mkdtemp(prefix="rjet-test-no-nats-config-")


def handler_module(directory: Path, module: str, out: Path, line: str, *, wait: float | None = None) -> str:
    """Writes ``<directory>/<module>.py``: a handler that appends ``line`` (an expression of ``event``)
    to ``out``, async and sleeping ``wait`` seconds first when ``wait`` is given, plain otherwise.
    Returns its MODULE:FUNCTION for ``rjet worker``."""
    head = (
        "def handle(fate, event):\n"
        if wait is None
        else f"async def handle(fate, event):\n    await asyncio.sleep({wait})\n"
    )
    (directory / f"{module}.py").write_text(
        f"import asyncio\n{head}    with open({str(out)!r}, 'a') as f:\n        f.write({line} + '\\n')\n"
    )
    return f"{module}:handle"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["XDG_CONFIG_HOME"] = _NO_NATS_CONFIG
    env["COLUMNS"] = "160"
    return env


def rjet_cmd(
    *args: str, input: str | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m rjet ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "rjet", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=_env(),
    )


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rjet: error: "), proc.stderr
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_insert_arguments_then_tail_text(server: EmbeddedServer, name: str) -> None:
    url = server.url
    proc = rjet_cmd("insert", name, "order-1", "order-2", "--type", "3", "--data", "hi", "--create", "-s", url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"inserted 2 event(s) into stream {name!r}: sequences 1..2"

    proc = rjet_cmd("tail", name, "--to-head", "-s", url)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [("1", "3", "order-1", "hi"), ("2", "3", "order-2", "hi")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", r[1]) for r in rows)


def test_insert_json_lines_then_tail_json_and_copy(server: EmbeddedServer, name: str) -> None:
    url = server.url
    lines = [
        {"foreign_id": "u1", "type": 2, "data": {"total": 12}},
        {"foreign_id": "u2", "data_b64": "AAH/"},
        {"foreign_id": "ü 3", "data": "line\nbreak"},
    ]
    stdin = "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n"
    proc = rjet_cmd("insert", name, "--create", "--type", "7", "-s", url, input=stdin)
    assert proc.returncode == 0, proc.stderr
    assert "inserted 3 event(s)" in proc.stdout

    proc = rjet_cmd("tail", name, "--to-head", "--json", "-s", url)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["id"], e["type"], e["foreign_id"]) for e in got] == [("1", 2, "u1"), ("2", 7, "u2"), ("3", 7, "ü 3")]
    assert got[0]["data"] == '{"total":12}'
    assert got[1]["data_b64"] == "AAH/"
    assert "data" not in got[1]
    assert got[2]["data"] == "line\nbreak"

    proc = rjet_cmd("tail", name, "--json", "--after", "2", "--to-head", "-s", url)
    assert [json.loads(line)["id"] for line in proc.stdout.splitlines()] == ["3"]

    # tail --json feeds insert: a copy of the stream, byte for byte.
    copy = name + "_copy"
    all_json = rjet_cmd("tail", name, "--json", "--to-head", "-s", url).stdout
    proc = rjet_cmd("insert", copy, "--create", "-q", "-s", url, input=all_json)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    copied = [json.loads(line) for line in rjet_cmd("tail", copy, "--json", "--to-head", "-s", url).stdout.splitlines()]
    strip = [{k: v for k, v in e.items() if k != "timestamp"} for e in got]
    assert [{k: v for k, v in e.items() if k != "timestamp"} for e in copied] == strip


def test_insert_stops_at_a_bad_line(server: EmbeddedServer, name: str) -> None:
    stdin = '{"foreign_id": "a"}\n{"foreign_id": "b"}\n{"type": 1}\n{"foreign_id": "c"}\n'
    proc = rjet_cmd("insert", name, "--create", "-s", server.url, input=stdin)
    assert proc.returncode == 1
    assert "stdin line 3" in _one_line_error(proc)
    assert "inserted 2 event(s)" in proc.stdout


async def follow_then_insert(
    js: JetStreamContext, stream: rjet.Stream, args: list[str], env: dict[str, str], event: tuple[str, int, bytes]
) -> tuple[int, bytes, bytes]:
    """Start ``rjet ARGS`` (a tail that follows), insert ``event`` once its consumer exists (so the
    event comes after its start), and return its exit status and output."""
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rjet", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        for _ in range(200):
            if (await js.stream_info(stream.name)).state.consumer_count:
                break
            await asyncio.sleep(0.05)
        await stream.insert(*event)
        out, err = await asyncio.wait_for(tail.communicate(), 20)
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
    assert tail.returncode is not None
    return tail.returncode, out, err


async def test_tail_from_head_with_timeout(server: EmbeddedServer, name: str, js: JetStreamContext) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert("old", 1)
    args = ["tail", name, "--from-head", "--json", "--timeout", "1.5", "-s", server.url]
    code, out, err = await follow_then_insert(js, stream, args, _env(), ("new", 2, b"x"))
    assert code == 0, err
    assert [(e["foreign_id"], e["type"]) for e in map(json.loads, out.splitlines())] == [("new", 2)]


async def test_worker_run_then_status_and_tail_cursor(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    url = server.url
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"key-{i % 5}", 1, b"") for i in range(20)])
    seen = tmp_path / "seen.txt"
    handler = handler_module(tmp_path, "cli_handler", seen, "event.id")
    ns = f"ns_{name}"[:60]
    proc = rjet_cmd(
        "worker", name, handler, "--name", "mailer", "-n", "2", "--namespace", ns, "--to-head",
        "-s", url, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted({int(x) for x in seen.read_text().split()}) == list(range(1, 21))
    assert re.search(r"mailer_1_of_2 .* done .* 20 ", proc.stdout), proc.stdout

    await stream.insert_many([("late", 1, b"")] * 3)
    proc = rjet_cmd("status", name, "--namespace", ns, "--json", "-s", url)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == {"mailer_1_of_2", "mailer_2_of_2"}
    for r in rows.values():
        assert (r["cursor"], r["lag_events"], r["last_seq"]) == (20, 3, 23)
        assert r["lag_seconds"] is not None
        assert r["lag_seconds"] >= 0
        assert r["idle_seconds"] is not None
        assert 0 <= r["idle_seconds"] < 60
        assert r["runners"] == []  # the worker stopped cleanly: its heartbeats are gone

    proc = rjet_cmd("status", name, "--namespace", ns, "--name", "mailer_2*", "-s", url)
    assert proc.returncode == 0, proc.stderr
    assert f"stream {name}: 23 event(s), sequences 1..23" in proc.stdout
    assert re.search(r"mailer_2_of_2\s+20\s+3\s", proc.stdout), proc.stdout
    assert "mailer_1_of_2" not in proc.stdout

    proc = rjet_cmd("tail", name, "--cursor", "mailer_1_of_2", "--namespace", ns, "--to-head", "-s", url)
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["21", "22", "23"]


async def test_status_shows_which_host_and_pid_run_each_shard(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"key-{i}", 1, b"") for i in range(4)])
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        for consumer in ("mailer_1_of_2", "mailer_2_of_2", "plain"):
            await store.set_cursor(consumer, "4")
    kv = await js.key_value(f"rjet_cursors_{ns}")
    # What a running group writes for its shards; what a group that died without clearing left (a
    # heartbeat without its ttl, as written before ttl was stored: judged by the default 10 s); and a
    # group that beats slowly, with a ttl of its own that its 30 s old heartbeat is still within.
    await Heartbeats(kv, "mailer", 2, [0], "live-group", interval=1.0, ttl=5.0).beat()
    assert json.loads((await kv.get(heartbeat_key("mailer", 0, 2, "live-group"))).value or b"")["ttl"] == 5.0
    old = time.time() - 30
    dead = {"group": "dead-group", "host": "old-host", "pid": 4242, "n": 2, "time": old}
    slow = {"group": "slow-group", "host": "far-host", "pid": 77, "n": 2, "time": old - 1, "ttl": 120.0}
    await kv.put(heartbeat_key("mailer", 0, 2, "dead-group"), json.dumps(dead).encode())
    await kv.put(heartbeat_key("mailer", 1, 2, "slow-group"), json.dumps(slow).encode())

    proc = rjet_cmd("status", name, "--namespace", ns, "--json", "-s", server.url)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == {"mailer_1_of_2", "mailer_2_of_2", "plain"}
    live, stale = rows["mailer_1_of_2"]["runners"]  # freshest first
    assert (live["host"], live["pid"], live["group"], live["stale"]) == (
        socket.gethostname(),
        os.getpid(),
        "live-group",
        False,
    )
    assert 0 <= live["heartbeat_seconds_ago"] < 5
    assert (stale["host"], stale["pid"], stale["group"], stale["stale"]) == ("old-host", 4242, "dead-group", True)
    assert 29 <= stale["heartbeat_seconds_ago"] < 60
    [slow_runner] = rows["mailer_2_of_2"]["runners"]
    assert (slow_runner["host"], slow_runner["pid"], slow_runner["stale"]) == ("far-host", 77, False)
    assert rows["plain"]["runners"] == []

    proc = rjet_cmd("status", name, "--namespace", ns, "-s", server.url)
    assert proc.returncode == 0, proc.stderr
    shard1 = next(line for line in proc.stdout.splitlines() if "mailer_1_of_2" in line)
    assert f"{socket.gethostname()} pid {os.getpid()}, old-host pid 4242 (stale: heartbeat" in shard1, proc.stdout
    shard2 = next(line for line in proc.stdout.splitlines() if "mailer_2_of_2" in line)
    assert re.search(r"far-host pid 77\s*$", shard2), proc.stdout
    plain = next(line for line in proc.stdout.splitlines() if "plain" in line)
    assert re.search(r"\s-\s*$", plain), proc.stdout


@pytest.mark.timeout(90)
async def test_worker_serves_prometheus_metrics(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"key-{i % 5}", 1, b"") for i in range(30)])
    (tmp_path / "noop_handler.py").write_text("def handle(fate, event):\n    pass\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "rjet", "worker", name, "noop_handler:handle", "--name", "m", "-n", "2"],
        *["--namespace", f"ns_{name}"[:60], "--metrics-port", str(port), "-s", server.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    try:
        body = ""
        for _ in range(300):
            await asyncio.sleep(0.1)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            body = (await reader.read()).decode()
            writer.close()
            handled = re.findall(r'rjet_events_handled_total\{consumer="m_\d_of_2"\} (\d+)', body)
            if len(handled) == 2 and sum(int(float(x)) for x in handled) == 30:
                break
        else:
            raise AssertionError(f"metrics never showed 30 handled events: {body}")
        assert 'rjet_shard_running{consumer="m_1_of_2"} 1.0' in body
        assert 'rjet_handler_duration_seconds_count{consumer="m_1_of_2"}' in body
        assert 'rjet_consumer_lag_events{consumer="m_2_of_2"} 0.0' in body
        assert 'rjet_handler_errors_total{consumer="m_2_of_2"} 0.0' in body
        worker.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(worker.communicate(), 30)
        assert worker.returncode == 0, err
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()


@pytest.mark.parametrize(
    "args",
    [
        ["insert", "s", "a"],
        ["tail", "s"],
        ["status", "s"],
        ["worker", "s", "operator:add", "--name", "w", "-n", "1", "--namespace", "ns"],
    ],
    ids=lambda a: a[0],
)
def test_unreachable_server_is_one_line(args: list[str]) -> None:
    url = f"nats://127.0.0.1:{_free_port()}"
    proc = rjet_cmd(*args, "--server", url, "--connect-timeout", "0.5")
    assert proc.returncode == 1
    assert f"cannot connect to NATS at {url}" in _one_line_error(proc)


def test_credentials_reach_the_server() -> None:
    with EmbeddedServer(extra_args=["--user", "app", "--pass", "s3cret"]) as srv:
        proc = rjet_cmd("insert", "s", "a", "--create", "-s", srv.url, "--user", "app", "--password", "s3cret")
        assert proc.returncode == 0, proc.stderr
        proc = rjet_cmd("tail", "s", "-s", srv.url, "--user", "app", "--password", "wrong", "--connect-timeout", "1")
        assert proc.returncode == 1
        assert "cannot connect to NATS" in _one_line_error(proc)


@pytest.mark.parametrize("args", [["insert", "a"], ["tail"], ["status"]], ids=lambda a: a[0])
def test_missing_stream_is_one_line(server: EmbeddedServer, args: list[str]) -> None:
    proc = rjet_cmd(args[0], "no_such_stream", *args[1:], "-s", server.url)
    assert proc.returncode == 1
    assert "stream 'no_such_stream' not found" in _one_line_error(proc)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fate", ["0", "0.005", "0.01", "0.1"])
def test_demo_on_its_own_embedded_server(fate: str) -> None:
    proc = rjet_cmd("demo", "--events", "2000", "--workers", "2", "--keys", "50", "--fate", fate, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "started nats-server at nats://127.0.0.1:" in proc.stderr
    assert "order violations" in proc.stdout
    # shard, handled, duplicates, order violations, restarts, cursor, events/s
    total = re.search(r"^\s*total\s+([\d,]+)\s+(\d+)\s+(\d+)\s", proc.stdout, re.MULTILINE)
    assert total is not None, proc.stdout
    assert (total.group(1), total.group(3)) == ("2,000", "0")
    if fate != "0":  # injected failures after the work: redelivered, so duplicates, never losses
        assert int(total.group(2)) > 0, proc.stdout
    for shard in ("demo_1_of_2", "demo_2_of_2"):  # each shard's final cursor is the last event
        assert re.search(rf"^\s*{shard}\s+[\d,]+\s+\d+\s+0\s+\d+\s+2000\s", proc.stdout, re.MULTILINE), proc.stdout
    assert "result: OK" in proc.stdout


@pytest.mark.timeout(60)
def test_demo_with_every_handler_call_failing_stops_with_no_progress_never_fenced() -> None:
    proc = rjet_cmd(
        "demo", "--events", "200", "--workers", "2", "--keys", "50", "--fate", "1", "--give-up-after", "4", timeout=50
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("rjet: error: no progress for 4s"), proc.stderr
    assert "every handler call fails" in err
    assert "runner" not in proc.stdout + proc.stderr  # was: "two runners share this consumer name"
    assert "fenced" not in proc.stdout + proc.stderr


async def test_server_runs_until_sigint() -> None:
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "rjet", "server", "--server", "nats://127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert re.fullmatch(r"nats://127\.0\.0\.1:\d+", url), url
        nc = await nats.connect(url)
        try:
            await rjet.Stream.create(nc.jetstream(), "dev")  # JetStream is on
        finally:
            await nc.close()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    assert b"stopping nats-server" in err
    pid = re.search(rb"; pid (\d+);", err)
    assert pid is not None, err
    with pytest.raises(ProcessLookupError):  # the nats-server process is gone (and reaped)
        os.kill(int(pid.group(1)), 0)


def test_help_lists_the_commands() -> None:  # rjet bench's rows: tests/test_cli_bench.py
    out = rjet_cmd("--help").stdout
    for command in ("demo", "insert", "tail", "status", "cursor", "worker", "server", "bench"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), out


def test_console_script_and_missing_extra() -> None:
    script = Path(sys.executable).parent / "rjet"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "0.1.0" in proc.stdout
    code = "import sys; sys.modules['rich'] = None; from rjet.__main__ import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=_env())
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "rjet: the command line needs the 'cli' extra (rich is missing): pip install 'rjet[cli]'"
        " (in a checkout: pip install -e '.[cli]')"
    )


async def test_cursor_moves_a_consumer_past_expired_events(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    stream = await rjet.Stream.create(js, name, max_msgs=5)
    await stream.insert_many([("k", 1, b"")] * 10)  # events 1-5 expired
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        await store.set_cursor("billing", "2")
    consumer = rjet.Consumer("billing", lambda f, e: None)
    store = await rjet.JetStreamCursorStore.create(js, ns)
    with pytest.raises(rjet.CursorExpired):
        await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
    await store.close()

    assert rjet_cmd("cursor", "billing", "--namespace", ns, "-s", server.url).stdout.strip() == "2"
    proc = rjet_cmd("cursor", "billing", "--namespace", ns, "--set", "first", "--stream", name, "-s", server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "billing: 2 -> 5"
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        with pytest.raises(rjet.HeadReached):
            await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
        assert await store.peek("billing") == "10"
    proc = rjet_cmd("cursor", "billing", "--namespace", ns, "--set", "beginning", "-s", server.url)
    assert proc.stdout.strip() == "billing: 10 -> (none: from the beginning)"
    proc = rjet_cmd("cursor", "billing", "--namespace", ns, "--set", "last", "-s", server.url)
    assert proc.returncode == 2
    assert "--set last needs --stream" in proc.stderr
    proc = rjet_cmd("cursor", "billing", "--namespace", ns, "--set", "x1", "-s", server.url)
    assert proc.returncode == 2  # a usage error, as the others (was: 1)
    assert "Invalid value for '--set': 'x1': give a stream sequence" in proc.stderr


async def test_reading_commands_never_create_a_namespace_and_name_what_is_missing(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 3)
    typo = f"typo_{name}"[:60]
    for args in (["cursor", "billing"], ["tail", name, "--cursor", "billing", "--to-head"]):
        proc = rjet_cmd(*args, "--namespace", typo, "-s", server.url)
        assert proc.returncode == 1, proc.stdout  # was: 0, printing everything or an empty line
        assert f"cursor namespace {typo!r} does not exist" in _one_line_error(proc)
    with pytest.raises(nats.js.errors.BucketNotFoundError):  # and nothing was created
        await js.key_value(f"rjet_cursors_{typo}")
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        await store.set_cursor("other", "1")
    proc = rjet_cmd("cursor", "billing", "--namespace", ns, "-s", server.url)
    assert proc.returncode == 1
    assert f"no cursor 'billing' in namespace {ns!r}" in _one_line_error(proc)
    proc = rjet_cmd("tail", name, "--cursor", "billing", "--namespace", ns, "--to-head", "-s", server.url)
    assert proc.returncode == 0, proc.stderr
    assert "no cursor 'billing'" in proc.stderr
    assert "reading from the beginning" in proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 3


def test_the_demo_checker_sees_order_violations_duplicates_and_misrouted_events(tmp_path: Path) -> None:
    from rjet.cli._demo_check import Checker
    from rjet.parallel import shard_of

    a, b = [f"k{i}" for i in range(100) if shard_of(f"k{i}", 2) == 0][:2]
    checker = Checker(tmp_path, 2)
    checker.expect([3, 4, 5], [a, b, a], 0.0)
    log = tmp_path / "0-100.log"
    log.write_text(f"5 {a}\n4 {b}\n3 {a}\n4 " + b[0])  # 3 after 5 for key a; a line cut mid-write
    checker.poll()
    assert (checker.violations, checker.duplicates, checker.unique) == (1, 0, 3)
    with log.open("a") as f:
        f.write(f"{b[1:]}\n")  # the rest of the cut line: event 4 again
    (tmp_path / "1-200.log").write_text(f"9 {a}\n")  # shard 1's worker handled a key of shard 0
    checker.poll()
    assert (checker.violations, checker.duplicates, checker.misrouted) == (1, 1, 1)


@pytest.mark.skipif(importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed here")
async def test_worker_on_uvloop(server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"key-{i % 3}", 1, b"") for i in range(30)])
    seen = tmp_path / "loops.txt"
    handler = handler_module(tmp_path, "loop_handler", seen, "type(asyncio.get_running_loop()).__module__", wait=0)
    proc = rjet_cmd(
        "worker", name, handler, "--name", "u", "-n", "2", "--namespace", f"ns_{name}"[:60],
        "--to-head", "--concurrency", "2", "--loop", "uvloop", "-s", server.url, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert seen.read_text().splitlines() == ["uvloop"] * 30


async def test_worker_concurrency_and_a_cursor_with_exact_progress(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"key-{i % 7}", 1, b"") for i in range(70)])
    seen = tmp_path / "seen.txt"
    handler = handler_module(tmp_path, "conc_handler", seen, 'event.id + " " + event.foreign_id', wait=0.001)
    ns = f"ns_{name}"[:60]
    proc = rjet_cmd(
        "worker", name, handler, "--name", "m", "-n", "1", "--namespace", ns, "--to-head",
        "--concurrency", "4", "-s", server.url, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    order = KeyOrder()
    for line in seen.read_text().splitlines():
        handled, key = line.split()
        order.record(int(handled), key)
    order.check(range(1, 71))
    # A cursor with events done above it says so (on stderr: stdout stays the cursor), and moving
    # it says what it drops.
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        claim = await store.claim("c")
        progress = Progress(10)
        for seq in (11, 12, 13):
            progress.read(seq)
        progress.done(12)
        progress.done(13)
        await claim.set_cursor(progress)
        await claim.release()
    proc = rjet_cmd("cursor", "c", "--namespace", ns, "-s", server.url)
    assert proc.stdout.strip() == "10"
    assert "c: 2 event(s) above it done already (exact progress)" in proc.stderr
    proc = rjet_cmd("cursor", "c", "--namespace", ns, "--set", "13", "--stream", name, "-s", server.url)
    assert proc.stdout.strip() == "c: 10 -> 13 (dropped the 2 event(s) recorded as done above 10)"
    proc = rjet_cmd("worker", name, handler, "--name", "m", "-n", "1", "--namespace", ns,
                    "--concurrency", "0", "-s", server.url, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "--concurrency" in proc.stderr


async def test_group_list_describe_reset_and_delete(server: EmbeddedServer, name: str, js: JetStreamContext) -> None:
    from datetime import UTC, datetime

    from rjet.parallel import Parallel

    url = server.url
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"key-{i % 9}", 1, b"") for i in range(40)])
    ns = f"ns_{name}"[:60]
    midway = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await stream.insert_many([(f"key-{i % 9}", 1, b"") for i in range(20)])  # events 41-60
    await Parallel("billing", 3, print_nothing, servers=url, stream=name, namespace=ns).run_async(to_head=True)

    proc = rjet_cmd("group", "list", "--namespace", ns, "--json", "-s", url)
    assert proc.returncode == 0, proc.stderr
    (listed,) = map(json.loads, proc.stdout.splitlines())
    assert (listed["group"], listed["n"], listed["running"]) == ("billing", 3, False)

    proc = rjet_cmd("group", "describe", "billing", "--namespace", ns, "--stream", name, "-s", url)
    assert proc.returncode == 0, proc.stderr
    assert "group billing in " in proc.stdout
    assert "n=3, lag 0 event(s)" in proc.stdout
    for m in (1, 2, 3):
        assert re.search(rf"billing_{m}_of_3\s+60\s", proc.stdout), proc.stdout

    # A dry run by default: nothing moves.
    proc = rjet_cmd("group", "reset", "billing", "--namespace", ns, "--stream", name, "--to-seq", "11", "-s", url)
    assert proc.returncode == 0, proc.stderr
    assert "billing_1_of_3: 60 -> 10" in proc.stdout
    assert "3 cursor(s) would move (a dry run: add --execute)" in proc.stdout
    described = rjet_cmd("group", "describe", "billing", "--namespace", ns, "--stream", name, "--json", "-s", url)
    assert {s["cursor"] for s in json.loads(described.stdout)["shards"]} == {60}

    proc = rjet_cmd("group", "reset", "billing", "--namespace", ns, "--stream", name, "--to-datetime",
                    midway.isoformat(), "--execute", "-s", url)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "3 cursor(s) moved" in proc.stdout
    described = rjet_cmd("group", "describe", "billing", "--namespace", ns, "--stream", name, "--json", "-s", url)
    body = json.loads(described.stdout)
    assert {s["cursor"] for s in body["shards"]} == {40}  # the next event handled is 41, the first after midway
    assert body["lag_events"] == 60

    proc = rjet_cmd("group", "reset", "billing", "--namespace", ns, "--stream", name, "--shift-by", "-45",
                    "--execute", "--json", "-s", url)  # fmt: skip
    assert {c["new"] for c in json.loads(proc.stdout)["cursors"]} == {0}
    proc = rjet_cmd("group", "reset", "billing", "--namespace", ns, "--stream", name, "-s", url)
    assert proc.returncode == 2
    assert "give exactly one of" in proc.stderr

    proc = rjet_cmd("group", "delete", "billing", "--namespace", ns, "-s", url)
    assert "would be deleted" in proc.stdout
    assert "billing_1_of_3" in proc.stdout
    proc = rjet_cmd("group", "delete", "billing", "--namespace", ns, "--execute", "-s", url)
    assert proc.returncode == 0, proc.stderr
    proc = rjet_cmd("group", "list", "--namespace", ns, "-s", url)
    assert "no Parallel group in namespace" in proc.stdout
    proc = rjet_cmd("group", "describe", "billing", "--namespace", ns, "--stream", name, "-s", url)
    assert proc.returncode == 1
    assert "no Parallel group 'billing'" in _one_line_error(proc)


async def test_group_reset_and_delete_are_refused_while_the_group_runs(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    from rjet.parallel import Parallel

    url = server.url
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 5)
    ns = f"ns_{name}"[:60]
    group = Parallel("live", 2, print_nothing, servers=url, stream=name, namespace=ns, heartbeat_interval=0.2,
                     heartbeat_ttl=2.0)  # fmt: skip
    task = asyncio.create_task(group.run_async())
    try:
        await wait_until(lambda: all(s.state == "running" for s in group.statistics().shards), 30, "running")
        for args in (("reset", "live", "--stream", name, "--to-latest"), ("delete", "live")):
            proc = await asyncio.to_thread(rjet_cmd, "group", *args, "--namespace", ns, "--execute", "-s", url)
            assert proc.returncode == 1
            assert "group 'live' is running (live_1_of_2 on " in _one_line_error(proc)
    finally:
        group.stop()
        await task


def print_nothing(fate: rjet.Fate, event: rjet.Event) -> None:
    """A handler that travels to worker processes (module level)."""


def test_insert_counts_what_the_server_stored_by_input_line(server: EmbeddedServer, name: str) -> None:
    big = "x" * (1024 * 1024 + 10)
    lines = [
        '{"foreign_id": "a", "msg_id": "m1"}',
        '{"foreign_id": "b"}',
        '{"foreign_id": "a", "msg_id": "m1"}',  # the same msg_id: de-duplicated, not stored again
        '{"foreign_id": "c"}',
        json.dumps({"foreign_id": "d", "data": big}),  # larger than a message may be
        '{"foreign_id": "e"}',
    ]
    proc = rjet_cmd("insert", name, "--create", "-s", server.url, input="\n".join(lines) + "\n")
    assert proc.returncode == 1
    err = _one_line_error(proc)
    assert "stdin line 5: the event is 1,048," in err
    assert "the server takes 1,048,576 at most" in err
    # The good lines before it are stored, and the count says so: a duplicate is not an insert.
    assert "inserted 3 event(s) into stream" in proc.stdout
    assert "sequences 1..3; 1 de-duplicated (msg_id seen before: not stored again)" in proc.stdout
    proc = rjet_cmd("insert", name, "-s", server.url, input='{"foreign_id": "f", "type": -1}\n')
    assert proc.returncode == 1
    assert '"type" must be an integer from 0 to 2**63-1, not -1' in _one_line_error(proc)


async def test_insert_interrupted_mid_pipe_reports_exactly_what_was_stored(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    await rjet.Stream.create(js, name)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rjet", "insert", name, "-s", server.url,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    assert proc.stdin is not None
    stdin = proc.stdin

    async def feed() -> None:  # lines keep coming, so a batch is in flight when the signal arrives
        with contextlib.suppress(ConnectionError):
            for start in range(0, 400_000, 1000):
                stdin.write(b"".join(b'{"foreign_id": "k%d"}\n' % i for i in range(start, start + 1000)))
                await stdin.drain()

    feeder = asyncio.create_task(feed())

    async def some_stored() -> bool:
        return (await js.stream_info(name)).state.messages >= 20_000

    await wait_until(some_stored, 60, "the first batches stored")
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    feeder.cancel()
    assert proc.returncode == 130, err
    stored = (await js.stream_info(name)).state.messages
    assert f"inserted {stored} event(s) into stream" in out.decode()
    assert f"interrupted; the next stdin line to insert is {stored + 1}" in err.decode()


async def test_status_lists_only_this_stream_s_cursors_and_never_cuts_a_name(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    ours = await rjet.Stream.create(js, name)
    other = await rjet.Stream.create(js, f"{name}_other")
    await ours.insert_many([("k", 1, b"")] * 3)
    await other.insert_many([("k", 1, b"")] * 50)
    ns = f"ns_{name}"[:60]
    long = "billing_consumer_with_a_rather_long_name_that_fills_a_terminal"
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        for consumer, stream in ((f"{long}_1_of_2", ours), (f"{long}_2_of_2", ours), ("other_reader", other)):
            with pytest.raises(rjet.HeadReached):
                await rjet.run(
                    rjet.Spec(stream.stream, store, rjet.Consumer(consumer, lambda f, e: None), to_head=True)
                )
    env_80 = {**_env(), "COLUMNS": "80"}
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "rjet", "status", name, "--namespace", ns, "-s", server.url],
        capture_output=True, text=True, timeout=60, env=env_80,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    assert "_1_of_2" in proc.stdout  # the part that tells the shards apart is shown, wrapped if need be
    assert "_2_of_2" in proc.stdout
    assert "other_reader" not in proc.stdout  # it reads another stream: no fake lag here


async def test_worker_to_head_with_concurrency_stops_on_sigterm(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    """A SIGTERM while a to-head run drains its queue stops it gracefully: no call starts after it
    (was: every queued call still ran, "not stopped within 8.0s: killing the workers", exit 1)."""
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"key-{i % 50}", 1, b"") for i in range(500)])  # read at once: the run drains
    seen = tmp_path / "seen.txt"
    handler = handler_module(tmp_path, "drain_handler", seen, "event.id", wait=0.2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rjet", "worker", name, handler, "--name", "d", "-n", "1", "--namespace",
        f"ns_{name}"[:60], "--to-head", "--concurrency", "8", "-s", server.url,
        cwd=tmp_path, env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_until(lambda: seen.exists() and len(seen.read_text().splitlines()) >= 16, 30, "calls started")
        proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        _, raw_err = await asyncio.wait_for(proc.communicate(), 30)
        took = time.monotonic() - stopped
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = raw_err.decode()
    assert proc.returncode == 0, err
    assert "killing the workers" not in err
    assert took < 5, f"stopped after {took:.1f}s"
    assert len(seen.read_text().splitlines()) < 100  # not the whole queue: 500 events at 8 x 5 a second


def test_a_server_url_of_another_scheme_is_named() -> None:
    proc = rjet_cmd("status", "s", "-s", "http://127.0.0.1:8222")
    assert proc.returncode == 2
    assert "http:// is not a NATS URL scheme: use nats://, tls://, ws:// or wss://" in proc.stderr
    assert "Name or service not known" not in proc.stderr
