"""``rjet bench``'s read rows: the ordered read beside nats-py's ``fetch(1000)`` and its ordered push
consumer, the same events with a trace context, and the shard scan (what a ``Parallel`` worker pays
for another shard's event). As ``benchmarks/test_bench_read.py`` and ``test_bench_shard.py`` measure
them; every path is read from the start to the head, the consumer made inside the timed part."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js import api

import rjet
from rjet.cli._bench_figure import Bench, BenchError, Figure, best_both
from rjet.parallel import shard_of

__all__ = ["TRACEPARENT", "read_figures", "shard_figures"]

# A sampled W3C context, as insert writes it under a span (the benchmark's: trace 0x1234, span 0x5678).
TRACEPARENT = "00-00000000000000000000000000001234-0000000000005678-01"


async def _traced_copy(b: Bench) -> rjet.Stream:
    """The events again, each message with a ``traceparent`` header before rjet's two, the layout
    ``insert`` writes under a span (written here by nats-py, so that no OpenTelemetry is needed)."""
    name = b.name("traced")
    stream = await rjet.Stream.create(b.js, name)
    for fid, typ, data in b.items:
        headers = {"traceparent": TRACEPARENT, "reflex_type": str(typ), "rjet_foreign_id": fid}
        await b.base_js.publish_async(f"{name}.events", data, headers=headers)
    await b.base_js.publish_async_completed()
    async with await stream.stream("") as client:
        first = await client.recv()
    if first.trace is None:
        raise BenchError("traced read", "the events written with a traceparent header carry no trace context")
    return stream


async def _read_all(stream: rjet.Stream, events: int, path: str) -> None:
    got = 0
    async with await stream.stream(to_head=True) as client:
        async for _ in client:
            got += 1
    if got != events:
        raise BenchError(path, f"read {got} events of {events}")


async def read_figures(b: Bench, source: rjet.Stream) -> list[Figure]:
    """The ordered read, its two nats-py baselines and the traced read, in turns each round."""
    traced = await _traced_copy(b)
    subject, n = f"{source.name}.>", b.events

    async def fetch() -> None:
        config = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0)
        sub = await b.base_js.pull_subscribe(subject, stream=source.name, config=config)
        got = 0
        while got < n:
            got += len(await sub.fetch(min(1000, n - got), timeout=10))
        await sub.unsubscribe()

    async def push() -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        got = 0

        async def cb(msg: Msg) -> None:
            nonlocal got
            got += 1
            if got == n:
                done.set_result(None)

        sub = await b.base_js.subscribe(subject, stream=source.name, cb=cb, ordered_consumer=True)
        await asyncio.wait_for(done, 60)
        await sub.unsubscribe()

    (ours, _), (fetched, _), (pushed, _), (traced_s, _) = await best_both(
        b.rounds,
        lambda: _read_all(source, n, "ordered read"),
        fetch,
        push,
        lambda: _read_all(traced, n, "traced read"),
    )
    rate, fetch_rate, traced_rate = n / ours, n / fetched, n / traced_s
    return [
        Figure("ordered read", "events/s", rate, "fetch(1000), AckPolicy NONE", fetch_rate,
               ">= 5x (aim 8x)", min_ratio=5),
        Figure("ordered read, traced events, no tracer", "events/s", traced_rate,
               "the same events untraced", rate, "-", detail=f"{traced_rate / fetch_rate:.1f}x fetch(1000)"),
        Figure("ordered read vs ordered push", "events/s", rate,
               "ordered push consumer with callback", n / pushed, "-"),
    ]  # fmt: skip


async def shard_figures(b: Bench, source: rjet.Stream) -> list[Figure]:
    """A worker's own filter for a shard that owns none of the events (every event is passed over),
    in turns with a run that decodes and handles every event."""

    async def run_with(key_filter: Callable[[str], bool] | None) -> None:
        consumer = rjet.Consumer("bench", lambda f, e: None, key_filter=key_filter)
        with contextlib.suppress(rjet.HeadReached):
            await rjet.run(rjet.Spec(source.stream, rjet.MemCursorStore(), consumer, to_head=True))

    fids = {fid for fid, _, _ in b.items}
    shards = 4 * len(fids)
    empty = min(set(range(shards)) - {shard_of(fid, shards) for fid in fids})
    (skip, skip_cpu), (handle, handle_cpu) = await best_both(
        b.rounds, lambda: run_with(rjet.ShardFilter(empty, shards)), lambda: run_with(None)
    )
    us = 1e6 / b.events
    return [
        Figure("shard scan: pass over an event, worker CPU", "us/event", skip_cpu * us,
               "handle an event, in turns with it", handle_cpu * us, "<= 4 us", max_value=4),
        Figure("shard scan: pass over an event, wall", "us/event", skip * us, "handle an event", handle * us, "-",
               detail="includes the co-located server's work"),
    ]  # fmt: skip
