"""Cursor writes whose answers are lost (connections cut mid-flight) never fence their own runner."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

import rjet
from rjet.server import EmbeddedServer

from .conftest import CuttingProxy

FAST = rjet.ReadConfig(batch=200, max_buffered=800, heartbeat=0.2, expires=2.0)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_cursor_writes_cut_mid_flight_never_fence_their_runner(
    own_server: EmbeddedServer, proxy: CuttingProxy
) -> None:
    direct = await rjet.connect(own_server.url)
    cut_conn = await rjet.connect(proxy.url, reconnect_time_wait=0.05)
    try:
        stream = await rjet.Stream.create(direct.jetstream(), "acks")
        total = 2000
        await stream.insert_many([(f"k{i % 13}", 1, b"") for i in range(total)])
        js = cut_conn.jetstream(timeout=1.0)  # a lost answer costs 1 s, not 5
        reader = rjet.Stream(js, "acks", read=FAST)
        handled: list[int] = []

        async def handle(fate: rjet.Fate, event: rjet.Event) -> None:
            handled.append(event.id_int)
            await asyncio.sleep(0.002)

        # flush_interval 0: a cursor write is always in flight, so some cuts land between a write and
        # its answer (about one in ten here); cut until a read-back has settled two such writes.
        async with await rjet.JetStreamCursorStore.create(js, "ns", flush_interval=0.0) as store:
            spec = rjet.Spec(reader.stream, store, rjet.Consumer("c", handle))
            task = asyncio.create_task(rjet.run_forever(spec, retry_delay=0.05, max_backoff=0.2))
            cuts = 0
            deadline = time.monotonic() + 90
            while not handled or max(handled) < total or (store.settled < 2 and cuts < 150):
                assert time.monotonic() < deadline, f"stuck at {max(handled, default=0)} of {total}"
                if task.done():
                    raise AssertionError(f"the runner stopped: {task.exception()!r}")  # was: CursorConflict
                if store.settled < 2 and cuts < 150:
                    proxy.cut()
                    cuts += 1
                    if max(handled, default=0) > total - 500:
                        await stream.insert_many([(f"k{i % 13}", 1, b"") for i in range(total, total + 500)])
                        total += 500
                await asyncio.sleep(0.15)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            settled = store.settled
        assert settled >= 1, "no cut landed between a write and its answer: the test proved nothing"
        assert sorted(set(handled)) == list(range(1, total + 1))
        first = list(dict.fromkeys(handled))
        assert first == list(range(1, total + 1))  # first handlings in stream order
        check = await rjet.JetStreamCursorStore.create(direct.jetstream(), "ns")
        assert await check.peek("c") == str(total)
        print(f"events={total} cuts={cuts} settled_by_read_back={settled} replays={len(handled) - total} conflicts=0")
    finally:
        await direct.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await cut_conn.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("lost", [0.5, 0.0], ids=["the next run's claim", "the last cursor write of the failing run"])
async def test_a_claim_applied_with_its_answer_lost_is_still_its_runners_own(
    own_server: EmbeddedServer, proxy: CuttingProxy, lost: float
) -> None:
    """A write of run_forever's runner is applied, its answer lost, and the read-back fails too (what a
    leader step-down or a lost node does): the run ends on a store error. The next run finds a record
    written by this very runner, which is its own, not another runner's. Either write: the next run's
    claim, or a cursor write of the run that fails (which must never be written again later without
    its claim, under another owner)."""
    direct = await rjet.connect(own_server.url)
    cut_conn = await rjet.connect(proxy.url, reconnect_time_wait=0.05)
    try:
        stream = await rjet.Stream.create(direct.jetstream(), "claims")
        await stream.insert_many([(f"k{i % 7}", 1, b"") for i in range(50)])
        js = cut_conn.jetstream(timeout=1.0)
        reader = rjet.Stream(js, "claims", read=FAST)
        seen: list[int] = []
        errors: list[str] = []
        loop = asyncio.get_running_loop()

        def handle(fate: rjet.Fate, event: rjet.Event) -> None:
            seen.append(event.id_int)
            if event.id_int == 20 and not errors:
                errors.append("once")
                # After 0.5 s this run has flushed and released its claim (it waits out a 1 s backoff):
                # the next write of the cursor's key is the next run's claim. At once: it is this
                # run's last cursor write.
                loop.call_later(lost, proxy.lose_answer_to, b"$KV.rjet_cursors_ns.c ", 2.5)
                raise RuntimeError("a transient error: this run ends, run_forever runs again")

        # Cursors are written when a run ends: the failing run's last write is its release's flush.
        async with await rjet.JetStreamCursorStore.create(js, "ns", flush_interval=3600) as store:
            spec = rjet.Spec(reader.stream, store, rjet.Consumer("c", handle), to_head=True)
            await asyncio.wait_for(rjet.run_forever(spec, retry_delay=0.05, max_backoff=1.0), 40)  # was: CursorConflict
        assert proxy.lost_answers == 1
        assert sorted(set(seen)) == list(range(1, 51))
        check = await rjet.JetStreamCursorStore.create(direct.jetstream(), "ns")
        assert await check.peek("c") == "50"
    finally:
        await direct.close()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await cut_conn.close()
