"""Consumer statistics and the Prometheus exporter."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.stats import ReaderCounts
from rjet.testing import MemoryStream, MemoryStreamClient

prometheus_client = pytest.importorskip("prometheus_client")


async def test_run_keeps_the_statistics(stream: rjet.Stream) -> None:
    await stream.insert_many([(f"k{i}", i % 2, b"") for i in range(100)])
    stats = rjet.ConsumerStats("c", timing=True)
    consumer = rjet.Consumer("c", lambda f, e: None, types=[1], key_filter=lambda fid: fid != "k3")
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True), stats=stats)
    snap = stats.snapshot()
    assert (snap.handled, snap.filtered, snap.skipped) == (49, 50, 1)
    assert snap.cursor == "100"
    assert snap.runs == 1
    assert snap.handler_seconds_count == 99
    assert sum(snap.handler_buckets) == 99
    assert snap.lag_events == 0
    assert snap.last_event_time is not None


async def test_lag_while_behind(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")] * 3000)
    stats = rjet.ConsumerStats("c")
    release = asyncio.Event()

    async def slow(fate: rjet.Fate, event: rjet.Event) -> None:
        await release.wait()

    task = asyncio.create_task(
        rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", slow)), stats=stats)
    )
    await asyncio.sleep(0.3)
    snap = stats.snapshot()
    assert snap.lag_events == 2999  # the first event is in the handler; the rest wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_errors_and_dead_letters_are_counted(stream: rjet.Stream) -> None:
    await stream.insert_many([("ok", 1, b""), ("bad", 1, b"")])

    async def sink(record: rjet.DeadLetterRecord) -> None:
        pass

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.foreign_id == "bad":
            raise ValueError("bad")

    stats = rjet.ConsumerStats("c")
    consumer = rjet.Consumer("c", fn, dead_letter=rjet.DeadLetter(sink, attempts=3, backoff=0))
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True), stats=stats)
    snap = stats.snapshot()
    assert (snap.handled, snap.errors, snap.dead_lettered, snap.cursor) == (1, 3, 1, "2")


async def test_prometheus_endpoint(js: JetStreamContext, stream: rjet.Stream) -> None:
    from prometheus_client import CollectorRegistry

    from rjet.metrics import RjetCollector, serve_metrics

    await stream.insert_many([("k", 1, b"")] * 10)
    stats = rjet.ConsumerStats("mailer", timing=True)
    async with await rjet.JetStreamCursorStore.create(js, stream.name) as store:
        with pytest.raises(rjet.HeadReached):
            await rjet.run(
                rjet.Spec(stream.stream, store, rjet.Consumer("mailer", lambda f, e: None), to_head=True), stats=stats
            )
        registry = CollectorRegistry()
        registry.register(RjetCollector([stats], cursor_stores=[store]))
        async with serve_metrics(registry, port=0) as server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            body = (await reader.read()).decode()
            writer.close()
    assert body.startswith("HTTP/1.1 200 OK")
    assert 'rjet_events_handled_total{consumer="mailer"} 10.0' in body
    assert 'rjet_handler_duration_seconds_count{consumer="mailer"} 10.0' in body
    assert 'rjet_consumer_lag_events{consumer="mailer"} 0.0' in body
    assert f'rjet_cursor_flushes_total{{namespace="{stream.name}"}} 1.0' in body


async def test_concurrent_consumers_report_hot_keys_and_exact_progress(stream: rjet.Stream) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from rjet.metrics import RjetCollector

    await stream.insert_many([("hot", 1, b"")] * 50 + [("cold", 1, b"")])

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        await asyncio.sleep(0)

    stats = rjet.ConsumerStats("c", timing=True)
    consumer = rjet.Consumer("c", fn, concurrency=4)
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True), stats=stats)
    snap = stats.snapshot()
    assert (snap.handled, snap.cursor, snap.in_flight) == (51, "51", 0)
    assert snap.key_queue_max >= 40  # "hot"'s events waited behind each other
    assert snap.handler_seconds_count == 51
    registry = CollectorRegistry()
    registry.register(RjetCollector([stats]))
    body = generate_latest(registry).decode()
    assert f'rjet_key_queue_max{{consumer="c"}} {float(snap.key_queue_max)}' in body
    assert 'rjet_handlers_in_flight{consumer="c"} 0.0' in body
    assert 'rjet_events_already_done_total{consumer="c"} 0.0' in body
    assert 'rjet_progress_stalls_total{consumer="c"} 0.0' in body


async def test_stats_without_a_name_take_the_consumers(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")])
    stats = rjet.ConsumerStats()
    with pytest.raises(rjet.HeadReached):
        await rjet.run(
            rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", lambda f, e: None), to_head=True),
            stats=stats,
        )
    assert stats.snapshot().name == "c"
    assert stats.snapshot().handled == 1


# The readers run keeps statistics from declare the counters the statistics read: renaming one of them
# (in a reader, or in ReaderCounts) is a type error here, not a figure that silently stays 0.
COUNTED: tuple[type[ReaderCounts], ...] = (rjet.StreamClient, MemoryStreamClient)


async def test_the_reader_s_own_counts_reach_the_snapshot_and_outlive_its_run() -> None:
    ms = MemoryStream("orders", read=rjet.ReadConfig(batch=2, max_buffered=4, on_removed="skip"))
    await ms.insert_many([(f"k{i % 4}", 1, b"") for i in range(40)])
    stats = rjet.ConsumerStats("c")
    lags: list[int] = []

    async def handle(fate: rjet.Fate, event: rjet.Event) -> None:
        lags.append(stats.snapshot().lag_events)
        if event.id == "2":  # removed ahead of the reader, which has fetched up to 4 at the most
            await ms.remove_through(20)

    consumer = rjet.Consumer("c", handle, key_filter=lambda fid: fid != "k3")  # k3: events 4, 8, ...
    store = rjet.MemCursorStore()
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(ms.stream, store, consumer, to_head=True), stats=stats)
    snap = stats.snapshot()
    gone = 20 - 7  # 8..20: the reader held 3, 5, 6 and 7 then (max_buffered 4; 4 passed over)
    assert snap.removed == gone
    assert snap.skipped == 1 + 5  # k3's 4, and 24, 28, 32, 36, 40 after the removed range
    assert snap.handled == len(lags) == 40 - gone - snap.skipped
    assert lags[0] > 0  # the reader's lag while the handler ran
    assert lags[-1] == snap.lag_events == 0

    # A second run's reader replaces the first: what the first counted stays counted.
    await ms.insert_many([("k3", 1, b""), ("k1", 1, b"")])
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(ms.stream, store, consumer, to_head=True), stats=stats)
    again = stats.snapshot()
    assert (again.handled, again.skipped, again.removed) == (snap.handled + 1, snap.skipped + 1, gone)


class _OwnClient:
    """A stream client of a user's own: recv and close, plus the three counts of ReaderCounts."""

    stream, stream_id, key_filter = "own", None, None

    def __init__(self, events: list[rjet.Event]) -> None:
        self._events = events
        self.skipped_passed, self.removed = 2, 5

    @property
    def num_pending(self) -> int:
        return len(self._events)

    async def recv(self) -> rjet.Event:
        if not self._events:
            raise rjet.HeadReached("own", 3)
        return self._events.pop(0)

    async def next_or_skip(self) -> rjet.Event | int | rjet.EventsRemoved:
        return await self.recv()

    def take(self, limit: int) -> list[rjet.Event]:
        return []

    async def close(self) -> None:
        pass


async def test_a_client_of_your_own_that_declares_the_counts_is_read() -> None:
    ms = MemoryStream()
    await ms.insert_many([("k", 1, b"")] * 3)
    async with await ms.stream("", to_head=True) as client:
        events = [e async for e in client]
    own = _OwnClient(events)
    assert isinstance(own, ReaderCounts)

    async def stream(
        after: str = "",
        *,
        from_head: bool = False,
        to_head: bool = False,
        key_filter: Callable[[str], bool] | None = None,
        stream_id: str | None = None,
    ) -> _OwnClient:
        return own

    stats = rjet.ConsumerStats("c")
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(stream, rjet.MemCursorStore(), rjet.Consumer("c", lambda f, e: None)), stats=stats)
    snap = stats.snapshot()
    assert (snap.handled, snap.skipped, snap.removed) == (3, 2, 5)
