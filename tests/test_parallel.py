"""rjet.parallel against a real nats-server with real worker processes.

Handlers write one line per handled event to a file per shard (``<dir>/shard-<m>.log``, the shard
told by ``on_start``), so the tests can check, from the parent, which process handled what in which
order.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.parallel import (
    ConsumerOptions,
    Parallel,
    ReshardRefused,
    ShardsFailed,
    Summary,
    admin,
    shard_name,
    shard_of,
)
from rjet.parallel._heartbeats import Heartbeats
from rjet.parallel._reshard import prepare
from rjet.server import EmbeddedServer
from rjet.testing import wait_until

_SHARD_ENV = "RJET_TEST_SHARD"


def remember_shard(m: int) -> None:
    """on_start: lets handlers know which shard their process runs."""
    os.environ[_SHARD_ENV] = str(m)


def logger(directory: Path, delay: float = 0.0) -> Callable[[rjet.Fate, rjet.Event], None]:
    """A handler that appends ``<seq> <foreign id> <pid>`` to its shard's file."""

    def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        if delay:
            time.sleep(delay)
        with open(directory / f"shard-{os.environ[_SHARD_ENV]}.log", "a") as f:
            f.write(f"{event.id} {event.foreign_id} {os.getpid()}\n")

    return handle


def read_logs(directory: Path) -> dict[int, list[tuple[int, str, int]]]:
    """(seq, foreign id, pid) per shard, in the order they were handled."""
    logs: dict[int, list[tuple[int, str, int]]] = {}
    for path in sorted(directory.glob("shard-*.log")):
        m = int(path.stem.split("-")[1])
        rows = logs.setdefault(m, [])
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) == 3:  # a worker killed mid-write may leave a partial line
                rows.append((int(parts[0]), parts[1], int(parts[2])))
    return logs


def loops_seen(directory: Path) -> list[str]:
    """The event loop modules that handlers wrote to ``<dir>/loop-<pid>``, one per process."""
    return [p.read_text() for p in sorted(directory.glob("loop-*"))]


def check_handling(logs: dict[int, list[tuple[int, str, int]]], n: int, events: dict[int, str]) -> int:
    """Each event handled by the shard shard_of names; per key, first handlings in stream order; none
    lost. Returns how many handlings were replays."""
    first: dict[int, int] = {}
    per_key: dict[str, list[int]] = collections.defaultdict(list)
    replays = 0
    for m, rows in logs.items():
        for seq, fid, _ in rows:
            assert events[seq] == fid
            assert shard_of(fid, n) == m, f"event {seq} ({fid!r}) handled by shard {m}"
            if seq in first:
                replays += 1
                continue
            first[seq] = m
            per_key[fid].append(seq)
    assert sorted(first) == sorted(events), f"lost: {sorted(set(events) - set(first))[:20]}"
    for fid, seqs in per_key.items():
        assert seqs == sorted(seqs), f"key {fid!r} handled out of order: {seqs}"
    return replays


async def insert(stream: rjet.Stream, count: int, keys: int = 40, prefix: str = "k") -> dict[int, str]:
    fids = [f"{prefix}{i % keys}" for i in range(count)]
    seqs = await stream.insert_many([(fid, 1, b"") for fid in fids])
    return dict(zip(seqs, fids, strict=True))


def group(server: EmbeddedServer, name: str, n: int, fn: Any, **options: Any) -> Parallel:
    options.setdefault("on_start", remember_shard)
    options.setdefault("flush_interval", 0.2)
    options.setdefault("restart_delay", 0.2)
    options.setdefault("heartbeat_interval", 0.5)
    options.setdefault("heartbeat_ttl", 3.0)
    return Parallel(name, n, fn, servers=server.url, stream=name, namespace=name, **options)


