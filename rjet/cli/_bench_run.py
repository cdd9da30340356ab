"""The measurements behind ``rjet bench``: rjet's hot paths beside plain nats-py, same server, same
data; the rows of the README's Performance table (its ``--markdown`` output), measured as the pytest
benchmarks in benchmarks/ measure them (that directory is not installed: the command's own code is).

Each figure is the best of ``rounds`` runs, the paths it compares taken in turns (on a shared machine
the slow rounds measure the neighbours). The nats-py baselines use a connection of their own, since
rjet's reader installs its parser fast lane on the connection it reads from. The rows live in
``_bench_read`` (ordered read, traced read, shard scan), ``_bench_cursors`` and ``_bench_memory``;
the insert and concurrency rows here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import rjet
from rjet.cli._bench_cursors import cursor_figures
from rjet.cli._bench_figure import Bench, BenchError, Figure, best, best_both
from rjet.cli._bench_memory import large_events_figure, long_read_figure
from rjet.cli._bench_read import read_figures, shard_figures

__all__ = ["Figure", "Measured", "run_bench"]

LONG_READ_ROW = "worker memory, long read"


@dataclasses.dataclass(frozen=True, slots=True)
class Measured:
    """One run of ``rjet bench``: its figures, the rows it left out and why (``failed``: the rows whose
    measurement went wrong, each with what went wrong), the server it measured against, and how long
    it took."""

    figures: list[Figure]
    not_measured: list[str]
    failed: list[str]
    server_version: str
    seconds: float


async def run_bench(
    servers: list[str],
    options: dict[str, Any] | None = None,
    *,
    events: int = 100_000,
    rounds: int = 5,
    full: bool = False,
    progress: Callable[[str], None] = print,
) -> Measured:
    """Measure every path against ``servers`` (with ``full``, the long memory read too); ``progress``
    hears what runs now."""
    began = time.perf_counter()
    options = options or {}
    nc = await rjet.connect(servers, **options)
    base_nc = await rjet.connect(servers, **options)  # a plain nats-py connection: rjet never reads on it
    items = [(f"user-{i % 1000}", 1 + i % 5, b'{"amount": 1234, "note": "bench"}') for i in range(events)]
    b = Bench(servers, options, nc, nc.jetstream(timeout=30), base_nc, base_nc.jetstream(timeout=30), events,
              rounds, items, f"{int(time.time() * 1000) % 10**9}")  # fmt: skip
    not_measured: list[str] = []
    failed: list[str] = []
    try:
        progress("insert")
        figures = [await _insert(b)]
        source = rjet.Stream(b.js, b.made[0])  # the events the first round inserted
        progress("ordered read")
        figures += await read_figures(b, source)
        progress("shard scan")
        figures += await shard_figures(b, source)
        progress("cursors")
        figures += await cursor_figures(b, source)
        progress("concurrency")
        figures.append(await _concurrency(b, source))
        # The worker process connects with the servers and options as data: a TLS context is not.
        if "tls" in options:
            not_measured.append("worker memory: not over TLS (the worker process takes no TLS context)")
        else:
            # A read that went wrong in the worker costs its row, not the figures measured before it.
            progress("worker memory, large events")
            with _failing(failed):
                figures.append(await large_events_figure(b))
            if full:
                progress(f"worker memory, a long read of {10 * events:,} events")
                with _failing(failed):
                    figures.append(await long_read_figure(b))
        if full is False:
            not_measured.append(f"{LONG_READ_ROW}: with --full ({10 * events:,} events)")
        v = nc.connected_server_version
        version = f"{v.major}.{v.minor}.{v.patch}" + (f"-{v.dev}" if v.dev else "")
        return Measured(figures, not_measured, failed, version, time.perf_counter() - began)
    finally:
        for name in b.made:
            with contextlib.suppress(Exception):  # best-effort clean-up of what the bench created
                await b.base_js.delete_stream(name)
        await nc.close()
        await base_nc.close()


@contextlib.contextmanager
def _failing(failed: list[str]) -> Iterator[None]:
    try:
        yield
    except BenchError as e:
        failed.append(str(e))


async def _insert(b: Bench) -> Figure:
    async def rjet_insert() -> None:
        stream = await rjet.Stream.create(b.js, b.name("ins"))
        for i in range(0, b.events, 10_000):
            await stream.insert_many(b.items[i : i + 10_000])

    async def base_insert() -> None:
        name = b.name("ins")
        await b.base_js.add_stream(name=name, subjects=[f"{name}.>"])
        for fid, typ, data in b.items:
            await b.base_js.publish_async(
                f"{name}.events", data, headers={"reflex_type": str(typ), "rjet_foreign_id": fid}
            )
        await b.base_js.publish_async_completed()

    (ours, _), (theirs, _) = await best_both(b.rounds, rjet_insert, base_insert)
    return Figure("insert_many", "events/s", b.events / ours, "publish_async + completed, same headers",
                  b.events / theirs, ">= 2x", min_ratio=2)  # fmt: skip


async def _concurrency(b: Bench, source: rjet.Stream) -> Figure:
    """A 1 ms async handler with concurrency=256 against one at a time, over 1,000 foreign IDs."""

    async def run_sleeping(k: int, upto: int) -> None:
        async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
            if event.id_int <= upto:
                await asyncio.sleep(0.001)  # a 1 ms I/O wait

        consumer = rjet.Consumer("bench_k", fn, concurrency=k)
        with contextlib.suppress(rjet.HeadReached):
            await rjet.run(rjet.Spec(source.stream, rjet.MemCursorStore(), consumer, to_head=True))

    few = min(b.events, 500)  # one at a time does ~900 events/s: a few hundred tell its rate
    sequential = await best(1, lambda: run_sleeping(1, few)) - await best(1, lambda: run_sleeping(1, 0))
    concurrent = await best(b.rounds, lambda: run_sleeping(256, b.events))
    return Figure("1 ms async handler, concurrency=256", "events/s", b.events / concurrent, "concurrency=1",
                  few / sequential, ">= 100x", min_ratio=100)  # fmt: skip
