"""``rjet insert --create`` with stream options, ``rjet demo`` as a user sees it (80 columns, a
partitioned stream, --keep, a failed run) and ``rjet bench``'s verdicts: real commands, real servers."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time

import pytest
from nats.js import JetStreamContext
from test_cli import _env, _one_line_error, rjet_cmd

from rjet.cli._bench import report
from rjet.cli._bench_run import Figure
from rjet.cli._insert import _Duration, _Size
from rjet.server import EmbeddedServer

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _on_terminal(*args: str, columns: int = 80, timeout: float = 60) -> tuple[int, list[str]]:
    """Run ``python -m rjet ARGS`` on a pseudo-terminal ``columns`` wide: its exit status and the
    lines it drew (escape sequences removed; every redraw of the live view is there)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**_env(), "COLUMNS": str(columns), "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rjet", *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if proc.poll() is None:
            proc.kill()
        code = proc.wait(10)
        os.close(master)
    text = _ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    return code, re.split(r"\r\n|\r|\n", text)


@pytest.mark.slow
async def test_insert_create_sets_the_stream_options_and_refuses_other_ones(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    url = server.url
    options = ["--subjects", f"{name}.in.>,{name}.other", "--partitions", "12", "--replicas", "1"]
    options += ["--max-age", "1h30m", "--max-bytes", "10MiB", "--max-msgs", "1000"]
    proc = rjet_cmd("insert", name, "--create", *options, "a", "b", "c", "-s", url)
    assert proc.returncode == 0, proc.stderr
    info = await js.stream_info(name, subjects_filter=">")
    c = info.config
    assert sorted(c.subjects or []) == [f"{name}.in.>", f"{name}.other"]
    assert (c.num_replicas, c.max_age, c.max_bytes, c.max_msgs) == (1, 5400.0, 10 * 1024**2, 1000)
    assert (c.metadata or {})["rjet_partitions"] == "12"
    # Each event went to a subject that carries its partition (12 = 2*2*3: three digits).
    subjects = list(info.state.subjects or {})
    assert subjects
    assert all(re.fullmatch(rf"{name}\.in\.p\.\d\.\d\.\d", s) for s in subjects), subjects

    # The same options again: the stream is as asked, so the events go in.
    proc = rjet_cmd("insert", name, "--create", *options, "d", "-s", url)
    assert proc.returncode == 0, proc.stderr
    assert "sequences 4..4" in proc.stdout

    # Other options: an error naming each difference, and nothing inserted.
    proc = rjet_cmd("insert", name, "--create", "--partitions", "720", "--max-age", "30m", "e", "-s", url)
    assert proc.returncode == 1
    err = _one_line_error(proc)
    assert "exists with other options" in err
    assert "it has 12 partitions, not 720" in err
    assert "max-age is 1h30m, not 30m" in err
    assert (await js.stream_info(name)).state.messages == 4

    for args, expect in [
        (["--create", "--max-age", "90"], "--max-age: '90' is not a duration"),
        (["--create", "--max-bytes", "10XB"], "--max-bytes: '10XB' is not a size"),
        (["--max-msgs", "5"], "--max-msgs applies with --create"),
    ]:
        proc = rjet_cmd("insert", name, *args, "f", "-s", url)
        assert proc.returncode == 2, proc.stderr
        assert expect in _one_line_error(proc)


def test_durations_and_sizes() -> None:
    assert [_Duration().convert(v, None, None) for v in ("90s", "30m", "1.5h", "7d", "1h30m")] == [
        90,
        1800,
        5400,
        7 * 86400,
        5400,
    ]
    assert [_Size().convert(v, None, None) for v in ("1000", "512MiB", "10GB", "10g", "1TiB")] == [
        1000,
        512 * 1024**2,
        10 * 1000**3,
        10 * 1000**3,
        1024**4,
    ]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_demo_on_a_partitioned_stream_at_80_columns(server: EmbeddedServer, js: JetStreamContext) -> None:
    code, lines = _on_terminal(
        "demo", "--partitioned", "--keep", "--events", "1000", "--workers", "2", "--keys", "50", "-s", server.url
    )
    text = "\n".join(lines)
    assert code == 0, text
    match = re.search(r"rjet_demo_[0-9a-f]+", text)
    assert match is not None, text
    stream = match.group()
    try:
        # Nothing runs past 80 columns but the commands to copy, kept whole.
        assert [line for line in lines if len(line) > 80 and not line.startswith("  rjet ")] == [], text
        assert re.search(r"^demo_1_of_2 +1,000 |^demo_1_of_2 +\d", text, re.MULTILINE), text
        # The live view's last figures are the summary's: both average from the first insert.
        live = re.findall(r"handled 1,000 of 1,000 in ([\d.]+)s: ([\d,]+) events/s since the first insert", text)
        final = re.search(r"^handled 1,000 events in ([\d.]+)s: ([\d,]+) events/s over 2 shard", text, re.MULTILINE)
        assert live, text
        assert final is not None, text
        assert live[-1] == final.groups(), text
        assert "stream: partitioned (720): each shard read only its own events" in text
        assert "result: OK" in text
        assert f"  rjet status {stream} --namespace {stream} --server {server.url}" in lines
        info = await js.stream_info(stream, subjects_filter=">")
        assert (info.config.metadata or {})["rjet_partitions"] == "720"
        assert info.state.messages == 1000
        assert all(s.startswith(f"{stream}.p.") for s in info.state.subjects or {}), info.state.subjects
    finally:
        for what in (stream, f"KV_rjet_cursors_{stream}"):
            with contextlib.suppress(Exception):
                await js.delete_stream(what)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_failed_demo_prints_its_summary_and_keeps_its_embedded_servers_storage() -> None:
    proc = rjet_cmd(
        "demo", "--keep", "--events", "100", "--workers", "1", "--keys", "10", "--fate", "1",
        "--give-up-after", "2", timeout=50,
    )  # fmt: skip
    out = proc.stdout
    store = re.search(r"rjet server --store-dir (\S+) &", out)
    try:
        assert proc.returncode == 1, out + proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("rjet: error: no progress for 2s"), proc.stderr
        assert re.search(r"^total +1 +\d+ +0 ", out, re.MULTILINE), out  # the summary table
        assert "result: FAILED: no progress for 2s" in out
        assert "the demo's nats-server has stopped" in out
        assert store is not None, out
        match = re.search(r"rjet status (rjet_demo_[0-9a-f]+) --namespace \1$", out, re.MULTILINE)
        assert match is not None, out
        # What the commands printed would look at is there: the stream and its cursor bucket.
        with EmbeddedServer(store_dir=store.group(1)) as srv:
            proc = rjet_cmd("status", match.group(1), "--namespace", match.group(1), "-s", srv.url)
        assert proc.returncode == 0, proc.stderr
        assert f"stream {match.group(1)}: 100 event(s)" in proc.stdout
        assert "demo_1_of_1" in proc.stdout
    finally:
        if store is not None:
            shutil.rmtree(store.group(1), ignore_errors=True)


def test_bench_says_which_targets_were_missed() -> None:
    from rich.console import Console

    figures = [
        Figure("insert_many", "events/s", 300.0, "publish_async", 100.0, ">= 2x", min_ratio=2),
        Figure("run with JetStream cursors", "events/s", 79.0, "MemCursorStore", 100.0, ">= 0.9x", min_ratio=0.9),
        Figure("scan", "us/event", 1.0, "handle", 3.0, "<= 4 us and <= 0.25x", max_ratio=0.25, max_value=4),
        Figure("wall", "us/event", 1.0, "handle", 2.0, "-"),
    ]
    table, line, ok = report(figures, 1000, 1)
    assert not ok
    assert line == "targets: 2 of 3 MISSED: run with JetStream cursors (0.79x, target >= 0.9x); scan (0.33x, target" \
        " <= 4 us and <= 0.25x)"  # fmt: skip
    drawn = io.StringIO()
    Console(width=200, file=drawn).print(table)
    cells = [[c.strip() for c in line.split("│")] for line in drawn.getvalue().splitlines() if "/" in line]
    assert {c[1]: c[-2] for c in cells} == {
        "insert_many": "ok",
        "run with JetStream cursors": "MISSED",
        "scan": "MISSED",
        "wall": "-",
    }, cells
    assert report(figures[:1], 1000, 1)[1:] == ("targets: all 1 met", True)
