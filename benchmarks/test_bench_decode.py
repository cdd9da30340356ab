"""Decode: the per-event cost of turning one delivered message into an :class:`rjet.Event`.

The messages are real deliveries of the pre-filled stream, captured once with a nats-py pull
consumer on the baselines' connection, so reply subjects, headers and bodies are what a reader sees.
rjet's reader has decoded two kinds of input over time, and this module follows whichever
``StreamClient._decode`` takes:

- nats-py ``Msg`` objects: ``_decode(sseq, ts, msg)``, with ``parse_ack(reply: str)``;
- raw wire frames: ``_decode(sseq, ts, subject, headers, data, foreign_id[, type_value, fid_value[,
  bytes held before]])``, with
  ``parse_ack(reply: bytes)`` (the header block rebuilt byte for byte as nats-py published it): the
  reader's frame-by-frame path;
- and, where the reader has one, its bulk scanner (``Intake.scan``) over the frames as the
  socket delivers them: ``test_rjet_scan_and_decode``, the per-event cost of the path reads take now.

Baselines: nats-py's ``Msg.metadata`` parse of the reply subject (memo cleared before each round),
and everything nats-py does per frame before a callback sees it (header block parsed into a dict,
``Msg`` built) plus ``Msg.metadata``. The ``component_*`` benchmarks split that work further.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

import rjet
from rjet._nats import frames as _frames
from rjet.event import Event
from rjet.reader._session import Session

from ._support import EVENTS, Arun, ratio, record

MSGS = min(int(os.environ.get("RJET_BENCH_DECODE_MSGS", "10000")), EVENTS)
ROUNDS = 20
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

pytestmark = pytest.mark.benchmark(group="decode")


@dataclasses.dataclass
class Frame:
    """One delivery as the wire carried it, and as nats-py handed it over."""

    msg: Msg
    subject: bytes
    reply: bytes
    headers: bytes
    data: bytes


@dataclasses.dataclass
class Decoder:
    """rjet's per-message decode, whichever input form the installed reader takes."""

    form: str  # "msg" or "raw"
    parse_ack: Callable[[Any], tuple[Any, int, int, int, int] | None]
    decode: Callable[..., Event]

    def reply(self, f: Frame) -> Any:
        return f.msg.reply if self.form == "msg" else f.reply

    arity: int = 0  # parameters of _decode

    def args(self, f: Frame) -> tuple[Any, ...]:
        if self.form == "msg":
            return (f.msg,)
        return (f.subject, f.headers, f.data, None, None, None, 0)[: self.arity - 2]


def _raw_headers(headers: dict[str, str]) -> bytes:
    return b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"


@pytest.fixture(scope="module")
def frames(filled: rjet.Stream, baseline_js: JetStreamContext, arun: Arun[Any]) -> list[Frame]:
    async def capture() -> list[Msg]:
        sub = await baseline_js.pull_subscribe(
            f"{filled.name}.>",
            stream=filled.name,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, inactive_threshold=10.0),
        )
        got: list[Msg] = []
        try:
            while len(got) < MSGS:
                got += await sub.fetch(min(1000, MSGS - len(got)), timeout=10)
        finally:
            await sub.unsubscribe()
        return got

    msgs: list[Msg] = arun(capture())
    assert msgs[0].reply.startswith("$JS.ACK."), msgs[0].reply
    assert all(m.headers for m in msgs)
    return [Frame(m, m.subject.encode(), m.reply.encode(), _raw_headers(m.headers or {}), m.data) for m in msgs]


@pytest.fixture(scope="module")
def decoder(filled: rjet.Stream, frames: list[Frame], arun: Arun[Any]) -> Decoder:
    """A real stream client's bound ``_decode`` (the client is closed; decoding needs no I/O)."""

    async def open_client() -> rjet.StreamClient:
        client = await filled.stream("", to_head=True)
        await client.close()
        return client

    decode = arun(open_client())._decode
    arity = len(inspect.signature(decode).parameters)
    d = Decoder("msg" if arity == 3 else "raw", _frames.parse_ack, decode, arity)
    ack = d.parse_ack(d.reply(frames[0]))
    assert ack is not None, f"parse_ack does not take the {d.form} form"
    event = d.decode(ack[1], ack[3], *d.args(frames[0]))
    assert event.foreign_id == frames[0].msg.headers["rjet_foreign_id"]  # type: ignore[index]
    assert event.metadata == frames[0].data
    return d


def test_baseline_natspy_metadata(benchmark: Any, frames: list[Frame], figures: dict[str, float]) -> None:
    """nats-py: ``msg.metadata`` (split the reply subject, ints, a datetime, two dataclasses)."""
    msgs = [f.msg for f in frames]

    def clear() -> None:
        for m in msgs:
            m._metadata = None

    def run() -> None:
        for m in msgs:
            m.metadata  # noqa: B018 (the property parses)

    benchmark.pedantic(run, setup=clear, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, events=MSGS, figures=figures, key="decode_natspy_metadata")


def test_baseline_natspy_frame_to_msg(
    benchmark: Any, frames: list[Frame], baseline_nc: Client, arun: Arun[Any], figures: dict[str, float]
) -> None:
    """nats-py, per delivered frame: header block -> dict, ``Msg`` built, then ``msg.metadata``."""
    raw = [(f.subject, f.reply, f.data, f.headers) for f in frames]

    async def run() -> None:
        process, build = baseline_nc._process_headers, baseline_nc._build_message
        for subject, reply, data, headers in raw:
            build(1, subject, reply, data, await process(headers)).metadata  # noqa: B018

    benchmark.pedantic(lambda: arun(run()), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, events=MSGS, figures=figures, key="decode_natspy_frame")


