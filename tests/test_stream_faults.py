"""The stream client under faults: lost consumers, reaping, server restarts. Nothing lost, no duplicates."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client

import rjet
from rjet.server import EmbeddedServer

FAST = rjet.ReadConfig(batch=50, max_buffered=200, heartbeat=0.2, expires=2.0, inactive_threshold=5.0)


@pytest.fixture
async def conn(own_server: EmbeddedServer) -> AsyncIterator[Client]:
    nc = await rjet.connect(own_server.url, reconnect_time_wait=0.1)
    yield nc
    # The server may be down at teardown; on Python 3.13 nats-py's close then fails inside asyncio's
    # transport (TypeError from writelines on a closed socket) instead of with an OSError.
    with contextlib.suppress(OSError, TypeError):
        await nc.close()


async def read_ids(client: rjet.StreamClient, n: int, timeout: float = 20) -> list[int]:
    return [(await asyncio.wait_for(client.recv(), timeout)).id_int for _ in range(n)]


async def test_consumer_deleted_behind_the_clients_back(conn: Client) -> None:
    js = conn.jetstream()
    stream = await rjet.Stream.create(js, "s", read=FAST)
    await stream.insert_many([("k", 1, b"")] * 500)
    async with await stream.stream() as client:
        got = await read_ids(client, 100)
        for name in await js.consumers_info("s"):
            await js.delete_consumer("s", name.name)
        await stream.insert_many([("k", 1, b"")] * 500)
        got += await read_ids(client, 900)
        assert client.recoveries >= 1
    assert got == list(range(1, 1001))


async def test_reading_resumes_after_the_consumer_is_reaped_for_inactivity(conn: Client) -> None:
    read = rjet.ReadConfig(batch=10, max_buffered=10, heartbeat=0.1, expires=1.0, inactive_threshold=0.5)
    stream = await rjet.Stream.create(conn.jetstream(), "s", read=read)
    await stream.insert_many([("k", 1, b"")] * 30)
    async with await stream.stream() as client:
        got = await read_ids(client, 1)
        await asyncio.sleep(0.1)  # the buffer is full: no pull request is open, so the server reaps
        assert (await conn.jetstream().stream_info("s")).state.consumer_count == 1
        for _ in range(100):  # reaped after inactive_threshold (0.5 s)
            if (await conn.jetstream().stream_info("s")).state.consumer_count == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the server never reaped the idle consumer: the test would prove nothing")
        assert client.recoveries == 0
        got += await read_ids(client, 29)
        assert client.recoveries >= 1  # it noticed and recreated the consumer
    assert got == list(range(1, 31))


@pytest.mark.parametrize("crash", [False, True], ids=["stop", "kill"])
async def test_server_restart_while_reading_loses_and_duplicates_nothing(
    own_server: EmbeddedServer, conn: Client, crash: bool
) -> None:
    stream = await rjet.Stream.create(conn.jetstream(), "s", read=FAST)
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(1000)])
    async with await stream.stream() as client:
        got = await read_ids(client, 300)
        if crash:
            own_server.kill()
        else:
            own_server.stop()
        await asyncio.sleep(0.5)
        own_server.start()
        got += await read_ids(client, 700)
        for _ in range(50):  # the connection is back once inserts work again
            try:
                await stream.insert_many([("after", 1, b"")] * 100)
                break
            except (rjet.RjetError, TimeoutError):
                await asyncio.sleep(0.2)
        got += await read_ids(client, 100)
        assert client.recoveries >= 1
    assert got == list(range(1, 1101))


async def test_server_down_longer_than_recover_timeout_raises_consumer_lost(
    own_server: EmbeddedServer, conn: Client
) -> None:
    read = rjet.ReadConfig(heartbeat=0.1, expires=1.0, recover_timeout=1.0)
    stream = await rjet.Stream.create(conn.jetstream(), "s", read=read)
    async with await stream.stream() as client:
        own_server.stop()
        with pytest.raises(rjet.ConsumerLost, match="could not recreate the consumer after sequence 0"):
            await asyncio.wait_for(client.recv(), 15)


async def test_closing_the_connection_stops_the_client(conn: Client) -> None:
    stream = await rjet.Stream.create(conn.jetstream(), "s", read=FAST)
    client = await stream.stream()
    await conn.close()
    with pytest.raises(rjet.Stopped, match="connection is closed"):
        await asyncio.wait_for(client.recv(), 5)
    await client.close()
