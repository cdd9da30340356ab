"""Stopping background tasks that may swallow their cancellation.

Python 3.11's ``asyncio.wait_for`` returns the inner result when a cancellation arrives in the same
loop turn that the awaited future completes (CPython gh-86296, fixed in 3.12), and nats-py's
requests (every KV put and get) await one. A background loop cancelled at that moment carries on as
if nothing happened, so an owner that cancels once and waits waits for ever: an elastic group's
stop hung on its coordinator this way, 1 run in 4 under load. :func:`cancel_and_wait` cancels again
until the tasks end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Final

log = logging.getLogger("rjet")

_AGAIN: Final = 0.05  # seconds between cancellations of a task that goes on


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any] | None]) -> None:
    """Cancel ``tasks`` (``None`` ignored) and return once every one has ended.

    For loops with nothing to finish when cancelled: one that goes on is cancelled again and again.

    A task's own failure is retrieved, not raised: the owner is stopping it either way, and reports
    what it needs of it itself. A cancellation of the caller ends the waiting (the tasks have been
    cancelled once at least).
    """
    every = [t for t in tasks if t is not None]
    pending = set(every)
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=_AGAIN)
    for t in every:
        if not t.cancelled() and (e := t.exception()) is not None:
            log.debug("stopped task %r had failed: %r", t, e)