def test_rjet_parse_ack(benchmark: Any, frames: list[Frame], decoder: Decoder) -> None:
    """rjet: the reply subject alone (consumer, stream seq, consumer seq, stored ns, pending)."""
    replies = [decoder.reply(f) for f in frames]
    parse_ack = decoder.parse_ack

    def run() -> None:
        for r in replies:
            parse_ack(r)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, events=MSGS, input=decoder.form)


def test_rjet_decode_only(benchmark: Any, frames: list[Frame], decoder: Decoder) -> None:
    """rjet: ``StreamClient._decode`` from an already parsed (sseq, ts): headers, Event construction."""
    parsed = []
    for f in frames:
        ack = decoder.parse_ack(decoder.reply(f))
        assert ack is not None
        parsed.append((ack[1], ack[3], decoder.args(f)))
    decode = decoder.decode

    def run() -> None:
        for sseq, ts, args in parsed:
            decode(sseq, ts, *args)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, events=MSGS, input=decoder.form)


def test_rjet_full_decode(benchmark: Any, frames: list[Frame], decoder: Decoder, figures: dict[str, float]) -> None:
    """rjet: what the reader does per message to produce an Event: parse_ack + _decode."""
    items = [(decoder.reply(f), decoder.args(f)) for f in frames]
    parse_ack, decode = decoder.parse_ack, decoder.decode

    def run() -> None:
        for reply, args in items:
            ack = parse_ack(reply)
            decode(ack[1], ack[3], *args)  # type: ignore[index]

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    rate = record(benchmark, events=MSGS, figures=figures, key="decode_rjet_full", input=decoder.form)
    ratio(benchmark, figures, rate, "decode_natspy_metadata", "natspy_metadata")
    ratio(benchmark, figures, rate, "decode_natspy_frame", "natspy_frame_to_msg")


def test_component_event_construction(benchmark: Any, frames: list[Frame]) -> None:
    """``Event(...)`` through its constructor with a datetime (the reader sets the slots and leaves the
    datetime for later; this is what building one by hand costs)."""
    fields = []
    for f in frames:
        ack = _parse_any(f)
        fields.append((ack[1], ack[3], f.data))

    def run() -> None:
        for sseq, ts, data in fields:
            Event(str(sseq), 1, "user-1", _EPOCH + timedelta(microseconds=ts // 1000), data)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, events=MSGS)


def test_component_natspy_headers(benchmark: Any, frames: list[Frame], baseline_nc: Client, arun: Arun[Any]) -> None:
    """nats-py, before a callback sees a message: parsing the raw header block into a dict."""
    raws = [f.headers for f in frames]
    assert arun(baseline_nc._process_headers(raws[0])) == frames[0].msg.headers

    async def parse_all() -> None:
        process = baseline_nc._process_headers
        for raw in raws:
            await process(raw)

    benchmark.pedantic(lambda: arun(parse_all()), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, events=MSGS)


def test_component_natspy_msg(benchmark: Any, frames: list[Frame], baseline_nc: Client) -> None:
    """nats-py, before a callback sees a message: building the ``Msg`` (subject and reply decoded)."""
    raw = [(f.subject, f.reply, f.data, f.msg.headers) for f in frames]

    def run() -> None:
        build = baseline_nc._build_message
        for subject, reply, data, headers in raw:
            build(1, subject, reply, data, headers)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, events=MSGS)


def _parse_any(f: Frame) -> tuple[Any, int, int, int, int]:
    ack = Msg.Metadata._from_reply(f.msg.reply)
    return ("", ack.sequence.stream, ack.sequence.consumer, int(ack.timestamp.timestamp() * 1e9), ack.num_pending)


def test_rjet_scan_and_decode(
    benchmark: Any, filled: rjet.Stream, frames: list[Frame], arun: Arun[Any], figures: dict[str, float]
) -> None:
    """rjet, the path reads take: the bulk scan (``rjet/reader/_scan.py``) over the frames as the socket
    delivers them (HMSG control lines, header blocks, bodies), then ``_decode`` of every event it buffered."""

    async def open_client() -> rjet.StreamClient:
        client = await filled.stream("", to_head=True)
        await client.close()  # decoding needs no I/O; a closed client sends no pull requests
        return client

    client = arun(open_client())
    first = _frames.parse_ack(frames[0].reply)
    assert first is not None
    consumer, cseq0 = first[0], first[2] - 1
    prefix = frames[0].reply[: frames[0].reply.index(consumer) + len(consumer) + 1]
    wire = bytearray(
        b"".join(
            b"HMSG %s %d %s %d %d\r\n%s%s\r\n"
            % (
                f.subject,
                client._sessions.sid,
                f.reply,
                len(f.headers),
                len(f.headers) + len(f.data),
                f.headers,
                f.data,
            )
            for f in frames
        )
    )

    def setup() -> None:
        client._state.buf.clear()
        client._state.last = 0
        session = client._state.session = Session(consumer, b"", "", reconnects=0)
        session.cseq, session.prefix = cseq0, prefix
        session.pattern = _frames.frame_pattern(client._sessions.sid, prefix)
        session.plain = _frames.frame_pattern(client._sessions.sid, prefix, plain=True)
        session.traced_pattern = _frames.frame_pattern(client._sessions.sid, prefix, traced=True)
        session.traced_plain = _frames.frame_pattern(client._sessions.sid, prefix, plain=True, traced=True)

    def run() -> None:
        assert client._intake.scan(wire, 0, len(wire)) == len(wire)
        decode = client._decode
        for frame in client._state.buf:
            decode(*frame)

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert len(client._state.buf) == MSGS
    rate = record(benchmark, events=MSGS, figures=figures, key="decode_rjet_scan", input="wire bytes")
    ratio(benchmark, figures, rate, "decode_natspy_frame", "natspy_frame_to_msg")
