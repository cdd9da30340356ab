"""Routine operations on a NATS cluster (leader step-downs, a node lost) never stop a consumer for good.

Every rolling upgrade of a cluster moves stream and bucket leaders. A write whose answer is lost on
the way (the leader stepped down after applying it) must be recognised by its runner as its own:
a runner keeps one identity for its lifetime, so no retry of it ever sees "another runner".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from test_parallel import check_handling, insert, logger, read_logs, remember_shard

import rjet
from rjet.parallel import Parallel
from rjet.server import EmbeddedServer

FAST = rjet.ReadConfig(batch=200, max_buffered=800, heartbeat=0.2, expires=1.0)


async def _replicated_stream(js: nats.js.JetStreamContext, name: str) -> rjet.Stream:
    for _ in range(100):  # the cluster elects its meta leader first
        try:
            return await rjet.Stream.create(js, name, num_replicas=3)
        except (rjet.RjetError, TimeoutError):
            await asyncio.sleep(0.3)
    raise AssertionError("the cluster elected no meta leader")


async def _step_down(nc: Client, stream: str) -> bool:
    try:
        reply = await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
    except Exception:  # a step-down refused or unanswered is simply not counted
        return False
    return b'"success":true' in reply.data


async def _leader(nc: Client, stream: str) -> str:
    js = nc.jetstream()
    info = await js.stream_info(stream)
    assert info.cluster is not None
    assert info.cluster.leader is not None
    return info.cluster.leader


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_leader_step_downs_of_stream_and_bucket_never_fence_a_parallel_group(
    cluster: list[EmbeddedServer], tmp_path: Path
) -> None:
    nc = await rjet.connect(cluster[0].url)
    try:
        stream = await _replicated_stream(nc.jetstream(), "steps")
        events: dict[int, str] = {}
        for _ in range(10):
            events.update(await insert(stream, 2000, keys=200))
        group = Parallel(
            "g", 2, logger(tmp_path, delay=0.0003), servers=[n.url for n in cluster], stream="steps", namespace="steps",
            flush_interval=0.05, restart_delay=0.1, retry_delay=0.05, max_backoff=0.5, on_start=remember_shard,
            fate=rjet.RandomFate(0.01, seed=3),  # a re-claim every ~100 events: some meet a step-down
        )  # fmt: skip
        run = asyncio.create_task(group.run_async(to_head=True))
        stepdowns = 0
        for i in range(8):  # what a rolling upgrade does: the leaders move, again and again
            await asyncio.sleep(0.4)
            if run.done():
                break
            stepdowns += await _step_down(nc, "steps" if i % 2 else "KV_rjet_cursors_steps")
        summary = await asyncio.wait_for(run, 180)
        states = {s.shard: s.state for s in summary.shards}
        assert set(states.values()) == {"done"}, states  # was: one shard "fenced"
        replays = check_handling(read_logs(tmp_path), 2, events)  # none lost, per-key order kept
        assert stepdowns >= 3, "the leaders did not move: the test proved nothing"
        print(f"events={len(events)} stepdowns={stepdowns} replays={replays} fenced=0")
    finally:
        await nc.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_run_forever_goes_on_when_the_node_leading_stream_and_bucket_is_killed(
    cluster: list[EmbeddedServer],
) -> None:
    urls = [n.url for n in cluster]
    admin = await rjet.connect(urls, reconnect_time_wait=0.1)
    runner = await rjet.connect(urls, reconnect_time_wait=0.1)
    try:
        stream = await _replicated_stream(admin.jetstream(), "kill")
        total = 20_000
        await stream.insert_many([(f"k{i % 97}", 1, b"") for i in range(total)])
        js = runner.jetstream(timeout=2.0)
        store = await rjet.JetStreamCursorStore.create(js, "kill", flush_interval=0.02, replicas=3)
        # One node leads both: losing it loses the answers of writes that both may have applied.
        for _ in range(30):
            if await _leader(admin, "kill") == await _leader(admin, "KV_rjet_cursors_kill"):
                break
            await _step_down(admin, "KV_rjet_cursors_kill")
            await asyncio.sleep(0.5)
        leader = await _leader(admin, "kill")
        assert leader == await _leader(admin, "KV_rjet_cursors_kill"), "no node came to lead both"
        victim = next(n for n in cluster if n.name == leader)
        seen: list[int] = []

        def handle(fate: rjet.Fate, event: rjet.Event) -> None:
            seen.append(event.id_int)

        reader = rjet.Stream(js, "kill", read=FAST)
        spec = rjet.Spec(reader.stream, store, rjet.Consumer("c", handle), to_head=True)
        task = asyncio.create_task(rjet.run_forever(spec, retry_delay=0.05, max_backoff=0.5))
        deadline = time.monotonic() + 60
        while len(seen) < 5000:
            assert not task.done(), f"stopped early: {task.exception()!r}"
            assert time.monotonic() < deadline, "too slow to reach 5,000 events"
            await asyncio.sleep(0.001)
        victim.kill()
        await asyncio.wait_for(task, 180)  # was: CursorConflict naming this very process
        assert sorted(set(seen)) == list(range(1, total + 1))
        first = list(dict.fromkeys(seen))
        assert first == list(range(1, total + 1))  # first handlings in stream order
        await store.close()
        print(f"events={total} replays={len(seen) - total} conflicts=0")
    finally:
        for conn in (admin, runner):
            with contextlib.suppress(Exception):
                await conn.close()
