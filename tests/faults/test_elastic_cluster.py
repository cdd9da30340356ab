"""An elastic group on a 3-node cluster: the cursor bucket's leader steps down while shards move."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from test_parallel import check_handling, insert, logger, read_logs, remember_shard

import rjet
from rjet.parallel import Parallel
from rjet.server import EmbeddedServer
from rjet.testing import wait_until


def _running(group: Parallel) -> int:
    return sum(1 for s in group.statistics().shards if s.state == "running")


@pytest.mark.timeout(180)
async def test_the_kv_leader_stepping_down_during_a_rebalance_loses_nothing(
    cluster: list[EmbeddedServer], tmp_path: Path
) -> None:
    nc = await rjet.connect(cluster[0].url)
    try:
        js = nc.jetstream()
        for _ in range(100):  # the cluster elects its meta leader first
            try:
                stream = await rjet.Stream.create(js, "r3", num_replicas=3)
                break
            except (rjet.RjetError, TimeoutError):
                await asyncio.sleep(0.3)
        events: dict[int, str] = {}

        async def produce() -> None:  # events keep coming while the shards move
            for _ in range(60):
                events.update(await insert(stream, 300, keys=200))
                await asyncio.sleep(0.1)

        servers = [n.url for n in cluster]
        options: dict[str, Any] = {
            "elastic": True, "heartbeat_interval": 0.2, "heartbeat_ttl": 1.5, "flush_interval": 0.2,
            "restart_delay": 0.1, "on_start": remember_shard,
        }  # fmt: skip
        handler = logger(tmp_path, delay=0.0003)
        a = Parallel("g", 4, handler, servers=servers, stream="r3", namespace="r3", member_id="a", **options)
        b = Parallel("g", 4, handler, servers=servers, stream="r3", namespace="r3", member_id="b", **options)
        producer = asyncio.create_task(produce())
        ta = asyncio.create_task(a.run_async())
        await wait_until(lambda: _running(a) == 4, 60, "a running every shard")
        tb = asyncio.create_task(b.run_async())  # the rebalance starts
        stepdowns = 0
        for _ in range(8):  # the bucket's leader moves again and again while shards change hands
            with contextlib.suppress(Exception):
                await nc.request("$JS.API.STREAM.LEADER.STEPDOWN.KV_rjet_cursors_r3", b"", timeout=5)
                stepdowns += 1
            await asyncio.sleep(0.5)
        await wait_until(lambda: _running(a) == 2 and _running(b) == 2, 60, "two shards on each member")
        await producer

        def handled() -> set[int]:
            return {seq for rows in read_logs(tmp_path).values() for seq, _, _ in rows}

        await wait_until(lambda: handled() >= set(events), 120, "every event handled")
        a.stop()
        b.stop()
        await asyncio.gather(ta, tb)
        replays = check_handling(read_logs(tmp_path), 4, events)  # per-key order on first handling, none lost
        assert stepdowns >= 3
        print(f"stepdowns={stepdowns} events={len(events)} replays={replays} lost=0")
    finally:
        await nc.close()
