"""One run of a concurrent consumer (see the package docstring): the reader that queues events
behind their keys' earlier ones, the workers that take and handle them, the saver that hands the
progress to the cursor store, and how the run ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

from rjet._keyed._batches import Batches
from rjet._keyed._calls import Calls
from rjet._keyed._failures import Abort, Failures
from rjet._progress import Progress, decode_done
from rjet._tasks import cancel_and_wait
from rjet.deadletter import DeadLetterRecord, record_for
from rjet.errors import DecodeError, EventsRemoved, HeadReached, InvalidCursor, Stopped
from rjet.event import Event

if TYPE_CHECKING:
    from rjet.consumer import Consumer
    from rjet.cursors import Claim, ProgressSource
    from rjet.stats import ConsumerStats

__all__ = ["PROGRESS_LIMIT", "KeyedRun"]

log = logging.getLogger("rjet.run")

PROGRESS_LIMIT: Final = 256 * 1024
"""Bytes of encoded done set past which reading pauses (a KV value holds about 1 MB)."""

_EVENT_OVERHEAD: Final = 200  # bytes an Event costs beside its metadata and foreign ID
_YIELD_EVERY: Final = 0.01
# Events the reader takes from the stream client in one call at most: the done set's size and the
# byte bound are looked at between calls, so this is how far past them a run of events may go.
_TAKE: Final = 64


class KeyedRun:
    """One run of a concurrent consumer (see the package docstring); :meth:`run` never returns."""

    def __init__(
        self,
        consumer: Consumer,
        *,
        recv: Callable[[], Awaitable[Event | int | EventsRemoved]],
        take: Callable[[int], list[Event]] | None = None,
        set_cursor: Callable[[str | ProgressSource], Awaitable[None]],
        lease: Claim,
        exact: bool,
        cursor: str,
        done: str | None,
        stats: ConsumerStats,
        stream: str,
        key_checked: bool,
        lag: float,
        halt: asyncio.Event,
        stopping: Callable[[], bool],
        failed: asyncio.Event,
        bury: Callable[[DeadLetterRecord, Exception], Awaitable[None]],
        record_removed: Callable[[EventsRemoved], Awaitable[None]],
    ) -> None:
        self._consumer = consumer
        self._name = consumer.name
        self._recv = recv
        self._take = take  # events ready now, in one call (StreamClient.take); None: recv() each
        self._store_cursor = set_cursor
        self._lease = lease
        self._exact = exact  # the store keeps exact progress (JetStreamCursorStore); others the watermark
        self._stats = stats
        self._stream = stream
        self._key_checked = key_checked
        self._lag = lag
        self._halt = halt
        self._stopping = stopping  # the stop request itself: set before the run's guard sets `halt`
        # The claim lost (set by the cursor store's flush, before the run's guard sets `halt`).
        self._lost: Callable[[], bool] = lambda: lease.lost is not None
        self._failed = failed
        self._bury = bury
        self._record_removed = record_removed
        base = int(cursor or 0)
        try:
            restored = decode_done(base, done or "")
        except ValueError as e:
            raise InvalidCursor(
                f"{cursor} (done {done!r}: {e})", f"consumer {consumer.name!r}: its stored exact progress"
            ) from None
        self._progress = Progress(base, restored)
        self._queues: dict[str, deque[Event]] = {}
        self._ready: deque[str] = deque()  # without batches: the ready keys, first come first
        self._idle: deque[asyncio.Future[None]] = deque()  # workers with nothing to take
        self._room: asyncio.Future[None] | None = None  # the reader, waiting for room
        self._progress_full = False  # the reader waits because the done set is at its limit
        self._low = consumer.max_waiting * 3 // 4  # where a reader waiting for room goes on
        self._low_bytes = consumer.max_waiting_bytes * 3 // 4
        self._saving: asyncio.Future[None] | None = None  # the saver, waiting for progress to move
        self._save_due = False  # progress moved since the saver last handed it to the store
        self._emptied: asyncio.Future[None] | None = None  # the reader, waiting for every event to be done
        self._waiting = 0  # events read and not started
        self._waiting_bytes = 0
        self._failure: BaseException | None = None
        self._closing = False  # graceful from here: no call starts (see _gated)
        self._halted: asyncio.Future[Any] | None = None  # resolves when the run's guard halts it
        self._loop = loop = asyncio.get_running_loop()
        self._batches: Batches | None = None  # with batches: the ready keys, and batches taken of them
        if consumer.batch is not None:
            self._batches = Batches(
                consumer.batch, self._queues, stats=stats, idle=self._idle, wake_one=self._wake_one, loop=loop
            )
        self._failures = Failures(
            consumer,
            stats=stats,
            stream=stream,
            bury=bury,
            fail=self._fail,
            closing=lambda: self._closing,
            wake_one=self._wake_one,
            loop=loop,
        )
        self._calls = Calls(consumer, stats=stats, gated=self._gated, lease=lease, loop=loop)

    async def _set_cursor(self, progress: Progress) -> None:
        if self._exact:
            await self._store_cursor(self)  # the store reads snapshot() when it flushes
        else:
            await self._store_cursor(str(progress.watermark or ""))

    def snapshot(self) -> tuple[str, str]:
        """The cursor and the encoded done set above it, now (what the cursor store writes)."""
        cursor, done = self._progress.snapshot()
        return ("" if cursor == "0" else cursor), done

    @property
    def progress(self) -> Progress:
        """The watermark and the events done above it."""
        return self._progress

    def _gated(self) -> bool:
        """Whether the run is ending: stopped, its claim lost, failed. Looked at right before every
        call starts (also from the pool's threads: plain reads)."""
        return self._closing or self._stopping() or self._lost()

    async def run(self) -> NoReturn:
        """Read, schedule and handle until the run ends; raises why it ended (see :func:`rjet.run`)."""
        work = self._work_loop if self._consumer.batch is None else self._batch_loop
        workers = [asyncio.create_task(work()) for _ in range(self._consumer.concurrency)]
        saver = asyncio.create_task(self._saver())
        self._halted = asyncio.ensure_future(self._halt.wait())
        self._halted.add_done_callback(lambda _: self._close())  # a reader waiting for room stops too
        try:
            try:
                await self._read()
            except HeadReached as e:
                await self._drain()  # to_head: every event read is handled before the run ends
                if self._failure is None and not self._gated():
                    self._fail(e)
            except Stopped as e:
                if not (self._halt.is_set() or self._gated()):
                    self._fail(e)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # The reader ended on an error at some point of the stream (events removed ahead of
                # it, an undecodable event, the consumer lost): the events read before that point
                # are handled first, as a one-at-a-time consumer handles them, so that the run ends
                # with everything before it done (and moving the cursor past a hole skips the hole).
                await self._drain()
                self._fail(e)
            # Graceful from here: calls in flight finish and are recorded; nothing new starts.
            self._close()
            await asyncio.gather(*workers, return_exceptions=True)
            saver.cancel()
            self._stats.cursor = str(self._progress.watermark)
            await self._set_cursor(self._progress)
            if self._failure is not None:
                raise self._failure
            raise Stopped(f"consumer {self._name!r}: stopped on request")
        finally:
            if self._halted is not None:
                self._halted.cancel()
            self._close()  # forced (a second stop, or the run's task cancelled): nothing new starts
            self._failures.cancel()
            if self._batches is not None:
                self._batches.cancel()
            await cancel_and_wait((*workers, saver))
            self._calls.close()
            self._stats.in_flight = 0

    # ------------------------------------------------------------------ the reader

    async def _read(self) -> None:  # noqa: C901 (the hot path, kept in one piece)
        consumer, progress, stats = self._consumer, self._progress, self._stats
        key_filter = None if self._key_checked else consumer.key_filter
        types, event_filter = consumer.types, consumer.filter
        filtered = key_filter is not None or types is not None or event_filter is not None
        recv, take, changed = self._recv, self._take, self._changed
        max_waiting, max_bytes = consumer.max_waiting, consumer.max_waiting_bytes
        halted, gated = self._halt.is_set, self._gated
        queues, ready, idle = self._queues, self._ready, self._idle
        queue_batched = self._batches.queue if self._batches is not None else None
        clock = time.monotonic
        next_yield = clock() + _YIELD_EVERY
        unchecked = 0  # events read since the done set's size was last looked at
        largest = 0  # the most bytes an event read so far costs (0: none read yet)
        while True:
            if halted() or gated():
                return
            full = self._waiting >= max_waiting or self._waiting_bytes >= max_bytes
            unchecked += 1
            # Each event read adds a few bytes to the done set at most: looking every 64 events
            # overshoots the limit by a few hundred bytes, for an O(1) check that is not free.
            if full or (unchecked >= 64 and progress.read_size_bound() > PROGRESS_LIMIT):
                await self._pause(full)
                continue
            if unchecked >= 64:
                unchecked = 0
            if clock() >= next_yield:
                await asyncio.sleep(0)  # workers take what was queued
                next_yield = clock() + _YIELD_EVERY
            # A run of the events ready now in one call, where the client can (a coroutine per
            # event was a quarter of this reader's cost); one at a time through recv() otherwise.
            # As many as fit the bytes left if each is as large as the largest so far (and one more,
            # which passes the bound and pauses reading; one alone before any was read): a run of
            # large events would overshoot it.
            if take:
                room = (max_bytes - self._waiting_bytes) // largest + 1 if largest else 1
                events: Sequence[Event] = take(min(_TAKE, max_waiting - self._waiting, room))
            else:
                events = ()
            if events:
                unchecked += len(events) - 1
            else:
                try:
                    item = await recv()
                except DecodeError as e:
                    await self._undecodable(e)
                    continue
                if type(item) is not Event:
                    await self._not_an_event(item)
                    continue
                events = (item,)
            for event in events:
                seq = int(event.id)
                if filtered and (
                    (key_filter is not None and not key_filter(event.foreign_id))
                    or (types is not None and event.type not in types)
                    or (event_filter is not None and not event_filter(event))
                ):
                    progress.passed(seq)
                    stats.filtered += 1
                    changed()
                    continue
                if not progress.read(seq):
                    stats.already_done += 1  # handled before the last restart, above its cursor
                    changed()
                    continue
                if self._lag:
                    await self._wait_lag(event)
                # Queued behind its key's earlier events; its key is ready when it had none.
                key = event.foreign_id
                if queue_batched is not None:
                    queue_batched(key, seq, event)
                else:
                    queue = queues.get(key)
                    if queue is None:
                        queues[key] = deque((event,))
                        ready.append(key)
                        if idle:
                            idle.popleft().set_result(None)
                    else:
                        queue.append(event)
                        if len(queue) > stats.key_queue_max:
                            stats.key_queue_max = len(queue)
                self._waiting += 1
                cost = len(event.metadata) + len(key) + _EVENT_OVERHEAD
                self._waiting_bytes += cost
                if cost > largest:
                    largest = cost

    async def _pause(self, full: bool) -> None:
        """Wait for room: once a quarter of the queue was taken (``full``), or progress moved (the
        done set at its limit)."""
        self._room = self._loop.create_future()
        try:
            if full:
                await self._room
                return
            self._stats.progress_stalls += 1
            self._progress_full = True
            try:
                await self._room
            finally:
                self._progress_full = False
        finally:
            self._room = None  # while it is set, every event a worker takes looks whether the reader may go on

    async def _undecodable(self, e: DecodeError) -> None:
        if self._consumer.dead_letter is None:
            raise e
        await self._bury(record_for(self._name, self._stream, str(e.seq), None, e, 1), e)
        self._progress.passed(e.seq)
        self._changed()

    async def _not_an_event(self, item: Event | int | EventsRemoved) -> None:
        if type(item) is int:  # the reader passed over other keys' events up to here
            self._progress.passed(item)
            self._changed()
        elif self._consumer.dead_letter is not None:  # a range skipped under ReadConfig(on_removed="skip")
            assert isinstance(item, EventsRemoved)
            await self._record_removed(item)

    async def _wait_lag(self, event: Event) -> None:
        wait = event.timestamp_us / 1e6 + self._lag - time.time()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._halt.wait(), wait)

    async def _drain(self) -> None:
        """Return once every event read is done, or the run ends (stopped, claim lost, failed): the
        reader has stopped, so part-full batches go now."""
        if self._batches is not None:
            self._batches.draining = True
        self._wake_all()
        while self._queues and not self._gated():
            self._emptied = self._loop.create_future()
            await self._emptied

    # ------------------------------------------------------------------ the workers

    @contextlib.contextmanager
    def _worker(self) -> Iterator[None]:
        """How a worker ends. (A context in the worker's loop, not a coroutine around it: every
        coroutine between the task and the handler costs each suspension a frame to go through.)"""
        try:
            yield
        except Abort:
            pass
        except Exception as e:  # a dead-letter sink failing, a bug: the run ends
            self._fail(e)

    async def _work_loop(self) -> None:  # noqa: C901 (the hot path, kept in one piece)
        with self._worker():
            consumer, progress, stats = self._consumer, self._progress, self._stats
            queues, ready, idle = self._queues, self._ready, self._idle
            due, after_failure = self._failures.due, self._failures.after
            fn, fate = consumer.fn, consumer.fate
            call = self._calls.call
            direct = self._calls.pool is None and not stats.timing
            gated, stopping = self._gated, self._stopping
            create_future = self._loop.create_future
            lease, monotonic = self._lease, time.monotonic
            low = self._low  # a reader waiting for room goes on below it (and the bytes' low mark)
            error: Exception | None
            handled: bool | None
            while True:
                if due:
                    retry = due.popleft()
                    key, event, attempt = retry.keys[0], retry.events[0], retry.attempt
                elif ready:
                    key = ready.popleft()
                    event = queues[key].popleft()
                    attempt = 0
                    self._waiting -= 1
                    self._waiting_bytes -= len(event.metadata) + len(key) + _EVENT_OVERHEAD
                    if self._room is not None and self._waiting <= low:
                        self._taken()
                else:
                    if gated():
                        return
                    waiter = create_future()
                    idle.append(waiter)
                    await waiter
                    continue
                if monotonic() >= lease.expires:  # not seen held for a lease: look before handling
                    await lease.confirm()
                # _gated(), spelled out: it is looked at before every call.
                if self._closing or stopping() or lease.lost is not None:
                    return  # not started: it stays not done, read again by the next run
                stats.in_flight += 1
                try:
                    if direct:
                        # The common case without the call helper's frame.
                        try:
                            await fn(fate, event)  # type: ignore[arg-type, misc]
                            error = None
                        except Abort:  # not started after all (a transactional call that waited): see _worker
                            raise
                        except Exception as e:
                            error = e
                    else:
                        error = await call([event])
                finally:
                    stats.in_flight -= 1
                if error is not None:
                    handled = await after_failure([key], [event], error, attempt + 1)
                    if handled is None:
                        continue  # parked: tried again at its due time; its key waits, this worker goes on
                else:
                    handled = True
                progress.done(int(event.id))
                if handled:
                    stats.handled += 1
                    stats.last_event = event
                if queues[key]:
                    ready.append(key)  # behind the keys that waited meanwhile
                else:
                    del queues[key]
                    if not queues and self._emptied is not None and not self._emptied.done():
                        self._emptied.set_result(None)
                if not self._save_due:  # one wake of the saver per loop turn, however many events finish
                    self._save_due = True
                    if self._saving is not None:
                        self._saving.set_result(None)
                if self._progress_full:
                    self._changed()

    async def _batch_loop(self) -> None:
        with self._worker():
            batches = self._batches
            assert batches is not None
            progress, stats, queues, idle = self._progress, self._stats, self._queues, self._idle
            due, after_failure = self._failures.due, self._failures.after
            gated, call = self._gated, self._calls.call
            handled: bool | None
            while True:
                if due:
                    retry = due.popleft()
                    keys, events, attempt = retry.keys, retry.events, retry.attempt
                else:
                    batch = batches.take()
                    if batch is None:
                        if gated():
                            return
                        waiter = self._loop.create_future()
                        idle.append(waiter)
                        await waiter
                        continue
                    keys, events = batch
                    attempt = 0
                    self._waiting -= len(events)
                    self._waiting_bytes -= sum(len(e.metadata) + len(e.foreign_id) + _EVENT_OVERHEAD for e in events)
                    if self._room is not None:
                        self._taken()
                    if idle and batches.full():
                        self._wake_one()  # the next batch is ready too
                if time.monotonic() >= self._lease.expires:
                    await self._lease.confirm()
                if gated():
                    return  # not handed over: they stay not done, read again by the next run
                stats.in_flight += 1
                try:
                    error = await call(events)
                finally:
                    stats.in_flight -= 1
                if error is not None:
                    handled = await after_failure(keys, events, error, attempt + 1)
                    if handled is None:
                        continue  # parked: its keys wait, other keys' batches go on
                else:
                    handled = True
                for e in events:
                    progress.done(int(e.id))
                if handled:
                    stats.handled += len(events)
                    stats.last_event = events[-1]
                batches.release(keys)
                if not queues and self._emptied is not None and not self._emptied.done():
                    self._emptied.set_result(None)
                self._changed()

    def _taken(self) -> None:
        """Events were taken off the queue: the reader waiting for room goes on below the low mark."""
        room = self._room
        if (
            room is not None
            and not room.done()
            and self._waiting <= self._low
            and self._waiting_bytes <= self._low_bytes
        ):
            room.set_result(None)

    def _changed(self) -> None:
        """Progress moved: the saver writes it once this loop turn's workers are through, and the
        reader may go on (there is room now, and the done set may have shrunk)."""
        if not self._save_due:
            self._save_due = True
            if self._saving is not None:
                self._saving.set_result(None)
        room = self._room
        if self._progress_full and room is not None and not room.done():
            room.set_result(None)

    async def _saver(self) -> None:
        """Hand the progress to the cursor store once per loop turn in which it moved, not per event."""
        try:
            while True:
                if not self._save_due:
                    self._saving = self._loop.create_future()
                    await self._saving
                    self._saving = None
                self._save_due = False
                self._stats.cursor = str(self._progress.watermark)
                await self._set_cursor(self._progress)
        except Exception as e:  # the store refused it: the run ends (a lost claim says so itself)
            self._fail(e)

    # ------------------------------------------------------------------ the end

    def _fail(self, error: BaseException) -> None:
        """The run ends because of ``error`` (the first one wins)."""
        if self._failure is None:
            self._failure = error
        elif error is not self._failure and repr(error) != repr(self._failure):
            # (Not the same error again: every worker whose call finds the claim lost raises it.)
            log.error("consumer %r: also failed while stopping: %r", self._name, error)
        self._failed.set()  # the run's guard closes the stream client: the reader stops at once
        self._close()

    def _close(self) -> None:
        """Graceful from here: no call starts; the calls in flight finish."""
        self._closing = True
        self._wake_all()

    def _wake_one(self) -> None:
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        for waiter in (*self._idle, *(f for f in (self._room, self._emptied) if f is not None)):
            if not waiter.done():
                waiter.set_result(None)
        self._idle.clear()
