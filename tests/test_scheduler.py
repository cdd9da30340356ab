"""The key-ordered scheduler's control flow (issue #24): a stop that stops, retries that hold no slot,
batches that block only their keys, a bound that never deadlocks.

Every test runs ``rjet.run`` against a real server and counts exactly: calls started after a stop,
healthy calls in flight beside failing keys, batches in flight, events of other keys handled.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.js import JetStreamContext

import rjet
import rjet._keyed._run
from rjet._progress import decode_done
from rjet.parallel import Parallel
from rjet.server import EmbeddedServer
from rjet.testing import KeyOrder, wait_until

# ------------------------------------------------------------------ 1. a stop ends a to_head run


async def test_a_stop_ends_a_to_head_run_while_it_drains(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(500)])
    stop = asyncio.Event()
    started = 0
    after_stop = 0

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        nonlocal started, after_stop
        started += 1
        after_stop += stop.is_set()
        await asyncio.sleep(0.02)

    stats = rjet.ConsumerStats("c")
    consumer = rjet.Consumer("c", fn, concurrency=4)
    spec = rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True)
    task = asyncio.create_task(rjet.run(spec, stats=stats, stop=stop))
    # Every event is read (the reader is past the head, draining) long before 12 calls have started.
    await wait_until(lambda: started >= 12, what="a few calls")
    stop.set()
    with pytest.raises(rjet.Stopped):
        await asyncio.wait_for(task, 5)
    assert after_stop == 0
    assert started < 500
    assert stats.in_flight == 0


async def test_a_stop_ends_a_to_head_run_whose_key_is_retrying(stream: rjet.Stream) -> None:
    await stream.insert_many([("bad", 1, b"")] + [(f"k{i}", 1, b"") for i in range(50)])
    stop = asyncio.Event()
    calls: Counter[int] = Counter()

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        calls[event.id_int] += 1
        if event.foreign_id == "bad":
            raise RuntimeError("always")

    stats = rjet.ConsumerStats("c")
    store = rjet.MemCursorStore()
    spec = rjet.Spec(stream.stream, store, rjet.Consumer("c", fn, concurrency=4), to_head=True)
    task = asyncio.create_task(rjet.run(spec, stats=stats, stop=stop))
    await wait_until(lambda: stats.handled == 50 and stats.errors >= 1, what="the healthy keys handled")
    stop.set()
    with pytest.raises(rjet.Stopped):
        await asyncio.wait_for(task, 5)
    assert store.cursors.get("c", "") == ""  # never past the failing event


def _appender(directory: Path) -> Callable[[rjet.Fate, rjet.Event], None]:
    """A sync handler taking 20 ms that appends ``<seq>`` to its process's file."""

    def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        time.sleep(0.02)
        with open(directory / f"calls-{os.getpid()}.log", "a") as f:
            f.write(f"{event.id}\n")

    return handle


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_parallel_group_run_to_head_stops_on_request(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    # What `rjet worker --to-head` and SIGTERM do: each shard has ~1,000 events read and queued
    # (5 s of work at K=4) when the stop comes; it must stop well within stop_timeout, not drain.
    await stream.insert_many([(f"k{i % 200}", 1, b"") for i in range(2000)])
    group = Parallel(
        name, 2, _appender(tmp_path), servers=server.url, stream=name, namespace=name, concurrency=4,
        stop_timeout=4.0, flush_interval=0.2,
    )  # fmt: skip
    task = asyncio.create_task(group.run_async(to_head=True))

    def calls() -> int:
        return sum(len(p.read_text().splitlines()) for p in tmp_path.glob("calls-*.log"))

    await wait_until(lambda: calls() >= 40, 30, what="both shards handling")
    t0 = time.monotonic()
    group.stop()
    summary = await asyncio.wait_for(task, 30)
    assert time.monotonic() - t0 < 3.0
    assert [s.state for s in summary.shards] == ["stopped", "stopped"], summary
    assert calls() < 1000


def _stuck_at(seq: int, directory: Path) -> Callable[[rjet.Fate, rjet.Event], None]:
    """A sync handler that appends ``<seq>`` to its process's file, and hangs at event ``seq``."""

    def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        with open(directory / f"calls-{os.getpid()}.log", "a") as f:
            f.write(f"{event.id}\n")
        if event.id_int == seq:
            time.sleep(120)

    return handle


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_handler_that_outlives_stop_timeout_is_killed_and_its_event_handled_again(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    """A stop while one handler hangs: after ``stop_timeout`` (1 s here) the group kills the workers
    still running and raises Stopped naming the timeout, well before the handler would have ended;
    no worker is left; the next run handles the killed call's event again (its cursor was never
    moved past it) and loses nothing."""
    await stream.insert_many([(f"k{i % 20}", 1, b"") for i in range(200)])

    def group(fn: Callable[[rjet.Fate, rjet.Event], None]) -> Parallel:
        return Parallel(
            name, 2, fn, servers=server.url, stream=name, namespace=name, stop_timeout=1.0, flush_interval=0.1
        )

    def calls(directory: Path = tmp_path) -> list[int]:
        return [int(line) for p in directory.glob("calls-*.log") for line in p.read_text().split()]

    first = group(_stuck_at(50, tmp_path))
    task = asyncio.create_task(first.run_async())
    await wait_until(lambda: 50 in calls(), 30, what="the handler to hang at event 50")
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    first.stop()
    with pytest.raises(rjet.Stopped, match=r"not stopped within 1(\.0)?s"):
        await asyncio.wait_for(task, 20)
    took = time.monotonic() - t0
    assert 1.0 <= took < 5.0, took
    for pid in await asyncio.to_thread(lambda: {int(p.name[6:-4]) for p in tmp_path.glob("calls-*.log")}):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    again = tmp_path / "again"
    again.mkdir()
    summary = await group(_stuck_at(0, again)).run_async(to_head=True)
    assert 50 in calls(again), "the killed call's event was not handled again"
    assert set(calls()) | set(calls(again)) == set(range(1, 201))
    assert [s.state for s in summary.shards] == ["done", "done"]


# ------------------------------------------------------------------ 2. no call starts after a stop


@pytest.mark.parametrize(("mode", "k"), [("async", 8), ("async", 64), ("async", 256), ("threads", 64), ("batches", 32)])
async def test_no_call_starts_after_a_stop(stream: rjet.Stream, mode: str, k: int) -> None:
    n = 20_000
    rng = random.Random(k)
    await stream.insert_many([(f"k{rng.randrange(1000)}", 1, b"") for _ in range(n)])
    stop = asyncio.Event()
    lock = threading.Lock()
    started = 0
    after_stop = 0
    order = KeyOrder()

    def begin(events: list[rjet.Event]) -> None:
        nonlocal started, after_stop
        with lock:
            started += 1
            after_stop += stop.is_set()
            for e in events:
                order.record(e.id_int, e.foreign_id)

    async def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        begin([event])
        await asyncio.sleep(random.random() * 0.002)

    def handle_sync(fate: rjet.Fate, event: rjet.Event) -> None:
        begin([event])
        threading.Event().wait(random.random() * 0.002)

    async def handle_batch(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        begin(events)
        await asyncio.sleep(random.random() * 0.002)

    if mode == "async":
        consumer = rjet.Consumer("c", handle, concurrency=k)
    elif mode == "threads":
        consumer = rjet.Consumer("c", handle_sync, concurrency=k)
    else:
        consumer = rjet.Consumer("c", handle_batch, concurrency=k, batch=rjet.Batch(max_len=5, max_wait=0.01))
    stats = rjet.ConsumerStats("c")
    store = rjet.MemCursorStore()
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer), stats=stats, stop=stop))
    await wait_until(lambda: started >= 300, what="calls under way")
    stop.set()
    with pytest.raises(rjet.Stopped):
        await asyncio.wait_for(task, 10)
    assert after_stop == 0
    assert stats.in_flight == 0
    assert order.duplicates == 0
    assert order.violations == []


