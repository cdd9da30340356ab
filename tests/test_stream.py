"""Stream: creating and binding, inserting, and reading in order from a cursor."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from nats.js import JetStreamContext, api

import rjet
import rjet.reader._session
from rjet.parallel import shard_of
from rjet.parallel._shard import key_filter
from rjet.reader._session import Requests
from rjet.server import EmbeddedServer


async def read_all(stream: rjet.Stream, after: str = "") -> list[rjet.Event]:
    async with await stream.stream(after, to_head=True) as client:
        return [e async for e in client]


# ------------------------------------------------------------------ create and bind


async def test_create_uses_rjet_defaults(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name)
    info = await js.stream_info(name)
    assert info.config.subjects == [f"{name}.>"]
    assert info.config.retention == api.RetentionPolicy.LIMITS
    assert info.config.storage == api.StorageType.FILE
    assert info.config.duplicate_window == 120
    assert stream.subject == f"{name}.events"


async def test_create_binds_a_compatible_existing_stream(js: JetStreamContext, name: str) -> None:
    await rjet.Stream.create(js, name, max_age=3600)
    again = await rjet.Stream.create(js, name, max_age=3600)
    assert await again.insert("k", 1) == 1


async def test_create_refuses_an_incompatible_existing_stream(js: JetStreamContext, name: str) -> None:
    await rjet.Stream.create(js, name, subjects=[f"{name}.a.>"])
    with pytest.raises(rjet.StreamConfigMismatch, match=r"subjects is \['.*\.a\.>'\], not \['.*\.>'\]"):
        await rjet.Stream.create(js, name)
    with pytest.raises(rjet.StreamConfigMismatch, match="max_msgs is -1, not 5"):
        await rjet.Stream.create(js, name, subjects=[f"{name}.a.>"], max_msgs=5)


async def test_unknown_stream_options_are_config_errors(js: JetStreamContext, name: str) -> None:
    with pytest.raises(rjet.ConfigError, match="unknown stream option"):
        await rjet.Stream.create(js, name, max_agee=1)


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*", "a>"])
def test_invalid_stream_names_are_refused(js: JetStreamContext, bad: str) -> None:
    with pytest.raises(rjet.ConfigError, match="stream name"):
        rjet.Stream(js, bad)


async def test_binding_a_missing_stream_fails_clearly_on_first_use(js: JetStreamContext, name: str) -> None:
    stream = rjet.Stream(js, name)
    with pytest.raises(rjet.StreamNotFound, match=f"stream '{name}' not found"):
        await stream.stream()
    with pytest.raises(rjet.StreamNotFound, match=f"stream '{name}' not found"):
        await stream.insert("k", 1)
    with pytest.raises(rjet.StreamNotFound):
        await rjet.Stream(js, name, subject=f"{name}.events").insert("k", 1)


async def test_bound_stream_derives_its_insert_subject(js: JetStreamContext, name: str) -> None:
    await js.add_stream(name=name, subjects=[f"{name}.orders.*"])
    stream = rjet.Stream(js, name)
    assert await stream.insert("k", 1) == 1
    assert stream.subject == f"{name}.orders.events"


# ------------------------------------------------------------------ insert


async def test_insert_returns_sequences_and_reads_back(stream: rjet.Stream) -> None:
    assert await stream.insert("user-1", 1, b"a") == 1
    assert await stream.insert("user 2 ü", 2) == 2
    events = await read_all(stream)
    assert [(e.id, e.type, e.foreign_id, e.metadata) for e in events] == [
        ("1", 1, "user-1", b"a"),
        ("2", 2, "user 2 ü", b""),
    ]
    assert events[0].timestamp <= events[1].timestamp
    assert events[0].timestamp.tzinfo is not None


async def test_msg_id_deduplicates_within_the_window(stream: rjet.Stream) -> None:
    first = await stream.insert("k", 1, b"x", msg_id="order-7-created")
    again = await stream.insert("k", 1, b"x", msg_id="order-7-created")
    assert first == again == 1
    assert await stream.insert("k", 1, b"x", msg_id="order-8-created") == 2
    assert len(await read_all(stream)) == 2


async def test_insert_many_is_in_order_and_returns_every_sequence(stream: rjet.Stream) -> None:
    items = [(f"k{i % 7}", i % 3, str(i).encode()) for i in range(5000)]
    seqs = await stream.insert_many(items)
    assert seqs == list(range(1, 5001))
    events = await read_all(stream)
    assert [(e.foreign_id, e.type, e.metadata) for e in events] == items
    assert await stream.insert_many([]) == []


async def test_insert_many_checks_every_event_before_sending_any(stream: rjet.Stream) -> None:
    with pytest.raises(rjet.InvalidEvent, match="event #2: foreign id is empty"):
        await stream.insert_many([("a", 1, b""), ("b", 1, b""), ("", 1, b"")])
    with pytest.raises(rjet.InvalidEvent, match=r"event #1 \(foreign id 'b'\) has \d+ bytes"):
        await stream.insert_many([("a", 1, b""), ("b", 1, b"x" * 2_000_000)])
    assert (await stream.info()).state.messages == 0


async def test_insert_refuses_bad_events(stream: rjet.Stream) -> None:
    with pytest.raises(rjet.InvalidEvent, match="more than the server's max payload"):
        await stream.insert("k", 1, b"x" * 2_000_000)
    with pytest.raises(rjet.InvalidEvent, match="foreign id is empty"):
        await stream.insert("", 1)
    with pytest.raises(rjet.InvalidEvent, match="must be bytes"):
        await stream.insert("k", 1, "text")  # type: ignore[arg-type]


async def test_insert_many_names_the_event_the_server_refused(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name, max_msg_size=300)
    with pytest.raises(rjet.InsertError, match=r"insert #1 \(foreign id 'big'\) failed: .*\(1 earlier event"):
        await stream.insert_many([("a", 1, b""), ("big", 1, b"x" * 400), ("c", 1, b"")])


# ------------------------------------------------------------------ reading


async def test_reads_after_the_cursor(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 10)
    assert [e.id for e in await read_all(stream, "7")] == ["8", "9", "10"]
    assert await read_all(stream, "10") == []


async def test_to_head_on_an_empty_stream_is_reached_at_once(stream: rjet.Stream) -> None:
    async with await stream.stream(to_head=True) as client:
        with pytest.raises(rjet.HeadReached):
            await client.recv()


async def test_to_head_stops_at_the_events_present_at_open(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 3)
    async with await stream.stream(to_head=True) as client:
        await stream.insert_many([("k", 1, b"")] * 3)
        got = [e.id async for e in client]
        with pytest.raises(rjet.HeadReached, match="up to sequence 3"):
            await client.recv()
    assert got == ["1", "2", "3"]


async def test_from_head_delivers_only_new_events(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 3)
    async with await stream.stream("1", from_head=True) as client:
        await stream.insert("new", 5)
        event = await asyncio.wait_for(client.recv(), 5)
    assert (event.id, event.foreign_id) == ("4", "new")


async def test_recv_waits_for_new_events(stream: rjet.Stream) -> None:
    async with await stream.stream() as client:
        later = asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(stream.insert("k", 1)))
        event = await asyncio.wait_for(client.recv(), 5)
        later.cancel()
    assert event.id == "1"


async def test_small_batches_keep_order_across_many_pulls(js: JetStreamContext, name: str) -> None:
    read = rjet.ReadConfig(batch=7, max_buffered=20)
    stream = await rjet.Stream.create(js, name, read=read)
    await stream.insert_many([(str(i), 1, b"") for i in range(3000)])
    events = await read_all(stream)
    assert [e.id_int for e in events] == list(range(1, 3001))
    assert [e.foreign_id for e in events] == [str(i) for i in range(3000)]


@pytest.mark.timeout(30)  # the wrong prefix made the client loop, not fail
async def test_a_consumer_named_like_its_stream_still_reads_every_event_in_order(
    js: JetStreamContext, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scanner's pattern takes the reply subject up to the consumer's token; found by its position,
    # not by searching for the consumer's name, which the stream's name may equal.
    class SameName:
        def next(self) -> bytearray:
            return bytearray(name.encode())

    monkeypatch.setattr(rjet.reader._session, "NUID", SameName)
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"k{i}", 1, b"x") for i in range(300)])
    async with await stream.stream(to_head=True) as client:
        assert [e.id async for e in client] == [str(i) for i in range(1, 301)]
        assert client._state.session is not None
        assert client._state.session.name == name.encode()


def test_read_config_refuses_settings_that_cannot_work() -> None:
    with pytest.raises(rjet.ConfigError, match="batch <= max_buffered"):
        rjet.ReadConfig(batch=100, max_buffered=50)
    with pytest.raises(rjet.ConfigError, match="max_buffered_bytes >= 1"):
        rjet.ReadConfig(max_buffered_bytes=0)
    with pytest.raises(rjet.ConfigError, match="heartbeat"):
        rjet.ReadConfig(heartbeat=20.0, expires=30.0)
    with pytest.raises(rjet.ConfigError, match="recover_timeout"):
        rjet.ReadConfig(recover_timeout=0)


LANES = pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "subscription"])


async def settled_buffer(client: rjet.StreamClient, over: int) -> int:
    """``client.buffered_bytes`` once it has passed ``over`` and then stopped growing for 0.2 s."""
    async with asyncio.timeout(5):
        seen = -1
        while True:
            held = client.buffered_bytes
            if held > over and held == seen:
                return held
            seen = held
            await asyncio.sleep(0.2)


@LANES
async def test_the_byte_budget_bounds_the_events_held(js: JetStreamContext, name: str, fast_lane: bool) -> None:
    budget = 64_000
    # By count alone, 400 events of 8 KB (3.2 MB) would be requested and held.
    read = rjet.ReadConfig(batch=100, max_buffered=400, max_buffered_bytes=budget, fast_lane=fast_lane)
    stream = await rjet.Stream.create(js, name, read=read)
    bodies = [b"x" * 8_000] * 300 + [b"small"] * 1000  # requests end at the budget, then at the batch
    await stream.insert_many([(str(i), 1, body) for i, body in enumerate(bodies)])
    async with await stream.stream(to_head=True) as client:
        events = [await client.recv()]
        assert await settled_buffer(client, budget // 2) <= budget  # all that the open requests allow
        events += [e async for e in client]
        assert client.recoveries == 0
    assert [e.id_int for e in events] == list(range(1, 1301))
    assert [e.metadata for e in events] == bodies


@LANES
async def test_an_event_larger_than_the_byte_budget_comes_alone(
    js: JetStreamContext, name: str, fast_lane: bool
) -> None:
    read = rjet.ReadConfig(batch=50, max_buffered=100, max_buffered_bytes=10_000, fast_lane=fast_lane)
    stream = await rjet.Stream.create(js, name, read=read)
    sizes = [100] * 20 + [50_000] + [100] * 20 + [30_000, 30_000] + [100] * 3
    await stream.insert_many([(str(i), 1, b"x" * size) for i, size in enumerate(sizes)])

    async def recv(client: rjet.StreamClient, n: int) -> list[rjet.Event]:
        return [await asyncio.wait_for(client.recv(), 5) for _ in range(n)]

    async with await stream.stream(to_head=True) as client:
        events = await recv(client, 20)
        assert await settled_buffer(client, 0) == 50_000  # asked for alone, into an empty buffer; nothing after it
        events += await recv(client, 21)
        assert await settled_buffer(client, 0) == 30_000
        events += await recv(client, 5)
        assert client.recoveries == 0
    assert [len(e.metadata) for e in events] == sizes
    assert [e.id_int for e in events] == list(range(1, len(sizes) + 1))


def test_pull_requests_are_accounted_oldest_first() -> None:
    """The byte budget's bookkeeping. The server fills pull requests in order; it ends one early with
    a status (408 expired, 409 the next message would pass max_bytes) and confirms that a request with
    max_bytes got its whole batch with a 409 too. Arguments: messages delivered, bytes held, budget,
    messages owed, the new request's share of the budget."""
    r = Requests()
    for owed in (0, 10, 20, 30):  # shares keep requests pipelined while the budget lasts
        assert r.max_bytes(0, 100, 1000, owed, 225) == 225
        r.add(10, 225)
    assert r.max_bytes(0, 100, 1000, 40, 225) == -1  # nothing left: wait
    r = Requests()
    assert r.max_bytes(0, 0, 1000, 0, 1000) == 1000
    r.add(10, 600)
    r.add(10, 400)
    assert r.max_bytes(5, 0, 1000, 15, 1000) == -1  # the open requests may still send the whole budget
    r.ended(10, 0, too_big=False)  # "Batch Completed" of the first; the second is still open
    assert r.max_bytes(10, 300, 1000, 10, 1000) == 300
    assert r.max_bytes(10, 400, 1000, 10, 1000) == -1  # under a quarter of the budget: wait
    r.ended(13, 7, too_big=True)  # the second stopped at its max_bytes after 3 messages
    assert r.max_bytes(13, 300, 1000, 0, 1000) == 700
    r.add(5, 700)
    r.ended(13, 5, too_big=True)  # none sent: the next message is larger than 700 bytes
    assert r.max_bytes(13, 300, 1000, 0, 1000) == -1  # it will come alone, into an empty buffer
    assert r.max_bytes(13, 0, 1000, 0, 1000) == 0  # one message, no byte limit
    r.add(1, 0)
    assert r.max_bytes(13, 0, 1000, 1, 1000) == -1  # still open
    assert r.max_bytes(14, 5000, 1000, 0, 1000) == -1
    assert r.max_bytes(14, 0, 1000, 0, 1000) == 1000
    r.add(10, 1000)
    r.ended(16, 8, too_big=False)  # expired after 2 messages
    assert r.max_bytes(16, 0, 1000, 0, 1000) == 1000
    r.add(10, 1000)
    assert r.max_bytes(16, 0, 1000, 0, 1000) == 1000  # nothing owed, so nothing is open (a status was lost)


