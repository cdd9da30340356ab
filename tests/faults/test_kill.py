"""Servers and workers killed mid-run: every event handled, per-key order on first handling kept,
replays only after the last flushed cursor, final cursors at the stream's end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
from test_parallel import check_handling, insert, logger, read_logs, remember_shard

import rjet
from rjet.parallel import Parallel
from rjet.server import EmbeddedServer

FAST = rjet.ReadConfig(batch=200, max_buffered=800, heartbeat=0.2, expires=2.0)


@pytest.mark.timeout(120)
async def test_server_killed_and_restarted_while_run_consumes(own_server: EmbeddedServer) -> None:
    producer = await rjet.connect(own_server.url, reconnect_time_wait=0.1)
    consumer_nc = await rjet.connect(own_server.url, reconnect_time_wait=0.1)
    try:
        stream = await rjet.Stream.create(producer.jetstream(), "s")
        reader = rjet.Stream(consumer_nc.jetstream(), "s", read=FAST)
        seqs = await stream.insert_many([(f"k{i % 50}", 1, b"") for i in range(20_000)])
        handled: list[int] = []
        busy = asyncio.Event()

        async def handle(fate: rjet.Fate, event: rjet.Event) -> None:
            handled.append(event.id_int)
            if len(handled) == 5000:
                busy.set()
            if len(handled) % 100 == 0:
                await asyncio.sleep(0.001)

        async with await rjet.JetStreamCursorStore.create(consumer_nc.jetstream(), "ns", flush_interval=0.1) as store:
            spec = rjet.Spec(reader.stream, store, rjet.Consumer("c", handle))
            task = asyncio.create_task(rjet.run_forever(spec, retry_delay=0.05, max_backoff=0.5))
            await asyncio.wait_for(busy.wait(), 60)
            flushed = int(await store.peek("c") or 0)
            own_server.kill()
            await asyncio.sleep(0.5)
            own_server.start()
            while not handled or max(handled) < seqs[-1]:
                assert not task.done(), task
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert int(await store.peek("c")) == seqs[-1]
        first: list[int] = []
        seen: set[int] = set()
        for seq in handled:
            if seq in seen:
                assert seq > flushed, f"event {seq} at or before the flushed cursor {flushed} was replayed"
                continue
            seen.add(seq)
            first.append(seq)
        assert first == seqs  # every event, first handled in stream order
        print(f"events={len(seqs)} server_kills=1 replays={len(handled) - len(first)} lost=0")
    finally:
        for nc in (producer, consumer_nc):
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await nc.close()


@pytest.mark.timeout(150)
async def test_server_killed_and_restarted_while_parallel_consumes(own_server: EmbeddedServer, tmp_path: Path) -> None:
    nc = await rjet.connect(own_server.url, reconnect_time_wait=0.1)
    try:
        stream = await rjet.Stream.create(nc.jetstream(), "s")
        events = await insert(stream, 10_000, keys=60)
        group = Parallel(
            "p", 2, logger(tmp_path, delay=0.0002), servers=own_server.url, stream="s", namespace="ns",
            on_start=remember_shard, flush_interval=0.2, restart_delay=0.2, read=FAST,
            connect_options={"reconnect_time_wait": 0.1},
        )  # fmt: skip
        task = asyncio.create_task(group.run_async(to_head=True))
        while group.statistics().handled < 2000:
            assert not task.done()
            await asyncio.sleep(0.02)
        own_server.kill()
        await asyncio.sleep(0.5)
        own_server.start()
        summary = await asyncio.wait_for(task, 120)
        replays = check_handling(read_logs(tmp_path), 2, events)
        assert all(s.cursor == str(max(events)) for s in summary.shards), summary
        assert replays <= 2 * 1000  # at most the events after each shard's last flush (0.2 s of work)
        print(f"events={len(events)} server_kills=1 replays={replays} lost=0")
    finally:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await nc.close()


@pytest.mark.timeout(180)
async def test_workers_killed_at_random_points_of_a_50k_event_run(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    n = 2
    events = await insert(stream, 50_000, keys=200)
    group = Parallel(
        name, n, logger(tmp_path, delay=0.0001), servers=server.url, stream=name, namespace=name,
        on_start=remember_shard, flush_interval=0.2, restart_delay=0.1, max_restart_delay=0.5,
    )  # fmt: skip
    task = asyncio.create_task(group.run_async(to_head=True))
    kills = await _kill_workers_at_random(group, task, random.Random(5), 6)
    summary = await asyncio.wait_for(task, 150)
    replays = check_handling(read_logs(tmp_path), n, events)
    assert kills >= 3, "the run ended before enough workers were killed"
    assert sum(s.restarts for s in summary.shards) >= kills - 1
    assert all(s.state == "done" and s.cursor == str(max(events)) for s in summary.shards), summary
    print(f"events={len(events)} kills={kills} replays={replays} lost=0")  # the reliability report's figures


@pytest.mark.timeout(180)
async def test_workers_killed_at_random_under_key_ordered_concurrency(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    n = 2
    events = await insert(stream, 30_000, keys=1000)
    group = Parallel(
        name, n, logger(tmp_path, delay=0.0005), servers=server.url, stream=name, namespace=name,
        on_start=remember_shard, flush_interval=0.2, restart_delay=0.1, max_restart_delay=0.5, concurrency=64,
    )  # fmt: skip
    task = asyncio.create_task(group.run_async(to_head=True))
    kills = await _kill_workers_at_random(group, task, random.Random(7), 5)
    summary = await asyncio.wait_for(task, 150)
    replays = check_handling(read_logs(tmp_path), n, events)  # every event, per-key order on first handling
    assert kills >= 3, "the run ended before enough workers were killed"
    assert all(s.state == "done" and s.cursor == str(max(events)) for s in summary.shards), summary
    print(f"events={len(events)} kills={kills} replays={replays} lost=0 concurrency=64")


async def _kill_workers_at_random(group: Parallel, task: asyncio.Task[Any], rng: random.Random, most: int) -> int:
    """SIGKILL a running worker of ``group`` every 0.5-1.5 s until ``most`` kills or the run ends."""
    kills = 0
    while not task.done() and kills < most:
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        pids = group.worker_pids
        running = [m for m, s in enumerate(group.statistics().shards) if s.state == "running" and m in pids]
        if running and not task.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[rng.choice(running)], signal.SIGKILL)
                kills += 1
    return kills
