"""The retry policy: how long a failing handler call waits before it is tried again, and how many
attempts an event gets before it is handed to a dead letter.

One policy, one set of defaults, used everywhere rjet tries again:

- a concurrent consumer (``concurrency > 1``, a :class:`rjet.Batch`, ``on_error="retry"``): the failing
  foreign ID gets a due time ``delay(attempt)`` seconds ahead; no worker waits for it, other keys go
  on, and the cursor never passes the failing event;
- a consumer with a :class:`rjet.DeadLetter`: after ``attempts`` failed attempts the event is
  recorded and its key moves on (the sequential loop waits ``delay(attempt)`` between attempts);
- :func:`rjet.run_forever`: after a run that ended on an unexpected error, it runs again after
  ``delay(n)``, ``n`` counting the failed runs since one made progress.

::

    consumer = rjet.Consumer("billing", bill, concurrency=64, retry=rjet.RetryPolicy(backoff=0.1, max_backoff=5))
"""

from __future__ import annotations

import dataclasses
from typing import Final

from rjet.errors import ConfigError

__all__ = ["ATTEMPTS", "BACKOFF", "MAX_BACKOFF", "RetryPolicy"]

BACKOFF: Final = 0.5
"""Seconds before the second attempt (the default of :class:`RetryPolicy` and :class:`rjet.DeadLetter`)."""

MAX_BACKOFF: Final = 30.0
"""The longest wait between two attempts, in seconds."""

ATTEMPTS: Final = 5
"""Attempts before an event is handed to the consumer's dead letter (when it has one)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Try a failing call again after ``backoff`` seconds, doubling up to ``max_backoff``; with a
    dead letter, hand the event to it after ``attempts`` attempts (without one, retry for ever).

    >>> [RetryPolicy().delay(n) for n in range(1, 9)]
    [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    """

    backoff: float = BACKOFF
    max_backoff: float = MAX_BACKOFF
    attempts: int = ATTEMPTS

    def __post_init__(self) -> None:
        for field in ("backoff", "max_backoff"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"RetryPolicy: {field} must be a number >= 0, not {value!r}")
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"RetryPolicy: attempts must be an int >= 1, not {self.attempts!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if attempt < 1:
            return 0.0
        # 2 ** 64 is past any max_backoff: no float overflow however many attempts failed.
        return float(min(self.max_backoff, self.backoff * 2 ** min(attempt - 1, 64)))

    def gives_up(self, attempt: int) -> bool:
        """Whether an event whose attempt number ``attempt`` failed goes to the dead letter now."""
        return attempt >= self.attempts
