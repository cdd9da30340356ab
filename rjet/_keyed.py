"""Key-ordered concurrency: many handler calls in flight, one at a time per foreign ID.

``run`` hands a consumer with ``concurrency`` > 1, a :class:`rjet.Batch` or ``on_error="retry"``
to :class:`KeyedRun`. One reader (the caller's task) takes events from the stream client in order
and queues each behind the earlier events of its foreign ID; ``concurrency`` worker tasks take keys
whose head may start, handle it, and mark it done in a :class:`rjet._progress.Progress`, whose
watermark is the cursor and whose done set above it is stored with it (exact progress). A key is
in ``_queues`` while it has events waiting or in flight, and in ``_ready`` while it has events
waiting and none in flight: the two together are the whole per-key ordering rule.

Bounds: at most ``concurrency`` calls in flight; at most ``max_waiting`` events (and
``max_waiting_bytes``) read and not started; and the encoded done set at most
:data:`PROGRESS_LIMIT` bytes. Reading pauses at any of them (a hot key fills the queue and so slows
reading; a stuck key at the watermark makes the done set grow until reading pauses): back-pressure,
never loss.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol

from rjet._progress import Progress, decode_done
from rjet._tasks import cancel_and_wait
from rjet.deadletter import record_for
from rjet.errors import DecodeError, EventsRemoved, HeadReached, InvalidCursor, Stopped, Tempted
from rjet.event import Event

if TYPE_CHECKING:
    from rjet.consumer import Consumer
    from rjet.cursors import ProgressSource
    from rjet.fate import Fate
    from rjet.stats import ConsumerStats

__all__ = ["PROGRESS_LIMIT", "KeyedRun"]

log = logging.getLogger("rjet.run")

PROGRESS_LIMIT: Final = 256 * 1024
"""Bytes of encoded done set past which reading pauses (a KV value holds about 1 MB)."""

_EVENT_OVERHEAD: Final = 200  # bytes an Event costs beside its metadata and foreign ID
_RETRY_BACKOFF: Final = 0.1  # first delay of a key's retry without a dead-letter policy, doubling
_RETRY_MAX_BACKOFF: Final = 10.0
_YIELD_EVERY: Final = 0.01
# Events the reader takes from the stream client in one call at most: the done set's size and the
# byte bound are looked at between calls, so this is how far past them a run of events may go.
_TAKE: Final = 64


class _Lease(Protocol):
    """The claim's lease: until when it is known held, and how to look again (see ``claim_lease``)."""

    expires: float

    async def confirm(self) -> None: ...


class _Abort(Exception):
    """A worker ends without finishing its events (the run is ending)."""


