"""``rjet bench``'s worker process for the memory rows: read a stream to its head as a worker would,
sampling the resident set size. Run as a script by path (``python .../_bench_memory_worker.py``), so
that what it measures is rjet's reader alone, without the command line's imports.

``python _bench_memory_worker.py`` reads one JSON object from stdin (``servers``, ``options`` for
:func:`rjet.connect`, ``name``: the stream, ``every``, ``delay``: the handler's in seconds,
``max_bytes``: the reader's ``max_buffered_bytes``; stdin, so that no password shows in a process
list) and prints one: the RSS in bytes after connecting (``start``), after every ``every`` events
read (``samples``), the largest of those (``peak``), the events read, whether the read stalled
(no event for ``STALL`` seconds: it was given up) and how often the connection was lost. A handler delay (a slow
consumer) lets the reader's buffer fill as far as its bounds allow. The same as
``benchmarks/_memory_worker.py``, with the byte bound as an argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys

import rjet

_PAGE = os.sysconf("SC_PAGE_SIZE")
STALL = 30.0  # seconds without an event read


def rss() -> int:
    """Resident set size of this process in bytes (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


async def main(
    servers: list[str], options: dict[str, object], name: str, every: int, delay: float, max_bytes: int
) -> dict[str, object]:
    disconnects = 0

    async def disconnected() -> None:
        nonlocal disconnects
        disconnects += 1

    nc = await rjet.connect(servers, **options, disconnected_cb=disconnected)
    try:
        stream = rjet.Stream(nc.jetstream(), name, read=rjet.ReadConfig(max_buffered_bytes=max_bytes))
        start = rss()
        samples: list[tuple[int, int]] = []
        seen = 0

        def count(fate: rjet.Fate, event: rjet.Event) -> None:
            nonlocal seen
            seen += 1
            if seen % every == 0:
                samples.append((seen, rss()))

        async def count_slowly(fate: rjet.Fate, event: rjet.Event) -> None:
            count(fate, event)
            await asyncio.sleep(delay)

        consumer = rjet.Consumer("memory", count_slowly if delay else count)
        spec = rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True)
        reading = asyncio.ensure_future(rjet.run(spec))
        stalled, last = False, -1
        # A read that stops short of the head would leave the bench waiting for ever: a read that
        # makes no progress for STALL seconds is given up and reported as such.
        while not reading.done():
            if seen == last:
                stalled = True
                reading.cancel()
                break
            last = seen
            await asyncio.wait({reading}, timeout=STALL)
        with contextlib.suppress(rjet.HeadReached, asyncio.CancelledError):
            await reading
        return {
            "start": start,
            "samples": samples,
            "events": seen,
            "peak": max((s for _, s in samples), default=start),
            "stalled": stalled,
            "disconnects": disconnects,
        }
    finally:
        await nc.close()


if __name__ == "__main__":
    given = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(main(**given))))
