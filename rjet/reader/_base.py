"""What a stream client offers on top of its ``next_or_skip``, ``close`` and reader state: :class:`ClientBase`.

The real client (:class:`rjet.StreamClient`) and the memory one (:class:`rjet.testing.MemoryStreamClient`)
both derive from it, so that ``recv``, ``async for``, ``async with`` and the positions they report
are one piece of code for both.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import TYPE_CHECKING, Self

from rjet.errors import EventsRemoved, HeadReached
from rjet.event import Event

if TYPE_CHECKING:
    from rjet.reader._state import ReadState

__all__ = ["ClientBase"]


class ClientBase(abc.ABC):
    """``recv``, async iteration (ending at the head of a ``to_head`` read), ``async with`` (closing),
    and where the reader is (from its :class:`~rjet.reader._state.ReadState`).

    It declares the counters ``run`` keeps statistics from (:class:`rjet.stats.ReaderCounts`):
    ``num_pending``, and ``skipped``, ``skipped_passed`` and ``removed`` (see :class:`rjet.StreamClient`).
    """

    _state: ReadState
    skipped: int
    skipped_passed: int
    removed: int

    @property
    @abc.abstractmethod
    def num_pending(self) -> int:
        """Events not yet handed over: buffered, or still in the stream (a lag figure)."""

    @abc.abstractmethod
    async def next_or_skip(self) -> Event | int | EventsRemoved:
        """The next event, a position passed over, or a removed range (see :meth:`rjet.StreamClient.next_or_skip`)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop reading. Safe to call twice."""

    async def recv(self) -> Event:
        """The next event in stream order; waits for one.

        Raises :class:`rjet.HeadReached` (``to_head``), :class:`rjet.Stopped` after :meth:`close`,
        or the stream error that ended the client.
        """
        while True:
            item = await self.next_or_skip()
            if type(item) is Event:
                return item

    @property
    def last_sequence(self) -> int:
        """The highest stream sequence this client has taken (delivered or buffered)."""
        return self._state.last

    @property
    def head(self) -> int:
        """The stream's last sequence when the client opened."""
        return self._state.head

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            while True:
                item = await self.next_or_skip()
                if type(item) is Event:
                    return item
        except HeadReached:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