async def wait_for(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    await wait_until(cond, timeout, what)


async def stored_cursors(js: JetStreamContext, namespace: str) -> dict[str, str]:
    store = await rjet.JetStreamCursorStore.create(js, namespace)
    return {k: v for k, v in (await store.cursors()).items() if not k.startswith("_rjet.")}


def per_shard(events: dict[int, str], n: int) -> collections.Counter[int]:
    return collections.Counter(shard_of(fid, n) for fid in events.values())


# ----------------------------------------------------------------- configuration


def test_config_errors(server: EmbeddedServer) -> None:
    ok: dict[str, Any] = {"servers": server.url, "stream": "s", "namespace": "ns"}
    with pytest.raises(rjet.ConfigError, match="n must be"):
        Parallel("p", 0, logger(Path()), **ok)
    with pytest.raises(rjet.ConfigError, match="not callable"):
        Parallel("p", 2, "nope", **ok)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):  # a keyword of its own each
        Parallel("p", 2, logger(Path()), bogus=1, **ok)  # type: ignore[call-arg]
    with pytest.raises(rjet.ConfigError, match="shard index"):
        Parallel("p", 2, logger(Path()), shards=[2], **ok)
    with pytest.raises(rjet.ConfigError, match="distinct"):
        Parallel("p", 2, logger(Path()), shards=[1, 1], **ok)
    with pytest.raises(rjet.ConfigError, match="namespace"):
        Parallel("p", 2, logger(Path()), **{**ok, "namespace": "a.b"})
    with pytest.raises(rjet.ConfigError, match="heartbeat_ttl"):
        Parallel("p", 2, logger(Path()), heartbeat_interval=2, heartbeat_ttl=3, **ok)
    assert Parallel("p", 4, logger(Path()), shards=[3, 1], **ok).shards == (1, 3)
    assert ConsumerOptions(types=[1, 2]).types == frozenset({1, 2})
    with pytest.raises(rjet.ConfigError, match="loop is 'asyncio' or 'uvloop', not 'trio'"):
        Parallel("p", 2, logger(Path()), loop="trio", **ok)  # type: ignore[arg-type]


def test_every_consumer_option_reaches_each_shard_s_consumer() -> None:
    policy = rjet.RetryPolicy(backoff=0.2, max_backoff=1.0, attempts=3)
    ok: dict[str, Any] = {"servers": "nats://127.0.0.1:1", "stream": "s", "namespace": "ns"}
    p = Parallel(
        "p", 2, logger(Path()), types=[1], concurrency=8, on_error="retry", retry=policy, max_waiting=64,
        max_waiting_bytes=4096, dead_letters="dl", heartbeat_ttl=30, stop_timeout=5, **ok,
    )  # fmt: skip

    async def sink(record: rjet.DeadLetterRecord) -> None: ...

    c = p.options.consumer.consumer("p_1_of_2", p.fn, sink=sink)
    assert (c.types, c.concurrency, c.on_error, c.max_waiting, c.max_waiting_bytes) == (
        frozenset({1}), 8, "retry", 64, 4096,
    )  # fmt: skip
    assert c.dead_letter is not None
    assert (c.retry, c.dead_letter.retry) == (policy, policy)  # the dead letters' tries and backoff too
    assert (p.options.heartbeats.ttl, p.options.supervision.stop_timeout, p.options.elastic) == (30, 5, None)
    with pytest.raises(rjet.ConfigError, match="Parallel: max_waiting and max_waiting_bytes must be >= 1"):
        Parallel("p", 2, logger(Path()), max_waiting=0, **ok)
    with pytest.raises(rjet.ConfigError, match="Parallel: dead_letter_attempts must be an int >= 1"):
        Parallel("p", 2, logger(Path()), dead_letters="dl", dead_letter_attempts=0, **ok)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("loop", "module"), [("asyncio", "asyncio.unix_events"), ("uvloop", "uvloop")])
async def test_workers_run_on_the_event_loop_asked_for(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, loop: str, module: str
) -> None:
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        with pytest.raises(rjet.ConfigError, match="needs the uvloop package here: pip install uvloop"):
            group(server, name, 2, logger(tmp_path), loop=loop)
        pytest.skip("uvloop is not installed here (it is in the dev extra)")
    events = await insert(stream, 200)

    async def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        (tmp_path / f"loop-{os.getpid()}").write_text(type(asyncio.get_running_loop()).__module__)
        logger(tmp_path)(fate, event)

    summary = await group(server, name, 2, handle, loop=loop, concurrency=4).run_async(to_head=True)
    assert summary.handled == len(events)
    check_handling(read_logs(tmp_path), 2, events)
    assert loops_seen(tmp_path) == [module, module]  # a file per worker process


async def test_a_handler_that_cannot_travel_is_refused_before_anything_starts(server: EmbeddedServer) -> None:
    gen = (x for x in [1])

    def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        next(gen)

    p = Parallel("p", 2, handle, servers=server.url, stream="s", namespace="ns")
    with pytest.raises(rjet.ConfigError, match="cannot be sent to a worker process"):
        await p.run_async(to_head=True)


def test_a_handler_of_the_wrong_shape_is_refused_when_the_group_is_built(server: EmbeddedServer) -> None:
    with pytest.raises(rjet.ConfigError, match=r"Parallel 'p': handler .* cannot be called as fn\(fate, event\)"):
        Parallel("p", 2, cast(Any, lambda event: None), servers=server.url, stream="s", namespace="ns")
    with pytest.raises(rjet.ConfigError, match=r"cannot be called as fn\(fate, events\)"):
        Parallel("p", 2, cast(Any, lambda: None), servers=server.url, stream="s", namespace="ns", batch=rjet.Batch(10))


