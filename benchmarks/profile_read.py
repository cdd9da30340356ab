"""Profile rjet's ordered read of N events (default 100k) with cProfile; prints the top entries.

::

    python benchmarks/profile_read.py [events] [top]
    python benchmarks/profile_read.py [events] --sample    # for py-spy, see below
    python benchmarks/profile_read.py [events] --traced    # events with a W3C trace context (#27)

Starts an embedded nats-server, fills a stream (not profiled), reads it once to warm up, then
profiles one full ``stream.stream("", to_head=True)`` read. With ``--traced`` the events are inserted
under a remote span context, so each message carries a ``traceparent`` header as ``insert`` writes it
with tracing on; the read has no tracer (needs the ``otel`` extra).

cProfile adds a cost to every call and inflates small per-event functions. For a sampling view,
``--sample`` prints the process ID after the fill, waits 3 s, and reads 4 times without cProfile::

    python benchmarks/profile_read.py --sample &   # prints "pid <pid>: reading in 3 s"
    py-spy record --pid <pid> -r 1000 -f raw -o read.txt
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import sys
import time

import nats

import rjet
from rjet.server import EmbeddedServer

SAMPLE = "--sample" in sys.argv
TRACED = "--traced" in sys.argv
_ARGS = [a for a in sys.argv[1:] if a not in ("--sample", "--traced")]
EVENTS = int(_ARGS[0]) if _ARGS else 100_000
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


async def main(url: str) -> None:
    nc = await nats.connect(url)
    try:
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