@pytest.mark.parametrize("k", [64, 256])
async def test_no_call_starts_after_the_claim_is_lost(js: JetStreamContext, stream: rjet.Stream, k: int) -> None:
    n = 20_000
    rng = random.Random(5)
    await stream.insert_many([(f"k{rng.randrange(1000)}", 1, b"") for _ in range(n)])
    async with (
        await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=0.005) as mine,
        await rjet.JetStreamCursorStore.create(js, stream.name) as theirs,
    ):
        started = 0
        after_loss = 0

        async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
            nonlocal started, after_loss
            started += 1
            after_loss += mine._lost.is_set()
            await asyncio.sleep(random.random() * 0.002)

        consumer = rjet.Consumer("c", fn, concurrency=k)
        task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, mine, consumer)))
        await wait_until(lambda: started >= 300, what="calls under way")
        await theirs.claim("c")  # another runner takes the cursor: this one finds out at its next write
        with pytest.raises(rjet.CursorConflict):
            await asyncio.wait_for(task, 10)
        assert mine._lost.is_set()
        assert after_loss == 0


# ------------------------------------------------------------------ 3. a retry holds no slot


async def _healthy_flow(js: JetStreamContext, name: str, k: int, failing: int) -> tuple[float, int]:
    """Seconds until 400 events of 200 healthy keys are handled beside ``failing`` always-failing keys
    (their events first), and the most healthy calls in flight at once."""
    stream = await rjet.Stream.create(js, f"{name}_{failing}")
    await stream.insert_many(
        [(f"bad{i}", 1, b"") for i in range(failing)] + [(f"k{i % 200}", 1, b"") for i in range(400)]
    )
    healthy = active = peak = 0

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        nonlocal healthy, active, peak
        if event.foreign_id.startswith("bad"):
            raise RuntimeError("always")
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.01)
        finally:
            active -= 1
        healthy += 1

    stop = asyncio.Event()
    store = rjet.MemCursorStore()
    consumer = rjet.Consumer("c", fn, concurrency=k)
    t0 = time.perf_counter()
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer), stop=stop))
    try:
        await wait_until(lambda: healthy == 400, timeout=15, what=f"the healthy keys' events beside {failing} failing")
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        with pytest.raises(rjet.Stopped):
            await asyncio.wait_for(task, 5)
    expected = "" if failing else "400"  # the cursor never passes a failing event
    assert store.cursors.get("c", "") == expected
    return elapsed, peak


