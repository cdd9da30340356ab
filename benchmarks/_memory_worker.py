"""Child process of ``test_bench_memory``: read a stream to its head as a worker would, sampling RSS.

``python _memory_worker.py <url> <stream> <every> [<handler delay, s>]`` prints one JSON object: the
resident set size in bytes after connecting (``start``), after every ``every`` events read
(``samples``), and the largest of those (``peak``). A handler delay (a slow consumer) lets the
reader's buffer fill as far as its bounds allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys

import rjet

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size of this process in bytes (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


async def main(url: str, name: str, every: int, delay: float) -> dict[str, object]:
    nc = await rjet.connect(url)
    try:
        stream = rjet.Stream(nc.jetstream(), name)
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

        handle = count_slowly if delay else count

        spec = rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("memory", handle), to_head=True)
        with contextlib.suppress(rjet.HeadReached):
            await rjet.run(spec)
        return {"start": start, "samples": samples, "events": seen, "peak": max(s for _, s in samples)}
    finally:
        await nc.close()


if __name__ == "__main__":
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), delay))))
