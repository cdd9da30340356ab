"""Key-ordered concurrency: many handler calls in flight, one at a time per foreign ID.

``run`` hands a consumer with ``concurrency`` > 1, a :class:`rjet.Batch` or ``on_error="retry"``
to :class:`KeyedRun`. One reader (the caller's task) takes events from the stream client in order
and queues each behind the earlier events of its foreign ID; ``concurrency`` worker tasks take work,
handle it, and mark it done in a :class:`rjet._progress.Progress`, whose watermark is the cursor and
whose done set above it is stored with it (exact progress).

A key is in ``_queues`` while it has events waiting, in flight or waiting to be tried again. It is
*ready* (may start) while it has events waiting and none in flight or waiting to retry: in
``_ready`` (a FIFO of keys) without batches; with batches, in ``_heap`` (keys by their oldest waiting
event) and not in ``_held``. Those are the whole per-key ordering rule.

Work whose call fails is *parked*: it gets a due time (the consumer's :class:`rjet.RetryPolicy`) and
a timer that hands it back to the workers in ``_due`` then; its keys stay held, no worker waits for
it, and the cursor never passes it. Workers take due work first, then ready keys.

Batches are assembled per key, oldest events first: a batch takes the oldest waiting event of the
ready keys, again and again (a merge by stream sequence), up to ``max_len``; every key it took an
event of is held until it is done, the others form other batches, up to ``concurrency`` in flight.
A batch goes as soon as ``max_len`` events are ready, or ``max_wait`` after the oldest ready key's
first event was read (or its key's last batch finished), or at once once a ``to_head`` run has
read everything.

One signal ends it: a stop request, a lost claim, a failure (``_gated``). Every worker looks at it
right before it starts a call (or hands a batch over; a thread of the pool looks again before it
calls a sync handler): after it is set, no call starts. Calls in flight finish, the progress is
flushed, and ``run`` raises why.

Bounds: at most ``concurrency`` calls in flight; at most ``max_waiting`` events (and
``max_waiting_bytes``) read and not started; and the encoded done set that reading adds at most
:data:`PROGRESS_LIMIT` bytes (the restored entries not reached yet are left out: they never block
the reader, and shrink as it goes). Reading pauses at any of them (a hot key fills the queue and so
slows reading; a stuck key at the watermark makes the done set grow until reading pauses; the
events of keys waiting to retry count as waiting): back-pressure, never loss.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

from rjet._progress import Progress, decode_done
from rjet._tasks import cancel_and_wait
from rjet.deadletter import record_for
from rjet.errors import DecodeError, EventsRemoved, HeadReached, InvalidCursor, Stopped, Tempted
from rjet.event import Event

if TYPE_CHECKING:
    from rjet.consumer import Consumer
    from rjet.cursors import Claim, ProgressSource
    from rjet.fate import Fate
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


class _Abort(Exception):
    """A worker ends without finishing its work (the run is ending)."""


class _Retry:
    """Work whose call failed, tried again at its due time: one event (or one batch), its keys held."""

    __slots__ = ("attempt", "events", "keys", "timer")

    def __init__(self, keys: list[str], events: list[Event], attempt: int) -> None:
        self.keys = keys
        self.events = events
        self.attempt = attempt  # attempts made (and failed)
        self.timer: asyncio.TimerHandle | None = None


class KeyedRun:
    """One run of a concurrent consumer (see the module docstring); :meth:`run` never returns."""

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
        # With batches: the ready keys by their oldest waiting event (entries go stale as keys are
        # taken; a stale one is dropped when it comes up), the keys in a batch in flight or parked,
        # the events of ready keys, and when each ready key's oldest event became ready.
        self._heap: list[tuple[int, str]] = []
        self._held: set[str] = set()
        self._ready_events = 0
        self._since: dict[str, float] = {}
        self._deadline: asyncio.TimerHandle | None = None  # wakes a worker when a part-full batch is due
        self._deadline_at = math.inf
        self._draining = False  # a to_head run read everything: part-full batches go at once
        self._due: deque[_Retry] = deque()  # parked work whose time came, taken before ready keys
        self._parked: set[_Retry] = set()
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
                self._draining = True
                self._wake_all()  # part-full batches go now: nothing more comes
                await self._drain()  # to_head: every event read is handled before the run ends
                if self._failure is None and not self._gated():
                    self._fail(e)
            except Stopped as e:
                if not (self._halt.is_set() or self._gated()):
                    self._fail(e)
            except asyncio.CancelledError:
                raise
            except Exception as e:
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
            for retry in self._parked:
                if retry.timer is not None:
                    retry.timer.cancel()
            self._parked.clear()
            if self._deadline is not None:
                self._deadline.cancel()
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
        halted, gated = self._halt.is_set, self._gated
        queues, ready, idle = self._queues, self._ready, self._idle
        batched = consumer.batch is not None
        queue_batched = self._queue_batched
        clock = time.monotonic
        next_yield = clock() + _YIELD_EVERY
        unchecked = 0  # events read since the done set's size was last looked at
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
                if batched:
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
                self._waiting_bytes += len(event.metadata) + len(key) + _EVENT_OVERHEAD

    def _queue_batched(self, key: str, seq: int, event: Event) -> None:
        """Queue ``event`` for the batches: a ready key's event counts towards the next batch."""
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = deque((event,))
            heapq.heappush(self._heap, (seq, key))
            now = self._loop.time()
            self._since[key] = now
            if self._deadline is None:
                self._arm(now + self._consumer.batch.max_wait)  # type: ignore[union-attr]
        else:
            queue.append(event)
            if len(queue) > self._stats.key_queue_max:
                self._stats.key_queue_max = len(queue)
            if key in self._held:
                return
        self._ready_events += 1
        if self._ready_events >= self._consumer.batch.max_len and self._idle:  # type: ignore[union-attr]
            self._wake_one()

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
        """Return once every event read is done, or the run ends (stopped, claim lost, failed)."""
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
        except _Abort:
            pass
        except Exception as e:  # a dead-letter sink failing, a bug: the run ends
            self._fail(e)

    async def _work_loop(self) -> None:  # noqa: C901 (the hot path, kept in one piece)
        with self._worker():
            consumer, progress, stats = self._consumer, self._progress, self._stats
            queues, ready, idle, due = self._queues, self._ready, self._idle, self._due
            fn, fate = consumer.fn, consumer.fate
            direct = self._pool is None and not stats.timing
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
                        except Exception as e:
                            error = e
                    else:
                        error = await self._call([event])
                finally:
                    stats.in_flight -= 1
                if error is not None:
                    handled = await self._after_failure([key], [event], error, attempt + 1)
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
            progress, stats, due = self._progress, self._stats, self._due
            gated = self._gated
            handled: bool | None
            while True:
                if due:
                    retry = due.popleft()
                    keys, events, attempt = retry.keys, retry.events, retry.attempt
                else:
                    batch = self._next_batch()
                    if batch is None:
                        if gated():
                            return
                        waiter = self._loop.create_future()
                        self._idle.append(waiter)
                        await waiter
                        continue
                    keys, events = batch
                    attempt = 0
                if time.monotonic() >= self._lease.expires:
                    await self._lease.confirm()
                if gated():
                    return  # not handed over: they stay not done, read again by the next run
                stats.in_flight += 1
                try:
                    error = await self._call(events)
                finally:
                    stats.in_flight -= 1
                if error is not None:
                    handled = await self._after_failure(keys, events, error, attempt + 1)
                    if handled is None:
                        continue  # parked: its keys wait, other keys' batches go on
                else:
                    handled = True
                for e in events:
                    progress.done(int(e.id))
                if handled:
                    stats.handled += len(events)
                    stats.last_event = events[-1]
                self._release(keys)
                self._changed()

    def _next_batch(self) -> tuple[list[str], list[Event]] | None:
        """Take the next batch, oldest events first, when one may go: ``max_len`` events ready, or
        the oldest ready one waited ``max_wait`` (a timer wakes a worker then), or a ``to_head`` run
        read everything."""
        if not self._ready_events:
            return None
        batch = self._consumer.batch
        assert batch is not None
        max_len = batch.max_len
        if self._ready_events < max_len and not self._draining:
            deadline = min(self._since.values()) + batch.max_wait
            if self._loop.time() < deadline:
                self._arm(deadline)
                return None
        heap, queues, held, since = self._heap, self._queues, self._held, self._since
        keys: list[str] = []
        taken: set[str] = set()
        events: list[Event] = []
        while heap and len(events) < max_len:
            seq, key = heapq.heappop(heap)
            queue = queues.get(key)
            if not queue or int(queue[0].id) != seq or (key in held and key not in taken):
                continue  # stale: the key was taken (or is parked), or this is a second entry of one head
            if key not in taken:  # first taken into this batch: held from now on
                taken.add(key)
                keys.append(key)
                held.add(key)
                del since[key]
            events.append(queue.popleft())
            # Its next events too while they come before every other ready key's oldest one.
            bound = heap[0][0] if heap else math.inf
            while queue and len(events) < max_len and int(queue[0].id) < bound:
                events.append(queue.popleft())
            if queue:
                heapq.heappush(heap, (int(queue[0].id), key))
        left = sum(len(queues[key]) for key in keys)  # held now, with their keys
        self._ready_events -= len(events) + left
        if len(heap) > 4 * len(queues) + 64:  # stale entries of keys held for long: drop them
            self._heap = [(int(q[0].id), k) for k, q in queues.items() if q and k not in held]
            heapq.heapify(self._heap)
        self._waiting -= len(events)
        self._waiting_bytes -= sum(len(e.metadata) + len(e.foreign_id) + _EVENT_OVERHEAD for e in events)
        if self._room is not None:
            self._taken()
        if self._idle and (self._ready_events >= max_len or (self._draining and self._ready_events)):
            self._wake_one()  # the next batch is ready too
        return keys, events

    def _release(self, keys: list[str]) -> None:
        """A batch is done: its keys are ready again (their waiting events count from now), or gone."""
        queues, held = self._queues, self._held
        now = self._loop.time()
        for key in keys:
            held.discard(key)
            queue = queues[key]
            if queue:
                self._ready_events += len(queue)
                heapq.heappush(self._heap, (int(queue[0].id), key))
                self._since[key] = now
            else:
                del queues[key]
        if not queues and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    def _arm(self, deadline: float) -> None:
        """Wake a worker at ``deadline`` (loop time), when a part-full batch may go."""
        if self._deadline is not None:
            if self._deadline_at <= deadline:
                return
            self._deadline.cancel()
        self._deadline_at = deadline
        self._deadline = self._loop.call_at(deadline, self._deadline_due)

    def _deadline_due(self) -> None:
        self._deadline = None
        self._deadline_at = math.inf
        self._wake_one()

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

    # ------------------------------------------------------------------ calls and retries

    async def _call(self, events: list[Event]) -> Exception | None:
        """One attempt: None when the handler succeeded, else its error. Raises :class:`_Abort` when a
        pool thread found the run ending before it called the handler."""
        consumer, stats = self._consumer, self._stats
        arg: Event | list[Event] = events if consumer.batch is not None else events[0]
        t0 = time.perf_counter() if stats.timing else 0.0
        try:
            if self._pool is None:
                await consumer.fn(consumer.fate, arg)  # type: ignore[arg-type, misc]
            else:
                result = await self._loop.run_in_executor(self._pool, self._in_thread, arg)
                if result is not None and asyncio.iscoroutine(result):
                    await result
        except _Abort:
            raise
        except Exception as e:
            return e
        if stats.timing:
            stats.observe(time.perf_counter() - t0)
        return None

    def _in_thread(self, arg: Event | list[Event]) -> object:
        """A sync handler's call, in a thread of the pool: not started when the run ended meanwhile."""
        if self._gated():
            raise _Abort
        fn: Callable[[Fate, Any], object] = self._consumer.fn
        return fn(self._consumer.fate, arg)

    async def _after_failure(self, keys: list[str], events: list[Event], error: Exception, attempt: int) -> bool | None:
        """After failed attempt number ``attempt`` of ``events``: park them to be tried again at their
        due time (None), or record them as dead letters (False); raises :class:`_Abort` when the error
        ends the run (``on_error="stop"``) or the dead-letter sink failed."""
        consumer = self._consumer
        self._stats.errors += 1
        dead_letter, policy = consumer.dead_letter, consumer.retry
        where = _where(events)
        tempted = isinstance(error, Tempted)
        if consumer.on_error == "stop" and (dead_letter is None or tempted):
            error.add_note(f"rjet: consumer {self._name!r} failed on {where}; its cursor stays before it")
            self._fail(error)
            raise _Abort from None
        if dead_letter is not None and not tempted and policy.gives_up(attempt):
            await self._bury_all(events, error, attempt)
            return False
        delay = policy.delay(attempt)
        log.warning(
            "consumer %r: %s failed (attempt %d), trying again in %.2fs; its key waits, others go on: %r",
            self._name, where, attempt, delay, error,
        )  # fmt: skip
        if not self._closing:
            retry = _Retry(keys, events, attempt)
            retry.timer = self._loop.call_later(delay, self._retry_due, retry)
            self._parked.add(retry)
        return None

    def _retry_due(self, retry: _Retry) -> None:
        """Parked work's due time came: the next free worker takes it, before any ready key."""
        self._parked.discard(retry)
        retry.timer = None
        self._due.append(retry)
        self._wake_one()

    async def _bury_all(self, events: list[Event], error: Exception, attempts: int) -> None:
        for e in events:
            try:
                await self._bury(record_for(self._name, self._stream, e.id, e, error, attempts), error)
            except BaseException as sink_error:
                self._fail(sink_error)
                raise _Abort from None

    # ------------------------------------------------------------------ the end

    def _fail(self, error: BaseException) -> None:
        """The run ends because of ``error`` (the first one wins)."""
        if self._failure is None:
            self._failure = error
        else:
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


def _where(events: list[Event]) -> str:
    e = events[0]
    if len(events) == 1:
        return f"event {e.id} (type {e.type}, foreign id {e.foreign_id!r})"
    return f"a batch of {len(events)} events ({e.id}..{events[-1].id})"
