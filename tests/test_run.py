"""run and run_forever: reflex's loop. Order, cursors, failures, filters, fate, lag, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.testing import wait_until


async def run_to_head(spec: rjet.Spec) -> None:
    with pytest.raises(rjet.HeadReached):
        await rjet.run(spec)


def recorder() -> tuple[list[rjet.Event], rjet.Handler]:
    seen: list[rjet.Event] = []

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        fate.tempt()
        seen.append(event)

    return seen, fn


async def test_handles_every_event_in_order_and_advances_the_cursor(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(100)])
    store = rjet.MemCursorStore()
    seen, fn = recorder()
    await run_to_head(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn), to_head=True))
    assert [e.id_int for e in seen] == list(range(1, 101))
    assert store.cursors == {"c": "100"}


async def test_resumes_after_the_stored_cursor(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 10)
    store = rjet.MemCursorStore({"c": "6"})
    seen, fn = recorder()
    await run_to_head(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn), to_head=True))
    assert [e.id for e in seen] == ["7", "8", "9", "10"]


async def test_async_handlers_are_awaited(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 5)
    seen: list[str] = []

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        await asyncio.sleep(0)
        seen.append(event.id)

    await run_to_head(rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", fn), to_head=True))
    assert seen == ["1", "2", "3", "4", "5"]


async def test_a_failing_handler_stops_run_and_the_cursor_stays_before_the_event(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i}", i, b"") for i in range(1, 6)])
    store = rjet.MemCursorStore()
    attempts: Counter[str] = Counter()

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        attempts[event.id] += 1
        if event.id == "3" and attempts["3"] == 1:
            raise KeyError("boom")

    spec = rjet.Spec(stream.stream, store, rjet.Consumer("c", fn), to_head=True)
    with pytest.raises(KeyError, match="boom") as e:
        await rjet.run(spec)
    assert store.cursors == {"c": "2"}
    assert any("failed on event 3 (type 3, foreign id 'k3')" in note for note in e.value.__notes__)
    await run_to_head(spec)
    assert attempts == {"1": 1, "2": 1, "3": 2, "4": 1, "5": 1}
    assert store.cursors == {"c": "5"}


async def test_type_and_event_filters_skip_the_handler_but_advance_the_cursor(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i}", i % 3, b"") for i in range(30)])
    store = rjet.MemCursorStore()
    seen, fn = recorder()
    consumer = rjet.Consumer("c", fn, types=[1, 2], filter=lambda e: e.foreign_id != "k4")
    await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True))
    assert [e.foreign_id for e in seen] == [f"k{i}" for i in range(30) if i % 3 and i != 4]
    assert store.cursors == {"c": "30"}


async def test_key_filter_sees_only_foreign_ids(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i % 4}", 1, b"") for i in range(20)])
    seen, fn = recorder()
    keys: list[str] = []

    def key_filter(fid: str) -> bool:
        keys.append(fid)
        return fid == "k1"

    store = rjet.MemCursorStore()
    await run_to_head(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn, key_filter=key_filter), to_head=True))
    assert [e.id_int for e in seen] == [2, 6, 10, 14, 18]
    assert len(keys) == 20
    assert store.cursors == {"c": "20"}


async def test_always_tempted_fate_stops_run_without_moving_the_cursor(stream: rjet.Stream) -> None:
    await stream.insert("k", 1)
    store = rjet.MemCursorStore()
    seen, fn = recorder()
    with pytest.raises(rjet.Tempted) as e:
        await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn, fate=rjet.ALWAYS)))
    assert rjet.is_expected(e.value)
    assert seen == []
    assert store.cursors == {}


async def test_random_fate_over_a_full_run_forever(stream: rjet.Stream) -> None:
    n, p = 400, 0.05
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(n)])
    fate = rjet.RandomFate(p, seed=7)
    seen, fn = recorder()
    store = rjet.MemCursorStore()
    spec = rjet.Spec(stream.stream, store, rjet.Consumer("c", fn, fate=fate), to_head=True)
    await asyncio.wait_for(rjet.run_forever(spec, retry_delay=0.001), 60)
    assert [e.id_int for e in seen] == list(range(1, n + 1))  # each succeeded once, in order
    assert fate.calls == n + fate.tempted
    # Each event needs a geometric number of tries: expected repeats n * p / (1 - p) = 21, sd ~4.7.
    assert 5 <= fate.tempted <= 45
    print(f"events={n} p={p} tempted={fate.tempted} expected={n * p / (1 - p):.1f}")
    assert store.cursors == {"c": str(n)}


async def test_lag_delays_events_until_they_are_old_enough(stream: rjet.Stream) -> None:
    await stream.insert("k", 1)
    handled_at: list[float] = []
    spec = rjet.Spec(
        stream.stream,
        rjet.MemCursorStore(),
        rjet.Consumer("c", lambda fate, e: handled_at.append(time.time() - e.timestamp.timestamp())),
        to_head=True,
        lag=0.5,
    )
    await run_to_head(spec)
    assert handled_at[0] >= 0.49


async def test_from_head_ignores_the_cursor(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 5)
    seen, fn = recorder()
    spec = rjet.Spec(stream.stream, rjet.MemCursorStore({"c": "1"}), rjet.Consumer("c", fn), from_head=True)
    task = asyncio.create_task(rjet.run(spec))

    async def reading() -> bool:
        return (await stream.info()).state.consumer_count == 1

    await wait_until(reading, what="the run's reader")
    await stream.insert("new", 1)
    await wait_until(lambda: bool(seen), what="the new event")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [e.foreign_id for e in seen] == ["new"]


async def test_run_flushes_the_cursor_store_on_the_way_out(js: JetStreamContext, stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 50)
    async with await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=3600) as store:
        await run_to_head(rjet.Spec(stream.stream, store, rjet.Consumer("c", lambda f, e: None), to_head=True))
        assert await store.peek("c") == "50"


async def test_cancelling_run_forever_flushes_and_stops(js: JetStreamContext, stream: rjet.Stream) -> None:
    async with await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=3600) as store:
        seen, fn = recorder()
        task = asyncio.create_task(rjet.run_forever(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn))))
        await stream.insert_many([("k", 1, b"")] * 20)
        await wait_until(lambda: len(seen) == 20, what="20 events handled")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.peek("c") == "20"


async def test_run_forever_retries_a_failing_handler_until_it_succeeds(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 3)
    tries: Counter[str] = Counter()

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        tries[event.id] += 1
        if event.id == "2" and tries["2"] < 3:
            raise RuntimeError("flaky downstream")

    spec = rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", fn), to_head=True)
    await asyncio.wait_for(rjet.run_forever(spec, retry_delay=0.01, max_backoff=0.05), 30)
    assert tries == {"1": 1, "2": 3, "3": 1}


async def test_run_forever_gives_up_when_another_runner_holds_the_cursor(
    js: JetStreamContext, stream: rjet.Stream
) -> None:
    async with (
        await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=0.05) as first,
        await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=0.05) as second,
    ):
        one = asyncio.create_task(
            rjet.run_forever(rjet.Spec(stream.stream, first, rjet.Consumer("c", lambda f, e: None)))
        )
        await stream.insert("k", 1)

        async def cursor_is(value: str) -> bool:
            return await first.peek("c") == value

        await wait_until(lambda: cursor_is("1"), what="the first runner's cursor")
        two = asyncio.create_task(
            rjet.run_forever(rjet.Spec(stream.stream, second, rjet.Consumer("c", lambda f, e: None)))
        )

        async def both_reading() -> bool:
            return (await stream.info()).state.consumer_count == 2

        await wait_until(both_reading, what="the second runner's reader")
        await stream.insert("k", 1)
        with pytest.raises(rjet.CursorConflict, match="two runners share this consumer name"):
            await asyncio.wait_for(one, 10)
        assert not two.done()
        two.cancel()
        with pytest.raises(asyncio.CancelledError):
            await two
        assert await second.peek("c") == "2"


async def test_run_forever_never_takes_back_a_cursor_another_runner_claimed_between_its_runs(
    js: JetStreamContext, stream: rjet.Stream
) -> None:
    await stream.insert_many([("k", 1, b"")] * 3)
    async with (
        await rjet.JetStreamCursorStore.create(js, stream.name) as first,
        await rjet.JetStreamCursorStore.create(js, stream.name) as second,
    ):
        calls = 0

        async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                await second.claim("c")  # another runner takes over (a member that saw this one gone)
                raise RuntimeError("a transient error, before this run wrote anything")

        spec = rjet.Spec(stream.stream, first, rjet.Consumer("c", fn))
        # Running again after the error must not claim the cursor back: the other runner is newer,
        # and this one would hand its handler what that one handles.
        with pytest.raises(rjet.CursorConflict, match="while this one was between runs"):
            await asyncio.wait_for(rjet.run_forever(spec, retry_delay=0.01, max_backoff=0.05), 10)
        assert calls == 1
        assert await second.check_claim("c")


async def test_a_stored_cursor_that_is_not_a_sequence_names_the_consumer(stream: rjet.Stream) -> None:
    spec = rjet.Spec(stream.stream, rjet.MemCursorStore({"c": "oops"}), rjet.Consumer("c", lambda f, e: None))
    with pytest.raises(rjet.InvalidCursor, match="consumer 'c': cursor 'oops' is not a stream sequence"):
        await rjet.run(spec)
    with pytest.raises(rjet.InvalidCursor):
        await rjet.run_forever(spec)


def test_spec_and_consumer_validate_their_arguments(stream: rjet.Stream) -> None:
    with pytest.raises(rjet.ConfigError, match="consumer name"):
        rjet.Consumer("", lambda f, e: None)
    with pytest.raises(rjet.ConfigError, match="not callable"):
        rjet.Consumer("c", "nope")  # type: ignore[arg-type]
    with pytest.raises(rjet.ConfigError, match="lag"):
        rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", lambda f, e: None), lag=-1)


async def test_stop_lets_the_handler_in_flight_finish_and_flushes(js: JetStreamContext, stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 50)
    stop = asyncio.Event()
    finished: list[str] = []

    async def slow(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.id == "3":
            stop.set()  # asked to stop while this handler is still running
            await asyncio.sleep(0.2)
        finished.append(event.id)

    async with await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=3600) as store:
        spec = rjet.Spec(stream.stream, store, rjet.Consumer("c", slow))
        with pytest.raises(rjet.Stopped, match="stopped on request"):
            await rjet.run(spec, stop=stop)
        assert finished == ["1", "2", "3"]
        assert await store.peek("c") == "3"
        stop.clear()
        task = asyncio.create_task(rjet.run_forever(spec, stop=stop))

        async def all_handled() -> bool:
            return len(finished) == 50

        await wait_until(all_handled, what="the rest of the events")
        stop.set()
        await asyncio.wait_for(task, 5)  # returns, does not raise
        assert await store.peek("c") == "50"


async def test_a_key_filter_that_raises_ends_the_run_with_its_error(stream: rjet.Stream) -> None:
    await stream.insert_many([("a", 1, b""), ("b", 1, b"")])

    def key_filter(fid: str) -> bool:
        if fid == "b":
            raise LookupError("no shard for b")
        return True

    store = rjet.MemCursorStore()
    consumer = rjet.Consumer("c", lambda f, e: None, key_filter=key_filter)
    with pytest.raises(LookupError, match="no shard for b"):
        await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
    assert store.cursors == {"c": "1"}


def test_spec_options_are_keyword_only(stream: rjet.Stream) -> None:
    consumer = rjet.Consumer("c", lambda f, e: None)
    with pytest.raises(TypeError):
        rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, True)  # type: ignore[call-arg]
    assert rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True).to_head


async def test_other_keys_never_reach_the_handler_though_the_stream_func_awaits_after_opening(
    stream: rjet.Stream,
) -> None:
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(200)])

    async def slow_open(
        after: str = "", *, from_head: bool = False, to_head: bool = False, key_filter: object = None, **_: object
    ) -> rjet.StreamClient:
        client = await stream.stream(after, from_head=from_head, to_head=to_head, key_filter=key_filter)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # frames arrive meanwhile (was: buffered unfiltered, then handled)
        return client

    async def plain_open(
        after: str = "", *, from_head: bool = False, to_head: bool = False, **_: object
    ) -> rjet.StreamClient:
        return await stream.stream(after, from_head=from_head, to_head=to_head)  # run filters by key itself

    for open_ in (slow_open, plain_open):
        seen: list[str] = []

        def record(f: rjet.Fate, e: rjet.Event, seen: list[str] = seen) -> None:
            seen.append(e.foreign_id)

        consumer = rjet.Consumer("c", record, key_filter=lambda fid: fid.endswith("7"))
        await run_to_head(rjet.Spec(open_, rjet.MemCursorStore(), consumer, to_head=True))
        assert seen == [f"k{i}" for i in range(200) if i % 10 == 7], open_.__name__


async def test_a_stream_function_that_does_not_take_key_filter_and_stream_id_is_a_config_error(
    stream: rjet.Stream,
) -> None:
    async def narrow(after: str = "", *, from_head: bool = False, to_head: bool = False) -> rjet.StreamClient:
        raise AssertionError("never called with what run passes")

    spec = rjet.Spec(narrow, rjet.MemCursorStore(), rjet.Consumer("c", lambda f, e: None))  # type: ignore[arg-type]
    with pytest.raises(rjet.ConfigError, match="does not take key_filter and stream_id"):
        await rjet.run(spec)
