"""Cursor stores: buffered ``set_cursor``, ``flush()``, and what the store costs a consumer.

- ``set_cursor``: calls/s of ``await store.set_cursor(name, id)`` in a loop (what ``run`` does per
  event), for :class:`rjet.MemCursorStore` and :class:`rjet.JetStreamCursorStore` (its background
  flush pushed out of the timed part).
- ``flush``: latency of ``JetStreamCursorStore.flush()`` with 1 and 100 dirty cursors (steady
  state: compare-and-swap updates), with the messages it puts on the wire and the replies it waits
  for; baselines: one nats-py ``kv.put`` (a single round trip) and 100 sequential ``kv.put``.
- ``run``: ``rjet.run`` to the head of the pre-filled stream, no-op handler, with each store
  (JetStreamCursorStore at its default 1 s flush interval; a new cursor name per round).

Targets (issue, 4): ``set_cursor`` >= 1M calls/s; ``flush()`` one round trip per dirty batch (judged
here as: flushing 100 cursors gets one reply from the server, so the client waits once; its latency
is reported against 1 and 100 ``kv.put``: the server's work for 100 compare-and-swap writes still
takes time within that one round trip); a consumer with the JetStream store within 10% of the same
consumer with MemCursorStore.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

import rjet

from ._support import ROUNDS, Arun, best, ratio, record, target, unique_name

SET_CALLS = 200_000
FLUSH_ROUNDS = 50


@pytest.fixture(scope="module")
def store(js: JetStreamContext, arun: Arun[Any]) -> Iterator[rjet.JetStreamCursorStore]:
    """A JetStream cursor store whose background flush never fires during a benchmark."""
    s: rjet.JetStreamCursorStore = arun(rjet.JetStreamCursorStore.create(js, "bench", flush_interval=3600))
    yield s
    arun(s.close())


@pytest.fixture(scope="module")
def kv(store: rjet.JetStreamCursorStore, baseline_js: JetStreamContext, arun: Arun[Any]) -> KeyValue:
    """The store's bucket, through the baselines' own connection."""
    bucket: KeyValue = arun(baseline_js.key_value(store.bucket))
    return bucket


def _set_loop(benchmark: Any, arun: Arun[Any], cursor_store: rjet.CursorStore) -> None:
    cursors = [str(i) for i in range(1, SET_CALLS + 1)]

    async def set_all() -> None:
        set_cursor = cursor_store.set_cursor
        for c in cursors:
            await set_cursor("bench_set", c)

    benchmark.pedantic(lambda: arun(set_all()), rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="cursors: set_cursor")
def test_set_cursor_mem(benchmark: Any, arun: Arun[Any], figures: dict[str, float]) -> None:
    _set_loop(benchmark, arun, rjet.MemCursorStore())
    record(benchmark, events=SET_CALLS, figures=figures, key="set_cursor_mem", unit="calls")


@pytest.mark.benchmark(group="cursors: set_cursor")
def test_set_cursor_jetstream(
    benchmark: Any, arun: Arun[Any], store: rjet.JetStreamCursorStore, figures: dict[str, float]
) -> None:
    _set_loop(benchmark, arun, store)
    rate = record(benchmark, events=SET_CALLS, figures=figures, key="set_cursor_js", unit="calls")
    ratio(benchmark, figures, rate, "set_cursor_mem", "mem")
    target(benchmark, ">= 1M buffered set_cursor calls/s", rate >= 1e6 if rate else None)


def _latency(benchmark: Any) -> float | None:
    seconds = best(benchmark)
    if seconds is not None:
        benchmark.extra_info["latency_us"] = round(seconds * 1e6, 1)
    return seconds


@pytest.mark.benchmark(group="cursors: flush")
def test_baseline_natspy_kv_put(benchmark: Any, kv: KeyValue, arun: Arun[Any], figures: dict[str, float]) -> None:
    """One KV write: one request, one acknowledgement (the round trip a flush is measured against)."""
    benchmark.pedantic(lambda: arun(kv.put("bench_put", b"1")), rounds=FLUSH_ROUNDS, warmup_rounds=2)
    seconds = _latency(benchmark)
    if seconds:
        figures["kv_put_s"] = seconds


@pytest.mark.benchmark(group="cursors: flush")
def test_baseline_natspy_kv_put_100_sequential(
    benchmark: Any, kv: KeyValue, arun: Arun[Any], figures: dict[str, float]
) -> None:
    async def put_all() -> None:
        for i in range(100):
            await kv.put(f"bench_put_{i}", b"1")

    benchmark.pedantic(lambda: arun(put_all()), rounds=10, warmup_rounds=1)
    seconds = _latency(benchmark)
    if seconds:
        figures["kv_put_100_s"] = seconds
    benchmark.extra_info["keys"] = 100


def _flush(benchmark: Any, store: rjet.JetStreamCursorStore, nc: Client, arun: Arun[Any], keys: int) -> float | None:
    names = [f"bench_flush_{keys}_{i}" for i in range(keys)]
    counter = iter(range(1, 1_000_000))
    sent: list[int] = []
    replies: list[int] = []

    async def dirty() -> None:
        c = str(next(counter))
        for name in names:
            await store.set_cursor(name, c)

    def setup() -> None:
        arun(dirty())
        sent.append(nc.stats["out_msgs"])
        replies.append(nc.stats["in_msgs"])

    def teardown() -> None:
        sent[-1] = nc.stats["out_msgs"] - sent[-1]
        replies[-1] = nc.stats["in_msgs"] - replies[-1]

    benchmark.pedantic(
        lambda: arun(store.flush()), setup=setup, teardown=teardown, rounds=FLUSH_ROUNDS, warmup_rounds=2
    )
    seconds = _latency(benchmark)
    benchmark.extra_info["keys"] = keys
    benchmark.extra_info["messages_sent_per_flush"] = int(statistics.median(sent))
    benchmark.extra_info["replies_per_flush"] = max(replies, default=None)
    return seconds


@pytest.mark.benchmark(group="cursors: flush")
def test_flush_1_key(
    benchmark: Any, store: rjet.JetStreamCursorStore, nc: Client, arun: Arun[Any], figures: dict[str, float]
) -> None:
    seconds = _flush(benchmark, store, nc, arun, 1)
    if seconds:
        figures["flush_1_s"] = seconds


@pytest.mark.benchmark(group="cursors: flush")
def test_flush_100_keys(
    benchmark: Any, store: rjet.JetStreamCursorStore, nc: Client, arun: Arun[Any], figures: dict[str, float]
) -> None:
    seconds = _flush(benchmark, store, nc, arun, 100)
    put, one = figures.get("kv_put_s"), figures.get("flush_1_s")
    met = None
    if seconds and one:
        benchmark.extra_info["vs_flush_1_key"] = round(seconds / one, 2)
    if seconds and put:
        benchmark.extra_info["latency_of_kv_puts"] = round(seconds / put, 2)
    if hundred := figures.get("kv_put_100_s"):
        benchmark.extra_info["vs_100_kv_puts"] = round(hundred / seconds, 2) if seconds else None
    if benchmark.extra_info["replies_per_flush"] is not None:
        met = benchmark.extra_info["replies_per_flush"] == 1
    target(benchmark, "flush of 100 dirty cursors is one round trip (one reply waited for)", met)


def _run(benchmark: Any, filled: rjet.Stream, arun: Arun[Any], make_store: Any) -> tuple[int, rjet.CursorStore]:
    state: dict[str, Any] = {}

    def setup() -> None:
        state["name"] = unique_name("bench_run")
        state["store"] = make_store()

    async def consume() -> None:
        consumer = rjet.Consumer(state["name"], lambda fate, event: None)
        spec = rjet.Spec(filled.stream, state["store"], consumer, to_head=True)
        with contextlib.suppress(rjet.HeadReached):
            await rjet.run(spec)

    benchmark.pedantic(lambda: arun(consume()), setup=setup, rounds=ROUNDS, warmup_rounds=1)
    n = int(arun(filled.info()).state.messages)
    s = state["store"]
    stored = (
        arun(s.peek(state["name"])) if isinstance(s, rjet.JetStreamCursorStore) else arun(s.get_cursor(state["name"]))
    )
    assert stored == str(n)
    return n, s


@pytest.mark.benchmark(group="cursors: run")
def test_run_mem_store(benchmark: Any, filled: rjet.Stream, arun: Arun[Any], figures: dict[str, float]) -> None:
    n, _ = _run(benchmark, filled, arun, rjet.MemCursorStore)
    record(benchmark, events=n, figures=figures, key="run_mem")


@pytest.mark.benchmark(group="cursors: run")
def test_run_jetstream_store(
    benchmark: Any, filled: rjet.Stream, js: JetStreamContext, arun: Arun[Any], figures: dict[str, float]
) -> None:
    stores: list[rjet.JetStreamCursorStore] = []

    def make() -> rjet.JetStreamCursorStore:
        s: rjet.JetStreamCursorStore = arun(rjet.JetStreamCursorStore.create(js, "bench_run"))
        stores.append(s)
        return s

    try:
        n, _ = _run(benchmark, filled, arun, make)
    finally:
        for s in stores:
            arun(s.close())
    rate = record(benchmark, events=n, figures=figures, key="run_js", flush_interval=stores[0].flush_interval)
    benchmark.extra_info["flushes_last_round"] = stores[-1].flushes
    r = ratio(benchmark, figures, rate, "run_mem", "mem_store")
    target(benchmark, "throughput with JetStreamCursorStore >= 90% of MemCursorStore", None if r is None else r >= 0.9)
