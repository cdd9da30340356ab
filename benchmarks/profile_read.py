"""Profile rjet's ordered read of N events (default 100k) with cProfile; prints the top entries.

::

    python benchmarks/profile_read.py [events] [top]
    python benchmarks/profile_read.py [events] --sample    # for py-spy, see below
    python benchmarks/profile_read.py [events] --traced    # events with a W3C trace context (#27)
    python benchmarks/profile_read.py [events] --replay    # the client's CPU without I/O (#28)
    python benchmarks/profile_read.py [events] --callgrind # its instructions a frame, under valgrind

Starts an embedded nats-server, fills a stream (not profiled), reads it once to warm up, then
profiles one full ``stream.stream("", to_head=True)`` read. With ``--traced`` the events are inserted
under a remote span context, so each message carries a ``traceparent`` header as ``insert`` writes it
with tracing on; the read has no tracer (needs the ``otel`` extra).

``--replay`` times the client alone: prepared frames of a real client's consumer (as the server lays
them out) go through a ``FastParser`` in 32 KiB reads (as nats-py reads) and are handed over with
``__anext__``, no server traffic and no waiting; it prints the process CPU an event of each part, the
fastest of 8 rounds. What it does per frame is deterministic, so ``valgrind --tool=callgrind`` counts
the same instructions each time (run it with ``PYTHONHASHSEED=0``): a measure of the client's work that
the other engineers' load on this machine does not move.

``--callgrind`` runs the same work for callgrind alone: a warm-up round, then 3 rounds of ``events``
frames (default 5,000) parsed and handed over inside ``operator.call``, driven without the event loop,
so that only they are counted (gc off, as in a real read, which collects nothing: its objects die young)::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --collect-atstart=no --toggle-collect='_operator_call*' \
        python benchmarks/profile_read.py --callgrind      # then: the summary's Ir / 15,000

Each handed-over event there also pays for the StopIteration that driving a coroutine by hand raises
(about 500 instructions), which ``async for`` does not; differences between two states are exact.

cProfile adds a cost to every call and inflates small per-event functions. For a sampling view,
``--sample`` prints the process ID after the fill, waits 3 s, and reads 4 times without cProfile::

    python benchmarks/profile_read.py --sample &   # prints "pid <pid>: reading in 3 s"
    py-spy record --pid <pid> -r 1000 -f raw -o read.txt
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import operator
import os
import pstats
import sys
import time
from collections.abc import Coroutine

import nats

import rjet
from rjet._nats.parser import FastParser
from rjet.server import EmbeddedServer

SAMPLE = "--sample" in sys.argv
TRACED = "--traced" in sys.argv
REPLAY = "--replay" in sys.argv
CALLGRIND = "--callgrind" in sys.argv
_ARGS = [a for a in sys.argv[1:] if a not in ("--sample", "--traced", "--replay", "--callgrind")]
EVENTS = int(_ARGS[0]) if _ARGS else 5_000 if CALLGRIND else 100_000
TOP = int(_ARGS[1]) if len(_ARGS) > 1 else 15


async def read(stream: rjet.Stream) -> int:
    got = 0
    async with await stream.stream("", to_head=True) as client:
        async for _ in client:
            got += 1
    return got


async def fill(stream: rjet.Stream) -> None:
    for start in range(0, EVENTS, 10_000):
        n = min(10_000, EVENTS - start)
        await stream.insert_many(
            [(f"user-{i % 1000}", 1 + i % 5, b'{"seq": %d, "amount": 1234, "currency": "EUR"}' % i) for i in range(n)]
        )


def wire(client: rjet.StreamClient, first: int, n: int) -> bytes:
    """Frames ``first`` to ``first + n - 1`` of ``client``'s consumer, laid out as the server sends them."""
    s = client._state.session
    assert s is not None
    sid = client._sessions.sid
    trace = b"traceparent: 00-%032x-%016x-01\r\n" % (0x1234, 0x5678) if TRACED else b""
    prefix = b"$JS.ACK.%s.%s.1." % (client.stream.encode(), s.name)
    out = []
    for i in range(first, first + n):
        hdr = b"NATS/1.0\r\n%sreflex_type: %d\r\nrjet_foreign_id: user-%d\r\n\r\n" % (trace, 1 + i % 5, i % 1000)
        body = b'{"seq": %d, "amount": 1234, "currency": "EUR"}' % i
        # delivered.sseq.cseq.stored time.pending: the last frame says 0 are left
        reply = prefix + b"%d.%d.%d.%d" % (i, i, 1_733_590_000_123_456_789 + 1000 * i, first + n - 1 - i)
        size = len(hdr) + len(body)
        out.append(b"HMSG profile.user-%d %d %s %d %d\r\n%s%s\r\n" % (i % 1000, sid, reply, len(hdr), size, hdr, body))
    return b"".join(out)


