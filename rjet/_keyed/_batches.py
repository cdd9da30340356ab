"""Batch assembly for a concurrent consumer with a :class:`rjet.Batch`: which waiting events go
together, oldest first, and when a part-full batch may go."""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from rjet.event import Event

if TYPE_CHECKING:
    from rjet.consumer import Batch
    from rjet.stats import ConsumerStats

__all__ = ["Batches"]


class Batches:
    """The ready keys of a batched run and the batches taken from them.

    ``queues`` (a key's waiting events, oldest first) is the run's own; a key is *ready* while it has
    events waiting and is not ``held`` (in a batch in flight, or parked to be tried again). ``heap``
    lists the ready keys by their oldest waiting event: its entries go stale as keys are taken, and
    a stale one is dropped when it comes up. ``ready_events`` counts the events of ready keys,
    ``since`` when each ready key's oldest event became ready.
    """

    __slots__ = (
        "_deadline", "_deadline_at", "_idle", "_loop", "_stats", "_wake_one", "draining", "heap", "held",
        "max_len", "max_wait", "queues", "ready_events", "since",
    )  # fmt: skip

    def __init__(
        self,
        batch: Batch,
        queues: dict[str, deque[Event]],
        *,
        stats: ConsumerStats,
        idle: deque[asyncio.Future[None]],
        wake_one: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.max_len = batch.max_len
        self.max_wait = batch.max_wait
        self.queues = queues
        self.heap: list[tuple[int, str]] = []
        self.held: set[str] = set()
        self.ready_events = 0
        self.since: dict[str, float] = {}
        self.draining = False  # a to_head run read everything: part-full batches go at once
        self._stats = stats
        self._idle = idle  # the run's idle workers
        self._wake_one = wake_one
        self._loop = loop
        self._deadline: asyncio.TimerHandle | None = None  # wakes a worker when a part-full batch is due
        self._deadline_at = math.inf

    def queue(self, key: str, seq: int, event: Event) -> None:
        """Queue ``event`` (sequence ``seq``) behind its key's: a ready key's event counts towards the
        next batch."""
        queue = self.queues.get(key)
        if queue is None:
            self.queues[key] = deque((event,))
            heapq.heappush(self.heap, (seq, key))
            now = self._loop.time()
            self.since[key] = now
            if self._deadline is None:
                self._arm(now + self.max_wait)
        else:
            queue.append(event)
            if len(queue) > self._stats.key_queue_max:
                self._stats.key_queue_max = len(queue)
            if key in self.held:
                return
        self.ready_events += 1
        if self.ready_events >= self.max_len and self._idle:
            self._wake_one()

    def full(self) -> bool:
        """Whether a batch may go at once: ``max_len`` events are ready, or a ``to_head`` run read
        everything and some are."""
        return self.ready_events >= self.max_len or (self.draining and self.ready_events > 0)

    def take(self) -> tuple[list[str], list[Event]] | None:
        """Take the next batch (its keys, held from now on, and its events), oldest events first, when
        one may go: :meth:`full`, or the oldest ready event waited ``max_wait`` (a timer wakes a worker
        then)."""
        if not self.ready_events:
            return None
        max_len = self.max_len
        if self.ready_events < max_len and not self.draining:
            deadline = min(self.since.values()) + self.max_wait
            if self._loop.time() < deadline:
                self._arm(deadline)
                return None
        heap, queues, held, since = self.heap, self.queues, self.held, self.since
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
        self.ready_events -= len(events) + left
        if len(heap) > 4 * len(queues) + 64:  # stale entries of keys held for long: drop them
            self.heap = [(int(q[0].id), k) for k, q in queues.items() if q and k not in held]
            heapq.heapify(self.heap)
        return keys, events

    def release(self, keys: list[str]) -> None:
        """A batch is done: its keys are ready again (their waiting events count from now), or gone."""
        queues, held = self.queues, self.held
        now = self._loop.time()
        for key in keys:
            held.discard(key)
            queue = queues[key]
            if queue:
                self.ready_events += len(queue)
                heapq.heappush(self.heap, (int(queue[0].id), key))
                self.since[key] = now
            else:
                del queues[key]

    def cancel(self) -> None:
        """The run ended: no worker is woken for a part-full batch."""
        if self._deadline is not None:
            self._deadline.cancel()

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