async def test_subject_filtered_stream_with_to_head(js: JetStreamContext, name: str) -> None:
    both = await rjet.Stream.create(js, name)
    a = rjet.Stream(js, name, subject=f"{name}.a")
    b = rjet.Stream(js, name, subject=f"{name}.b")
    for i in range(10):
        await (a if i % 3 else b).insert(f"k{i}", i)
    await b.insert("last-b", 99)
    only_a = rjet.Stream(js, name, filter_subjects=[f"{name}.a"])
    got = await read_all(only_a)
    assert [e.type for e in got] == [i for i in range(10) if i % 3]
    assert [e.id_int for e in got] == [2, 3, 5, 6, 8, 9]
    after = await read_all(only_a, "5")
    assert [e.id_int for e in after] == [6, 8, 9]
    assert len(await read_all(both)) == 11


async def test_closed_client_raises_stopped(stream: rjet.Stream) -> None:
    client = await stream.stream()
    await client.close()
    await client.close()
    with pytest.raises(rjet.Stopped):
        await client.recv()


async def test_close_wakes_a_waiting_recv(stream: rjet.Stream) -> None:
    client = await stream.stream()
    waiting = asyncio.ensure_future(client.recv())
    await asyncio.sleep(0.1)
    await client.close()
    with pytest.raises(rjet.Stopped):
        await asyncio.wait_for(waiting, 5)


