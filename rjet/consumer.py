"""A consumer: a name (the key of its cursor) and the handler that consumes events."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeAlias

from rjet.deadletter import DeadLetter
from rjet.errors import ConfigError
from rjet.event import Event
from rjet.fate import NEVER, Fate

__all__ = ["Consumer", "Handler"]

Handler: TypeAlias = Callable[[Fate, Event], Awaitable[None] | None]
"""``fn(fate, event)``, a plain function or a coroutine function; raising stops the run."""


class Consumer:
    """A named handler of events. The name keys the consumer's cursor.

    - ``types``: only events of these types reach ``fn``; others are skipped, the cursor advances.
    - ``filter``: ``filter(event) -> bool``; events it rejects are skipped, the cursor advances.
    - ``key_filter``: ``key_filter(foreign_id) -> bool``; like ``filter`` on the foreign ID alone, so
      a reader may apply it before decoding the rest of the event (sharding uses it).
    - ``fate``: what ``fn`` receives to inject errors on purpose (default :data:`rjet.fate.NEVER`).
    - ``dead_letter``: a :class:`rjet.DeadLetter` policy: after that many failed attempts an event
      is recorded and skipped instead of blocking the consumer (off by default: retry forever).

    ::

        async def fn(fate, event):
            fate.tempt()
            await db.apply(event)

        consumer = Consumer("billing", fn, types=[1, 2])
    """

    __slots__ = ("_async", "dead_letter", "fate", "filter", "fn", "key_filter", "name", "types")

    def __init__(
        self,
        name: str,
        fn: Handler,
        *,
        types: Iterable[int] | None = None,
        filter: Callable[[Event], bool] | None = None,
        key_filter: Callable[[str], bool] | None = None,
        fate: Fate = NEVER,
        dead_letter: DeadLetter | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"consumer name must be a non-empty str, not {name!r}")
        if not callable(fn):
            raise ConfigError(f"consumer {name!r}: handler {fn!r} is not callable")
        self.name = name
        self.fn = fn
        self.types = frozenset(types) if types is not None else None
        self.filter = filter
        self.key_filter = key_filter
        self.fate = fate
        if dead_letter is not None and not isinstance(dead_letter, DeadLetter):
            raise ConfigError(f"consumer {name!r}: dead_letter must be an rjet.DeadLetter, not {dead_letter!r}")
        self.dead_letter = dead_letter
        self._async = inspect.iscoroutinefunction(fn)

    def wants(self, event: Event) -> bool:
        """Whether ``event`` passes the key filter, the type filter and the event filter."""
        if self.key_filter is not None and not self.key_filter(event.foreign_id):
            return False
        if self.types is not None and event.type not in self.types:
            return False
        return self.filter is None or self.filter(event)

    async def consume(self, event: Event) -> bool:
        """Handle ``event`` unless it is filtered out; returns whether the handler ran."""
        if self.key_filter is not None and not self.key_filter(event.foreign_id):
            return False
        return await self.consume_key_passed(event)

    async def consume_key_passed(self, event: Event) -> bool:
        """:meth:`consume` for an event whose foreign ID passed ``key_filter`` already (a reader
        opened with the consumer's key filter checked it before decoding the event)."""
        if (self.types is not None and event.type not in self.types) or (
            self.filter is not None and not self.filter(event)
        ):
            return False
        if self._async:
            await self.fn(self.fate, event)  # type: ignore[misc]
        else:
            result = self.fn(self.fate, event)
            if result is not None and inspect.isawaitable(result):
                await result
        return True

    def __repr__(self) -> str:
        return f"Consumer({self.name!r}, {getattr(self.fn, '__qualname__', self.fn)!r})"
