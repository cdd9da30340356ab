"""Memory: a worker's resident memory from 100k to 1M events read (opt-in: ``RJET_BENCH_MEMORY=1``).

A child process (``_memory_worker.py``) runs ``rjet.run`` to the head of a stream of
``RJET_BENCH_MEMORY_EVENTS`` (default 1,000,000) events with a no-op handler and samples its RSS
(/proc/self/statm) every 100k events. Filling the stream takes about 25 s and reading it about 15 s
on a 2-core machine, so this path is off in the default run.
Target (issue, 6): RSS after the last event within 20% of RSS after 100k events.
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

pytestmark = [
    pytest.mark.benchmark(group="memory"),
    pytest.mark.skipif(os.environ.get("RJET_BENCH_MEMORY", "") in ("", "0"), reason="opt-in: set RJET_BENCH_MEMORY=1"),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def big(js: JetStreamContext, arun: Arun[Any]) -> Iterator[rjet.Stream]:
    stream: rjet.Stream = arun(rjet.Stream.create(js, "bench_memory"))
    for start in range(0, EVENTS, FILL_CHUNK):
        chunk = make_events(min(FILL_CHUNK, EVENTS - start))
        arun(stream.insert_many(chunk))
    yield stream
    arun(js.delete_stream(stream.name))


def test_worker_rss(benchmark: Any, big: rjet.Stream, bench_server: EmbeddedServer) -> None:
    worker = Path(__file__).with_name("_memory_worker.py")
    args = [sys.executable, str(worker), bench_server.url, big.name, str(EVERY)]

    # The child imports the same rjet as this process (a checkout may shadow the installed one).
    root = str(Path(rjet.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}

    def read() -> dict[str, Any]:
        out = subprocess.run(args, capture_output=True, check=True, timeout=300, env=env)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    result = benchmark.pedantic(read, rounds=1)
    assert result["events"] == EVENTS
    samples = dict(result["samples"])
    mb = {f"rss_mb_at_{n // 1000}k": round(b / 2**20, 1) for n, b in samples.items()}
    record(benchmark, events=EVENTS, rss_mb_at_start=round(result["start"] / 2**20, 1), **mb)
    first, last = samples[EVERY], samples[max(samples)]
    growth = last / first - 1
    benchmark.extra_info["rss_growth_100k_to_end"] = round(growth, 3)
    target(benchmark, "RSS within 20% from 100k to 1M events read", growth <= 0.2)
