"""What a concurrent run does after a handler call fails: park the work until its due time (the
consumer's :class:`rjet.RetryPolicy`), record it as dead letters, or end the run."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from rjet.deadletter import record_for
from rjet.errors import Tempted
from rjet.event import Event

if TYPE_CHECKING:
    from rjet.consumer import Consumer
    from rjet.deadletter import DeadLetterRecord
    from rjet.stats import ConsumerStats

__all__ = ["Abort", "Failures", "Retry"]

log = logging.getLogger("rjet.run")


class Abort(Exception):
    """A worker ends without finishing its work (the run is ending)."""


class Retry:
    """Work whose call failed, tried again at its due time: one event (or one batch), its keys held."""

    __slots__ = ("attempt", "events", "keys", "timer")

    def __init__(self, keys: list[str], events: list[Event], attempt: int) -> None:
        self.keys = keys
        self.events = events
        self.attempt = attempt  # attempts made (and failed)
        self.timer: asyncio.TimerHandle | None = None


class Failures:
    """The failed work of one run: parked (a timer each), then ``due`` (taken by the workers before
    any ready key). Its keys stay held meanwhile, and the cursor never passes it."""

    __slots__ = ("_bury", "_closing", "_consumer", "_fail", "_loop", "_parked", "_stats", "_stream", "_wake_one", "due")

    def __init__(
        self,
        consumer: Consumer,
        *,
        stats: ConsumerStats,
        stream: str,
        bury: Callable[[DeadLetterRecord, Exception], Awaitable[None]],
        fail: Callable[[BaseException], None],
        closing: Callable[[], bool],
        wake_one: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._consumer = consumer
        self._stats = stats
        self._stream = stream
        self._bury = bury
        self._fail = fail  # the run ends because of this error
        self._closing = closing  # the run is ending: nothing more is parked
        self._wake_one = wake_one  # an idle worker takes due work
        self._loop = loop
        self.due: deque[Retry] = deque()  # parked work whose time came
        self._parked: set[Retry] = set()

    async def after(self, keys: list[str], events: list[Event], error: Exception, attempt: int) -> bool | None:
        """After failed attempt number ``attempt`` of ``events``: park them to be tried again at their
        due time (None), or record them as dead letters (False); raises :class:`Abort` when the error
        ends the run (``on_error="stop"``) or the dead-letter sink failed."""
        consumer = self._consumer
        self._stats.errors += 1
        dead_letter, policy = consumer.dead_letter, consumer.retry
        where = _where(events)
        tempted = isinstance(error, Tempted)
        if consumer.on_error == "stop" and (dead_letter is None or tempted):
            error.add_note(f"rjet: consumer {consumer.name!r} failed on {where}; its cursor stays before it")
            self._fail(error)
            raise Abort from None
        if dead_letter is not None and not tempted and policy.gives_up(attempt):
            await self._bury_all(events, error, attempt)
            return False
        delay = policy.delay(attempt)
        log.warning(
            "consumer %r: %s failed (attempt %d), trying again in %.2fs; its key waits, others go on: %r",
            consumer.name, where, attempt, delay, error,
        )  # fmt: skip
        if not self._closing():
            retry = Retry(keys, events, attempt)
            retry.timer = self._loop.call_later(delay, self._retry_due, retry)
            self._parked.add(retry)
        return None

    def _retry_due(self, retry: Retry) -> None:
        """Parked work's due time came: the next free worker takes it, before any ready key."""
        self._parked.discard(retry)
        retry.timer = None
        self.due.append(retry)
        self._wake_one()

    async def _bury_all(self, events: list[Event], error: Exception, attempts: int) -> None:
        name = self._consumer.name
        for e in events:
            try:
                await self._bury(record_for(name, self._stream, e.id, e, error, attempts), error)
            except BaseException as sink_error:
                self._fail(sink_error)
                raise Abort from None

    def cancel(self) -> None:
        """The run ended: parked work is not tried again (it stays not done, read again by the next run)."""
        for retry in self._parked:
            if retry.timer is not None:
                retry.timer.cancel()
        self._parked.clear()


def _where(events: list[Event]) -> str:
    e = events[0]
    if len(events) == 1:
        return f"event {e.id} (type {e.type}, foreign id {e.foreign_id!r})"
    return f"a batch of {len(events)} events ({e.id}..{events[-1].id})"
