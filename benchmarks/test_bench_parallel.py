"""Parallel scaling: events/s of a Parallel group for N workers, read-all versus partitioned streams.

Throughput is measured from the first to the last handler call over all workers (each worker
records its own first/last time and count when it exits), so process start-up is not counted.
Handlers: CPU-bound (a busy loop of ``CPU_US`` microseconds per event) and I/O-bound
(``await asyncio.sleep(0.001)``).

Targets (issue): CPU-bound N=2 >= 1.7x N=1 on 2 cores; I/O-bound N=8 >= 6x N=1.

The many-core curve: ``RJET_BENCH_PARALLEL_NS=1,2,4,8,16 pytest benchmarks/test_bench_parallel.py
--benchmark-only --benchmark-json=curve.json``, then ``python benchmarks/report.py curve.json``
prints events/s, speed-up and efficiency (speed-up / N) per handler, layout and N.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.parallel import Parallel
from rjet.server import EmbeddedServer

from ._support import Arun, make_events, target, unique_name

CPU_US = 50.0
CPU_EVENTS = int(os.environ.get("RJET_BENCH_PARALLEL_CPU_EVENTS", "20000"))
IO_EVENTS = int(os.environ.get("RJET_BENCH_PARALLEL_IO_EVENTS", "3000"))
KEYS = 1000
SCALING: dict[tuple[str, str, int], float] = {}


def timed(directory: str, *, cpu_us: float = 0.0, io: bool = False) -> Callable[..., Any]:
    """A handler that burns ``cpu_us`` or sleeps 1 ms, and leaves its worker's timing in ``directory``."""
    state: dict[str, float] = {"first": 0.0, "last": 0.0, "n": 0.0}

    def dump() -> None:
        Path(directory, f"{os.getpid()}.json").write_text(json.dumps(state))

    def tick() -> None:
        now = time.perf_counter()
        if not state["n"]:
            state["first"] = now
            atexit.register(dump)
        state["last"] = now
        state["n"] += 1

    if io:

        async def io_handler(fate: rjet.Fate, event: rjet.Event) -> None:
            await asyncio.sleep(0.001)
            tick()

        return io_handler

    def cpu_handler(fate: rjet.Fate, event: rjet.Event) -> None:
        end = time.perf_counter() + cpu_us / 1e6
        while time.perf_counter() < end:
            pass
        tick()

    return cpu_handler


def last_handled(directory: str, events: int) -> float:
    rows = [json.loads(p.read_text()) for p in Path(directory).glob("*.json")]
    assert sum(r["n"] for r in rows) == events, rows
    return float(max(r["last"] for r in rows))


def barrier(directory: str) -> Callable[[int], None]:
    """``on_start``: say ready, then wait for the go file, so every worker starts reading at once."""

    def wait(m: int) -> None:
        Path(directory, f"ready-{m}").touch()
        while not Path(directory, "go").exists():
            time.sleep(0.001)

    return wait


async def steady_state(server: EmbeddedServer, js: JetStreamContext, kind: str, layout: str, n: int) -> float:
    """Fill the stream, start the group, release every worker at once, time to the last event.

    Workers start one after the other (a second or more apiece on 2 cores); holding them at a
    barrier until all are up keeps start-up out of the figure. perf_counter is CLOCK_MONOTONIC,
    shared by processes.
    """
    count = CPU_EVENTS if kind == "cpu" else IO_EVENTS
    events = make_events(count, KEYS)
    partitions = 720 if layout == "partitioned" else None
    stream = await rjet.Stream.create(js, unique_name(f"par_{kind}"), partitions=partitions)
    for i in range(0, count, 10_000):
        await stream.insert_many(events[i : i + 10_000])
    with tempfile.TemporaryDirectory() as d:
        fn = timed(d, cpu_us=CPU_US, io=kind == "io")
        group = Parallel(
            unique_name("g"), n, fn, servers=server.url, stream=stream.name, namespace=unique_name("ns"),
            on_start=barrier(d),
        )  # fmt: skip
        task = asyncio.ensure_future(group.run_async(to_head=True))
        deadline = time.monotonic() + 60
        while len(list(Path(d).glob("ready-*"))) < n:  # noqa: ASYNC240 - a few files in a tmp dir
            assert time.monotonic() < deadline, group.statistics()
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        Path(d, "go").touch()  # noqa: ASYNC240
        summary = await task
        assert summary.handled == count
        return count / (last_handled(d, count) - t0)


def _workers(default: tuple[int, ...]) -> tuple[int, ...]:
    given = os.environ.get("RJET_BENCH_PARALLEL_NS", "")
    return tuple(int(n) for n in given.split(",")) if given else default


CASES = [("cpu", layout, n) for layout in ("read-all", "partitioned") for n in _workers((1, 2))] + [
    ("io", layout, n) for layout in ("read-all", "partitioned") for n in _workers((1, 8))
]


@pytest.mark.parametrize(("kind", "layout", "n"), CASES, ids=[f"{k}-{lay}-n{n}" for k, lay, n in CASES])
def test_parallel_scaling(
    benchmark: Any, bench_server: EmbeddedServer, js: JetStreamContext, arun: Arun[Any], kind: str, layout: str, n: int
) -> None:
    results: list[float] = []
    benchmark.group = f"parallel: {kind}"
    benchmark.pedantic(lambda: results.append(arun(steady_state(bench_server, js, kind, layout, n))), rounds=1)
    eps = results[0]
    SCALING[(kind, layout, n)] = eps
    base = SCALING.get((kind, layout, 1))
    speedup = eps / base if base and n > 1 else None
    benchmark.extra_info.update(
        events=CPU_EVENTS if kind == "cpu" else IO_EVENTS, workers=n, layout=layout, handler=kind,
        events_per_s=round(eps), speedup_vs_n1=None if speedup is None else round(speedup, 2),
        efficiency=None if speedup is None else round(speedup / n, 2),
    )  # fmt: skip
    if (kind, n) in (("cpu", 2), ("io", 8)) and speedup is not None:
        target(benchmark, f"N={n} >= {1.7 if kind == 'cpu' else 6}x N=1", speedup >= (1.7 if kind == "cpu" else 6))
