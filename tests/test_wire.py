"""The fast lane in nats-py's parser: same results as nats-py, other subscriptions untouched."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.protocol.parser import Parser

import rjet
from rjet._nats.frames import TYPE_RAW
from rjet._nats.parser import FastParser, fast_lanes
from rjet.parallel._shard import key_filter, shard_of
from rjet.reader import StreamClient


async def read_all(stream: rjet.Stream, after: str = "") -> list[rjet.Event]:
    async with await stream.stream(after, to_head=True) as client:
        return [e async for e in client]


@pytest.mark.fast_paths
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
        assert client._state.session is not None
        consumer = client._state.session.name
        hdr = b"NATS/1.0\r\nreflex_type: 7\r\nrjet_foreign_id: v2-key\r\n\r\n"
        for seq, cseq in ((2, 2), (3, 3)):
            reply = b"$JS.ACK.hub.ACCOUNTHASH.%s.%s.1.%d.%d.1700000000000000000.0.abc" % (
                stream.name.encode(),
                consumer,
                seq,
                cseq,
            )
            client._intake.on_frame(b"subject", reply, hdr, b"v2")
        got = [await asyncio.wait_for(client.recv(), 5) for _ in range(2)]
    assert [(e.id, e.type, e.foreign_id, e.metadata) for e in got] == [
        ("2", 7, "v2-key", b"v2"),
        ("3", 7, "v2-key", b"v2"),
    ]


# ----------------------------------------------------------------------------------------------
# The bulk scanner (StreamClient._scan) against the frame-by-frame handler (StreamClient._on_frame)


@dataclasses.dataclass(frozen=True)
class _Frame:
    # "event", "msg_id_first" (other header layout), "heartbeat"; a trace context before rjet's headers
    # ("traced", "traced_state" with a tracestate, "traced_odd" with blanks in the values and a
    # tracestate after them)
    kind: str
    fid: bytes
    typ: int
    payload: bytes
    sseq_step: int
    gap: bool  # the consumer sequence jumps before this frame (a message lost in transit)
    # The server's count of messages left after it: None for the frames still to come; 0 where the
    # reader caught up, maybe before more frames (the stream grew meanwhile)
    pending: int | None = None


_fids = st.one_of(
    st.sampled_from([b"user-1", b"user-2", b"k", b"a%20b", b"%C3%BC", b"%FF", b"%", b"x" * 40]),
    st.binary(min_size=1, max_size=12).filter(lambda b: all(0x21 <= c <= 0x7E for c in b)),
)
_frames = st.lists(
    st.builds(
        _Frame,
        kind=st.sampled_from(
            ["event"] * 6 + ["traced"] * 3 + ["traced_state", "traced_odd", "msg_id_first", "heartbeat"]
        ),
        fid=_fids,
        typ=st.integers(-5, 2**40),
        payload=st.one_of(st.binary(max_size=60), st.just(b"HMSG fake 1 $JS.ACK.x 10 20\r\nNATS/1.0\r\n")),
        sseq_step=st.integers(1, 3),
        gap=st.sampled_from([False] * 6 + [True]),
        pending=st.sampled_from([None] * 6 + [0, 1]),
    ),
    max_size=40,
)
_SHARD_0_OF_3 = key_filter(0, 3)
_filters: list[Callable[[str], bool] | None] = [
    None,
    key_filter(0, 1),
    _SHARD_0_OF_3,
    key_filter(2, 3),
    lambda f: len(f) % 2 == 0,
]


def _wire_bytes(client: StreamClient, frames: list[_Frame], v2: bool) -> bytes:
    session = client._state.session
    assert session is not None
    consumer = session.name
    stream, sid = client.stream.encode(), client._sessions.sid
    out, sseq, cseq = [], 0, 0
    for i, f in enumerate(frames):
        if f.kind == "heartbeat":
            hdr = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 0\r\nNats-Last-Stream: 0\r\n\r\n"
            out.append(b"HMSG %s %d %d %d\r\n%s\r\n" % (session.deliver, sid, len(hdr), len(hdr), hdr))
            continue
        sseq += f.sseq_step
        cseq += 2 if f.gap else 1
        pending = len(frames) - i if f.pending is None else f.pending
        head = b"%s.%s.1.%d.%d.%d.%d" % (stream, consumer, sseq, cseq, 1_700_000_000_000_000_000 + i, pending)
        reply = b"$JS.ACK.hub.ACCOUNTHASH." + head + b".tok" if v2 else b"$JS.ACK." + head
        rjet_lines = b"reflex_type: %d\r\nrjet_foreign_id: %s\r\n" % (f.typ, f.fid)
        hdr = b"NATS/1.0\r\n%s\r\n" % rjet_lines
        if f.kind == "msg_id_first":
            hdr = b"NATS/1.0\r\nNats-Msg-Id: m%d\r\n%s\r\n" % (i, rjet_lines)
        elif f.kind == "traced":
            hdr = b"NATS/1.0\r\ntraceparent: 00-%032x-%016x-01\r\n%s\r\n" % (i + 1, sseq, rjet_lines)
        elif f.kind == "traced_state":
            hdr = b"NATS/1.0\r\ntraceparent: 00-%032x-%016x-01\r\ntracestate: v=%d\r\n%s\r\n" % (
                i + 1,
                sseq,
                i,
                rjet_lines,
            )
        elif f.kind == "traced_odd":
            hdr = b"NATS/1.0\r\ntraceparent:  00-%032x-%016x-01 \r\n%stracestate: a=1, b=%d\r\n\r\n" % (
                i + 1,
                sseq,
                rjet_lines,
                i,
            )
        size = len(hdr) + len(f.payload)
        out.append(b"HMSG %s.events %d %s %d %d\r\n%s%s\r\n" % (stream, sid, reply, len(hdr), size, hdr, f.payload))
    return b"".join(out)


def _outcome(client: StreamClient) -> tuple[object, ...]:
    events: list[object] = []
    for frame in client._state.buf:
        try:
            e = client._decode(*frame)
            events.append((e.id, e.type, e.foreign_id, e.timestamp, e.metadata, e.trace))
        except rjet.DecodeError as err:
            events.append(str(err))
    return (
        events,
        client._state.last,
        client._state.session.cseq if client._state.session is not None else None,
        client.skipped,
        client._state.skipped_at,
        client._state.session is None,  # recovering after a gap
        client._state.caught_up,
        client._state.server_pending,
        client.buffered_bytes,
    )


async def _feed(
    stream: rjet.Stream, frames: list[_Frame], cuts: list[int], which: int, v2: bool, bulk: bool
) -> tuple[object, ...]:
    client = await stream.stream(key_filter=_filters[which])
    try:
        parser = FastParser(client._sessions._nc)
        parser.lanes[client._sessions.sid] = client._intake.on_frame
        if bulk:
            parser.scanners[client._sessions.sid] = client._intake.scan
        data = _wire_bytes(client, frames, v2)
        at = 0
        for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
            await parser.parse(data[at:cut])  # no await inside for lane frames: nothing interleaves
            at = cut
        assert not parser.buf
        return _outcome(client)
    finally:
        await client.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    frames=_frames,
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    which=st.integers(0, len(_filters) - 1),
    v2=st.booleans(),
)
def test_the_bulk_scanner_agrees_with_the_frame_handler(
    loop_stream: tuple[asyncio.AbstractEventLoop, rjet.Stream],
    frames: list[_Frame],
    cuts: list[int],
    which: int,
    v2: bool,
) -> None:
    """Whatever arrives (other header layouts, trace contexts, percent-encoded or undecodable keys,
    heartbeats, fake frames inside payloads, a consumer-sequence gap) in whatever socket reads, taking
    frames in bulk buffers, passes over and recovers exactly as handing them over one at a time does."""
    loop, stream = loop_stream
    bulk = loop.run_until_complete(_feed(stream, frames, cuts, which, v2, bulk=True))
    assert bulk == loop.run_until_complete(_feed(stream, frames, cuts, which, v2, bulk=False))


@pytest.mark.fast_paths
@pytest.mark.parametrize("which", [0, 2], ids=["all", "shard 0 of 3"])
def test_frames_with_a_trace_context_are_taken_in_bulk(
    loop_stream: tuple[asyncio.AbstractEventLoop, rjet.Stream], which: int
) -> None:
    """insert writes a trace context before rjet's headers: the scan takes such frames too (their
    type and foreign ID cut out, the header block kept for the trace), switching layouts as they come."""
    loop, stream = loop_stream
    kinds = ["event", "traced", "traced", "traced_state", "event", "event", "traced_odd", "traced", "event"]
    frames = [_Frame(k, f"user-{i}".encode(), i, b"x", 1, gap=False) for i, k in enumerate(kinds)]

    async def feed() -> list[tuple[bool, rjet.Event]]:
        client = await stream.stream(key_filter=_filters[which])
        try:
            sid = client._sessions.sid
            parser = FastParser(client._sessions._nc)
            parser.lanes[sid] = client._intake.on_frame
            parser.scanners[sid] = client._intake.scan
            await parser.parse(_wire_bytes(client, frames, False))
            return [(f[TYPE_RAW] is not None, client._decode(*f)) for f in client._state.buf]
        finally:
            await client.close()

    got = loop.run_until_complete(feed())
    keep = _filters[which] or (lambda fid: True)
    kept = [i for i in range(len(kinds)) if keep(f"user-{i}")]
    assert [e.foreign_id for _, e in got] == [f"user-{i}" for i in kept]
    # The consumer's first frame makes the patterns; every frame after it is taken in bulk.
    assert [bulk for bulk, _ in got] == [i != 0 for i in kept]

    def trace(i: int) -> dict[str, str] | None:  # as _wire_bytes writes it (sequence i + 1)
        parent = {"traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"}
        states = {"traced_state": f"v={i}", "traced_odd": f"a=1, b={i}"}
        return (
            None if kinds[i] == "event" else parent | ({"tracestate": states[kinds[i]]} if kinds[i] in states else {})
        )

    assert [e.trace for _, e in got] == [trace(i) for i in kept]


@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "one by one"])
def test_a_frame_that_says_nothing_is_left_marks_the_reader_caught_up(
    loop_stream: tuple[asyncio.AbstractEventLoop, rjet.Stream], bulk: bool
) -> None:
    """Whichever frame of a run says so, not only the last: more may follow it (the stream grew)."""
    loop, stream = loop_stream
    frames = [_Frame("event", b"k", 1, b"x", 1, gap=False, pending=p) for p in (7, 0, 5)]

    async def feed() -> tuple[bool, int, int]:
        client = await stream.stream()
        try:
            sid = client._sessions.sid
            parser = FastParser(client._sessions._nc)
            parser.lanes[sid] = client._intake.on_frame
            if bulk:
                parser.scanners[sid] = client._intake.scan
            data = _wire_bytes(client, frames, False)
            # (The empty stream's consumer may have said so already; nothing interleaves with one parse.)
            client._state.caught_up = False
            await parser.parse(data)
            return client._state.caught_up, client._state.server_pending, len(client._state.buf)
        finally:
            await client.close()

    assert loop.run_until_complete(feed()) == (True, 5, 3)


@pytest.mark.parametrize("cuts", [[], [300]], ids=["one read", "two reads"])
def test_a_gap_among_the_last_passed_over_frames_is_found(
    loop_stream: tuple[asyncio.AbstractEventLoop, rjet.Stream], cuts: list[int]
) -> None:
    loop, stream = loop_stream
    others = [f"user-{i}".encode() for i in range(100) if shard_of(f"user-{i}", 3) != 0][:6]
    frames = [_Frame("event", fid, 1, b"x", 1, gap=i == 4) for i, fid in enumerate(others)]
    which = _filters.index(_SHARD_0_OF_3)
    bulk = loop.run_until_complete(_feed(stream, frames, cuts, which, False, bulk=True))
    events, last, _, skipped, _, recovering, _, _, _ = bulk
    assert (events, last, skipped, recovering) == ([], 4, 4, True)  # stopped before the lost message
    assert bulk == loop.run_until_complete(_feed(stream, frames, cuts, which, False, bulk=False))


async def test_only_a_shard_filter_is_hashed_by_the_reader(stream: rjet.Stream) -> None:
    """The reader recognises rjet.ShardFilter by its type: any other callable is called per event,
    whatever attributes it has (the reader once took an ``xxh3_shard`` attribute at its word)."""

    class Claims:
        xxh3_shard = (0, 3)

        def __call__(self, fid: str) -> bool:
            return True

    class Narrower(rjet.ShardFilter):  # a subclass may decide otherwise: called, not hashed
        def __call__(self, fid: str) -> bool:
            return False

    async with await stream.stream(key_filter=key_filter(1, 3)) as client:
        assert client._intake._shard == (1, 3)
    async with await stream.stream(key_filter=rjet.ShardFilter(2, 5)) as client:
        assert client._intake._shard == (2, 5)
    others: list[Callable[[str], bool]] = [Claims(), Narrower(0, 3), lambda fid: True]
    for other in others:
        async with await stream.stream(key_filter=other) as client:
            assert client._intake._shard is None, other


# The fast lane against nats-py's own parser: the same bytes, cut anywhere, give the same calls.


class _Recorder:
    """Stands for a nats-py Client: records what a parser hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, hdr: bytes | None) -> None:
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), None if hdr is None else bytes(hdr)))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))

    async def _process_info(self, info: dict[str, object]) -> None:
        self.calls.append(("info", info))