async def test_the_consumer_is_deleted_on_close(js: JetStreamContext, stream: rjet.Stream) -> None:
    client = await stream.stream()
    assert (await js.stream_info(stream.name)).state.consumer_count == 1
    await client.close()
    assert (await js.stream_info(stream.name)).state.consumer_count == 0


# ------------------------------------------------------------------ decoding


async def test_messages_without_rjet_headers_decode_with_type_zero_and_subject(
    js: JetStreamContext, stream: rjet.Stream
) -> None:
    await js.publish(f"{stream.name}.legacy.user-9", b"raw")
    [event] = await read_all(stream)
    assert (event.type, event.foreign_id, event.metadata) == (0, f"{stream.name}.legacy.user-9", b"raw")


async def test_a_malformed_rjet_header_raises_decode_error_naming_the_sequence(
    js: JetStreamContext, stream: rjet.Stream
) -> None:
    await stream.insert("ok", 1)
    await js.publish(f"{stream.name}.events", b"", headers={"reflex_type": "one"})
    async with await stream.stream(to_head=True) as client:
        assert (await client.recv()).foreign_id == "ok"
        with pytest.raises(rjet.DecodeError, match=rf"stream '{stream.name}' sequence 2: header reflex_type 'one'"):
            await client.recv()


# ------------------------------------------------------------------ cursors the stream cannot honour


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", " 3", "٣"])
async def test_a_cursor_that_is_not_a_sequence_is_refused(stream: rjet.Stream, bad: str) -> None:
    with pytest.raises(rjet.InvalidCursor, match="is not a stream sequence"):
        await stream.stream(bad)


