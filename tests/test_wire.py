"""The fast lane in nats-py's parser: same results as nats-py, other subscriptions untouched."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.protocol.parser import Parser

import rjet
from rjet._wire import FastParser, fast_lanes


async def read_all(stream: rjet.Stream, after: str = "") -> list[rjet.Event]:
    async with await stream.stream(after, to_head=True) as client:
        return [e async for e in client]


async def test_other_subscriptions_on_the_connection_keep_working_while_reading(
    nc: Client, js: JetStreamContext, stream: rjet.Stream
) -> None:
    await stream.insert_many([(f"k{i}", 1, b"x" * 50) for i in range(5000)])
    got: list[bytes] = []

    async def on_plain(msg: Msg) -> None:
        got.append(msg.data)

    async def on_request(msg: Msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    await nc.subscribe(f"{stream.name}_plain", cb=on_plain)
    await nc.subscribe(f"{stream.name}_svc", cb=on_request)

    async def chatter() -> list[bytes]:
        answers = []
        for i in range(200):
            await nc.publish(f"{stream.name}_plain", str(i).encode(), headers={"h": str(i)} if i % 2 else None)
            answers.append((await nc.request(f"{stream.name}_svc", str(i).encode(), timeout=5)).data)
        return answers

    events, answers = await asyncio.gather(read_all(stream), chatter())
    assert isinstance(nc._ps, FastParser)
    assert [e.id_int for e in events] == list(range(1, 5001))
    assert answers == [b"pong:" + str(i).encode() for i in range(200)]
    await nc.flush()
    assert got == [str(i).encode() for i in range(200)]


async def test_frames_larger_than_one_socket_read(stream: rjet.Stream) -> None:
    payloads = [bytes([i]) * (200_000 + i) for i in range(20)]
    await stream.insert_many([(f"k{i}", i, p) for i, p in enumerate(payloads)])
    events = await read_all(stream)
    assert [e.metadata for e in events] == payloads
    assert [e.type for e in events] == list(range(20))


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast", "nats-py"])
async def test_both_lanes_read_the_same_events(js: JetStreamContext, name: str, fast_lane: bool) -> None:
    read = rjet.ReadConfig(batch=20, max_buffered=60, fast_lane=fast_lane)
    stream = await rjet.Stream.create(js, name, read=read)
    await stream.insert_many([(f"ü {i} %", i % 5, str(i).encode()) for i in range(300)])
    await js.publish(f"{name}.raw", b"raw")
    await js.publish(f"{name}.events", b"", headers={"reflex_type": "7", "rjet_foreign_id": "plain"})
    events = await read_all(stream)
    assert [(e.foreign_id, e.type, e.metadata) for e in events[:300]] == [
        (f"ü {i} %", i % 5, str(i).encode()) for i in range(300)
    ]
    assert [(e.foreign_id, e.type) for e in events[300:]] == [(f"{name}.raw", 0), ("plain", 7)]
    # A deleted consumer is recovered on either lane.
    async with await stream.stream("100") as client:
        assert (await client.recv()).id == "101"
        for info in await js.consumers_info(name):
            await js.delete_consumer(name, info.name)
        ids = [(await asyncio.wait_for(client.recv(), 10)).id_int for _ in range(201)]
    assert ids == list(range(102, 303))


async def test_an_unexpected_parser_falls_back_to_plain_subscriptions(nc: Client, stream: rjet.Stream) -> None:
    class Custom(Parser):
        pass

    nc._ps = Custom(nc)
    assert fast_lanes(nc) is None
    await stream.insert_many([("k", 1, b"")] * 50)
    assert len(await read_all(stream)) == 50


async def test_the_reader_takes_both_reply_subject_forms(stream: rjet.Stream) -> None:
    """The server here sends the 9-token v1 form; frames in the 12-token v2 form (domain and account
    hash, as servers send behind leafnodes) are fed to the frame handler directly."""
    await stream.insert("k", 1, b"real")
    async with await stream.stream() as client:
        first = await asyncio.wait_for(client.recv(), 5)
        assert first.metadata == b"real"
        consumer = client._consumer
        assert consumer is not None
        hdr = b"NATS/1.0\r\nreflex_type: 7\r\nrjet_foreign_id: v2-key\r\n\r\n"
        for seq, cseq in ((2, 2), (3, 3)):
            reply = b"$JS.ACK.hub.ACCOUNTHASH.%s.%s.1.%d.%d.1700000000000000000.0.abc" % (
                stream.name.encode(),
                consumer,
                seq,
                cseq,
            )
            client._on_frame(b"subject", reply, hdr, b"v2")
        got = [await asyncio.wait_for(client.recv(), 5) for _ in range(2)]
    assert [(e.id, e.type, e.foreign_id, e.metadata) for e in got] == [
        ("2", 7, "v2-key", b"v2"),
        ("3", 7, "v2-key", b"v2"),
    ]