async def test_failing_keys_hold_no_slot(js: JetStreamContext, name: str) -> None:
    k = 8
    base, base_peak = await _healthy_flow(js, name, k, 0)
    assert base_peak == k
    for failing in (2, 6, k + 2):
        elapsed, peak = await _healthy_flow(js, name, k, failing)
        assert peak == k, f"{failing} failing keys: at most {peak} healthy calls in flight"
        assert elapsed < 2 * base + 0.5, f"{failing} failing keys: {elapsed:.2f}s, {base:.2f}s with none"


async def test_a_retry_waits_its_due_time_in_no_worker(stream: rjet.Stream) -> None:
    # One worker and a failing key: with the retry parked, the worker goes on with the other keys.
    await stream.insert_many([("bad", 1, b"")] + [(f"k{i}", 1, b"") for i in range(100)])
    calls: Counter[str] = Counter()

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        calls[event.foreign_id] += 1
        if event.foreign_id == "bad" and calls["bad"] < 3:
            raise RuntimeError("twice")

    stats = rjet.ConsumerStats("c")
    store = rjet.MemCursorStore()
    consumer = rjet.Consumer("c", fn, on_error="retry", retry=rjet.RetryPolicy(backoff=0.3, max_backoff=0.3))
    t0 = time.perf_counter()
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True), stats=stats))
    await wait_until(lambda: stats.handled == 100, what="the other keys, while bad waits")
    assert calls["bad"] == 1
    assert time.perf_counter() - t0 < 0.3
    with pytest.raises(rjet.HeadReached):
        await asyncio.wait_for(task, 5)
    assert calls["bad"] == 3
    assert stats.errors == 2
    assert store.cursors == {"c": "101"}


# ------------------------------------------------------------------ 4. batches block only their keys


async def test_a_failing_batch_blocks_only_its_own_keys(stream: rjet.Stream) -> None:
    keys = 50
    await stream.insert_many([(f"k{i % keys}", 1, b"") for i in range(1000)])
    failing_keys: set[str] = set()
    handled: set[int] = set()
    stop = asyncio.Event()

    async def fn(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        await asyncio.sleep(0.001)
        if events[0].id == "1":
            failing_keys.update(e.foreign_id for e in events)
            raise RuntimeError("the batch with event 1 always fails")
        handled.update(e.id_int for e in events)

    consumer = rjet.Consumer("c", fn, concurrency=4, batch=rjet.Batch(max_len=10, max_wait=0.02))
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer), stop=stop))
    await wait_until(lambda: bool(failing_keys), what="the failing batch")
    others = {i + 1 for i in range(1000) if f"k{i % keys}" not in failing_keys}
    assert len(failing_keys) < keys
    try:
        await wait_until(lambda: others <= handled, timeout=10, what="every event of the other keys")
    finally:
        stop.set()
        with pytest.raises(rjet.Stopped):
            await asyncio.wait_for(task, 5)
    assert handled == others  # and none of the failing batch's keys went past it