async def test_an_expired_cursor_raises_with_both_numbers(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name, max_msgs=5)
    await stream.insert_many([("k", 1, b"")] * 10)
    with pytest.raises(
        rjet.CursorExpired, match=r"cursor 2 has expired: the stream's first retained sequence is 6"
    ) as e:
        await stream.stream("2")
    assert (e.value.cursor, e.value.first_seq) == (2, 6)
    assert [x.id for x in await read_all(stream, "5")] == ["6", "7", "8", "9", "10"]


async def test_a_purged_stream_expires_older_cursors(js: JetStreamContext, stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 4)
    await js.purge_stream(stream.name)
    with pytest.raises(rjet.CursorExpired):
        await stream.stream("2")
    assert await read_all(stream, "4") == []


async def test_a_cursor_past_the_end_raises(stream: rjet.Stream) -> None:
    await stream.insert("k", 1)
    with pytest.raises(rjet.CursorAhead, match="cursor 9 is past the stream's last sequence 1"):
        await stream.stream("9")


async def test_stream_deleted_while_reading_ends_the_client(js: JetStreamContext, stream: rjet.Stream) -> None:
    await stream.insert("k", 1)
    async with await stream.stream() as client:
        await client.recv()
        await js.delete_stream(stream.name)
        with pytest.raises(rjet.StreamNotFound):
            await asyncio.wait_for(client.recv(), 10)