_tokens = st.text(alphabet="abcxyz0123456789_-", min_size=1, max_size=8)
_frame = st.one_of(
    st.tuples(
        st.just("msg"), st.sampled_from([1, 2, 7]), _tokens, st.one_of(st.just(""), _tokens), st.binary(max_size=40)
    ),
    st.tuples(
        st.just("hmsg"),
        st.sampled_from([1, 2, 7]),
        _tokens,
        st.one_of(st.just(""), _tokens),
        st.dictionaries(st.sampled_from(["a", "b", "Nats-Seq"]), _tokens, max_size=2),
        st.binary(max_size=40),
    ),
    st.just(("ping",)),
    st.just(("pong",)),
    st.just(("ok",)),
    st.tuples(st.just("err"), st.sampled_from(["'Permissions Violation for Publish to \"X.Y\"'", "'Unknown'"])),
    st.tuples(
        st.just("info"), st.dictionaries(st.sampled_from(["max_payload", "server_id"]), st.integers(0, 9), max_size=2)
    ),
)


def _encode(frame: tuple[object, ...]) -> bytes:
    kind = frame[0]
    if kind == "msg":
        _, sid, subject, reply, data = frame
        r = f" {reply}" if reply else ""
        return f"MSG {subject} {sid}{r} {len(data)}\r\n".encode() + data + b"\r\n"  # type: ignore[arg-type, operator]
    if kind == "hmsg":
        _, sid, subject, reply, headers, data = frame
        block = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()  # type: ignore[attr-defined]
        r = f" {reply}" if reply else ""
        total = len(block) + len(data)  # type: ignore[arg-type]
        return f"HMSG {subject} {sid}{r} {len(block)} {total}\r\n".encode() + block + data + b"\r\n"  # type: ignore[operator]
    if kind == "err":
        return f"-ERR {frame[1]}\r\n".encode()
    if kind == "info":
        return b"INFO " + json.dumps(frame[1]).encode() + b"\r\n"
    return {"ping": b"PING\r\n", "pong": b"PONG\r\n", "ok": b"+OK\r\n"}[kind]  # type: ignore[index]


async def _parse(parser: object, wire: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(wire) + 1) for c in cuts})
    for a, b in zip([0, *points], [*points, len(wire)], strict=True):
        await parser.parse(wire[a:b])  # type: ignore[attr-defined]


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(_frame, max_size=25), cuts=st.lists(st.integers(0, 10_000), max_size=12), lane=st.booleans())
def test_the_fast_parser_agrees_with_nats_pys_parser(
    frames: list[tuple[object, ...]], cuts: list[int], lane: bool
) -> None:
    wire = b"".join(_encode(f) for f in frames)
    theirs, ours = _Recorder(), _Recorder()
    plain = Parser(theirs)
    fast = FastParser(ours)  # type: ignore[arg-type]
    if lane:  # sid 7 on the lane: its frames reach the handler, the rest go the usual way

        def handler(subject: bytes, reply: bytes, hdr: bytes | None, data: bytes) -> None:
            ours.calls.append(("msg", 7, bytes(subject), bytes(reply), bytes(data), hdr))

        fast.lanes[7] = handler
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_parse(plain, wire, cuts))
        loop.run_until_complete(_parse(fast, wire, cuts))
    finally:
        loop.close()
    assert ours.calls == theirs.calls
