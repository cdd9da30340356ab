"""A Parallel group on a replicated stream keeps its cursors as replicated as its events."""

from __future__ import annotations

import asyncio

import pytest

import rjet
from rjet.parallel import Parallel
from rjet.server import EmbeddedServer


def noop(fate: rjet.Fate, event: rjet.Event) -> None:
    pass


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_the_cursor_bucket_gets_the_streams_replica_count(cluster: list[EmbeddedServer]) -> None:
    nc = await rjet.connect(cluster[0].url)
    try:
        js = nc.jetstream()
        for _ in range(100):  # the cluster elects its meta leader first
            try:
                stream = await rjet.Stream.create(js, "r3", num_replicas=3)
                await stream.insert_many([(f"k{i}", 1, b"", f"m{i}") for i in range(50)])
                break
            except (rjet.RjetError, TimeoutError):
                await asyncio.sleep(0.3)
        group = Parallel(
            "g", 2, noop, servers=[n.url for n in cluster], stream="r3", namespace="r3", flush_interval=0.1
        )
        summary = await group.run_async(to_head=True)
        assert sum(s.handled for s in summary.shards) == 50
        bucket = await js.stream_info("KV_rjet_cursors_r3")
        assert bucket.config.num_replicas == 3  # was: 1, so losing that node stopped every cursor write
        one = Parallel("g1", 1, noop, servers=cluster[0].url, stream="r3", namespace="r1", cursor_replicas=1)
        await one.run_async(to_head=True)
        assert (await js.stream_info("KV_rjet_cursors_r1")).config.num_replicas == 1
    finally:
        await nc.close()