async def test_a_server_without_jetstream_is_reported() -> None:
    with EmbeddedServer(jetstream=False) as srv:
        nc = await rjet.connect(srv.url)
        try:
            with pytest.raises(rjet.StreamError, match="JetStream is not enabled"):
                await rjet.Stream.create(nc.jetstream(), "s")
            with pytest.raises(rjet.StreamNotFound, match="JetStream is not enabled"):
                await rjet.Stream(nc.jetstream(), "s").stream()
        finally:
            await nc.close()


async def test_insert_many_with_msg_ids_can_be_retried_whole(stream: rjet.Stream) -> None:
    batch = [(f"k{i}", 1, b"", f"batch-1-{i}") for i in range(100)]
    first = await stream.insert_many(batch[:60])
    again = await stream.insert_many(batch)  # a retry after a failure part-way: no duplicates
    assert again[:60] == first
    assert again == list(range(1, 101))
    assert (await stream.info()).state.messages == 100
    with pytest.raises(rjet.InvalidEvent, match="msg_id"):
        await stream.insert_many([("k", 1, b"", "two\nlines")])


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast lane", "nats-py"])
@pytest.mark.parametrize("shard", [False, True], ids=["all", "shard"])
async def test_nats_py_statistics_count_every_delivery(
    js: JetStreamContext, name: str, fast_lane: bool, shard: bool
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"k{i}", 1, b"x" * 10) for i in range(1000)])
    url = js._nc.connected_url
    assert url is not None
    nc = await rjet.connect(url.geturl())  # a connection of its own: only this reader counts
    try:
        reader = rjet.Stream(nc.jetstream(), name, read=rjet.ReadConfig(fast_lane=fast_lane))
        before = dict(nc.stats)
        client = await reader.stream(to_head=True, key_filter=key_filter(0, 2) if shard else None)
        got = [e async for e in client]
        await client.close()
        msgs = nc.stats["in_msgs"] - before["in_msgs"]
        data = nc.stats["in_bytes"] - before["in_bytes"]
        assert 1000 <= msgs < 1020  # every delivery (was: 3 with the fast lane), and a few API replies
        # The events' bodies (and, for those a shard passes over, their ~60 header bytes), and the API replies.
        assert 10_000 <= data < 10_000 + 1000 * 100 + (msgs - 1000) * 2000
        mine = sum(1 for i in range(1000) if shard_of(f"k{i}", 2) == 0)
        assert len(got) == (mine if shard else 1000)
    finally:
        await nc.close()


# ------------------------------------------------------------------ opening, and what a client keeps


