"""Fate: errors injected on purpose, so that handlers prove they are idempotent.

A handler calls ``fate.tempt()`` where a real failure could happen (before or after a side effect).
When fate strikes it raises :class:`rjet.Tempted`; ``run`` stops without advancing the cursor, and
the event is delivered again on the next run. A handler that survives a high ``p`` in tests is safe
to replay.

::

    def handle(fate: Fate, event: Event) -> None:
        fate.tempt()          # may raise Tempted
        db.upsert(event.foreign_id, event.metadata)
        fate.tempt()          # the upsert happened, the cursor did not move: replay must be harmless

Use :data:`NEVER` in production code paths that must not fail on purpose, :data:`ALWAYS` in tests
that check the failure path, and ``RandomFate(p, seed=...)`` to shake a whole run.
"""

from __future__ import annotations

import random
from typing import Final, Protocol, runtime_checkable

from rjet.errors import ConfigError, Tempted

__all__ = ["ALWAYS", "NEVER", "Fate", "FixedFate", "RandomFate"]


@runtime_checkable
class Fate(Protocol):
    """Something that may raise :class:`rjet.Tempted` when tempted."""

    def tempt(self) -> None:
        """Raise :class:`rjet.Tempted`, or not."""
        ...


class RandomFate:
    """Raises :class:`rjet.Tempted` with probability ``p`` on each :meth:`tempt`.

    ``seed`` makes the sequence of outcomes repeatable. ``tempted`` counts the errors raised.
    """

    def __init__(self, p: float, *, seed: int | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"fate probability must be within [0, 1], not {p}")
        self.p = p
        self.tempted = 0
        self.calls = 0
        self._random = random.Random(seed)

    def tempt(self) -> None:
        """Raise :class:`rjet.Tempted` with probability ``p``."""
        self.calls += 1
        if self.p and self._random.random() < self.p:
            self.tempted += 1
            raise Tempted(f"fate tempted (p={self.p}): the event will be delivered again")

    def __repr__(self) -> str:
        return f"RandomFate(p={self.p})"


class FixedFate:
    """Always (``strike=True``) or never raises; see :data:`ALWAYS` and :data:`NEVER`."""

    def __init__(self, strike: bool) -> None:
        self.strike = strike

    def tempt(self) -> None:
        """Raise :class:`rjet.Tempted` when this fate always strikes."""
        if self.strike:
            raise Tempted("fate tempted (always): the event will be delivered again")

    def __repr__(self) -> str:
        return "ALWAYS" if self.strike else "NEVER"


NEVER: Final = FixedFate(False)
"""A fate that never strikes (the default)."""

ALWAYS: Final = FixedFate(True)
"""A fate that strikes on every :meth:`~Fate.tempt`."""
