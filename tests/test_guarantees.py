"""rjet's core promise under the operations an operator performs: never a silent skip, never a false fence.

Each test runs against a real nats-server and failed before the change that made it pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.cursors import CursorRecord, encode_key
from rjet.testing import wait_until


def recording() -> tuple[list[int], Callable[[rjet.Fate, rjet.Event], Awaitable[None]]]:
    seen: list[int] = []

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event.id_int)

    return seen, fn


# ----------------------------------------------------------------- events removed ahead of a reader


async def test_retention_ahead_of_a_running_reader_is_an_error_not_a_skip(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name, max_msgs=200)
    await stream.insert_many([("k", 1, b"")] * 100)
    seen: list[int] = []
    release = asyncio.Event()

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event.id_int)
        if event.id_int == 50:
            await release.wait()  # the reader is stuck here while retention runs ahead of it

    store = rjet.MemCursorStore()
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn))))
    await wait_until(lambda: 50 in seen, what="the handler to reach event 50")
    # 10,000 more events: the stream keeps the last 200, so events up to 9,900 are removed, most of
    # them after what the reader has fetched.
    for _ in range(10):
        await stream.insert_many([("k", 1, b"")] * 1000)
    release.set()
    with pytest.raises(rjet.EventsRemoved) as caught:
        await asyncio.wait_for(task, 20)
    err = caught.value
    assert err.certain
    assert seen == list(range(1, err.first))  # every event before the hole, in order, and none after
    assert 50 < err.first <= err.last < 10_100  # a hole after what the reader had fetched
    assert int(store.cursors["c"]) == err.first - 1
    assert isinstance(err, rjet.CursorExpired)
    assert (err.consumer, err.move) == ("c", str(err.last))
    assert f"move the cursor of consumer 'c' on purpose to go on: to sequence {err.last}" in str(err)


@pytest.mark.parametrize("batch", [None, rjet.Batch(10, 0.01)], ids=["K8", "K8-batch10"])
async def test_retention_ahead_of_a_concurrent_reader_is_an_error_after_every_event_before_it(
    js: JetStreamContext, name: str, batch: rjet.Batch | None
) -> None:
    """As above with ``concurrency=8``: one key's call is stuck at event 50 while the other keys go
    on, and events of the stuck key queue up behind it. The hole ends the run only once every event
    read before it was handled (the stuck key's queue included), so that moving the cursor past the
    hole, as the error says, skips nothing but the hole."""
    stream = await rjet.Stream.create(js, name, max_msgs=200)
    await stream.insert_many([(f"k{i % 8}", 1, b"") for i in range(100)])
    seen: list[int] = []
    release = asyncio.Event()

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event.id_int)
        if event.id_int == 50:
            await release.wait()

    async def fn_batch(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        for event in events:
            await fn(fate, event)

    store = rjet.MemCursorStore()
    consumer = (
        rjet.Consumer("c", fn_batch, concurrency=8, batch=batch) if batch else rjet.Consumer("c", fn, concurrency=8)
    )
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer)))
    await wait_until(lambda: 50 in seen, what="the handler to reach event 50")
    for _ in range(10):
        await stream.insert_many([(f"k{i % 8}", 1, b"") for i in range(1000)])
    await asyncio.sleep(0.5)  # the reader meets the hole while event 50's call is still stuck
    release.set()
    with pytest.raises(rjet.EventsRemoved) as caught:
        await asyncio.wait_for(task, 20)
    err = caught.value
    assert 50 < err.first <= err.last < 10_100
    unhandled = sorted(set(range(1, err.first)) - set(seen))
    assert sorted(seen) == list(range(1, err.first)), f"unhandled before the hole: {unhandled[:10]}"
    assert int(store.cursors["c"]) == err.first - 1
    assert err.move == str(err.last)


async def test_a_purge_mid_run_is_an_error_with_the_missing_range(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 20_000)
    seen, fn = recording()

    async def slow(fate: rjet.Fate, event: rjet.Event) -> None:
        await fn(fate, event)
        if event.id_int == 10:
            await js.purge_stream(name)
            await stream.insert_many([("k", 1, b"")] * 10)

    with pytest.raises(rjet.EventsRemoved) as caught:
        await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", slow))), 20)
    assert seen == list(range(1, caught.value.first))
    assert caught.value.last == 20_000


async def test_a_filtered_reader_notices_a_purge_ahead_of_it(js: JetStreamContext, name: str) -> None:
    await rjet.Stream.create(js, name)
    a = rjet.Stream(js, name, subject=f"{name}.a")
    b = rjet.Stream(js, name, subject=f"{name}.b")
    for _ in range(5):
        await a.insert_many([("k", 1, b"")] * 2000)
        await b.insert_many([("k", 1, b"")] * 2000)
    only_a = rjet.Stream(js, name, filter_subjects=[f"{name}.a"])
    seen: list[int] = []

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event.id_int)
        if len(seen) == 10:
            await js.purge_stream(name)
            await a.insert_many([("k", 1, b"")] * 10)

    with pytest.raises(rjet.EventsRemoved) as caught:
        await asyncio.wait_for(rjet.run(rjet.Spec(only_a.stream, rjet.MemCursorStore(), rjet.Consumer("c", fn))), 20)
    assert not caught.value.certain
    assert max(seen) < caught.value.first
    assert caught.value.last >= 20_000


async def test_a_quiet_filtered_reader_is_not_alarmed_when_retention_passes_its_position(
    js: JetStreamContext, name: str
) -> None:
    await rjet.Stream.create(js, name, max_msgs=100)
    a = rjet.Stream(js, name, subject=f"{name}.a")
    b = rjet.Stream(js, name, subject=f"{name}.b")
    await a.insert("k", 1)
    only_a = rjet.Stream(js, name, filter_subjects=[f"{name}.a"])
    seen, fn = recording()
    task = asyncio.create_task(rjet.run(rjet.Spec(only_a.stream, rjet.MemCursorStore(), rjet.Consumer("c", fn))))
    await wait_until(lambda: seen == [1], what="the first event")
    await b.insert_many([("k", 1, b"")] * 1000)  # other subjects' events push the stream's start past 1
    await asyncio.sleep(0.2)
    last = await a.insert("k", 1)
    await wait_until(lambda: seen == [1, last], what="the quiet subject's next event")
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_an_unfiltered_reader_with_no_cursor_starts_at_the_first_retained_event(
    js: JetStreamContext, name: str
) -> None:
    stream = await rjet.Stream.create(js, name, max_msgs=10)
    await stream.insert_many([("k", 1, b"")] * 30)
    seen, fn = recording()
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", fn), to_head=True))
    assert seen == list(range(21, 31))


# ----------------------------------------------------------------- a stream deleted and created again


async def test_a_recreated_stream_is_not_read_as_the_old_one(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 5)
    async with await rjet.JetStreamCursorStore.create(js, name, flush_interval=0.01) as store:
        seen, fn = recording()
        with pytest.raises(rjet.HeadReached):
            await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn), to_head=True))
        assert seen == [1, 2, 3, 4, 5]
        record = await store.peek_record("c")
        assert record is not None
        assert record.stream is not None
        assert record.stream.startswith(f"{name}@")
        await js.delete_stream(name)
        stream = await rjet.Stream.create(js, name)
        await stream.insert_many([("k", 1, b"")] * 8)  # longer than the old cursor: CursorAhead cannot see it
        with pytest.raises(rjet.StreamRecreated, match=f"cursor of consumer 'c' \\(cursor namespace '{name}'\\)"):
            await asyncio.wait_for(rjet.run_forever(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn))), 10)
        assert seen == [1, 2, 3, 4, 5]


async def test_a_stream_recreated_under_a_running_consumer_stops_it(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 3)
    async with await rjet.JetStreamCursorStore.create(js, name, flush_interval=0.01) as store:
        seen, fn = recording()
        task = asyncio.create_task(rjet.run_forever(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn))))
        await wait_until(lambda: seen == [1, 2, 3], what="the first events")
        await asyncio.sleep(0.1)  # the cursor is flushed with the stream's identity
        await js.delete_stream(name)
        stream = await rjet.Stream.create(js, name)
        await stream.insert_many([("k", 1, b"")] * 10)
        with pytest.raises(rjet.StreamRecreated):
            await asyncio.wait_for(task, 10)
        assert seen == [1, 2, 3]


# ----------------------------------------------------------------- claims


async def test_two_runners_through_one_store_are_fenced(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 2000)
    async with await rjet.JetStreamCursorStore.create(js, name, flush_interval=0.01) as store:
        first_seen, first = recording()
        one = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", first))))
        await wait_until(lambda: bool(first_seen), what="the first runner to start")
        second_seen, second = recording()
        two = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", second))))
        with pytest.raises(rjet.CursorConflict, match="another runner claimed it through the same store"):
            await asyncio.wait_for(one, 10)
        await stream.insert("k", 1)
        await wait_until(lambda: 2001 in second_seen, what="the second runner to reach the head")
        assert not two.done()
        two.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await two


async def test_claims_and_checks_do_not_race(js: JetStreamContext, name: str) -> None:
    # A claim in flight (its write sent, its answer not yet read) while the claim is checked, at
    # every point of the claim: the check must never report the claim lost (was: 3 in 300).
    async with await rjet.JetStreamCursorStore.create(js, name) as store:
        await store.claim("c")
        for i in range(400):
            claiming = asyncio.ensure_future(store.claim("c"))
            for _ in range(i % 8):
                await asyncio.sleep(0)
            assert await store.check_claim("c"), f"a false 'claim lost' at iteration {i}"
            await claiming
        assert await store.check_claim("c")


async def test_a_write_applied_but_not_acknowledged_is_settled_by_reading_back(js: JetStreamContext, name: str) -> None:
    async with await rjet.JetStreamCursorStore.create(js, name) as store:
        claim = await store.claim("c")
        await claim.set_cursor("5")
        await claim.flush()
        # Our next write reaches the bucket but its answer never arrives: the claim's revision is stale.
        applied = CursorRecord("6", claim.stream, claim.owner)
        await (await js.key_value(store.bucket)).update(encode_key("c"), applied.encode(), last=claim.rev)
        await claim.set_cursor("7")
        await claim.flush()  # was: CursorConflict "two runners share this consumer name"
        assert await store.peek("c") == "7"
        assert await store.check_claim("c")


async def test_losing_one_cursor_does_not_stop_the_others(js: JetStreamContext, name: str) -> None:
    async with (
        await rjet.JetStreamCursorStore.create(js, name) as store,
        await rjet.JetStreamCursorStore.create(js, name) as other,
    ):
        a, b = await store.claim("a"), await store.claim("b")
        await other.claim("a")
        await a.set_cursor("1")
        await b.set_cursor("1")
        with pytest.raises(rjet.CursorConflict, match="cursor 'a'"):
            await store.flush()
        await b.set_cursor("2")
        await b.flush()
        assert await store.peek("b") == "2"
        with pytest.raises(rjet.CursorConflict):
            await a.set_cursor("3")


async def test_a_deleted_bucket_is_named_as_such_not_as_another_runner(js: JetStreamContext, name: str) -> None:
    store = await rjet.JetStreamCursorStore.create(js, name)
    claim = await store.claim("c")
    await js.delete_key_value(store.bucket)
    assert not await store.check_claim("c")
    with pytest.raises(rjet.CursorBucketGone, match="the bucket is gone"):
        claim.check()
    # Created again: the key the claim held is gone; that is not another runner either.
    fresh = await rjet.JetStreamCursorStore.create(js, name)
    second = await fresh.claim("c")
    await second.set_cursor("4")
    await second.flush()
    third = await rjet.JetStreamCursorStore.create(js, name)
    await js.delete_key_value(store.bucket)
    await rjet.JetStreamCursorStore.create(js, name)
    await second.set_cursor("5")
    with pytest.raises(rjet.CursorBucketGone, match="vanished while this runner held it"):
        await second.flush()
    assert await third.get_cursor("c") == ""  # a new claim (a runner that never held one) starts afresh


@pytest.mark.parametrize("what", ["bucket", "key"])
async def test_run_forever_stops_with_a_named_error_when_its_cursor_record_vanishes(
    js: JetStreamContext, stream: rjet.Stream, what: str
) -> None:
    """Neither "another runner" (none was seen) nor a silent start from the beginning (the whole stream
    handled again): a named, permanent error that says where the runner was and how to go on."""
    await stream.insert_many([(f"k{i % 5}", 1, b"") for i in range(40)])
    store = await rjet.JetStreamCursorStore.create(js, stream.name, flush_interval=0.0)
    seen: list[int] = []
    gone = asyncio.Event()

    async def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event.id_int)
        if event.id_int == 20:
            await store.flush()
            if what == "bucket":  # deleted and created again
                await js.delete_key_value(store.bucket)
                await js.create_key_value(bucket=store.bucket)
            else:
                await store.kv.delete(encode_key("c"))
            gone.set()
            raise RuntimeError("a transient error: run_forever runs again, and finds the record gone")

    spec = rjet.Spec(stream.stream, store, rjet.Consumer("c", handle))
    with pytest.raises(rjet.CursorBucketGone) as caught:  # was: CursorConflict "owner unknown"
        await asyncio.wait_for(rjet.run_forever(spec, retry_delay=0.01, max_backoff=0.05), 10)
    err = caught.value
    assert gone.is_set()
    assert seen == list(range(1, 21))  # nothing handled again from the beginning
    assert (err.name, err.bucket, err.cursor) == ("c", store.bucket, "19")
    assert err.stream is not None
    assert err.stream.startswith(f"{stream.name}@")
    assert "vanished while this runner held it" in str(err)
    assert (err.namespace, err.move) == (stream.name, "19")
    assert f"to sequence 19 of stream {stream.name!r}, where this runner was" in str(err)
    assert "rjet cursor" not in str(err)
    assert rjet.is_permanent(err)
    assert not isinstance(err, rjet.CursorConflict)


async def test_a_bucket_with_a_ttl_is_refused_at_open(js: JetStreamContext, name: str) -> None:
    await js.create_key_value(bucket=f"rjet_cursors_{name}", ttl=60)
    with pytest.raises(rjet.CursorBucketUnusable, match="TTL of 60s"):
        await rjet.JetStreamCursorStore.create(js, name)


async def test_an_existing_bucket_config_is_never_changed(js: JetStreamContext, name: str) -> None:
    kv = await js.create_key_value(bucket=f"rjet_cursors_{name}")
    before = (await js.stream_info(f"KV_rjet_cursors_{name}")).config
    assert not before.allow_atomic
    async with await rjet.JetStreamCursorStore.create(js, name) as store:
        for i in range(5):
            await store.set_cursor(f"c{i}", "1")
        await store.flush()  # one by one: the bucket takes no atomic batches
        assert not store._atomic
    after = (await js.stream_info(f"KV_rjet_cursors_{name}")).config
    assert after == before
    assert (await kv.get("c3")).value is not None


async def test_run_forever_with_a_tempting_fate_is_never_fenced_by_itself(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 300)
    async with await rjet.JetStreamCursorStore.create(js, name, flush_interval=0.0) as store:
        seen, fn = recording()

        async def check_often() -> None:
            while True:
                await store.check_claim("c")  # what a Parallel worker's fence watch does
                await asyncio.sleep(0)

        watcher = asyncio.create_task(check_often())
        consumer = rjet.Consumer("c", fn, fate=rjet.RandomFate(0.1, seed=7))
        await asyncio.wait_for(
            rjet.run_forever(rjet.Spec(stream.stream, store, consumer, to_head=True), retry_delay=0.001), 60
        )
        watcher.cancel()
        assert set(seen) == set(range(1, 301))


# ----------------------------------------------------------------- stopping


async def test_stop_does_not_wait_out_the_lag(stream: rjet.Stream) -> None:
    await stream.insert("k", 1)
    seen, fn = recording()
    stop = asyncio.Event()
    task = asyncio.create_task(
        rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", fn), lag=30), stop=stop)
    )
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    stop.set()
    with pytest.raises(rjet.Stopped):
        await asyncio.wait_for(task, 5)
    assert time.monotonic() - t0 < 1.0
    assert seen == []  # no handler call starts after stop


# ----------------------------------------------------------------- limits


async def test_an_insert_whose_headers_pass_max_payload_is_refused_before_sending(
    nc: object, stream: rjet.Stream
) -> None:
    limit = stream.js._nc.max_payload
    with pytest.raises(rjet.InvalidEvent, match="max payload"):
        await stream.insert("k" * 100, 1, b"x" * (limit - 50))
    assert stream.js._nc.is_connected  # was: the server closed the connection
    assert await stream.insert("k", 1) == 1


async def test_stream_create_refusals_stay_in_the_error_tree(js: JetStreamContext, name: str) -> None:
    short = await rjet.Stream.create(js, name, max_age=30.0)  # was: raw ServerError 10052
    assert (await short.info()).config.duplicate_window == 30.0
    with pytest.raises(rjet.StreamError, match=r"refused to create it.*error 10074"):
        await rjet.Stream.create(js, name + "_r3", num_replicas=3)


# ----------------------------------------------------------------- skipping removed events on purpose


async def test_skipping_removed_events_is_logged_counted_and_recorded(
    js: JetStreamContext, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    await rjet.Stream.create(js, name)
    skip = rjet.ReadConfig(batch=100, max_buffered=200, on_removed="skip")  # at event 10, 200 at most fetched
    stream = rjet.Stream(js, name, read=skip)
    await stream.insert_many([("k", 1, b"")] * 5000)
    seen, fn = recording()

    async def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        await fn(fate, event)
        if event.id_int == 10:
            await js.purge_stream(name)
            await stream.insert_many([("k", 1, b"")] * 10)

    dlq = await rjet.DeadLetterStream.create(js, f"{name}_dlq")
    consumer = rjet.Consumer("c", handle, dead_letter=rjet.DeadLetter(dlq))
    stats = rjet.ConsumerStats("c")
    store = rjet.MemCursorStore()
    stop = asyncio.Event()
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer), stats=stats, stop=stop))
    await wait_until(lambda: 5010 in seen, what="the events after the hole")
    stop.set()
    with pytest.raises(rjet.Stopped):
        await asyncio.wait_for(task, 10)
    # What the reader had fetched before the purge is delivered; then the hole; then the new events.
    hole = [s for s in range(1, 5011) if s not in seen]
    assert hole
    assert seen == [*range(1, hole[0]), *range(5001, 5011)]
    snap = stats.snapshot()
    assert snap.removed == len(hole)
    assert snap.dead_lettered == 1
    async with await dlq.stream.stream(to_head=True) as client:
        [letter] = [e async for e in client]
    import json

    record = json.loads(letter.metadata)
    assert record["event_id"] == f"{hole[0]}..5000"
    assert record["error"].startswith("EventsRemoved: ")
    assert f"skipping events {hole[0]}..5000" in caplog.text
    assert store.cursors["c"] == "5010"


async def test_a_raw_client_skipping_removed_events_counts_them(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name, max_msgs=10)
    await stream.insert_many([("k", 1, b"")] * 5)
    # A buffer of 4: once 1..4 are fetched, nothing more is asked for while they wait.
    read = rjet.ReadConfig(batch=4, max_buffered=4, on_removed="skip")
    client = await rjet.Stream(js, name, read=read).stream()
    assert (await client.recv()).id_int == 1
    await asyncio.sleep(0.1)
    await stream.insert_many([("k", 1, b"")] * 30)  # keeps 26..35
    got = [(await client.recv()).id_int for _ in range(13)]
    assert got == [2, 3, 4, *range(26, 36)]
    assert client.removed == 21
    await client.close()
    with pytest.raises(rjet.ConfigError, match="on_removed"):
        rjet.ReadConfig(on_removed="ignore")  # type: ignore[arg-type]


async def test_no_handler_call_starts_after_stop_with_a_sync_handler(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 50)
    starts: list[float] = []

    def slow(fate: rjet.Fate, event: rjet.Event) -> None:
        starts.append(time.monotonic())
        time.sleep(0.1)  # blocks the loop, as a sync handler does: a signal is seen between events

    stop = asyncio.Event()
    stopped_at: list[float] = []

    def request_stop() -> None:  # what a SIGTERM handler on the loop does
        stopped_at.append(time.monotonic())
        stop.set()

    asyncio.get_running_loop().call_later(0.25, request_stop)
    with pytest.raises(rjet.Stopped):
        await asyncio.wait_for(
            rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", slow)), stop=stop), 10
        )
    assert [t for t in starts if t > stopped_at[0]] == []  # was: one or two more calls after the stop


async def test_a_run_that_cannot_open_its_stream_leaves_no_cursor_record(
    js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    """A run against a missing stream used to leave an empty cursor record behind (listed by `rjet status`
    under every stream); now only a run that read something leaves a record."""
    from rjet.sql import SqlCursorStore

    missing = rjet.Stream(js, f"{name}_missing")
    consumer = rjet.Consumer("c", lambda f, e: None)
    async with (
        await rjet.JetStreamCursorStore.create(js, name) as jetstream,
        await SqlCursorStore.open(f"sqlite:///{tmp_path / 'c.db'}") as sql,
    ):
        mem = rjet.MemCursorStore()
        for store in (jetstream, sql, mem):
            with pytest.raises(rjet.StreamNotFound):
                await rjet.run(rjet.Spec(missing.stream, store, consumer))
        assert await jetstream.peek_record("c") is None
        assert await jetstream.cursors() == {}
        assert await sql.peek("c") == ""
        assert mem.record("c") is None
        # A cursor that was there stays, as it was.
        await (claim := await jetstream.claim("c")).set_cursor("7")
        await claim.release()
        with pytest.raises(rjet.StreamNotFound):
            await rjet.run(rjet.Spec(missing.stream, jetstream, consumer))
        assert await jetstream.peek("c") == "7"


async def test_run_forever_goes_on_once_its_missing_stream_appears(js: JetStreamContext, name: str) -> None:
    """A run that cannot open its stream removes the record its claim created; the next run claims
    afresh (was: it looked for its own record, found none, and stopped with CursorBucketGone)."""
    seen: list[int] = []

    def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event.id_int)

    async with await rjet.JetStreamCursorStore.create(js, name) as store:
        spec = rjet.Spec(rjet.Stream(js, name).stream, store, rjet.Consumer("c", handle), to_head=True)
        task = asyncio.create_task(rjet.run_forever(spec, retry_delay=0.05, max_backoff=0.1))
        await asyncio.sleep(0.5)  # several runs find no stream
        assert not task.done()
        stream = await rjet.Stream.create(js, name)
        await stream.insert_many([("k", 1, b"")] * 3)
        await asyncio.wait_for(task, 10)
        assert seen == [1, 2, 3]
        assert await store.peek("c") == "3"
