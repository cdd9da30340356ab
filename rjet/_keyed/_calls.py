"""How a concurrent run calls its handler: on the event loop (an async handler) or in a thread of the
run's pool (a sync one), timed when the statistics ask for it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rjet._keyed._failures import Abort
from rjet.event import Event

if TYPE_CHECKING:
    from rjet.consumer import Consumer
    from rjet.cursors import Claim
    from rjet.fate import Fate
    from rjet.stats import ConsumerStats

__all__ = ["Calls"]


class _Unconfirmed(Exception):
    """A pool thread found the claim not seen held for a lease (the process was frozen, say, between
    the worker's look at it and the thread's start): the call did not start."""


class Calls:
    """One run's handler calls. ``pool`` (None for an async handler) has a thread per worker."""

    __slots__ = ("_consumer", "_gated", "_lease", "_loop", "_stats", "pool")

    def __init__(
        self,
        consumer: Consumer,
        *,
        stats: ConsumerStats,
        gated: Callable[[], bool],
        lease: Claim,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._consumer = consumer
        self._stats = stats
        self._gated = gated  # the run is ending: a thread of the pool looks right before it calls
        self._lease = lease  # and whether the claim was seen held within a lease (its expires)
        self._loop = loop
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        if not consumer.is_async:
            self.pool = concurrent.futures.ThreadPoolExecutor(consumer.concurrency, f"rjet-{consumer.name}")

    async def call(self, events: list[Event]) -> Exception | None:
        """One attempt: None when the handler succeeded, else its error. Raises :class:`Abort` when a
        pool thread found the run ending before it called the handler."""
        consumer, stats = self._consumer, self._stats
        arg: Event | list[Event] = events if consumer.batch is not None else events[0]
        t0 = time.perf_counter() if stats.timing else 0.0
        try:
            if self.pool is None:
                await consumer.fn(consumer.fate, arg)  # type: ignore[arg-type, misc]
            else:
                result = await self._loop.run_in_executor(self.pool, self._in_thread, arg)
                if result is not None and asyncio.iscoroutine(result):
                    await result
        except Abort:
            raise
        except _Unconfirmed:
            # As the worker does before a call: read the claim back (raises where it is lost, and
            # the run ends), then call.
            await self._lease.confirm()
            return await self.call(events)
        except Exception as e:
            return e
        if stats.timing:
            stats.observe(time.perf_counter() - t0)
        return None

    def _in_thread(self, arg: Event | list[Event]) -> object:
        """A sync handler's call, in a thread of the pool: not started when the run ended meanwhile."""
        if self._gated():
            raise Abort
        if time.monotonic() >= self._lease.expires:
            raise _Unconfirmed
        fn: Callable[[Fate, Any], object] = self._consumer.fn
        return fn(self._consumer.fate, arg)

    def close(self) -> None:
        """The run ended: the pool's threads go once their calls return; queued calls never start."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