def _parser(client: rjet.StreamClient) -> FastParser:
    """A parser that hands ``client``'s frames over as its connection's own does."""
    parser = FastParser(client._sessions._nc)
    parser.lanes[client._sessions.sid] = client._intake.on_lane_frame
    parser.scanners[client._sessions.sid] = client._intake.scan
    return parser


async def replay(stream: rjet.Stream, rounds: int = 8) -> None:
    """The client's CPU an event without I/O: see the module docstring."""
    client = await stream.stream("")  # the stream is empty: the server sends nothing
    try:
        parser = _parser(client)
        st, hand = client._state, client.__anext__
        scan, handed, first = [], [], 1
        for _ in range(rounds + 1):  # the first warms up
            data = wire(client, first, EVENTS)
            first += EVENTS
            assert st.session is not None
            st.session.pending = 2 * EVENTS  # owed enough: no pull request is due
            t = time.process_time()
            for at in range(0, len(data), 32768):
                await parser.parse(data[at : at + 32768])
            t1 = time.process_time()
            assert len(st.buf) == EVENTS
            for _ in range(EVENTS):
                await hand()
            t2 = time.process_time()
            scan.append((t1 - t) * 1e6 / EVENTS)
            handed.append((t2 - t1) * 1e6 / EVENTS)
        both = min(a + b for a, b in zip(scan[1:], handed[1:], strict=True))
        print(
            f"CPU us an event, fastest of {rounds}: parse and scan {min(scan[1:]):.3f}, handing over"
            f" {min(handed[1:]):.3f}, both {both:.3f}"
        )
    finally:
        await client.close()


def _drive(step: Coroutine[object, None, object]) -> None:
    """Run a coroutine that does not wait (nothing here does) to its end, without an event loop."""
    try:
        step.send(None)
    except StopIteration:
        return
    raise RuntimeError("the replay waited")


async def counted(stream: rjet.Stream, rounds: int = 3) -> None:
    """The work of --replay, for callgrind: see the module docstring."""
    client = await stream.stream("")  # the stream is empty: the server sends nothing
    try:
        parser = _parser(client)
        st, hand = client._state, client.__anext__
        data = [wire(client, 1 + i * EVENTS, EVENTS) for i in range(rounds + 1)]

        def one(frames: bytes) -> None:
            assert st.session is not None
            st.session.pending = 2 * EVENTS  # owed enough: no pull request is due
            for at in range(0, len(frames), 32768):
                _drive(parser.parse(frames[at : at + 32768]))
            assert len(st.buf) == EVENTS
            for _ in range(EVENTS):
                _drive(hand())

        one(data[0])  # warm-up, not counted
        gc.disable()
        for frames in data[1:]:
            operator.call(one, frames)  # counted: callgrind collects inside operator.call only
        gc.enable()
        print(f"{rounds * EVENTS} frames counted")
    finally:
        await client.close()


async def main(url: str) -> None:
    nc = await nats.connect(url)
    try:
        if CALLGRIND:
            await counted(await rjet.Stream.create(nc.jetstream(), "profile"))
            return
        if REPLAY:
            await replay(await rjet.Stream.create(nc.jetstream(), "profile"))
            return
        stream = await rjet.Stream.create(nc.jetstream(), "profile")
        if TRACED:
            from opentelemetry import trace

            parent = trace.SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=trace.TraceFlags(1))
            with trace.use_span(trace.NonRecordingSpan(parent)):
                await fill(stream)
        else:
            await fill(stream)
        await read(stream)
        if SAMPLE:
            print(f"pid {os.getpid()}: reading in 3 s", flush=True)
            await asyncio.sleep(3)
            t = time.perf_counter()
            for _ in range(4):
                assert await read(stream) == EVENTS
            print(f"4 reads: {4 * EVENTS / (time.perf_counter() - t):,.0f} events/s")
            return
        t = time.perf_counter()
        assert await read(stream) == EVENTS
        print(f"unprofiled read: {EVENTS / (time.perf_counter() - t):,.0f} events/s")
        profile = cProfile.Profile()
        t = time.perf_counter()
        profile.enable()
        got = await read(stream)
        profile.disable()
        print(f"profiled read: {got / (time.perf_counter() - t):,.0f} events/s")
        for key in ("cumulative", "tottime"):
            pstats.Stats(profile).strip_dirs().sort_stats(key).print_stats(TOP)
    finally:
        await nc.close()


if __name__ == "__main__":
    with EmbeddedServer() as srv:
        asyncio.run(main(srv.url))
