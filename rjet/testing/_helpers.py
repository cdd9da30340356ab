"""The small helpers of :mod:`rjet.testing`: :func:`wait_until`, :class:`KeyOrder`."""

from __future__ import annotations

import asyncio
import inspect
import typing

if typing.TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable

__all__ = ["KeyOrder", "wait_until"]


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    what: str = "a condition",
    *,
    every: float = 0.01,
) -> None:
    """Return once ``predicate()`` (sync or async) is true; ``AssertionError`` naming ``what`` after
    ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)


class KeyOrder:
    """Checks at-least-once, per-key ordered handling: every ``record(seq, key)`` of a handled event.

    A sequence seen before is a duplicate (a redelivery: allowed); a first handling of a key's event
    that comes after a later event of the same key is an order violation (never allowed).
    ``handled`` counts distinct sequences, ``violations`` lists ``(key, seq, after)``.
    """

    def __init__(self) -> None:
        self.handled = 0
        self.duplicates = 0
        self.violations: list[tuple[Hashable, int, int]] = []
        self._seen: set[int] = set()
        self._last: dict[Hashable, int] = {}

    def record(self, seq: int, key: Hashable) -> bool:
        """Note a handled event; True when it was its first handling."""
        if seq in self._seen:
            self.duplicates += 1
            return False
        self._seen.add(seq)
        self.handled += 1
        last = self._last.get(key, 0)
        if seq < last:
            self.violations.append((key, seq, last))
        else:
            self._last[key] = seq
        return True

    def missing(self, expected: range | list[int]) -> list[int]:
        """The sequences of ``expected`` never handled."""
        return [s for s in expected if s not in self._seen]

    def check(self, expected: range | list[int] | None = None) -> None:
        """``AssertionError`` on an order violation, or on an event of ``expected`` never handled."""
        if self.violations:
            key, seq, after = self.violations[0]
            raise AssertionError(
                f"{len(self.violations)} order violation(s); first: key {key!r} event {seq} handled after {after}"
            )
        if expected is not None and (gone := self.missing(expected)):
            raise AssertionError(f"{len(gone)} event(s) never handled; first: {gone[:10]}")
