"""Memory: a worker's resident memory over a long read, and with large events.

A child process (``rjet bench``'s memory worker, ``rjet/cli/_bench_memory_worker.py``) runs
``rjet.run`` to the head of a stream and samples its RSS (/proc/self/statm).

- ``test_worker_rss`` (opt-in: ``RJET_BENCH_MEMORY=1``): ``RJET_BENCH_MEMORY_EVENTS`` (default
  1,000,000) small events with a no-op handler, sampled every 100k events. Filling the stream takes
  about 25 s and reading it about 15 s on a 2-core machine, so this path is off in the default run.
  Target (issue, 6): RSS after the last event within 20% of RSS after 100k events.
- ``test_worker_rss_large_events``: 1,500 events of 64 KB (96 MB) read by a slow handler, so the
  reader buffers as much as its bounds allow: by count alone (``max_buffered`` 8,000) that would be
  all of them. Its bound: peak RSS within ``max_buffered_bytes`` (32 MiB) and 25% of the worker's
  RSS at start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.server import EmbeddedServer

from ._support import FILL_CHUNK, Arun, make_events, record, target

EVENTS = int(os.environ.get("RJET_BENCH_MEMORY_EVENTS", "1000000"))
EVERY = 100_000

LARGE_EVENTS, LARGE_SIZE = 1_500, 64 * 1024

pytestmark = [pytest.mark.benchmark(group="memory"), pytest.mark.timeout(600)]
opt_in = pytest.mark.skipif(
    os.environ.get("RJET_BENCH_MEMORY", "") in ("", "0"), reason="opt-in: set RJET_BENCH_MEMORY=1"
)


@pytest.fixture(scope="module")
def big(js: JetStreamContext, arun: Arun[Any]) -> Iterator[rjet.Stream]:
    stream: rjet.Stream = arun(rjet.Stream.create(js, "bench_memory"))
    for start in range(0, EVENTS, FILL_CHUNK):
        chunk = make_events(min(FILL_CHUNK, EVENTS - start))
        arun(stream.insert_many(chunk))
    yield stream
    arun(js.delete_stream(stream.name))


@pytest.fixture(scope="module")
def large(js: JetStreamContext, arun: Arun[Any]) -> Iterator[rjet.Stream]:
    stream: rjet.Stream = arun(rjet.Stream.create(js, "bench_memory_large"))
    body = b"x" * LARGE_SIZE
    for start in range(0, LARGE_EVENTS, 100):
        arun(stream.insert_many([(f"user-{i}", 1, body) for i in range(start, start + 100)]))
    yield stream
    arun(js.delete_stream(stream.name))


def read_in_child(benchmark: Any, url: str, stream: str, every: int, delay: float = 0.0) -> dict[str, Any]:
    """``rjet bench``'s memory worker (``rjet/cli/_bench_memory_worker.py``: what it is given comes on
    stdin) reading ``stream`` to its head with the reader's default bounds."""
    worker = Path(rjet.__file__).parent / "cli" / "_bench_memory_worker.py"
    given = {"servers": [url], "options": {}, "name": stream, "every": every, "delay": delay,
             "max_bytes": rjet.ReadConfig().max_buffered_bytes}  # fmt: skip

    # The child imports the same rjet as this process (a checkout may shadow the installed one).
    root = str(Path(rjet.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}

    def read() -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, str(worker)], input=json.dumps(given).encode(), capture_output=True, check=True,
            timeout=300, env=env,
        )  # fmt: skip
        result: dict[str, Any] = json.loads(out.stdout)
        assert not result["stalled"], result
        return result

    result: dict[str, Any] = benchmark.pedantic(read, rounds=1)
    return result


def test_worker_rss_large_events(benchmark: Any, large: rjet.Stream, bench_server: EmbeddedServer) -> None:
    result = read_in_child(benchmark, bench_server.url, large.name, 50, delay=0.001)
    assert result["events"] == LARGE_EVENTS
    budget = rjet.ReadConfig().max_buffered_bytes
    start, peak = result["start"], result["peak"]
    record(
        benchmark,
        events=LARGE_EVENTS,
        event_kb=LARGE_SIZE // 1024,
        stream_mb=round(LARGE_EVENTS * LARGE_SIZE / 2**20, 1),
        rss_mb_at_start=round(start / 2**20, 1),
        rss_mb_peak=round(peak / 2**20, 1),
        max_buffered_mb=round(budget / 2**20, 1),
    )
    target(benchmark, "peak RSS within max_buffered_bytes + 25% of the start RSS", peak <= start * 1.25 + budget)


@opt_in
def test_worker_rss(benchmark: Any, big: rjet.Stream, bench_server: EmbeddedServer) -> None:
    result = read_in_child(benchmark, bench_server.url, big.name, EVERY)
    assert result["events"] == EVENTS
    samples = dict(result["samples"])
    mb = {f"rss_mb_at_{n // 1000}k": round(b / 2**20, 1) for n, b in samples.items()}
    record(benchmark, events=EVENTS, rss_mb_at_start=round(result["start"] / 2**20, 1), **mb)
    first, last = samples[EVERY], samples[max(samples)]
    growth = last / first - 1
    benchmark.extra_info["rss_growth_100k_to_end"] = round(growth, 3)
    target(benchmark, "RSS within 20% from 100k to 1M events read", growth <= 0.2)
