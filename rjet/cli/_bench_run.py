"""The measurements behind ``rjet bench``: rjet's hot paths beside plain nats-py, same server, same data.

Each figure is the best of ``rounds`` runs (on a shared machine the slow rounds measure the
neighbours). The nats-py baselines use a connection of their own, since rjet's reader installs its
parser fast lane on the connection it reads from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js import api

import rjet
from rjet.parallel import shard_of

__all__ = ["Figure", "run_bench"]


@dataclasses.dataclass(frozen=True, slots=True)
class Figure:
    """One comparison: rjet's figure, the baseline's, their ratio, and the target from the issue.

    ``target`` says the target in words; the bounds below are what :attr:`meets` checks (a figure
    with none has no target: ``meets`` is None).
    """

    path: str
    unit: str
    rjet: float
    baseline_name: str
    baseline: float | None
    target: str
    min_ratio: float | None = None
    max_ratio: float | None = None
    min_value: float | None = None
    max_value: float | None = None

    @property
    def ratio(self) -> float | None:
        """rjet / baseline (for costs, baseline / rjet is not used: costs are compared as stated)."""
        return self.rjet / self.baseline if self.baseline else None

    @property
    def meets(self) -> bool | None:
        """Whether the figure meets its target; None when it has none (or its ratio is unknown)."""
        bounds = (self.min_ratio, self.max_ratio, self.min_value, self.max_value)
        if all(b is None for b in bounds):
            return None
        ratio = self.ratio
        if ratio is None and (self.min_ratio is not None or self.max_ratio is not None):
            return None
        checks = [
            self.min_ratio is None or (ratio is not None and ratio >= self.min_ratio),
            self.max_ratio is None or (ratio is not None and ratio <= self.max_ratio),
            self.min_value is None or self.rjet >= self.min_value,
            self.max_value is None or self.rjet <= self.max_value,
        ]
        return all(checks)


async def _best(rounds: int, fn: Callable[[], Awaitable[Any]]) -> float:
    [(wall, _)] = await _best_both(rounds, fn)
    return wall


async def _best_both(rounds: int, *fns: Callable[[], Awaitable[Any]]) -> list[tuple[float, float]]:
    """(best wall seconds, best CPU seconds of this process) of each of ``fns`` over ``rounds`` runs,
    taken in turns so that both see the same neighbours on a shared machine."""
    best = [(float("inf"), float("inf")) for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            await fn()
            best[i] = (min(best[i][0], time.perf_counter() - t), min(best[i][1], time.process_time() - c))
    return best


async def run_bench(
    servers: list[str],
    options: dict[str, Any] | None = None,
    *,
    events: int = 100_000,
    rounds: int = 5,
    progress: Callable[[str], None] = print,
) -> list[Figure]:
    """Measure every path against ``servers``; ``progress`` hears what runs now."""
    options = options or {}
    nc = await rjet.connect(servers, **options)
    base_nc = await rjet.connect(servers, **options)  # a plain nats-py connection: rjet never reads on it
    js, base_js = nc.jetstream(timeout=30), base_nc.jetstream(timeout=30)
    tag = f"{int(time.time() * 1000) % 10**9}"
    names: list[str] = []
    try:
        items = [(f"user-{i % 1000}", 1 + i % 5, b'{"amount": 1234, "note": "bench"}') for i in range(events)]
        figures = []

        progress("insert")
        counter = iter(range(10**6))

        async def rjet_insert() -> None:
            name = f"rjet_bench_ins_{tag}_{next(counter)}"
            names.append(name)
            stream = await rjet.Stream.create(js, name)
            for i in range(0, events, 10_000):
                await stream.insert_many(items[i : i + 10_000])

        async def base_insert() -> None:
            name = f"rjet_bench_ins_{tag}_{next(counter)}"
            names.append(name)
            await base_js.add_stream(name=name, subjects=[f"{name}.>"])
            for fid, typ, data in items:
                await base_js.publish_async(
                    f"{name}.events", data, headers={"reflex_type": str(typ), "rjet_foreign_id": fid}
                )
            await base_js.publish_async_completed()

        ours, theirs = await _best(rounds, rjet_insert), await _best(rounds, base_insert)
        figures.append(
            Figure("insert_many", "events/s", events / ours, "publish_async", events / theirs, ">= 2x", min_ratio=2)
        )

        progress("read")
        source = rjet.Stream(js, names[0])

        async def rjet_read() -> None:
            async with await source.stream(to_head=True) as client:
                async for _ in client:
                    pass

        async def base_read() -> None:
            sub = await base_js.pull_subscribe(
                f"{names[0]}.>", stream=names[0], config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE)
            )
            got = 0
            while got < events:
                got += len(await sub.fetch(1000, timeout=10))
            await sub.unsubscribe()

        ours, theirs = await _best(rounds, rjet_read), await _best(rounds, base_read)
        figures.append(
            Figure("ordered read", "events/s", events / ours, "fetch(1000)", events / theirs, ">= 5x", min_ratio=5)
        )

        progress("shard scan")

        async def run_with(key_filter: Callable[[str], bool] | None) -> None:
            consumer = rjet.Consumer("bench", lambda f, e: None, key_filter=key_filter)
            with contextlib.suppress(rjet.HeadReached):
                await rjet.run(rjet.Spec(source.stream, rjet.MemCursorStore(), consumer, to_head=True))

        # A worker's own filter for a shard that owns none of the events: every event is passed over.
        fids = {fid for fid, _, _ in items}
        empty = min(set(range(4 * len(fids))) - {shard_of(fid, 4 * len(fids)) for fid in fids})
        (skip, skip_cpu), (handle, handle_cpu) = await _best_both(
            rounds, lambda: run_with(rjet.ShardFilter(empty, 4 * len(fids))), lambda: run_with(None)
        )
        figures.append(
            Figure("shard scan: pass over an event, worker CPU", "us/event", skip_cpu / events * 1e6,
                   "handle an event", handle_cpu / events * 1e6, "<= 4 us", max_value=4)
        )  # fmt: skip
        figures.append(
            Figure("shard scan: pass over an event, wall", "us/event", skip / events * 1e6, "handle an event",
                   handle / events * 1e6, "- (includes the server's work)")
        )  # fmt: skip

        progress("cursors")
        async with await rjet.JetStreamCursorStore.create(js, f"bench_{tag}") as store:
            await store.get_cursor("c")
            mem = rjet.MemCursorStore()

            async def set_many(target: rjet.CursorStore) -> None:
                for i in range(200_000):
                    await target.set_cursor("c", str(i))

            ours, theirs = await _best(rounds, lambda: set_many(store)), await _best(rounds, lambda: set_many(mem))
            figures.append(
                Figure("set_cursor (buffered)", "calls/s", 200_000 / ours, "MemCursorStore", 200_000 / theirs,
                       ">= 1M/s", min_value=1e6)
            )  # fmt: skip

            async def run_store(target: rjet.CursorStore) -> None:
                consumer = rjet.Consumer(f"c{time.time_ns()}", lambda f, e: None)
                with contextlib.suppress(rjet.HeadReached):
                    await rjet.run(rjet.Spec(source.stream, target, consumer, to_head=True))

            ours = await _best(rounds, lambda: run_store(store))
            theirs = await _best(rounds, lambda: run_store(rjet.MemCursorStore()))
            figures.append(
                Figure("run with JetStream cursors", "events/s", events / ours, "run with MemCursorStore",
                       events / theirs, ">= 0.9x", min_ratio=0.9)
            )  # fmt: skip
        await js.delete_key_value(store.bucket)  # after the store's last flush on closing

        progress("concurrency")
        figures.append(await _concurrency(source, events, rounds))
        return figures
    finally:
        for name in names:
            with contextlib.suppress(Exception):  # best-effort clean-up of what the bench created
                await base_js.delete_stream(name)
        await nc.close()
        await base_nc.close()


async def _concurrency(source: rjet.Stream, events: int, rounds: int) -> Figure:
    """A 1 ms async handler with concurrency=256 against one at a time, over 1,000 foreign IDs."""

    async def run_sleeping(k: int, upto: int) -> None:
        async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
            if event.id_int <= upto:
                await asyncio.sleep(0.001)  # a 1 ms I/O wait

        consumer = rjet.Consumer("bench_k", fn, concurrency=k)
        with contextlib.suppress(rjet.HeadReached):
            await rjet.run(rjet.Spec(source.stream, rjet.MemCursorStore(), consumer, to_head=True))

    few = min(events, 500)  # one at a time does ~900 events/s: a few hundred tell its rate
    sequential = await _best(1, lambda: run_sleeping(1, few)) - await _best(1, lambda: run_sleeping(1, 0))
    concurrent = await _best(rounds, lambda: run_sleeping(256, events))
    return Figure(
        "1 ms async handler, concurrency=256", "events/s", events / concurrent, "concurrency=1", few / sequential,
        ">= 100x", min_ratio=100,
    )  # fmt: skip


if __name__ == "__main__":  # pragma: no cover - manual use
    from rjet.server import EmbeddedServer

    with EmbeddedServer() as srv:
        for f in asyncio.run(run_bench([srv.url], events=20_000, rounds=1)):
            print(f, f.ratio)
