"""``rjet bench``'s memory rows, measured in a worker process of their own (``_bench_memory_worker.py``)
as ``benchmarks/test_bench_memory.py`` measures them:

- a long read: ten times ``--events`` small events read by a no-op handler (1,000,000 at the default
  100,000), the RSS sampled every ``--events``; its target: the RSS at the end within 20% of the RSS
  after the first ``--events``. Only with ``--full``: filling and reading a million events takes a
  minute on 2 cores.
- large events: 1,500 events of 64 KB (96 MB) read by a slow handler (1 ms an event), so the reader
  holds as much as its bounds allow, beside the same read bounded by count only (``max_buffered``
  8,000 would be all of them); its target: the peak within ``max_buffered_bytes`` and 25% of the
  worker's RSS at start.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import rjet
from rjet.cli._bench_figure import Bench, BenchError, Figure

__all__ = ["LARGE_EVENTS", "large_events_figure", "long_read_figure"]

LARGE_EVENTS, LARGE_SIZE = 1_500, 64 * 1024
LONG_READ = 10  # times --events
_MB = 2**20
_UNBOUNDED = 2**40  # bytes: the byte bound never binds, the count bound does
_WORKER = Path(__file__).with_name("_bench_memory_worker.py")
# The worker imports the same rjet as this process (a checkout may shadow an installed one).
_ROOT = str(Path(rjet.__file__).resolve().parents[1])


async def _read_in_worker(
    b: Bench, stream: str, every: int, *, delay: float = 0.0, max_bytes: int | None = None
) -> dict[str, Any]:
    budget = rjet.ReadConfig().max_buffered_bytes if max_bytes is None else max_bytes
    given = {"servers": b.servers, "options": b.options, "name": stream, "every": every, "delay": delay,
             "max_bytes": budget}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(_WORKER), env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(given).encode()), 600)
    except TimeoutError:  # its own watchdog gives a stalled read up long before: a worker that hangs
        proc.kill()
        await proc.wait()
        raise BenchError("worker memory", "the worker process ran for 600 s and was killed") from None
    if proc.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise BenchError("worker memory", f"the worker process exited with {proc.returncode}: {last[0]}")
    result: dict[str, Any] = json.loads(out)
    return result


def _short(result: dict[str, Any], expected: int) -> str | None:
    """What went wrong with a worker's read, or None when it read every event."""
    if result["events"] == expected:
        return None
    why = "no event for 30 s, given up" if result["stalled"] else "ended"
    return f"the reader stopped at {result['events']:,} events of {expected:,} ({why}; {_cuts(result)})"


def _cuts(result: dict[str, Any]) -> str:
    n = result["disconnects"]
    return f"connection lost {n} time{'' if n == 1 else 's'}"


async def long_read_figure(b: Bench) -> Figure:
    total = LONG_READ * b.events
    stream = await rjet.Stream.create(b.js, b.name("memory"))
    chunk = 10_000
    for start in range(0, total, chunk):
        await stream.insert_many([b.items[i % b.events] for i in range(start, min(total, start + chunk))])
    result = await _read_in_worker(b, stream.name, b.events)
    if problem := _short(result, total):
        raise BenchError("worker memory, long read", problem)
    samples = dict(result["samples"])
    first, last = samples[b.events] / _MB, samples[max(samples)] / _MB
    return Figure(f"worker memory, long read ({LONG_READ}x --events)", "MB", last,
                  f"after the first {b.events:,} events", first, "within 20%", max_ratio=1.2,
                  detail=f"after {total:,} events; {result['start'] / _MB:.1f} MB at start")  # fmt: skip


async def large_events_figure(b: Bench) -> Figure:
    stream = await rjet.Stream.create(b.js, b.name("memory_large"))
    body = b"x" * LARGE_SIZE
    for start in range(0, LARGE_EVENTS, 100):
        await stream.insert_many([(f"user-{i}", 1, body) for i in range(start, start + 100)])
    bounded = await _read_in_worker(b, stream.name, 50, delay=0.001)
    by_count = await _read_in_worker(b, stream.name, 50, delay=0.001, max_bytes=_UNBOUNDED)
    if problem := _short(bounded, LARGE_EVENTS):
        raise BenchError("worker memory, large events", problem)
    # Bounded by count only, the reader may be cut off by the server as a slow consumer (what the
    # byte bound is for): the baseline says so, and where its read stopped if it did.
    baseline = "the reader bounded by count only"
    if by_count["disconnects"] or by_count["events"] != LARGE_EVENTS:
        baseline += f" ({_short(by_count, LARGE_EVENTS) or _cuts(by_count)})"
    budget = rjet.ReadConfig().max_buffered_bytes
    start, peak = bounded["start"], bounded["peak"]
    return Figure(f"worker memory, {LARGE_EVENTS:,} events of {LARGE_SIZE // 1024} KB", "MB",
                  peak / _MB, baseline, by_count["peak"] / _MB,
                  f"peak <= start x 1.25 + {budget // _MB} MiB (max_buffered_bytes)",
                  detail=f"peak, slow handler; {start / _MB:.1f} MB at start",
                  condition=peak <= start * 1.25 + budget)  # fmt: skip
