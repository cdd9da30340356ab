"""``rjet bench``'s cursor rows: buffered ``set_cursor``, a run to the head with JetStream cursors
against in-memory ones, and a flush of 100 dirty cursors against 100 ``kv.put``, as
``benchmarks/test_bench_cursors.py`` measures them."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import rjet
from rjet.cli._bench_figure import Bench, Figure, best, best_both

__all__ = ["cursor_figures"]

SET_CALLS = 200_000
FLUSH_KEYS = 100


async def cursor_figures(b: Bench, source: rjet.Stream) -> list[Figure]:
    # No background flush inside a timed part: the flushes measured are the ones asked for.
    async with await rjet.JetStreamCursorStore.create(b.js, f"bench_{b.tag}", flush_interval=3600) as store:
        figures = [await _set_cursor(b, store), await _run(b, source), await _flush(b, store)]
    await b.js.delete_key_value(store.bucket)  # after the store's last flush on closing
    return figures


async def _set_cursor(b: Bench, store: rjet.JetStreamCursorStore) -> Figure:
    mem = rjet.MemCursorStore()
    cursors = [str(i) for i in range(1, SET_CALLS + 1)]

    async def set_many(target: rjet.CursorStore) -> None:
        set_cursor = target.set_cursor
        for c in cursors:
            await set_cursor("c", c)

    (ours, _), (theirs, _) = await best_both(b.rounds, lambda: set_many(store), lambda: set_many(mem))
    return Figure("buffered set_cursor", "calls/s", SET_CALLS / ours, "MemCursorStore", SET_CALLS / theirs,
                  ">= 1M/s", min_value=1e6)  # fmt: skip


async def _run(b: Bench, source: rjet.Stream) -> Figure:
    """``rjet.run`` to the head, no-op handler, a new cursor each round; the JetStream store made
    before (untimed) at its default flush interval, as a consumer runs it."""

    async def run_store(target: rjet.CursorStore) -> None:
        consumer = rjet.Consumer(f"c{time.time_ns()}", lambda f, e: None)
        with contextlib.suppress(rjet.HeadReached):
            await rjet.run(rjet.Spec(source.stream, target, consumer, to_head=True))

    async with await rjet.JetStreamCursorStore.create(b.js, f"bench_run_{b.tag}") as store:
        mem = rjet.MemCursorStore()
        (ours, _), (theirs, _) = await best_both(b.rounds, lambda: run_store(store), lambda: run_store(mem))
    await b.js.delete_key_value(store.bucket)
    return Figure("run to head, JetStream cursors", "events/s", b.events / ours, "MemCursorStore",
                  b.events / theirs, ">= 0.9x (within 10%)", min_ratio=0.9)  # fmt: skip


async def _flush(b: Bench, store: rjet.JetStreamCursorStore) -> Figure:
    """A flush's latency and the replies it waited for, against ``kv.put`` of as many keys in a row on
    the baselines' connection (one request and one reply each)."""
    names = [f"flush_{i}" for i in range(FLUSH_KEYS)]
    kv: Any = await b.base_js.key_value(store.bucket)
    rounds = 10 * b.rounds  # a flush takes milliseconds: more rounds to find the quiet ones
    counter = iter(range(1, 10**9))
    replies: list[int] = []
    theirs = float("inf")

    async def puts() -> None:
        for i in range(FLUSH_KEYS):
            await kv.put(f"put_{i}", b"1")

    fastest = float("inf")
    for _ in range(rounds):  # in turns with the puts, as best_both takes its paths
        c = str(next(counter))
        for name in names:  # untimed: a flush is timed from cursors already set
            await store.set_cursor(name, c)
        before, t = b.nc.stats["in_msgs"], time.perf_counter()
        await store.flush()
        fastest = min(fastest, time.perf_counter() - t)
        replies.append(b.nc.stats["in_msgs"] - before)
        theirs = min(theirs, await best(1, puts))
    most = max(replies)
    return Figure(f"flush() of {FLUSH_KEYS} dirty cursors", "ms", fastest * 1e3,
                  f"{FLUSH_KEYS} sequential kv.put", theirs * 1e3, "one round trip per batch",
                  detail=f"{most} {'reply' if most == 1 else 'replies'} waited for",
                  condition=most == 1)  # fmt: skip
