"""Faults in the network and the cluster: nothing lost, nothing duplicated inside one client."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

import rjet
from rjet.server import EmbeddedServer

from .conftest import CuttingProxy

FAST = rjet.ReadConfig(batch=100, max_buffered=400, heartbeat=0.2, expires=2.0)


async def insert_with_retries(stream: rjet.Stream, items: list[tuple[str, int, bytes, str]]) -> None:
    """Insert a batch, retrying the whole of it (msg_ids make retries exact) until it sticks."""
    for _ in range(100):
        try:
            await stream.insert_many(items, timeout=2)
            return
        except (rjet.RjetError, TimeoutError, OSError):
            await asyncio.sleep(0.2)
    raise AssertionError("inserts never succeeded")


@pytest.mark.timeout(90)
async def test_connections_cut_repeatedly_by_a_proxy(own_server: EmbeddedServer, proxy: CuttingProxy) -> None:
    direct = await rjet.connect(own_server.url)
    cut_conn = await rjet.connect(proxy.url, reconnect_time_wait=0.05)
    try:
        producer = await rjet.Stream.create(direct.jetstream(), "cuts")
        reader = rjet.Stream(cut_conn.jetstream(), "cuts", read=FAST)
        total = 3000

        async def produce() -> None:
            for chunk in range(0, total, 100):
                await producer.insert_many([(f"k{i % 13}", 1, str(i).encode()) for i in range(chunk, chunk + 100)])
                await asyncio.sleep(0.03)

        async def cut() -> None:
            for _ in range(12):
                await asyncio.sleep(0.25)
                proxy.cut()

        got: list[int] = []

        async def consume() -> None:
            async with await reader.stream() as client:
                while len(got) < total:
                    got.append((await asyncio.wait_for(client.recv(), 30)).id_int)

        await asyncio.gather(produce(), cut(), consume())
        assert proxy.cuts == 12
        assert got == list(range(1, total + 1))
    finally:
        await direct.close()
        # nats-py may be mid-reconnect after the last cut; its close can then raise either.
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await cut_conn.close()


@pytest.mark.timeout(120)
async def test_a_cluster_node_killed_mid_stream(cluster: list[EmbeddedServer]) -> None:
    urls = [node.url for node in cluster]
    nc = await rjet.connect(urls, reconnect_time_wait=0.1)
    try:
        js = nc.jetstream()
        for _ in range(100):  # the cluster elects its meta leader first
            try:
                stream = await rjet.Stream.create(js, "r3", num_replicas=3, read=FAST)
                break
            except (rjet.RjetError, TimeoutError) as e:
                last = e
                await asyncio.sleep(0.3)
        else:
            raise AssertionError(f"no R3 stream: {last!r}")
        await insert_with_retries(stream, [(f"k{i % 7}", 1, b"", f"m{i}") for i in range(1500)])
        got: list[int] = []
        async with await stream.stream() as client:
            while len(got) < 500:
                got.append((await asyncio.wait_for(client.recv(), 30)).id_int)
            url = nc.connected_url
            assert url is not None
            victim = next(node for node in cluster if node.url == url.geturl())
            victim.kill()
            await insert_with_retries(stream, [(f"k{i % 7}", 1, b"", f"m{i}") for i in range(1500, 3000)])
            while len(got) < 3000:
                got.append((await asyncio.wait_for(client.recv(), 30)).id_int)
        assert got == list(range(1, 3001))
        info = await stream.info()
        assert info.state.messages == 3000
    finally:
        with contextlib.suppress(OSError):
            await nc.close()


@pytest.mark.timeout(60)
async def test_a_reader_at_the_head_gets_what_a_lost_connection_took(
    own_server: EmbeddedServer, proxy: CuttingProxy
) -> None:
    """The server sends every event, the connection dies before they arrive (as when it cuts a slow
    consumer, its buffer full), the client reconnects: the consumer has nothing left to send and its
    pull request's heartbeats go on, so no gap and no silence shows. The reader still gets them all."""
    direct = await rjet.connect(own_server.url)
    cut_conn = await rjet.connect(proxy.url, reconnect_time_wait=0.05)
    try:
        total = 60  # fewer than a pull request asks for: the request stays open, sending heartbeats
        producer = await rjet.Stream.create(direct.jetstream(), "lost_in_flight")
        await producer.insert_many([(f"k{i % 13}", 1, str(i).encode()) for i in range(total)])
        # What the server sends after the first pull request is dropped for 0.2 s (well within the
        # watchdog's three heartbeats: the heartbeats after it arrive), then the connection is cut.
        proxy.lose_answer_to(b"CONSUMER.MSG.NEXT", outage=0.2)
        config = rjet.ReadConfig(batch=100, max_buffered=400, heartbeat=0.5, expires=5.0)
        reader = rjet.Stream(cut_conn.jetstream(), "lost_in_flight", read=config)
        got: list[int] = []
        async with await reader.stream(to_head=True) as client:

            async def cut_after_the_outage() -> None:
                await asyncio.sleep(0.5)  # the first pull request went out as the reader opened
                assert proxy.lost_answers == 1
                proxy.cut()

            cutting = asyncio.create_task(cut_after_the_outage())
            with contextlib.suppress(rjet.HeadReached):
                while True:
                    got.append((await asyncio.wait_for(client.recv(), 10)).id_int)
            await cutting
            assert client.recoveries >= 1
        assert proxy.cuts == 1
        assert got == list(range(1, total + 1))
    finally:
        await direct.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await cut_conn.close()