async def test_a_client_opens_in_one_step_and_one_not_opened_says_so(js: JetStreamContext, stream: rjet.Stream) -> None:
    await stream.insert_many([("a", 1, b"x"), ("b", 2, b"y")])
    async with await rjet.StreamClient.open(js, stream.name, after=1, to_head=True) as client:
        assert [(e.id, e.foreign_id) async for e in client] == [("2", "b")]
        assert client.stream_id.startswith(f"{stream.name}@")
    unopened = rjet.StreamClient(js, stream.name, config=rjet.ReadConfig())
    with pytest.raises(rjet.ConfigError, match=r"not open: use `await StreamClient\.open"):
        await unopened.recv()
    await unopened.close()


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "subscription"])
async def test_keep_raw_keeps_each_events_subject_and_headers(js: JetStreamContext, name: str, fast_lane: bool) -> None:
    await rjet.Stream.create(js, name)
    await js.publish(f"{name}.other", b"plain", headers={"reflex_type": "3", "X-Extra": "1"})
    stream = rjet.Stream(js, name, read=rjet.ReadConfig(keep_raw=True, fast_lane=fast_lane))
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(300)])  # runs the bulk scan would take
    async with await stream.stream(to_head=True) as client:
        seen = [(e.id_int, client.last_subject, client.last_headers) async for e in client]
    assert len(seen) == 301
    assert seen[0] == (1, f"{name}.other", b"NATS/1.0\r\nreflex_type: 3\r\nX-Extra: 1\r\n\r\n")
    assert all(subject == f"{name}.events" for _, subject, _ in seen[1:])
    assert all(hdr is not None and b"rjet_foreign_id: k%d\r\n" % (seq - 2) in hdr for seq, _, hdr in seen[1:])


# ------------------------------------------------------------------ a to_head reader's tail removed


TAIL_READ = rjet.ReadConfig(batch=1, max_buffered=1, heartbeat=0.2, expires=1.0)


async def _remove_tail(js: JetStreamContext, name: str, how: str, after: int, last: int) -> None:
    if how == "purge":
        await js.purge_stream(name)
    else:
        for seq in range(after + 1, last + 1):
            await js.delete_msg(name, seq)


@pytest.mark.parametrize("how", ["purge", "delete"])
@pytest.mark.parametrize("filtered", [False, True], ids=["unfiltered", "filtered"])
async def test_a_to_head_reader_whose_remaining_events_are_removed_raises_without_waiting_for_an_insert(
    js: JetStreamContext, name: str, how: str, filtered: bool
) -> None:
    # Old code: no frame came after the removal, so the reader waited until the next insert (here,
    # for ever) and only then raised EventsRemoved.
    await rjet.Stream.create(js, name)
    stream = rjet.Stream(js, name, read=TAIL_READ, filter_subjects=[f"{name}.>"] if filtered else None)
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(10)])
    got: list[int] = []
    async with await stream.stream(to_head=True) as client:
        got.append((await asyncio.wait_for(client.recv(), 5)).id_int)  # one more may be on its way
        await _remove_tail(js, name, how, 2, 10)

        async def read_on() -> None:
            while True:
                got.append((await asyncio.wait_for(client.recv(), 5)).id_int)

        with pytest.raises(rjet.EventsRemoved) as caught:
            await read_on()
    assert got in ([1], [1, 2])
    assert (caught.value.first, caught.value.last, caught.value.certain) == (got[-1] + 1, 10, not filtered)


async def test_run_to_head_ends_once_its_tail_is_purged(js: JetStreamContext, name: str) -> None:
    # As reported: rjet.run(to_head=True) hung after its tail was purged.
    stream = await rjet.Stream.create(js, name, read=TAIL_READ)
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(10)])
    seen: list[int] = []

    async def purge_at_3(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event.id_int)
        if len(seen) == 3:  # handling its third event, the run purges the stream
            await js.purge_stream(name)

    store = rjet.MemCursorStore()
    spec = rjet.Spec(stream.stream, store, rjet.Consumer("c", purge_at_3), to_head=True)
    with pytest.raises(rjet.EventsRemoved) as caught:
        await asyncio.wait_for(rjet.run(spec), 10)
    assert caught.value.last == 10
    assert seen in ([1, 2, 3], [1, 2, 3, 4])
    assert store.cursors == {"c": str(seen[-1])}

    skipping = rjet.Stream(js, name, read=dataclasses.replace(TAIL_READ, on_removed="skip"))
    await skipping.insert_many([(f"k{i}", 1, b"") for i in range(5)])  # 11..15
    stats = rjet.ConsumerStats("d")
    skip_spec = rjet.Spec(skipping.stream, rjet.MemCursorStore(), rjet.Consumer("d", purge_at_3), to_head=True)
    seen.clear()
    await asyncio.wait_for(rjet.run_forever(skip_spec, stats=stats), 10)  # returns at the head
    assert seen in ([11, 12, 13], [11, 12, 13, 14])
    assert stats.snapshot().removed == 15 - seen[-1]