async def test_a_cold_key_is_not_passed_by_a_hot_keys_later_events(stream: rjet.Stream) -> None:
    # Read together before the first batch goes: both keys are ready at once, again and again.
    await stream.insert_many([("hot", 1, b"")] * 49 + [("cold", 1, b"")] + [("hot", 1, b"")] * 5950)
    cold = 50
    passed = 0
    seen_cold = False

    async def fn(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        nonlocal passed, seen_cold
        seen_cold = seen_cold or any(e.id_int == cold for e in events)
        if not seen_cold:
            passed += sum(e.id_int > cold for e in events)
        await asyncio.sleep(0.002)

    consumer = rjet.Consumer("c", fn, concurrency=4, batch=rjet.Batch(max_len=100, max_wait=0.05))
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True))
    assert seen_cold
    assert passed == 0


async def test_k_batches_run_in_flight(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i % 1000}", 1, b"") for i in range(3000)])
    active = peak = 0
    order = KeyOrder()

    async def fn(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        for e in events:
            order.record(e.id_int, e.foreign_id)
        await asyncio.sleep(0.02)
        active -= 1

    consumer = rjet.Consumer("c", fn, concurrency=8, batch=rjet.Batch(max_len=10, max_wait=0.5))
    with pytest.raises(rjet.HeadReached):
        await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True)), 30)
    order.check(range(1, 3001))
    assert peak == 8


# ------------------------------------------------------------------ 5. a full batch goes at once


@pytest.mark.parametrize("k", [2, 8])
async def test_full_batches_go_at_once(stream: rjet.Stream, k: int) -> None:
    n = 24_000
    for start in range(0, n, 8000):
        await stream.insert_many([(f"k{i % 1000}", 1, b"") for i in range(start, start + 8000)])
    sizes: list[int] = []
    order = KeyOrder()

    async def fn(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        sizes.append(len(events))
        for e in events:
            order.record(e.id_int, e.foreign_id)
        await asyncio.sleep(0.002)

    consumer = rjet.Consumer("c", fn, concurrency=k, batch=rjet.Batch(max_len=100, max_wait=0.5))
    t0 = time.perf_counter()
    with pytest.raises(rjet.HeadReached):
        await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True)), 8)
    elapsed = time.perf_counter() - t0
    order.check(range(1, n + 1))
    assert sum(sizes) == n
    # Only the last events, once nothing more comes, wait out max_wait in part-full batches.
    assert sum(1 for s in sizes if s < 100) <= k
    assert elapsed < 3.0


# ------------------------------------------------------------------ 6. a restart at the bound


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_a_restart_at_the_progress_bound_goes_on(
    js: JetStreamContext, stream: rjet.Stream, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setattr(rjet._keyed._run, "PROGRESS_LIMIT", 300)
    # One stuck event, then events with gaps in the done set (type 2 is filtered out: passed over,
    # never done).
    n = 6000
    await stream.insert_many([("stuck", 1, b"")] + [(f"k{i % 100}", 1 + i % 2, b"") for i in range(n - 1)])
    stuck = True
    calls: Counter[int] = Counter()

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        calls[event.id_int] += 1
        if event.id_int == 1 and stuck:
            raise RuntimeError("stuck")

    async with await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=0.01) as store:
        consumer = rjet.Consumer("c", fn, concurrency=8, types=[1])
        stats = rjet.ConsumerStats("c")
        stop = asyncio.Event()
        task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer), stats=stats, stop=stop))
        await wait_until(lambda: stats.progress_stalls > 0 and stats.errors > 0, what="reading paused at the bound")
        await asyncio.sleep(0.1)  # flushed at the bound
        if how == "stop":
            stop.set()
            with pytest.raises(rjet.Stopped):
                await task
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        record = await store.peek_record("c")
        assert record is not None
        assert record.cursor in ("", "0")
        done = decode_done(0, record.done or "")
        assert len(done) > 10
        handled_before = {s for s in calls if s != 1}
        assert done == handled_before

    stuck = False
    calls.clear()
    async with await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=0.01) as store:
        stats = rjet.ConsumerStats("c")
        with pytest.raises(rjet.HeadReached):
            await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True), stats=stats), 20)
        assert await store.peek("c") == str(n)
        assert stats.already_done == len(done)
        wanted = {i + 2 for i in range(n - 1) if i % 2 == 0} | {1}
        assert set(calls) == wanted - done
        assert all(c == 1 for c in calls.values())
