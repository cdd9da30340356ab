"""Key-ordered concurrency: many handler calls in flight, one at a time per foreign ID, exact progress.

Each test runs ``rjet.run`` against a real server; the handlers check the ordering rule themselves
(no two events of one foreign ID in flight at once; first handlings in stream order per key).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter

import pytest
from nats.js import JetStreamContext

import rjet
import rjet._keyed._run
from rjet._progress import decode_done
from rjet.testing import KeyOrder, wait_until


class Checked:
    """A handler that records per-key order and fails the test on two calls of one key at once."""

    def __init__(self, latency: float = 0.0, fail: dict[str, int] | None = None) -> None:
        self.order = KeyOrder()
        self.active: set[str] = set()
        self.overlaps: list[str] = []
        self.peak = 0
        self.calls: Counter[str] = Counter()
        self.latency = latency
        self.fail = dict(fail or {})  # event id -> failures left

    async def __call__(self, fate: rjet.Fate, event: rjet.Event) -> None:
        key = event.foreign_id
        if key in self.active:
            self.overlaps.append(f"{key}@{event.id}")
        self.active.add(key)
        self.peak = max(self.peak, len(self.active))
        try:
            self.calls[event.id] += 1
            if self.latency:
                await asyncio.sleep(random.random() * self.latency)
            if self.fail.get(event.id, 0) > 0:
                self.fail[event.id] -= 1
                raise RuntimeError(f"handler failed on {event.id}")
            self.order.record(event.id_int, key)
        finally:
            self.active.discard(key)


async def run_to_head(spec: rjet.Spec, stats: rjet.ConsumerStats | None = None) -> None:
    with pytest.raises(rjet.HeadReached):
        await rjet.run(spec, stats=stats)


@pytest.mark.parametrize("k", [1, 8, 256])
async def test_per_key_order_and_no_loss_with_random_latency(js: JetStreamContext, stream: rjet.Stream, k: int) -> None:
    n, keys = 20_000, 1000
    rng = random.Random(k)
    await stream.insert_many([(f"k{rng.randrange(keys)}", 1, b"x") for _ in range(n)])
    handler = Checked(latency=0.002 if k > 1 else 0.0)
    async with await rjet.JetStreamCursorStore.create(js, stream.name) as store:
        consumer = rjet.Consumer("c", handler, concurrency=k)
        await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True))
        assert await store.peek("c") == str(n)
        record = await store.peek_record("c")
        assert record is not None
        assert record.done is None
    handler.order.check(range(1, n + 1))
    assert handler.overlaps == []
    assert handler.order.duplicates == 0
    assert (handler.peak > 1) == (k > 1)


async def test_sync_handlers_run_in_k_threads(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i % 50}", 1, b"") for i in range(400)])
    lock = threading.Lock()
    active, peak, threads = 0, 0, set()
    order = KeyOrder()

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
            threads.add(threading.get_ident())
            order.record(event.id_int, event.foreign_id)
        threading.Event().wait(0.001)  # blocking I/O: releases the GIL
        with lock:
            active -= 1

    consumer = rjet.Consumer("c", fn, concurrency=8)
    await run_to_head(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True))
    order.check(range(1, 401))
    assert 1 < peak <= 8
    assert 1 < len(threads) <= 8
    assert threading.get_ident() not in threads


async def test_a_failing_key_waits_while_other_keys_flow_and_resumes_in_order(stream: rjet.Stream) -> None:
    events = [("bad" if i % 10 == 0 else f"k{i % 7}", 1, b"") for i in range(200)]
    await stream.insert_many(events)
    first_bad = next(i + 1 for i, e in enumerate(events) if e[0] == "bad")
    handler = Checked(fail={str(first_bad): 3})
    flowed_while_failing: list[int] = []
    inner = handler.__call__

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        if 0 < handler.calls[str(first_bad)] < 4 and event.foreign_id != "bad":
            flowed_while_failing.append(event.id_int)
        await inner(fate, event)

    stats = rjet.ConsumerStats("c")
    store = rjet.MemCursorStore()
    consumer = rjet.Consumer("c", fn, concurrency=4, max_waiting=1000)
    await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True), stats)
    handler.order.check(range(1, 201))
    assert handler.calls[str(first_bad)] == 4  # three failures, then the same event again
    assert stats.errors == 3
    # Every other key went on meanwhile: all of their events, in fact (the retries take 0.7 s).
    others = [i + 1 for i, e in enumerate(events) if e[0] != "bad"]
    assert len(flowed_while_failing) == len(others)
    assert store.cursors == {"c": "200"}


async def test_the_cursor_never_passes_a_failing_event(stream: rjet.Stream) -> None:
    await stream.insert_many([("bad", 1, b"")] + [(f"k{i}", 1, b"") for i in range(20)])
    handler = Checked(fail={"1": 10**6})
    store = rjet.MemCursorStore()
    stats = rjet.ConsumerStats("c")
    spec = rjet.Spec(stream.stream, store, rjet.Consumer("c", handler, concurrency=4))
    task = asyncio.create_task(rjet.run(spec, stats=stats))
    await wait_until(lambda: stats.handled == 20 and stats.errors >= 2, what="the other keys handled")
    assert store.cursors.get("c", "") == ""  # all done above it, event 1 not
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.cursors.get("c", "") == ""


async def test_on_error_stop_ends_the_run_after_the_calls_in_flight(js: JetStreamContext, stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i % 20}", 1, b"") for i in range(100)])
    handler = Checked(latency=0.002, fail={"30": 1})
    async with await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=3600) as store:
        spec = rjet.Spec(
            stream.stream, store, rjet.Consumer("c", handler, concurrency=8, on_error="stop"), to_head=True
        )
        with pytest.raises(RuntimeError, match="handler failed on 30") as e:
            await rjet.run(spec)
        assert any("failed on event 30" in note for note in e.value.__notes__)
        assert not handler.active  # every call in flight finished before run raised
        record = await store.peek_record("c")
        assert record is not None
        assert int(record.cursor) < 30
        done = decode_done(int(record.cursor), record.done or "")
        handled = {s for s, n in handler.calls.items() if n}
        assert 30 not in done
        assert all(str(s) in handled for s in done)
        before = Counter(handler.calls)
        await run_to_head(spec)
        again = {int(s) for s in handler.calls if handler.calls[s] > before.get(s, 0) and before.get(s, 0)}
        assert again.isdisjoint(done)  # exact progress: what was done above the cursor is not redone
        assert 30 in again
    handler.order.check(range(1, 101))


async def test_a_graceful_stop_records_exact_progress_and_a_restart_skips_it(
    js: JetStreamContext, stream: rjet.Stream
) -> None:
    await stream.insert_many([("slow", 1, b"")] + [(f"k{i % 30}", 1, b"") for i in range(300)])
    release = asyncio.Event()
    calls: Counter[int] = Counter()
    stop = asyncio.Event()

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        calls[event.id_int] += 1
        if event.foreign_id == "slow" and calls[event.id_int] == 1:
            await release.wait()  # holds the watermark at 0 while the other keys go on

    stats = rjet.ConsumerStats("c")
    async with await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=3600) as store:
        consumer = rjet.Consumer("c", fn, concurrency=16)
        task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer), stats=stats, stop=stop))
        await wait_until(lambda: stats.handled == 300, what="every other key handled")
        stop.set()
        await asyncio.sleep(0.05)
        assert not task.done()  # the call in flight is let finish
        release.set()
        with pytest.raises(rjet.Stopped):
            await task
        record = await store.peek_record("c")
        assert record is not None
        assert record.cursor == "301"
        # Stopped before event 1 finished this time: the 300 others are the exact progress.
        release.clear()
        calls.clear()
        await stream.insert_many([("slow", 1, b"")] + [(f"k{i % 30}", 1, b"") for i in range(300)])
        stop.clear()
        task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer), stats=stats, stop=stop))
        await wait_until(lambda: len(calls) == 301, what="the second batch handled but event 302")
        stop.set()
        await asyncio.sleep(0.05)
        task.cancel()  # a second signal forces: the call in flight is interrupted
        with pytest.raises(asyncio.CancelledError):
            await task
        record = await store.peek_record("c")
        assert record is not None
        assert record.cursor == "301"
        assert decode_done(301, record.done or "") == frozenset(range(303, 603))
        calls.clear()
        release.set()
        restarted = rjet.ConsumerStats("c")
        await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True), restarted)
        assert calls == {302: 1}  # only the event that was not done
        assert restarted.already_done == 300
        assert await store.peek("c") == "602"


async def test_dead_letters_let_a_key_move_on(js: JetStreamContext, stream: rjet.Stream) -> None:
    await stream.insert_many([("bad", 1, b""), ("bad", 1, b""), ("ok", 1, b"")])
    buried: list[rjet.DeadLetterRecord] = []

    async def sink(record: rjet.DeadLetterRecord) -> None:
        buried.append(record)

    handler = Checked(fail={"1": 100})
    dead_letter = rjet.DeadLetter(sink, attempts=3, backoff=0.01)
    consumer = rjet.Consumer("c", handler, concurrency=4, dead_letter=dead_letter)
    store = rjet.MemCursorStore()
    await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True))
    assert [r.event_id for r in buried] == ["1"]
    assert buried[0].attempts == 3
    assert handler.calls == {"1": 3, "2": 1, "3": 1}
    assert store.cursors == {"c": "3"}


async def test_fate_errors_are_retried_per_key(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i % 10}", 1, b"") for i in range(300)])
    handler = Checked()
    inner = handler.__call__

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        fate.tempt()
        await inner(fate, event)

    fate = rjet.RandomFate(0.1, seed=3)
    consumer = rjet.Consumer("c", fn, concurrency=8, fate=fate)
    stats = rjet.ConsumerStats("c")
    await run_to_head(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True), stats)
    handler.order.check(range(1, 301))
    assert stats.errors > 0
    assert handler.overlaps == []


async def test_a_hot_key_fills_the_queue_and_slows_reading_instead_of_growing_memory(stream: rjet.Stream) -> None:
    await stream.insert_many([("hot", 1, b"")] * 3000 + [("cold", 1, b"")])
    stats = rjet.ConsumerStats("c")
    handler = Checked(latency=0.0)
    consumer = rjet.Consumer("c", handler, concurrency=8, max_waiting=100)
    await run_to_head(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True), stats)
    handler.order.check(range(1, 3002))
    assert 50 <= stats.key_queue_max <= 100
    snap = stats.snapshot()
    assert snap.key_queue_max == stats.key_queue_max
    assert snap.in_flight == 0


async def test_a_hot_key_of_large_events_is_bounded_by_max_waiting_bytes(stream: rjet.Stream) -> None:
    """``max_waiting_bytes`` bounds what is read but not started, in bytes, where ``max_waiting``
    (in events) would let 2,000 events of 64 KB (128 MB) pile up behind a slow hot key: 1 MiB
    holds 16 of them, and the reader stops at the first past the bound."""
    body = b"x" * 65_536
    for _ in range(3):
        await stream.insert_many([("hot", 1, body)] * 100)
    await stream.insert("cold", 1, body)
    stats = rjet.ConsumerStats("c")
    handler = Checked(latency=0.004)
    consumer = rjet.Consumer("c", handler, concurrency=8, max_waiting=2000, max_waiting_bytes=1 << 20)
    await run_to_head(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True), stats)
    handler.order.check(range(1, 302))
    assert 8 <= stats.key_queue_max <= 17, stats.key_queue_max


async def test_a_full_done_set_pauses_reading_and_loses_nothing(
    js: JetStreamContext, stream: rjet.Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rjet._keyed._run, "PROGRESS_LIMIT", 40)
    # The stuck key's later events wait behind event 1 too: the done set above it has holes.
    await stream.insert_many([("stuck" if i % 2 == 0 else f"k{i}", 1, b"") for i in range(2001)])
    handler = Checked(fail={"1": 5})
    stats = rjet.ConsumerStats("c")
    dead_letter = rjet.DeadLetter(lambda r: asyncio.sleep(0), attempts=100, backoff=0.05, max_backoff=0.05)
    async with await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=0.01) as store:
        consumer = rjet.Consumer("c", handler, concurrency=32, dead_letter=dead_letter)
        await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True), stats)
        assert await store.peek("c") == "2001"
    handler.order.check(range(1, 2002))
    assert stats.progress_stalls > 0
    assert handler.calls["1"] == 6


async def test_batches_keep_per_key_order_and_their_bounds(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i % 13}", 1, b"") for i in range(1000)])
    batches: list[list[int]] = []
    order = KeyOrder()
    active: set[str] = set()
    overlaps = 0

    async def fn(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        nonlocal overlaps
        keys = {e.foreign_id for e in events}
        overlaps += len(keys & active)
        active.update(keys)
        await asyncio.sleep(0.001)
        batches.append([e.id_int for e in events])
        for e in events:
            order.record(e.id_int, e.foreign_id)
        active.difference_update(keys)

    consumer = rjet.Consumer("c", fn, concurrency=4, batch=rjet.Batch(max_len=50, max_wait=0.02))
    store = rjet.MemCursorStore()
    await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True))
    order.check(range(1, 1001))
    assert overlaps == 0
    assert all(1 <= len(b) <= 50 and b == sorted(b) for b in batches)
    assert max(len(b) for b in batches) == 50
    assert store.cursors == {"c": "1000"}


async def test_a_batch_waits_at_most_max_wait_for_more_events(stream: rjet.Stream) -> None:
    await stream.insert_many([("a", 1, b""), ("b", 1, b"")])
    batches: list[list[str]] = []

    def fn(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        batches.append([e.id for e in events])

    consumer = rjet.Consumer("c", fn, batch=rjet.Batch(max_len=100, max_wait=0.05))
    stats = rjet.ConsumerStats("c")
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer), stats=stats))
    await wait_until(lambda: batches == [["1", "2"]], what="the first batch, of both events")
    await stream.insert_many([("a", 1, b"")])
    await wait_until(lambda: len(batches) == 2, what="a second batch")
    assert batches[1] == ["3"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_failed_batch_is_retried_whole(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(10)])
    calls: list[list[str]] = []

    async def fn(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        calls.append([e.id for e in events])
        if len(calls) == 1:
            raise RuntimeError("bulk insert failed")

    consumer = rjet.Consumer("c", fn, batch=rjet.Batch(max_len=10, max_wait=1), on_error="retry")
    store = rjet.MemCursorStore()
    await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True))
    assert calls == [[str(i) for i in range(1, 11)]] * 2
    assert store.cursors == {"c": "10"}


async def test_a_stop_interrupts_a_key_waiting_to_retry(stream: rjet.Stream) -> None:
    await stream.insert_many([("bad", 1, b"")])
    handler = Checked(fail={"1": 10**6})
    stop = asyncio.Event()
    stats = rjet.ConsumerStats("c")
    consumer = rjet.Consumer("c", handler, concurrency=2)
    task = asyncio.create_task(
        rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer), stats=stats, stop=stop)
    )
    await wait_until(lambda: stats.errors >= 3, what="a few retries")
    stop.set()
    with pytest.raises(rjet.Stopped):
        await asyncio.wait_for(task, 2)  # the backoff (up to 10 s) does not hold the stop


def test_concurrency_options_are_checked() -> None:
    def fn(fate: rjet.Fate, event: rjet.Event) -> None: ...

    with pytest.raises(rjet.ConfigError, match="concurrency must be an int >= 1"):
        rjet.Consumer("c", fn, concurrency=0)
    with pytest.raises(rjet.ConfigError, match="on_error is 'stop' or 'retry'"):
        rjet.Consumer("c", fn, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(rjet.ConfigError, match="max_len must be an int >= 1"):
        rjet.Batch(max_len=0)
    assert rjet.Consumer("c", fn).sequential
    assert rjet.Consumer("c", fn, concurrency=2).on_error == "retry"
    assert not rjet.Consumer("c", fn, on_error="retry").sequential