async def test_a_missing_stream_fails_before_any_worker_starts(server: EmbeddedServer, name: str) -> None:
    p = group(server, name, 2, logger(Path()))
    with pytest.raises(rjet.StreamNotFound):
        await p.run_async(to_head=True)
    assert p.worker_pids == {}


# ----------------------------------------------------------------- order, cursors, summary


@pytest.mark.timeout(60)
async def test_shards_handle_their_keys_in_order_and_resume_without_rescanning(
    server: EmbeddedServer, stream: rjet.Stream, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    n = 3
    events = await insert(stream, 3000)
    last = str(max(events))

    async def handle(fate: rjet.Fate, event: rjet.Event) -> None:  # async handlers work too
        logger(tmp_path)(fate, event)

    summary = await group(server, name, n, handle).run_async(to_head=True)

    assert check_handling(read_logs(tmp_path), n, events) == 0
    counts = per_shard(events, n)
    assert isinstance(summary, Summary)
    assert [s.shard for s in summary.shards] == [0, 1, 2]
    for s in summary.shards:
        assert s.name == shard_name(name, s.shard, n)
        assert (s.handled, s.skipped, s.cursor, s.restarts, s.state) == (
            counts[s.shard],
            len(events) - counts[s.shard],
            last,
            0,
            "done",
        )
    assert summary.handled == len(events)
    assert summary.reshard is None
    assert await stored_cursors(js, name) == {shard_name(name, m, n): last for m in range(n)}

    # Each shard advanced past the other shards' events too: a restart rescans nothing.
    again = await group(server, name, n, handle).run_async(to_head=True)
    assert [(s.handled, s.skipped, s.cursor) for s in again.shards] == [(0, 0, last)] * n


@pytest.mark.timeout(60)
async def test_on_a_partitioned_stream_each_shard_reads_only_its_own_events(
    server: EmbeddedServer, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    n = 3
    stream = await rjet.Stream.create(js, name, partitions=True)
    events = await insert(stream, 2000)
    summary = await group(server, name, n, logger(tmp_path)).run_async(to_head=True)
    assert check_handling(read_logs(tmp_path), n, events) == 0
    assert summary.skipped == 0  # the server filtered other shards' events out
    assert [s.handled for s in summary.shards] == [per_shard(events, n)[m] for m in range(n)]


@pytest.mark.timeout(60)
async def test_shards_spread_over_groups(
    server: EmbeddedServer, stream: rjet.Stream, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    n = 2
    events = await insert(stream, 2000)
    fn = lambda fate, event: logger(tmp_path)(fate, event)  # noqa: E731  # lambdas travel too
    first = group(server, name, n, fn, shards=[0])
    second = group(server, name, n, fn, shards=[1])
    a, b = await asyncio.gather(first.run_async(to_head=True), second.run_async(to_head=True))

    assert [s.shard for s in a.shards] == [0]
    assert [s.shard for s in b.shards] == [1]
    assert check_handling(read_logs(tmp_path), n, events) == 0
    assert a.handled + b.handled == len(events)
    last = str(max(events))
    assert await stored_cursors(js, name) == {shard_name(name, 0, n): last, shard_name(name, 1, n): last}


# ----------------------------------------------------------------- supervision


@pytest.mark.timeout(60)
async def test_a_killed_worker_is_restarted_and_resumes_from_its_cursor(
    server: EmbeddedServer,
    stream: rjet.Stream,
    js: JetStreamContext,
    name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = 2
    events = await insert(stream, 3000)
    p = group(server, name, n, logger(tmp_path, delay=0.001))
    task = asyncio.create_task(p.run_async(to_head=True))
    await wait_for(lambda: p.statistics().shard(0).handled >= 200, what="progress on shard 0")
    # While it runs, each shard's heartbeat names this host, this (the supervising) process and the ttl.
    store = await admin.open_namespace(js, name)
    beats = await admin.heartbeats(store)
    assert {shard: [(b.host, b.pid, b.ttl) for b in found] for shard, found in beats.items()} == {
        shard_name(name, m, n): [(socket.gethostname(), os.getpid(), 3.0)] for m in range(n)
    }
    victim = p.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    summary = await task
    assert await admin.heartbeats(store) == {}  # a clean stop deletes them

    logs = read_logs(tmp_path)
    check_handling(logs, n, events)
    assert {pid for _, _, pid in logs[0]} - {victim}, "shard 0 was not handled by a new process"
    assert summary.shard(0).restarts == 1
    assert summary.shard(1).restarts == 0
    assert all(s.state == "done" and s.cursor == str(max(events)) for s in summary.shards)
    assert "was killed by SIGKILL" in caplog.text


@pytest.mark.timeout(60)
async def test_a_handler_error_stops_backs_off_and_retries_the_same_event(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = 2
    events = await insert(stream, 600)
    bad = sorted(events)[300]
    marker = tmp_path / "failed-once"
    log = logger(tmp_path)

    def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.id_int == bad and not marker.exists():
            marker.touch()
            raise ValueError("boom")
        log(fate, event)

    summary = await group(server, name, n, handle, max_backoff=0.2).run_async(to_head=True)

    assert check_handling(read_logs(tmp_path), n, events) == 0  # the failed event was handled after
    assert summary.shard(shard_of(events[bad], n)).restarts == 0  # the worker itself did not die
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and "ValueError: boom" in r.getMessage()]
    assert failures, caplog.text
    assert f"failed on event {bad}" in failures[0].getMessage()  # the event is named
    assert failures[0].processName == f"rjet:{shard_name(name, shard_of(events[bad], n), n)}"


@pytest.mark.timeout(90)
async def test_a_shard_with_a_flaky_handler_is_never_fenced_by_its_own_store(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    # Every tempted failure re-runs the shard, which claims its cursor again while the worker's
    # fence watch checks the claim (was: such a shard ended fenced in about half the runs).
    n = 2
    events = await insert(stream, 1500)
    summary = await group(
        server, name, n, logger(tmp_path), fate=rjet.RandomFate(0.05, seed=3), retry_delay=0.0, max_backoff=0.05,
        flush_interval=0.05,
    ).run_async(to_head=True)  # fmt: skip
    assert [s.state for s in summary.shards] == ["done", "done"]
    check_handling(read_logs(tmp_path), n, events)


def fail_setup_of_shard_0(m: int) -> None:
    remember_shard(m)
    if m == 0:
        raise RuntimeError("setup of shard 0 fails")


@pytest.mark.timeout(60)
async def test_a_worker_that_keeps_failing_is_restarted_with_backoff_and_the_others_go_on(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = 2
    events = await insert(stream, 1000)
    p = group(
        server,
        name,
        n,
        logger(tmp_path),
        on_start=fail_setup_of_shard_0,
        restart_delay=0.1,
        max_restart_delay=0.4,
    )
    task = asyncio.create_task(p.run_async())
    own = per_shard(events, n)[1]
    await wait_for(
        lambda: p.statistics().shard(0).restarts >= 4 and p.statistics().shard(1).handled == own,
        30,
        what="shard 1 done while shard 0 keeps failing",
    )
    p.stop()
    summary = await task

    assert summary.shard(1).handled == own
    assert summary.shard(1).cursor == str(max(events))
    assert summary.shard(0).handled == 0
    assert [s.state for s in summary.shards] == ["stopped", "stopped"]
    restarts = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"parallel {name!r}: worker of")]
    delays = [float(m.split("restarting it in ")[1].split("s ")[0]) for m in restarts]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.4]
    assert "setup of shard 0 fails" in caplog.text


# ----------------------------------------------------------------- duplicate runners


@pytest.mark.timeout(60)
async def test_a_second_runner_of_the_same_shards_fences_the_first(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = 2
    events = await insert(stream, 2000)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = group(server, name, n, logger(tmp_path / "old", delay=0.002))
    old_task = asyncio.create_task(old.run_async())
    await wait_for(lambda: old.statistics().handled >= 100, what="the first group to make progress")

    new = group(server, name, n, logger(tmp_path / "new"))
    new_summary = await new.run_async(to_head=True)
    with pytest.raises(ShardsFailed) as failed:
        await asyncio.wait_for(old_task, 10)

    assert failed.value.fenced == frozenset({0, 1})
    assert all(s.state == "fenced" and s.restarts == 0 for s in failed.value.summary.shards)
    # The error itself crossed from each worker process, with its fields.
    conflicts = {m: e.name for m, e in failed.value.errors.items() if isinstance(e, rjet.CursorConflict)}
    assert conflicts == {m: shard_name(name, m, n) for m in range(n)}
    assert all(s.state == "done" for s in new_summary.shards)
    # Between them, the groups lost nothing; each handled its keys in order.
    old_logs, new_logs = read_logs(tmp_path / "old"), read_logs(tmp_path / "new")
    handled = {seq for logs in (old_logs, new_logs) for rows in logs.values() for seq, _, _ in rows}
    assert handled == set(events)
    for logs in (old_logs, new_logs):
        check_handling(logs, n, {seq: events[seq] for rows in logs.values() for seq, _, _ in rows})
    assert "already run by another group" in caplog.text


@pytest.mark.timeout(60)
async def test_a_shard_whose_stream_was_recreated_fails_for_good(
    server: EmbeddedServer, js: JetStreamContext, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    await insert(stream, 40)
    await group(server, name, 2, logger(tmp_path)).run_async(to_head=True)
    await js.delete_stream(name)
    await insert(await rjet.Stream.create(js, name), 80)  # longer than the old cursors: only the identity tells
    with pytest.raises(ShardsFailed) as failed:
        # Not restarted with backoff for ever: running again cannot make the cursors count in the new stream.
        await asyncio.wait_for(group(server, name, 2, logger(tmp_path)).run_async(to_head=True), 20)
    assert [(s.state, s.restarts) for s in failed.value.summary.shards] == [("failed", 0), ("failed", 0)]
    assert all(why.startswith("failed: StreamRecreated") for why in failed.value.failures.values())
    assert failed.value.fenced == frozenset()
    for m, err in failed.value.errors.items():  # the data the command line renders its hints from
        assert isinstance(err, rjet.StreamRecreated)
        assert (err.consumer, err.namespace, err.stream, err.move) == (shard_name(name, m, 2), name, name, "beginning")
    assert sorted(failed.value.errors) == [0, 1]


class _HoldsALock(rjet.ConfigError):
    """A permanent error that cannot be pickled."""

    def __init__(self) -> None:
        super().__init__("refused by the handler")
        self.lock = threading.Lock()


def _refuse(fate: rjet.Fate, event: rjet.Event) -> None:
    raise _HoldsALock


@pytest.mark.timeout(60)
async def test_a_shard_error_that_cannot_be_pickled_reaches_the_parent_as_text(
    server: EmbeddedServer, stream: rjet.Stream, name: str
) -> None:
    await insert(stream, 3)
    with pytest.raises(ShardsFailed) as failed:
        await asyncio.wait_for(group(server, name, 1, _refuse).run_async(to_head=True), 20)
    assert failed.value.failures == {0: "failed: _HoldsALock: refused by the handler"}
    assert failed.value.errors == {}


# ----------------------------------------------------------------- resharding


@pytest.mark.timeout(90)
async def test_reshard_2_to_3_seeds_from_the_lowest_old_cursor(
    server: EmbeddedServer, stream: rjet.Stream, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    batch1 = await insert(stream, 1500)
    (tmp_path / "x").mkdir()
    old = group(server, name, 2, logger(tmp_path / "x"))
    old_task = asyncio.create_task(old.run_async())
    head1 = str(max(batch1))
    await wait_for(lambda: all(s.cursor == head1 for s in old.statistics().shards), what="n=2 to catch up")

    with pytest.raises(ReshardRefused) as refused:
        await group(server, name, 3, logger(tmp_path)).run_async(to_head=True)
    assert set(refused.value.running) == {shard_name(name, 0, 2), shard_name(name, 1, 2)}
    old.stop()
    await old_task

    # Make the old cursors differ: only shard 2 of 2 sees the second batch.
    batch2 = await insert(stream, 1000, prefix="j")
    await group(server, name, 2, logger(tmp_path / "x"), shards=[1]).run_async(to_head=True)
    cursors = await stored_cursors(js, name)
    assert cursors == {shard_name(name, 0, 2): head1, shard_name(name, 1, 2): str(max(batch2))}

    new_dir = tmp_path / "new"
    new_dir.mkdir()
    summary = await group(server, name, 3, logger(new_dir)).run_async(to_head=True)

    report = summary.reshard
    assert report is not None
    assert (report.n, report.old_n, report.seed, report.source_n) == (3, (2,), head1, 2)
    assert report.seeded == tuple(shard_name(name, m, 3) for m in range(3))
    assert report.old_cursors == cursors
    # No loss (everything after the seed is handled), no full replay (nothing before it is).
    assert check_handling(read_logs(new_dir), 3, batch2) == 0
    assert all(s.cursor == str(max(batch2)) for s in summary.shards)
    # The old cursors stay; a second start of n=3 is a plain restart.
    assert (await stored_cursors(js, name)).items() >= cursors.items()
    again = await group(server, name, 3, logger(new_dir)).run_async(to_head=True)
    assert again.reshard is None
    assert again.handled == 0


async def test_reshard_uses_the_best_bound_over_old_generations(js: JetStreamContext, name: str) -> None:
    store = await rjet.JetStreamCursorStore.create(js, name)
    kv = await js.key_value(store.bucket)  # the bucket as another writer sees it
    # n=2 ran long ago; n=4 ran later, one of its shards never flushed; n=5 ran last.
    for m, c in enumerate(["100", "90"]):
        await kv.put(shard_name(name, m, 2), c.encode())
    for m, c in enumerate(["500", "400", "450"]):
        await kv.put(shard_name(name, m, 4), c.encode())
    for m, c in enumerate(["300", "280", "290", "310", "299"]):
        await kv.put(shard_name(name, m, 5), c.encode())
    report = await prepare(kv, name, 3, group="g", ttl=5.0)
    assert report is not None
    assert (report.seed, report.source_n, report.old_n) == ("280", 5, (2, 4, 5))
    assert {m: await store.peek(shard_name(name, m, 3)) for m in range(3)} == {0: "280", 1: "280", 2: "280"}
    assert await prepare(kv, name, 3, group="g", ttl=5.0) is None

    # Back to an n that ran before: its stale cursors are replaced, not resumed.
    await kv.put(shard_name(name, 0, 3), b"700")
    await kv.put(shard_name(name, 1, 3), b"650")
    await kv.put(shard_name(name, 2, 3), b"690")
    report = await prepare(kv, name, 2, group="g", ttl=5.0)
    assert report is not None
    assert (report.seed, report.source_n) == ("650", 3)
    assert [await store.peek(shard_name(name, m, 2)) for m in range(2)] == ["650", "650"]


async def test_reshard_of_a_generation_with_no_cursors_starts_at_the_beginning(js: JetStreamContext, name: str) -> None:
    store = await rjet.JetStreamCursorStore.create(js, name)
    kv = await js.key_value(store.bucket)  # the bucket as another writer sees it
    assert await prepare(kv, name, 2, group="g", ttl=5.0) is None  # first run: nothing to seed
    report = await prepare(kv, name, 3, group="g", ttl=5.0)
    assert report is not None
    assert (report.seed, report.source_n) == ("", None)
    assert [await store.peek(shard_name(name, m, 3)) for m in range(3)] == ["", "", ""]


async def test_groups_of_different_n_starting_at_once_exactly_one_goes_ahead(js: JetStreamContext, name: str) -> None:
    store = await rjet.JetStreamCursorStore.create(js, name)
    kv = await js.key_value(store.bucket)  # the bucket as another writer sees it
    await kv.put(shard_name(name, 0, 1), b"5")
    a = Heartbeats(kv, name, 2, [0, 1], "a", interval=1.0)
    b = Heartbeats(kv, name, 3, [0, 1, 2], "b", interval=1.0)
    await a.beat()
    await b.beat()
    results = await asyncio.gather(
        prepare(kv, name, 2, group="a", ttl=5.0), prepare(kv, name, 3, group="b", ttl=5.0), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, ReshardRefused)]
    assert len(refused) == 1, results  # the group record decides: one n, never both and never neither
    won, lost = (2, 3) if isinstance(results[1], ReshardRefused) else (3, 2)
    assert f"cannot start with n={lost}: the group runs with n={won}" in str(refused[0])
    await a.clear()
    await b.clear()
    assert await prepare(kv, name, lost, group="c", ttl=5.0) is not None  # its holders stopped: a reshard


async def test_groups_of_the_same_n_starting_at_once_agree(js: JetStreamContext, name: str) -> None:
    store = await rjet.JetStreamCursorStore.create(js, name)
    kv = await js.key_value(store.bucket)  # the bucket as another writer sees it
    await kv.put(shard_name(name, 0, 1), b"42")
    results = await asyncio.gather(*(prepare(kv, name, 4, group=g, ttl=5.0) for g in "abc"))
    assert sum(r is not None for r in results) == 1
    assert [await store.peek(shard_name(name, m, 4)) for m in range(4)] == ["42"] * 4


# ----------------------------------------------------------------- signals (a real parent process)

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys, time
    from rjet.parallel import Parallel

    def main():
        url, stream, directory, sleep = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

        def handle(fate, event):
            with open(os.path.join(directory, "events.log"), "a") as f:
                f.write(f"start {event.id} {os.getpid()}\\n")
            time.sleep(sleep)
            with open(os.path.join(directory, "events.log"), "a") as f:
                f.write(f"end {event.id} {os.getpid()}\\n")

        logging.basicConfig(level=logging.INFO, format="%(processName)s %(message)s")
        group = Parallel("sig", 2, handle, servers=url, stream=stream, namespace=stream,
                         flush_interval=0.2, stop_timeout=20)
        summary = group.run()
        print("handled", summary.handled, flush=True)

    if __name__ == "__main__":
        main()
    """
)


def start_script(tmp_path: Path, server: EmbeddedServer, name: str, sleep: float) -> subprocess.Popen[str]:
    script = tmp_path / "group.py"
    script.write_text(SCRIPT)
    return subprocess.Popen(
        [sys.executable, str(script), server.url, name, str(tmp_path), str(sleep)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal would give it
    )


def script_events(tmp_path: Path) -> list[tuple[str, int, int]]:
    path = tmp_path / "events.log"
    if not path.exists():
        return []
    rows = [line.split(" ") for line in path.read_text().splitlines()]
    return [(r[0], int(r[1]), int(r[2])) for r in rows if len(r) == 3]


async def wait_gone(pids: set[int], timeout: float = 5.0) -> None:
    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await wait_for(lambda: all(gone(p) for p in pids), timeout, what=f"workers {pids} to exit")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGTERM to the parent", "SIGINT to the process group"])
async def test_a_signal_stops_gracefully_finishing_handlers_and_flushing_cursors(
    server: EmbeddedServer, stream: rjet.Stream, js: JetStreamContext, name: str, tmp_path: Path, how: str
) -> None:
    events = await insert(stream, 300)
    proc = start_script(tmp_path, server, name, sleep=0.05)
    try:
        await wait_for(lambda: len(script_events(tmp_path)) >= 20, what="the script to handle events")
        if how.startswith("SIGTERM"):
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the workers get it too, and ignore it
        t0 = time.monotonic()
        out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out
    assert took < 10, out
    rows = script_events(tmp_path)
    starts = [seq for kind, seq, _ in rows if kind == "start"]
    ends = [seq for kind, seq, _ in rows if kind == "end"]
    assert sorted(starts) == sorted(ends), "a handler in flight did not finish"
    await wait_gone({pid for _, _, pid in rows})
    # Every cursor was flushed: it covers every event its shard handled, and no own event after it.
    cursors = await stored_cursors(js, name)
    for m in range(2):
        cursor = int(cursors[shard_name("sig", m, 2)])
        handled = {seq for seq in ends if shard_of(events[seq], 2) == m}
        own_until_cursor = {seq for seq, fid in events.items() if seq <= cursor and shard_of(fid, 2) == m}
        assert handled == own_until_cursor
    assert "stopping gracefully" in out


@pytest.mark.timeout(60)
async def test_workers_stop_gracefully_when_their_parent_dies(
    server: EmbeddedServer, stream: rjet.Stream, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    events = await insert(stream, 300)
    proc = start_script(tmp_path, server, name, sleep=0.05)
    try:
        await wait_for(lambda: len(script_events(tmp_path)) >= 20, what="the script to handle events")
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.communicate, timeout=10)  # EOF once the workers, which share stdout, exit
        await wait_gone({pid for _, _, pid in script_events(tmp_path)})
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rows = script_events(tmp_path)
    starts = [seq for kind, seq, _ in rows if kind == "start"]
    assert sorted(starts) == sorted(seq for kind, seq, _ in rows if kind == "end")
    cursors = await stored_cursors(js, name)
    for m in range(2):
        cursor = int(cursors[shard_name("sig", m, 2)])
        assert {seq for seq in starts if shard_of(events[seq], 2) == m} == {
            seq for seq, fid in events.items() if seq <= cursor and shard_of(fid, 2) == m
        }


@pytest.mark.timeout(60)
async def test_cancelling_run_async_stops_gracefully(
    server: EmbeddedServer, stream: rjet.Stream, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    events = await insert(stream, 1000)
    p = group(server, name, 1, logger(tmp_path, delay=0.002))
    task = asyncio.create_task(p.run_async())
    await wait_for(lambda: p.statistics().handled >= 50, what="progress")
    pids = set(p.worker_pids.values())
    assert not p.stopping
    task.cancel()
    await wait_for(lambda: p.stopping, what="the stop to be seen")  # what /readyz reports meanwhile
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not p.stopping
    await wait_gone(pids)
    handled = [seq for seq, _, _ in read_logs(tmp_path)[0]]
    assert handled == sorted(events)[: len(handled)]
    assert (await stored_cursors(js, name))[shard_name(name, 0, 1)] == str(handled[-1])


@pytest.mark.timeout(60)
async def test_a_second_signal_forces(server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path) -> None:
    await insert(stream, 50)
    proc = start_script(tmp_path, server, name, sleep=60)
    try:
        await wait_for(lambda: len(script_events(tmp_path)) >= 2, what="handlers to start")
        os.kill(proc.pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert proc.poll() is None  # the handlers in flight sleep for a minute: graceful waits
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "forced to stop" in out
    await wait_gone({pid for _, _, pid in script_events(tmp_path)})


async def test_a_poison_key_goes_to_the_dead_letter_stream_and_its_shard_goes_on(
    server: EmbeddedServer, js: JetStreamContext, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    n = 2
    events = await insert(stream, 400, keys=20)
    log = logger(tmp_path)

    def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.foreign_id == "k7":
            raise ValueError("k7 is poison")
        log(fate, event)

    summary = await group(
        server, name, n, handle, dead_letters=f"{name}_dlq", dead_letter_attempts=1, max_backoff=0.1
    ).run_async(to_head=True)
    poison = {seq for seq, fid in events.items() if fid == "k7"}
    handled = {seq for rows in read_logs(tmp_path).values() for seq, _, _ in rows}
    assert handled == set(events) - poison
    assert summary.handled == len(events) - len(poison)
    dlq = rjet.Stream(js, f"{name}_dlq")
    async with await dlq.stream(to_head=True) as client:
        letters = [e async for e in client]
    assert sorted(json.loads(e.metadata)["event_id"] for e in letters) == sorted(str(s) for s in poison)
    assert {e.foreign_id for e in letters} == {"k7"}


async def test_reshard_on_a_partitioned_stream_loses_nothing(
    server: EmbeddedServer, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name, partitions=True)
    batch1 = await insert(stream, 1200)
    (tmp_path / "old").mkdir()
    first = await group(server, name, 2, logger(tmp_path / "old")).run_async(to_head=True)
    assert first.skipped == 0  # the server filtered: no worker read another shard's events
    batch2 = await insert(stream, 900, prefix="j")
    (tmp_path / "new").mkdir()
    summary = await group(server, name, 3, logger(tmp_path / "new")).run_async(to_head=True)
    assert summary.reshard is not None
    assert summary.reshard.old_n == (2,)
    assert summary.skipped == 0
    # Every event after the seed is handled by its new shard, in order per key; nothing is lost.
    seed = int(summary.reshard.seed or 0)
    after_seed = {seq: fid for seq, fid in {**batch1, **batch2}.items() if seq > seed}
    check_handling(read_logs(tmp_path / "new"), 3, after_seed)
    # A filtered shard's cursor stops at its own last event (the server never sends it the others').
    for s in summary.shards:
        own = [seq for seq, fid in after_seed.items() if shard_of(fid, 3) == s.shard]
        assert s.cursor == str(max(own, default=seed))


# ----------------------------------------------------------------- concurrency


def slow_first(directory: Path, slow_seq: int) -> Callable[[rjet.Fate, rjet.Event], None]:
    """``logger``, but event ``slow_seq`` takes 3 seconds: it is in flight when the group stops."""
    log = logger(directory)

    def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.id_int == slow_seq:
            time.sleep(3.0)
        log(fate, event)

    return handle


@pytest.mark.timeout(90)
@pytest.mark.parametrize("restart_n", [2, 3], ids=["restart", "reshard-to-3"])
async def test_concurrent_shards_keep_exact_progress_over_a_graceful_restart(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, js: JetStreamContext, restart_n: int
) -> None:
    n = 2
    # Key "slow" has events 1 and 2; the stop comes while 1 is in flight, so 2 is never started and
    # its shard's watermark stays at 1 while that shard's other keys are done above it.
    await stream.insert_many([("slow", 1, b""), ("slow", 1, b"")])
    events = {1: "slow", 2: "slow", **(await insert(stream, 600, keys=30))}
    slow_shard = shard_of("slow", n)
    p = group(server, name, n, slow_first(tmp_path, 1), concurrency=8, flush_interval=3600)
    task = asyncio.create_task(p.run_async())

    def others_done() -> bool:  # every event but the two of "slow" (1 is in flight)
        return sum(len(rows) for rows in read_logs(tmp_path).values()) == len(events) - 2

    await wait_for(others_done, 30, what="every other key's events handled")
    p.stop()
    await task
    record = await (await rjet.JetStreamCursorStore.create(js, name)).peek_record(shard_name(name, slow_shard, n))
    assert record is not None
    assert record.cursor == "1"
    assert record.done  # the other keys' events, done above the watermark
    before = read_logs(tmp_path)
    summary = await group(server, name, restart_n, logger(tmp_path), concurrency=8).run_async(to_head=True)
    after = {m: rows[len(before.get(m, [])) :] for m, rows in read_logs(tmp_path).items()}
    handled_again = sorted(seq for rows in after.values() for seq, _, _ in rows if seq != 2)
    if restart_n == n:
        assert handled_again == []  # nothing done above the watermark came again
    else:
        # Resharded from the lowest old cursor (1): the slow shard's done set is carried over, so
        # only the other old shard's events (at or below its own cursor, not in any done set) come again.
        other = sorted(seq for seq, _, _ in before[1 - slow_shard])
        assert handled_again == other
    assert [seq for rows in after.values() for seq, _, _ in rows].count(2) == 1
    assert all(s.cursor == str(max(events)) for s in summary.shards), summary


@pytest.mark.timeout(60)
async def test_a_script_without_a_main_guard_fails_fast_with_one_error_naming_the_fix(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    await insert(stream, 10)
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from rjet.parallel import Parallel

            def handle(fate, event):
                pass

            Parallel({name!r}, 2, handle, servers={server.url!r}, stream={name!r}, namespace={name!r}).run(to_head=True)
            """
        )
    )
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(script)], capture_output=True, text=True, timeout=50, cwd=tmp_path
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rjet.errors.ConfigError: "), proc.stderr
    assert 'put the code that starts it under `if __name__ == "__main__":`' in last
    assert proc.stderr.count("Traceback") == 1  # the script's own, not one per worker start
    assert "spawn_main" not in proc.stderr
    assert "killed" not in proc.stderr