class KeyedRun:
    """One run of a concurrent consumer (see the module docstring); :meth:`run` never returns."""

    def __init__(
        self,
        consumer: Consumer,
        *,
        recv: Callable[[], Awaitable[Event | int | EventsRemoved]],
        take: Callable[[int], list[Event]] | None = None,
        set_cursor: Callable[[str | ProgressSource], Awaitable[None]],
        lease: _Lease,
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
        bury: Callable[..., Awaitable[None]],
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
        self._stopping = stopping
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
        self._ready: deque[str] = deque()
        self._since: dict[str, float] = {}  # batches: key -> loop time its first waiting event was read
        self._idle: deque[asyncio.Future[None]] = deque()  # workers with nothing to take
        self._arrivals: list[asyncio.Future[None]] = []  # a batch collector waiting for events
        self._collecting = False  # a worker is filling a batch (one at a time: batches fill up)
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
        self._closing = asyncio.Event()
        self._halted: asyncio.Future[Any] | None = None  # resolves when the run's guard halts it
        self._loop = asyncio.get_running_loop()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if not consumer.is_async:
            self._pool = concurrent.futures.ThreadPoolExecutor(consumer.concurrency, f"rjet-{consumer.name}")

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

    async def run(self) -> NoReturn:
        """Read, schedule and handle until the run ends; raises why it ended (see :func:`rjet.run`)."""
        work = self._work_loop if self._consumer.batch is None else self._batch_loop
        workers = [asyncio.create_task(work()) for _ in range(self._consumer.concurrency)]
        saver = asyncio.create_task(self._saver())
        self._halted = asyncio.ensure_future(self._halt.wait())
        self._halted.add_done_callback(lambda _: self._wake_all())  # a reader waiting for room stops too
        try:
            try:
                await self._read()
            except HeadReached as e:
                await self._drain()  # to_head: every event read is handled before the run ends
                if self._failure is None:
                    self._fail(e)
            except Stopped as e:
                if not self._halt.is_set():
                    self._fail(e)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._fail(e)
            # Graceful from here: calls in flight finish and are recorded; nothing new starts.
            self._closing.set()
            self._wake_all()
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
            self._closing.set()  # forced (a second stop, or the run's task cancelled): nothing new starts
            await cancel_and_wait((*workers, saver))
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._stats.in_flight = 0

    # ------------------------------------------------------------------ the reader

    async def _read(self) -> None:  # noqa: C901 (the hot path, kept in one piece)
        consumer, progress, stats = self._consumer, self._progress, self._stats
        key_filter = None if self._key_checked else consumer.key_filter
        types, event_filter = consumer.types, consumer.filter
        filtered = key_filter is not None or types is not None or event_filter is not None
        recv, take, changed = self._recv, self._take, self._changed
        max_waiting, max_bytes = consumer.max_waiting, consumer.max_waiting_bytes
        halted, stopping, closing = self._halt.is_set, self._stopping, self._closing.is_set
        queues, ready, idle = self._queues, self._ready, self._idle
        batched = consumer.batch is not None
        clock = time.monotonic
        next_yield = clock() + _YIELD_EVERY
        unchecked = 0  # events read since the done set's size was last looked at
        while True:
            if halted() or stopping() or closing():
                return
            full = self._waiting >= max_waiting or self._waiting_bytes >= max_bytes
            unchecked += 1
            # Each event read adds a few bytes to the done set at most: looking every 64 events
            # overshoots the limit by a few hundred bytes, for an O(1) check that is not free.
            if full or (unchecked >= 64 and progress.size_bound() > PROGRESS_LIMIT):
                await self._pause(full)
                continue
            if unchecked >= 64:
                unchecked = 0
            if clock() >= next_yield:
                await asyncio.sleep(0)  # workers take what was queued
                next_yield = clock() + _YIELD_EVERY
            # A run of the events ready now in one call, where the client can (a coroutine per
            # event was a quarter of this reader's cost); one at a time through recv() otherwise.
            events: Sequence[Event] = take(min(_TAKE, max_waiting - self._waiting)) if take else ()
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
                queue = queues.get(key)
                if queue is None:
                    queues[key] = deque((event,))
                    ready.append(key)
                    if batched:
                        self._since[key] = self._loop.time()
                    if idle:
                        idle.popleft().set_result(None)
                else:
                    queue.append(event)
                    if len(queue) > stats.key_queue_max:
                        stats.key_queue_max = len(queue)
                self._waiting += 1
                self._waiting_bytes += len(event.metadata) + len(key) + _EVENT_OVERHEAD
                if batched and self._arrivals:
                    self._arrived()

    def _arrived(self) -> None:
        """Events were queued: a batch collector waiting for more looks again."""
        for f in self._arrivals:
            if not f.done():
                f.set_result(None)
        self._arrivals.clear()

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
        """Return once every event read is done, or the run fails."""
        while self._queues and not self._closing.is_set():
            self._emptied = self._loop.create_future()
            await self._emptied

    # ------------------------------------------------------------------ the workers

    @contextlib.contextmanager
    def _worker(self) -> Iterator[None]:
        """How a worker ends. (A context in the worker's loop, not a coroutine around it: every
        coroutine between the task and the handler costs each suspension a frame to go through.)"""
        try:
            yield
        except _Abort:
            pass
        except Exception as e:  # a dead-letter sink failing, a bug: the run ends
            self._fail(e)

    async def _work_loop(self) -> None:
        with self._worker():
            consumer, progress, stats = self._consumer, self._progress, self._stats
            queues, ready, idle = self._queues, self._ready, self._idle
            fn, fate = consumer.fn, consumer.fate
            direct = self._pool is None and not stats.timing
            closing = self._closing.is_set
            create_future = self._loop.create_future
            lease, monotonic = self._lease, time.monotonic
            low = self._low  # a reader waiting for room goes on below it (and the bytes' low mark)
            while not closing():
                if not ready:
                    waiter = create_future()
                    idle.append(waiter)
                    await waiter
                    continue
                key = ready.popleft()
                queue = queues[key]
                event = queue.popleft()
                self._waiting -= 1
                self._waiting_bytes -= len(event.metadata) + len(key) + _EVENT_OVERHEAD
                if self._room is not None and self._waiting <= low:
                    self._taken()
                if monotonic() >= lease.expires:  # not seen held for a lease: look before handling
                    await lease.confirm()
                    if closing():
                        return
                stats.in_flight += 1
                try:
                    if direct:
                        # The common case without the retry machinery's frame; a failure goes through it.
                        try:
                            await fn(fate, event)  # type: ignore[arg-type, misc]
                            handled = True
                        except Exception as e:
                            handled = await self._handle([event], e)
                    else:
                        handled = await self._handle([event])
                finally:
                    stats.in_flight -= 1
                progress.done(int(event.id))
                if handled:
                    stats.handled += 1
                    stats.last_event = event
                if queue:
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
            progress, stats = self._progress, self._stats
            queues, ready = self._queues, self._ready
            batch = self._consumer.batch
            assert batch is not None
            closing = self._closing.is_set
            while not closing():
                if not ready or self._collecting:
                    waiter = self._loop.create_future()
                    self._idle.append(waiter)
                    await waiter
                    continue
                keys, events = await self._collect(batch.max_len, batch.max_wait)
                if time.monotonic() >= self._lease.expires:
                    await self._lease.confirm()
                if closing():
                    return  # not started: they stay not done, read again by the next run
                self._waiting -= len(events)
                self._waiting_bytes -= sum(len(e.metadata) + len(e.foreign_id) + _EVENT_OVERHEAD for e in events)
                if self._room is not None:
                    self._taken()
                stats.in_flight += 1
                try:
                    handled = await self._handle(events)
                finally:
                    stats.in_flight -= 1
                for e in events:
                    progress.done(int(e.id))
                if handled:
                    stats.handled += len(events)
                    stats.last_event = events[-1]
                for key in keys:
                    if queues[key]:
                        ready.append(key)
                        self._since[key] = self._loop.time()
                    else:
                        del queues[key]
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

    async def _collect(self, max_len: int, max_wait: float) -> tuple[list[str], list[Event]]:
        """Fill one batch: whole keys' waiting events, until ``max_len`` or ``max_wait`` after the
        first one was read. Only one worker collects at a time, so batches fill up."""
        queues, ready = self._queues, self._ready
        self._collecting = True
        try:
            keys: list[str] = []
            events: list[Event] = []
            deadline = self._since.get(ready[0], self._loop.time()) + max_wait
            while True:
                while ready and len(events) < max_len:
                    key = ready.popleft()
                    keys.append(key)
                    self._since.pop(key, None)
                for key in keys:  # a key taken keeps its later events for this batch, in order
                    queue = queues[key]
                    while queue and len(events) < max_len:
                        events.append(queue.popleft())
                left = deadline - self._loop.time()
                if len(events) >= max_len or left <= 0 or self._closing.is_set():
                    break
                arrival = self._loop.create_future()
                self._arrivals.append(arrival)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrival, left)
        finally:
            self._collecting = False
            if ready and self._idle:
                self._idle.popleft().set_result(None)  # the next collector
        if len(keys) > 1:
            events.sort(key=lambda e: int(e.id))
        return keys, events

    async def _handle(self, events: list[Event], error: Exception | None = None) -> bool:
        """Call the handler until it succeeds (True) or the events are recorded as dead letters
        (False); raises :class:`_Abort` when the run ends first (the events stay not done).
        ``error``: the first attempt was made already and raised it."""
        consumer, stats = self._consumer, self._stats
        dead_letter = consumer.dead_letter
        arg: Event | list[Event] = events if consumer.batch is not None else events[0]
        attempt = 0
        while True:
            attempt += 1
            if error is None:
                t0 = time.perf_counter() if stats.timing else 0.0
                try:
                    await self._call(arg)
                except Exception as first:
                    error = first
                else:
                    if stats.timing:
                        stats.observe(time.perf_counter() - t0)
                    return True
            e: Exception = error
            error = None
            stats.errors += 1
            where = _where(events)
            if consumer.on_error == "stop" and (dead_letter is None or isinstance(e, Tempted)):
                e.add_note(f"rjet: consumer {self._name!r} failed on {where}; its cursor stays before it")
                self._fail(e)
                raise _Abort from None
            if dead_letter is not None and attempt >= dead_letter.attempts and not isinstance(e, Tempted):
                await self._bury_all(events, e, attempt)
                return False
            delay = (
                dead_letter.delay(attempt)
                if dead_letter is not None
                else min(_RETRY_MAX_BACKOFF, _RETRY_BACKOFF * 2 ** (attempt - 1))
            )
            log.warning(
                "consumer %r: %s failed (attempt %d), trying again in %.2fs; its key waits, others go on: %r",
                self._name, where, attempt, delay, e,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
            if self._closing.is_set():
                raise _Abort from None

    async def _call(self, arg: Event | list[Event]) -> None:
        consumer = self._consumer
        if self._pool is None:
            await consumer.fn(consumer.fate, arg)  # type: ignore[arg-type, misc]
            return
        fn: Callable[[Fate, Any], object] = consumer.fn
        result = await self._loop.run_in_executor(self._pool, fn, consumer.fate, arg)
        if result is not None and asyncio.iscoroutine(result):
            await result

    async def _bury_all(self, events: list[Event], error: Exception, attempts: int) -> None:
        for e in events:
            try:
                await self._bury(record_for(self._name, self._stream, e.id, e, error, attempts), error)
            except BaseException as sink_error:
                self._fail(sink_error)
                raise _Abort from None

    def _fail(self, error: BaseException) -> None:
        """The run ends because of ``error`` (the first one wins)."""
        if self._failure is None:
            self._failure = error
        else:
            log.error("consumer %r: also failed while stopping: %r", self._name, error)
        self._failed.set()  # the run's guard closes the stream client: the reader stops at once
        self._closing.set()
        self._wake_all()

    def _wake_all(self) -> None:
        for waiter in (*self._idle, *self._arrivals, *(f for f in (self._room, self._emptied) if f is not None)):
            if not waiter.done():
                waiter.set_result(None)
        self._idle.clear()
        self._arrivals.clear()


def _where(events: list[Event]) -> str:
    e = events[0]
    if len(events) == 1:
        return f"event {e.id} (type {e.type}, foreign id {e.foreign_id!r})"
    return f"a batch of {len(events)} events ({e.id}..{events[-1].id})"
