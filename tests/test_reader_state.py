"""The stream client's state by lifetime: a consumer's lives in one ``_Session`` (created whole with the
consumer, dropped on recovery and swapped for the next one's, dropped on close); the stream's (last
sequence, buffer, counters) stays on the client. And the bulk scanner's runs keep nats-py's counts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from nats.js import JetStreamContext

import rjet
from rjet._nats.parser import FastParser
from rjet.parallel._shard import key_filter, shard_of
from rjet.reader import ReadConfig, StreamClient

LANES = pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "subscription"])
HDR = b"NATS/1.0\r\nreflex_type: 1\r\nrjet_foreign_id: k\r\n\r\n"


def _reply(stream: str, consumer: bytes, sseq: int, cseq: int, pending: int = 0) -> bytes:
    return b"$JS.ACK.%s.%s.1.%d.%d.1700000000000000000.%d" % (stream.encode(), consumer, sseq, cseq, pending)


async def _next_session(client: StreamClient, old: object) -> None:
    for _ in range(500):
        if client._state.session is not None and client._state.session is not old:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the client never created its next consumer")


@LANES
async def test_a_recovery_swaps_the_whole_session_and_the_old_consumers_frames_are_ignored(
    js: JetStreamContext, name: str, fast_lane: bool
) -> None:
    stream = await rjet.Stream.create(js, name, read=rjet.ReadConfig(fast_lane=fast_lane))
    await stream.insert_many([(f"k{i}", 1, b"x") for i in range(20)])
    async with await stream.stream() as client:
        got = [(await asyncio.wait_for(client.recv(), 5)).id_int for _ in range(5)]
        old = client._state.session
        assert old is not None
        assert old.cseq == client.last_sequence  # this consumer sent every frame so far
        last, held = client.last_sequence, len(client._state.buf)

        client._sessions.recover("a test")
        assert client._state.session is None  # dropped at once: nothing of the old consumer's is taken now

        def stale_frames() -> None:
            """What the old consumer might still have in flight: a delivery, a status."""
            client._intake.on_frame(b"subject", _reply(name, old.name, last + 1, old.cseq + 1), HDR, b"stale")
            client._intake.on_frame(
                old.deliver, b"", b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 7\r\n\r\n", b""
            )

        stale_frames()
        assert (client.last_sequence, len(client._state.buf)) == (last, held)

        await _next_session(client, old)
        new = client._state.session
        assert new is not None
        assert new.name != old.name
        assert new.deliver != old.deliver  # another inbox subject: the old one's statuses do not match
        assert new.next_subject != old.next_subject
        assert new.requests is not old.requests
        state = (client.last_sequence, len(client._state.buf), new.cseq, new.pending, new.frames)
        stale_frames()  # and still ignored once the new consumer's session is in
        assert (client.last_sequence, len(client._state.buf), new.cseq, new.pending, new.frames) == state

        got += [(await asyncio.wait_for(client.recv(), 5)).id_int for _ in range(15)]
        assert client._state.session is new
        assert new.cseq == 20 - last  # its consumer sequence counts its own deliveries from 1
        assert (client.recoveries, client.last_sequence) == (1, 20)  # the stream's state carried on
    assert got == list(range(1, 21))
    assert client._state.session is None  # dropped on close, and its consumer deleted (a lost one the server reaps)
    assert [c.name.encode() for c in await js.consumers_info(name)] == [old.name]


async def test_each_consumer_starts_a_session_of_its_own(stream: rjet.Stream) -> None:
    async with await stream.stream() as client:
        first = client._state.session
        assert first is not None
        assert (first.cseq, first.pattern) == (0, None)  # no frame yet
        await stream.insert("k", 1, b"one")
        assert (await asyncio.wait_for(client.recv(), 5)).metadata == b"one"
        assert client._state.session is first
        assert first.cseq == 1
        client._sessions.recover("a test")
        await _next_session(client, first)
        second = client._state.session
        assert second is not None
        assert (second.cseq, second.pattern, second.prefix) == (0, None, b"")
        await stream.insert("k", 1, b"two")
        assert (await asyncio.wait_for(client.recv(), 5)).metadata == b"two"
        assert (second.cseq, first.cseq) == (1, 1)  # the old one's is left as it was


# The bulk scanner against the frame handler, fed the same bytes: nats-py's message count is the same
# (each delivery counted once) wherever a run of kept or passed-over frames meets a lost message.

_SHARD_0_OF_3 = key_filter(0, 3)
_KEYS = [f"user-{i}" for i in range(12)]


def _wire(client: StreamClient, gap_at: int | None, count: int = 12) -> bytes:
    session = client._state.session
    assert session is not None
    out = []
    cseq = 0
    for i in range(count):
        cseq += 2 if i == gap_at else 1
        hdr = b"NATS/1.0\r\nreflex_type: 1\r\nrjet_foreign_id: %s\r\n\r\n" % _KEYS[i].encode()
        reply = _reply(client.stream, session.name, i + 1, cseq, count - i - 1)
        body = b"x%d" % i
        sid = client._sessions.sid
        out.append(
            b"HMSG %s.e %d %s %d %d\r\n%s%s\r\n"
            % (client.stream.encode(), sid, reply, len(hdr), len(hdr) + len(body), hdr, body)
        )
    return b"".join(out)


async def _feed(
    stream: rjet.Stream, gap_at: int | None, filt: Callable[[str], bool] | None, bulk: bool
) -> tuple[object, ...]:
    client = await stream.stream(key_filter=filt)
    try:
        parser = FastParser(client._sessions._nc)
        parser.lanes[client._sessions.sid] = client._intake.on_lane_frame
        if bulk:
            parser.scanners[client._sessions.sid] = client._intake.scan
        stats = client._sessions._nc.stats
        before = stats["in_msgs"]
        await parser.parse(_wire(client, gap_at))  # lane frames only: nothing else runs meanwhile
        return (
            stats["in_msgs"] - before,
            [frame[0] for frame in client._state.buf],
            client.last_sequence,
            client.skipped,
            client._state.session is None,
        )
    finally:
        await client.close()


@pytest.mark.parametrize("gap_at", [None, 1, 2, 4, 7, 11])
@pytest.mark.parametrize(
    "filt", [None, _SHARD_0_OF_3, lambda f: f.endswith(("1", "2", "3"))], ids=["all", "shard", "filter"]
)
async def test_the_bulk_scanner_counts_each_delivery_once_around_a_lost_message(
    stream: rjet.Stream, gap_at: int | None, filt: Callable[[str], bool] | None
) -> None:
    if filt is _SHARD_0_OF_3:
        assert 0 < sum(shard_of(k, 3) == 0 for k in _KEYS) < len(_KEYS)  # runs of both kinds
    bulk = await _feed(stream, gap_at, filt, bulk=True)
    assert bulk == await _feed(stream, gap_at, filt, bulk=False)
    assert bulk[0] == 12
    assert bulk[-1] == (gap_at is not None)  # recovering after the lost message


@pytest.mark.parametrize("filt", [None, _SHARD_0_OF_3], ids=["all", "shard"])
@pytest.mark.parametrize("batch", [7, 2000])
async def test_taking_runs_of_events_reads_what_one_at_a_time_reads(
    js: JetStreamContext, name: str, filt: Callable[[str], bool] | None, batch: int
) -> None:
    # StreamClient.take (a concurrent consumer's reader) stops wherever next_or_skip does more than
    # pop and decode: a removed range, an undecodable message, a pull to send (small batches), the head.
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(_KEYS[i % 12], 1, b"") for i in range(120)])
    await js.publish(f"{name}.events", b"not an event", headers={"reflex_type": "created"})  # 121
    await stream.insert_many([(_KEYS[i % 12], 2, b"") for i in range(80)])
    for seq in (40, 41, 42, 150):
        await js.delete_msg(name, seq)
    read = ReadConfig(batch=batch, max_buffered=4 * batch, on_removed="skip")

    async def read_all(take: bool) -> list[str]:
        out = []
        client = await rjet.Stream(js, name, read=read).stream(to_head=True, key_filter=filt)
        try:
            while True:
                if take and (events := client.take(5)):
                    out += [e.id for e in events]
                    continue
                try:
                    item = await client.next_or_skip()
                except rjet.HeadReached:
                    return out
                except rjet.DecodeError as e:
                    out.append(f"undecodable {e.seq}")
                    continue
                if isinstance(item, rjet.EventsRemoved):
                    out.append(f"removed {item.first}..{item.last}")
                elif isinstance(item, rjet.Event):
                    out.append(item.id)
        finally:
            await client.close()

    one_by_one = await read_all(take=False)
    if filt is None:  # (a shard's reader passes over the message, its key is another shard's)
        assert "undecodable 121" in one_by_one
    assert "removed 40..42" in one_by_one
    assert one_by_one == await read_all(take=True)
