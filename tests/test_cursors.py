"""Cursor stores: the protocol, buffering, key encoding, and fencing of a second runner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.js import JetStreamContext

import rjet
from rjet.cursors import decode_key, encode_key
from rjet.testing import wait_until

StoreFactory = Callable[[], Awaitable[rjet.CursorStore]]


@pytest.fixture(params=["mem", "jetstream"])
async def make_store(request: pytest.FixtureRequest, js: JetStreamContext, name: str) -> AsyncIterator[StoreFactory]:
    made: list[rjet.JetStreamCursorStore] = []
    shared: dict[str, str] = {}

    async def factory() -> rjet.CursorStore:
        if request.param == "mem":
            store = rjet.MemCursorStore()
            store.cursors = shared  # one backing map, as one bucket would be
            return store
        js_store = await rjet.JetStreamCursorStore.create(js, name, flush_interval=0.05)
        made.append(js_store)
        return js_store

    yield factory
    for s in made:
        await s.close()


# ------------------------------------------------------------------ the protocol, for every store


async def test_a_missing_cursor_is_empty(make_store: StoreFactory) -> None:
    store = await make_store()
    assert isinstance(store, rjet.CursorStore)
    assert await store.get_cursor("nobody") == ""


async def test_flushed_cursors_are_read_back_by_a_new_store(make_store: StoreFactory) -> None:
    store = await make_store()
    await store.get_cursor("c")
    await store.set_cursor("c", "41")
    await store.set_cursor("c", "42")
    await store.flush()
    assert await (await make_store()).get_cursor("c") == "42"


# ------------------------------------------------------------------ the JetStream store


async def jet(js: JetStreamContext, ns: str, interval: float = 3600) -> rjet.JetStreamCursorStore:
    return await rjet.JetStreamCursorStore.create(js, ns, flush_interval=interval)


async def test_set_cursor_buffers_until_flush(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as store:
        await store.get_cursor("c")
        await store.set_cursor("c", "5")
        assert await store.peek("c") == ""
        await store.flush()
        assert await store.peek("c") == "5"


async def test_background_flush_writes_within_the_interval(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name, interval=0.1) as store:
        await store.get_cursor("c")
        for i in range(1, 1001):
            await store.set_cursor("c", str(i))
        assert await store.peek("c") == ""
        t0 = asyncio.get_running_loop().time()

        async def flushed() -> bool:  # stored, and the flush that stored it has finished
            return store.flushes >= 1 and await store.peek("c") == "1000"

        await wait_until(flushed, what="the background flush", timeout=2)
        assert asyncio.get_running_loop().time() - t0 < 0.5  # within the interval, give or take
        assert 1 <= store.flushes <= 2


async def test_close_flushes(js: JetStreamContext, name: str) -> None:
    store = await jet(js, name)
    await store.set_cursor("c", "9")
    await store.close()
    await store.close()
    async with await jet(js, name) as other:
        assert await other.peek("c") == "9"
    with pytest.raises(rjet.CursorStoreError, match="closed"):
        await store.set_cursor("c", "10")


async def test_many_dirty_cursors_are_written_in_one_flush(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as store:
        for i in range(100):
            await store.set_cursor(f"c{i}", str(i))
        await store.flush()
        assert store.flushes == 1
        assert await store.cursors() == {f"c{i}": str(i) for i in range(100)}


@pytest.mark.parametrize("cursor_name", ["a b", "über", "x.", ".x", "a..b", "a*b", "a>b", "_b64.x", "tab\there"])
async def test_names_that_are_not_kv_keys_are_encoded(js: JetStreamContext, name: str, cursor_name: str) -> None:
    async with await jet(js, name) as store:
        assert await store.get_cursor(cursor_name) == ""
        await store.set_cursor(cursor_name, "7")
        await store.flush()
        assert await store.peek(cursor_name) == "7"
        assert await store.cursors() == {cursor_name: "7"}


@settings(max_examples=300)
@given(st.text(min_size=1))
def test_key_encoding_round_trips(cursor_name: str) -> None:
    key = encode_key(cursor_name)
    assert decode_key(key) == cursor_name


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "ü"])
async def test_invalid_namespaces_are_refused(js: JetStreamContext, bad: str) -> None:
    with pytest.raises(rjet.ConfigError, match="namespace"):
        await rjet.JetStreamCursorStore.create(js, bad)


async def test_a_second_runner_fences_the_first(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as first, await jet(js, name) as second:
        assert await first.get_cursor("c") == ""
        await first.set_cursor("c", "10")
        await first.flush()
        assert await second.get_cursor("c") == "10"  # claims it
        await first.set_cursor("c", "11")
        with pytest.raises(rjet.CursorConflict, match="another runner wrote it"):
            await first.flush()
        with pytest.raises(rjet.CursorConflict):  # a conflict is final for the fenced store
            await first.set_cursor("c", "12")
        await second.set_cursor("c", "20")
        await second.flush()
        assert await second.peek("c") == "20"


async def test_peek_does_not_fence(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as runner, await jet(js, name) as observer:
        await runner.get_cursor("c")
        await runner.set_cursor("c", "3")
        await runner.flush()
        assert await observer.peek("c") == "3"
        await runner.set_cursor("c", "4")
        await runner.flush()


async def test_bucket_deleted_while_running_is_a_clear_error(js: JetStreamContext, name: str) -> None:
    store = await jet(js, name)
    await store.get_cursor("c")
    await js.delete_key_value(store.bucket)
    await store.set_cursor("c", "3")
    with pytest.raises(rjet.CursorStoreError, match=f"cursor bucket 'rjet_cursors_{name}'.*cursor 'c'"):
        await store.flush()


async def test_check_claim_finds_out_that_an_idle_runner_was_fenced(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as first, await jet(js, name) as second:
        await first.get_cursor("c")
        assert await first.check_claim("c")
        await second.get_cursor("c")
        assert not await first.check_claim("c")
        with pytest.raises(rjet.CursorConflict, match="another runner claimed it"):
            await first.set_cursor("c", "1")
        assert await second.check_claim("c")


async def test_last_written_follows_reads_and_flushes(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as store:
        assert store.last_written("c") is None
        assert await store.get_cursor("c") == ""
        assert store.last_written("c") == ""
        await store.set_cursor("c", "8")
        assert store.last_written("c") == ""
        await store.flush()
        assert store.last_written("c") == "8"


async def test_a_flush_cancelled_mid_write_does_not_fence_the_store_itself(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as store:
        await store.get_cursor("c")
        for i in range(20):
            await store.set_cursor("c", str(i))
            flush = asyncio.ensure_future(store.flush())
            await asyncio.sleep(0)  # the write is on the wire
            flush.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flush
        # The cancelled writes still land (before the next one: one connection keeps them in order).
        await store.set_cursor("c", "final")
        await store.flush()
        assert await store.peek("c") == "final"


async def test_reserved_keys_are_not_cursors(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as store:
        await (await js.key_value(store.bucket)).put("_rjet.heartbeat.x", b"{}")
        await store.set_cursor("_rjet.looks-reserved", "3")
        await store.flush()
        assert await store.cursors() == {"_rjet.looks-reserved": "3"}


async def test_deleted_cursors_are_not_listed(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as store:
        await store.set_cursor("gone", "3")
        await store.set_cursor("kept", "4")
        await store.flush()
        await (await js.key_value(store.bucket)).delete("gone")
        assert await store.cursors() == {"kept": "4"}
        assert await store.peek("gone") == ""


@pytest.mark.fast_paths
async def test_a_flush_of_many_cursors_is_one_atomic_batch(js: JetStreamContext, name: str) -> None:
    async with await jet(js, name) as store:
        assert store._atomic
        for _round in range(3):  # the revisions the batch recorded let the next writes compare-and-swap
            for i in range(50):
                await store.set_cursor(f"c{i}", str(_round * 100 + i))
            await store.flush()
        await store.set_cursor("c7", "single")
        await store.flush()
        cursors = await store.cursors()
        assert cursors["c7"] == "single"
        assert cursors["c49"] == "249"
        bucket = await js.stream_info(f"KV_{store.bucket}")
        assert bucket.config.allow_atomic
        assert bucket.state.last_seq == 151  # 3 batches of 50 and one single write


async def test_a_conflict_inside_a_batch_names_its_cursor_and_writes_the_others(
    js: JetStreamContext, name: str
) -> None:
    async with await jet(js, name) as first, await jet(js, name) as second:
        for n in ("a", "b", "c"):
            await first.get_cursor(n)
        await second.get_cursor("b")  # fences `first` on b only
        for n in ("a", "b", "c"):
            await first.set_cursor(n, "9")
        with pytest.raises(rjet.CursorConflict, match="cursor 'b'"):
            await first.flush()
        assert await first.peek("a") == "9"
        assert await first.peek("c") == "9"
        assert await first.peek("b") == ""


@given(
    cursor=st.one_of(st.just(""), st.integers(0, 2**63).map(str), st.text(max_size=20)),
    stream=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    owner=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
)
def test_cursor_records_round_trip(cursor: str, stream: str | None, owner: str | None) -> None:
    record = rjet.CursorRecord(cursor, stream, owner)
    assert rjet.CursorRecord.decode(record.encode()) == record


def test_a_bare_decimal_is_a_cursor_of_rjet_0_1() -> None:
    assert rjet.CursorRecord.decode(b"42") == rjet.CursorRecord("42")
    assert rjet.CursorRecord.decode(b"") == rjet.CursorRecord("")
    assert rjet.CursorRecord.decode(b"oops").cursor == "oops"  # run then names the consumer: InvalidCursor


async def test_a_claim_lease_counts_from_the_request_not_from_an_answer_that_waited_out_a_pause(
    js: JetStreamContext, name: str
) -> None:
    import time

    async with await rjet.JetStreamCursorStore.create(js, name, claim_lease=0.5) as store:
        claim = await store.claim("c")
        assert claim.expires > time.monotonic()
        await claim.set_cursor("5")
        flushing = asyncio.create_task(claim.flush())
        for _ in range(5):
            await asyncio.sleep(0)  # the write goes out
        time.sleep(0.8)  # noqa: ASYNC251  # the process stalls (a pause, a long GC) as the answer comes in
        await flushing
        # The write proves the claim was held when it was sent, 0.8 s ago: the lease has run out,
        # and run reads the record back before its next handler call.
        assert claim.expires <= time.monotonic()
        await claim.confirm()  # still ours: confirmed now, for another lease
        assert claim.expires > time.monotonic()
