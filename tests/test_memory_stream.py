"""rjet.testing's MemoryStream and FakeClock (with rjet.MemCursorStore), used as a handler test would use
them: no nats-server, no real seconds. (How faithful MemoryStream is to the real stream is checked in
test_stream_conformance.py.)"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from pathlib import Path

import pytest

import rjet
from rjet.testing import (
    FakeClock,
    KeyOrder,
    MemoryDeadLetterStream,
    MemoryStream,
    MemoryStreamClient,
)


def recorder() -> tuple[list[rjet.Event], rjet.Handler]:
    seen: list[rjet.Event] = []

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event)

    return seen, fn


async def run_to_head(spec: rjet.Spec) -> None:
    with pytest.raises(rjet.HeadReached):
        await rjet.run(spec)


# ----------------------------------------------------------------- the stream


async def test_the_readme_example_runs_in_well_under_a_second() -> None:
    started = time.perf_counter()
    ms = MemoryStream("orders")
    await ms.insert_many([("order-1", 1, b'{"total": 12}'), ("order-2", 1, b"{}"), ("order-1", 2, b"{}")])
    totals: dict[str, int] = {}

    async def bill(fate: rjet.Fate, event: rjet.Event) -> None:
        fate.tempt()
        totals[event.foreign_id] = totals.get(event.foreign_id, 0) + 1

    cursors = rjet.MemCursorStore()
    consumer = rjet.Consumer("billing", bill, types=[1])
    await run_to_head(rjet.Spec(ms.stream, cursors, consumer, to_head=True))
    assert totals == {"order-1": 1, "order-2": 1}
    assert cursors.cursors["billing"] == "3"
    assert time.perf_counter() - started < 0.5


async def test_the_readme_test_module_passes_in_well_under_a_second() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("## Testing your handlers", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    module: dict[str, object] = {"__name__": "readme_testing_example"}
    exec(compile(code, "README.md#testing-your-handlers", "exec"), module)
    tests = [fn for name, fn in module.items() if name.startswith("test_") and inspect.iscoroutinefunction(fn)]
    assert len(tests) == 4
    started = time.perf_counter()
    for test in tests:
        await test()
    assert time.perf_counter() - started < 0.5


async def test_a_reader_is_a_stream_client_with_the_real_interface() -> None:
    ms = MemoryStream("orders")
    assert await ms.insert("a", 1, b"x") == 1
    assert await ms.insert_once("a", 1, msg_id="m") == (2, True)
    assert await ms.insert_once("a", 1, msg_id="m") == (2, False)
    async with await ms.stream(to_head=True) as client:
        assert isinstance(client, rjet.StreamClient)
        assert isinstance(client, MemoryStreamClient)
        assert (client.stream, client.head, client.num_pending) == ("orders", 2, 2)
        ids = [e.id async for e in client]
        assert ids == ["1", "2"]
        assert client.last_sequence == 2
        assert client.stream_id == ms.stream_id
        assert client.stream_id.startswith("orders@")
    with pytest.raises(rjet.Stopped):
        await client.recv()
    assert [e.id for e in ms.events()] == ["1", "2"]
    assert (ms.first_seq, ms.last_seq) == (1, 2)


async def test_a_waiting_reader_gets_new_events_at_once() -> None:
    ms = MemoryStream()
    client = await ms.stream(from_head=True)
    got = asyncio.create_task(client.recv())
    await asyncio.sleep(0)
    assert not got.done()
    await ms.insert("a", 7, b"late")
    event = await asyncio.wait_for(got, 1)
    assert (event.id, event.type, event.metadata) == ("1", 7, b"late")
    await client.close()


async def test_names_and_arguments_are_checked_as_the_real_stream_checks_them() -> None:
    with pytest.raises(rjet.ConfigError, match="stream name 'a b' is invalid"):
        MemoryStream("a b")
    ms = MemoryStream()
    with pytest.raises(rjet.ConfigError):
        await ms.remove_through(-1)
    with pytest.raises(rjet.InvalidEvent, match="event #1: foreign id is empty"):
        await ms.insert_many([("a", 1, b""), ("", 1, b"")])
    assert ms.last_seq == 0  # every event is checked before the first is stored
    with pytest.raises(rjet.InvalidCursor):
        await ms.stream("x")


# ----------------------------------------------------------------- what is hard on a real stream


async def test_events_removed_ahead_of_a_running_consumer_stop_it_where_the_real_reader_would() -> None:
    # A reader fetches ahead (ReadConfig.batch and max_buffered); with 1 and 1, one event at most.
    ms = MemoryStream("orders", read=rjet.ReadConfig(batch=1, max_buffered=1))
    await ms.insert_many([("k", 1, b"")] * 10)
    seen: list[int] = []

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event.id_int)
        if event.id_int == 3:
            await ms.remove_through(7)  # retention or a purge, while event 4 is fetched already

    store = rjet.MemCursorStore()
    with pytest.raises(rjet.EventsRemoved) as caught:
        await rjet.run(rjet.Spec(ms.stream, store, rjet.Consumer("c", fn)))
    assert (caught.value.first, caught.value.last, caught.value.certain) == (5, 7, True)
    assert seen == [1, 2, 3, 4]
    assert store.cursors["c"] == "4"
    assert (caught.value.consumer, caught.value.namespace, caught.value.move) == ("c", None, "7")
    assert "move the cursor of consumer 'c' on purpose to go on: to sequence 7" in str(caught.value)


async def test_a_cursor_before_the_first_retained_event_is_expired_at_open() -> None:
    ms = MemoryStream("orders")
    await ms.insert_many([("k", 1, b"")] * 10)
    await ms.remove_through(5)
    seen, fn = recorder()
    with pytest.raises(rjet.CursorExpired) as caught:
        await rjet.run(rjet.Spec(ms.stream, rjet.MemCursorStore({"c": "2"}), rjet.Consumer("c", fn)))
    assert (caught.value.cursor, caught.value.first_seq) == (2, 6)
    assert (caught.value.consumer, caught.value.move) == ("c", "first")
    assert "move the cursor of consumer 'c' on purpose to go on: to the first retained event" in str(caught.value)
    assert seen == []
    await run_to_head(rjet.Spec(ms.stream, rjet.MemCursorStore(), rjet.Consumer("new", fn), to_head=True))
    assert [e.id_int for e in seen] == [6, 7, 8, 9, 10]  # no cursor: from the first event still there


async def test_a_recreated_stream_is_not_read_as_the_old_one_through_a_mem_cursor_store() -> None:
    ms = MemoryStream("orders")
    await ms.insert_many([("k", 1, b"")] * 3)
    cursors = rjet.MemCursorStore()
    seen, fn = recorder()
    spec = rjet.Spec(ms.stream, cursors, rjet.Consumer("c", fn), to_head=True)
    await run_to_head(spec)
    record = cursors.record("c")
    assert record is not None
    assert (record.cursor, record.stream) == ("3", ms.stream_id)  # the stream the cursor counts in
    old = ms.stream_id
    await ms.recreate()
    await ms.insert_many([("k", 1, b"")] * 5)
    with pytest.raises(rjet.StreamRecreated) as caught:
        await rjet.run(spec)
    assert (caught.value.cursor, caught.value.recorded, caught.value.current) == (3, old, ms.stream_id)
    assert (caught.value.consumer, caught.value.move) == ("c", "beginning")
    assert "move the cursor of consumer 'c' on purpose to go on: to the beginning" in str(caught.value)
    # A cursor set by hand counts in no particular stream (as `rjet cursor --set` writes it): read on.
    plain = rjet.MemCursorStore({"c": "3"})
    seen.clear()
    await run_to_head(rjet.Spec(ms.stream, plain, rjet.Consumer("c", fn), to_head=True))
    assert [e.id_int for e in seen] == [4, 5]
    await cursors.set_cursor("c", "")  # moved on purpose: from the beginning of the new stream
    seen.clear()
    await run_to_head(spec)
    assert [e.id_int for e in seen] == [1, 2, 3, 4, 5]
    record = cursors.record("c")
    assert record is not None
    assert (record.cursor, record.stream) == ("5", ms.stream_id)


async def test_a_reader_open_while_the_stream_is_recreated_delivers_what_it_fetched_then_stops() -> None:
    ms = MemoryStream("orders")
    await ms.insert_many([("k", 1, b"")] * 3)
    client = await ms.stream()
    first = await client.recv()
    old = ms.stream_id
    await ms.recreate()
    assert [(await client.recv()).id for _ in range(2)] == ["2", "3"]
    with pytest.raises(rjet.StreamRecreated) as caught:
        await client.recv()
    assert (first.id, caught.value.cursor, caught.value.recorded, caught.value.current) == ("1", 3, old, ms.stream_id)
    assert await ms.insert("k", 1) == 1  # the new stream counts from 1 again
    await client.close()


async def test_a_restarted_consumer_gets_events_again_so_its_handler_must_be_idempotent() -> None:
    # The recipe of the README: a crash loses the cursor writes since the last flush, so run, move
    # the cursor back to where a flush might have left it, and run again.
    ms = MemoryStream("orders")
    await ms.insert_many([(f"order-{i % 3}", 1, b"{}") for i in range(10)])
    order = KeyOrder()
    mails: set[int] = set()

    async def mail(fate: rjet.Fate, event: rjet.Event) -> None:
        order.record(event.id_int, event.foreign_id)
        mails.add(event.id_int)  # idempotent: one mail per event, however often it comes

    cursors = rjet.MemCursorStore()
    spec = rjet.Spec(ms.stream, cursors, rjet.Consumer("mailer", mail), to_head=True)
    stop = asyncio.Event()

    async def stop_at_six(fate: rjet.Fate, event: rjet.Event) -> None:
        await mail(fate, event)
        if event.id_int == 6:
            stop.set()  # a stop mid-stream, as a deploy or a crash would

    with pytest.raises(rjet.Stopped):
        await rjet.run(rjet.Spec(ms.stream, cursors, rjet.Consumer("mailer", stop_at_six)), stop=stop)
    assert cursors.cursors["mailer"] == "6"
    cursors.cursors["mailer"] = "2"  # the cursor writes after event 2 were lost
    await run_to_head(spec)
    order.check(range(1, 11))
    assert order.duplicates == 4  # events 3..6 came twice
    assert mails == set(range(1, 11))


async def test_tempted_events_come_again_under_run_forever() -> None:
    ms = MemoryStream()
    await ms.insert_many([("k", 1, b"")] * 20)
    order = KeyOrder()

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        fate.tempt()  # before any effect: a tempted event is simply delivered again
        order.record(event.id_int, event.foreign_id)

    consumer = rjet.Consumer("c", fn, fate=rjet.RandomFate(0.3, seed=7))
    async with FakeClock():  # run_forever's 100 ms between runs costs nothing
        await rjet.run_forever(rjet.Spec(ms.stream, rjet.MemCursorStore(), consumer, to_head=True))
    order.check(range(1, 21))


# ----------------------------------------------------------------- run's features on a MemoryStream


async def test_concurrency_batches_and_key_filters() -> None:
    ms = MemoryStream()
    await ms.insert_many([(f"k{i % 7}", 1, b"") for i in range(200)])
    order = KeyOrder()

    async def one(fate: rjet.Fate, event: rjet.Event) -> None:
        await asyncio.sleep(0.001 * (event.id_int % 3))
        order.record(event.id_int, event.foreign_id)

    async def many(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        for e in events:
            order.record(e.id_int, e.foreign_id)

    async with FakeClock():
        for consumer in (
            rjet.Consumer("conc", one, concurrency=16),
            rjet.Consumer("batch", many, batch=rjet.Batch(max_len=10, max_wait=0.5), concurrency=4),
        ):
            order = KeyOrder()
            cursors = rjet.MemCursorStore()
            await run_to_head(rjet.Spec(ms.stream, cursors, consumer, to_head=True))
            order.check(range(1, 201))
            assert cursors.cursors[consumer.name] == "200"
    seen, fn = recorder()
    cursors = rjet.MemCursorStore()
    only_k0 = rjet.Consumer("k0", fn, key_filter=lambda k: k == "k0")
    await run_to_head(rjet.Spec(ms.stream, cursors, only_k0, to_head=True))
    assert [e.id_int for e in seen] == list(range(1, 201, 7))
    assert cursors.cursors["k0"] == "200"  # past the other keys' events, as with the real reader


async def test_dead_letters_go_to_another_memory_stream() -> None:
    ms = MemoryStream("orders")
    dlq = MemoryStream("orders_dlq")
    await ms.insert_many([("a", 1, b"ok"), ("b", 2, b"poison"), ("a", 1, b"ok")])

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.metadata == b"poison":
            raise ValueError("cannot bill")

    sink = dlq.dead_letter_sink()
    assert isinstance(sink, MemoryDeadLetterStream)
    consumer = rjet.Consumer("billing", fn, dead_letter=rjet.DeadLetter(sink, attempts=3))
    async with FakeClock() as clock:
        started = clock.time()
        await run_to_head(rjet.Spec(ms.stream, rjet.MemCursorStore(), consumer, to_head=True))
        assert clock.time() - started == pytest.approx(1.5, abs=0.01)  # backoff 0.5 + 1.0, in virtual time
    assert sink.recorded == 1
    [letter] = dlq.events()
    record = json.loads(letter.metadata)
    assert (letter.foreign_id, letter.type) == ("b", 2)
    fields = (record["consumer"], record["stream"], record["event_id"], record["attempts"])
    assert fields == ("billing", "orders", "2", 3)
    assert record["error"] == "ValueError: cannot bill"


# ----------------------------------------------------------------- time


async def test_lag_is_waited_out_in_virtual_time() -> None:
    async with FakeClock() as clock:
        ms = MemoryStream()
        await ms.insert("a", 1)
        ages: list[float] = []

        async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
            ages.append(clock.time() - event.timestamp.timestamp())

        real = time.perf_counter()
        await run_to_head(rjet.Spec(ms.stream, rjet.MemCursorStore(), rjet.Consumer("c", fn), to_head=True, lag=30))
        assert ages == [pytest.approx(30, abs=0.01)]
        await ms.insert("a", 1)
        await clock.advance(45)  # older than the lag already: handled at once
        before = clock.time()
        await run_to_head(rjet.Spec(ms.stream, rjet.MemCursorStore(), rjet.Consumer("d", fn), to_head=True, lag=30))
        assert clock.time() == before
        assert time.perf_counter() - real < 1


async def test_run_forever_backoff_takes_no_real_time() -> None:
    ms = MemoryStream()
    await ms.insert("a", 1)
    failures = 4

    async def flaky(fate: rjet.Fate, event: rjet.Event) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("the database is down")

    real = time.perf_counter()
    async with FakeClock() as clock:
        started = clock.time()
        await rjet.run_forever(rjet.Spec(ms.stream, rjet.MemCursorStore(), rjet.Consumer("c", flaky), to_head=True))
        assert clock.time() - started == pytest.approx(0.5 + 1 + 2 + 4, abs=0.01)
    assert time.perf_counter() - real < 1


async def test_fake_clock_moves_loop_time_and_wall_time_together() -> None:
    loop = asyncio.get_running_loop()
    real_time = time.time
    async with FakeClock() as clock:
        assert time.time is not real_time
        wall, mono = clock.time(), loop.time()
        assert time.time() == wall  # frozen until something moves it
        await asyncio.sleep(3600)
        assert clock.time() - wall == pytest.approx(3600)
        assert loop.time() - mono == pytest.approx(3600)
        assert time.time_ns() == clock.time_ns()
        fired: list[str] = []
        loop.call_later(2, fired.append, "b")
        loop.call_later(1, fired.append, "a")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 5)
        assert fired == ["a", "b"]
        assert clock.time() - wall == pytest.approx(3605)
        pending = loop.call_later(10, fired.append, "never")
    assert time.time is real_time
    assert pending.when() - loop.time() == pytest.approx(10, abs=0.5)  # back in real time, 10 s to go
    pending.cancel()


async def test_without_autojump_time_moves_only_when_advanced() -> None:
    async with FakeClock(autojump=False) as clock:
        start = clock.time()
        done = asyncio.ensure_future(asyncio.sleep(10))
        await asyncio.sleep(0)
        assert not done.done()
        await clock.advance(9)
        assert not done.done()
        await clock.advance(1)
        await asyncio.sleep(0)
        assert done.done()
        assert clock.time() - start == pytest.approx(10)


async def test_a_clock_not_installed_stamps_events() -> None:
    clock = FakeClock(start=1_800_000_000.0)
    ms = MemoryStream(clock=clock)
    await ms.insert("a", 1)
    await clock.advance(60)
    await ms.insert("a", 1)
    first, second = ms.events()
    assert (first.timestamp_us, second.timestamp_us) == (1_800_000_000_000_000, 1_800_000_060_000_000)
    assert ms.stream_id == "memory@2027-01-15T08:00:00+00:00"


async def test_one_fake_clock_at_a_time() -> None:
    async with FakeClock():
        with pytest.raises(rjet.ConfigError, match="installed on this event loop already"):
            async with FakeClock():
                pass


def test_a_fake_clock_needs_asyncios_own_loop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def install() -> None:
        async with FakeClock():
            pass

    loop = uvloop.new_event_loop()
    try:
        with pytest.raises(rjet.ConfigError, match="asyncio's own selector event loop"):
            loop.run_until_complete(install())
    finally:
        loop.close()
