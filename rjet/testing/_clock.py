"""Virtual time for tests: :class:`FakeClock`.

How it works with asyncio. An asyncio event loop reads the time through ``loop.time()`` alone (for
``asyncio.sleep``, ``wait_for``, ``asyncio.timeout``, ``call_later``), and when it has nothing ready to
run it waits in its selector until the next timer is due. Installed on the running loop
(``async with clock:``), the clock

- replaces that loop's ``time()`` with its own virtual time, frozen until something moves it;
- wraps the loop's selector: when the loop would wait for a timer and no I/O is ready, virtual time
  jumps to that timer at once (trio's ``MockClock`` "autojump"), so a 30-second backoff takes no real
  time, and timers still fire in order, each at its own virtual time;
- replaces ``time.time()`` and ``time.time_ns()`` (the wall clock rjet's ``lag`` reads, and what
  :class:`rjet.testing.MemoryStream` stamps events with) with the same virtual time, as freezegun and
  time-machine do.

On the way out it puts all three back, and shifts the timers still pending back to real time (each
keeps the virtual delay it had left).

Limits: it needs asyncio's own selector event loop (the default on Linux and macOS; not uvloop, not
Windows' proactor loop). Code that holds ``time.time`` from before (``from time import time``),
``time.monotonic``, ``time.perf_counter`` and ``datetime.now()`` see real time. It is for code
without real I/O (a :class:`MemoryStream`, not a nats-server): a network reply does not come back in
a virtual instant, so its timeouts would expire at once. Work in threads (sync handlers of a
concurrent consumer, ``asyncio.to_thread``) takes real time while virtual time may jump past the
timers it races: give ``autojump_threshold``, the real seconds the loop must be idle before time
jumps (trio's default is 0 too), or keep such code away from timeouts.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

from rjet.errors import ConfigError

__all__ = ["FakeClock"]

_NS: Final = 1_000_000_000


class FakeClock:
    """Virtual time: wall time (``time()``, seconds since the epoch) that moves only when told to,
    and, once installed with ``async with clock:``, the running event loop's time too.

    ``start`` is the initial wall time (a UTC datetime or epoch seconds; default: now). With
    ``autojump`` (the default) an installed clock jumps to the next timer whenever the loop has
    nothing else to do, so sleeps and timeouts take no real time; without it, time moves only in
    :meth:`advance`. A clock is also a plain clock function: ``MemoryStream(clock=clock)`` stamps
    events with ``clock()``.

    ::

        async with FakeClock() as clock:
            await asyncio.sleep(3600)        # returns at once; clock.time() is an hour later
            await clock.advance(5)           # the same, explicitly
    """

    def __init__(
        self, start: datetime | float | None = None, *, autojump: bool = True, autojump_threshold: float = 0.0
    ) -> None:
        if isinstance(start, datetime):
            if start.tzinfo is None:
                raise ConfigError(f"FakeClock: start {start!r} has no time zone (use UTC)")
            start = start.timestamp()
        if autojump_threshold < 0:
            raise ConfigError(f"FakeClock: autojump_threshold must be >= 0, not {autojump_threshold!r}")
        self._ns = round((time.time() if start is None else start) * _NS)
        self.autojump = autojump
        self.autojump_threshold = autojump_threshold
        self._advancing = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._saved: dict[str, Any] = {}
        self._loop_base = 0.0
        self._ns_base = 0

    # ----------------------------------------------------------------- reading and moving time

    def time(self) -> float:
        """The virtual wall time, in seconds since the epoch."""
        return self._ns / _NS

    __call__ = time

    def time_ns(self) -> int:
        """The virtual wall time, in nanoseconds since the epoch."""
        return self._ns

    def now(self) -> datetime:
        """The virtual wall time as a UTC datetime."""
        return datetime.fromtimestamp(self._ns / _NS, UTC)

    def _loop_time(self) -> float:
        return self._loop_base + (self._ns - self._ns_base) / _NS

    def _jump(self, seconds: float) -> None:
        self._ns += max(1, math.ceil(seconds * _NS))

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``. Installed, everything due on the way runs, in order, each
        at its own time (a sleep of ``seconds`` that jumps from timer to timer); otherwise it moves the
        wall time only."""
        if seconds < 0:
            raise ConfigError(f"FakeClock.advance: seconds must be >= 0, not {seconds!r}")
        if self._loop is None:
            self._ns += round(seconds * _NS)
            return
        self._advancing += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self._advancing -= 1

    def _jumping(self) -> bool:
        return self.autojump or self._advancing > 0

    # ----------------------------------------------------------------- installing on the running loop

    async def __aenter__(self) -> FakeClock:
        loop = asyncio.get_running_loop()
        selector = getattr(loop, "_selector", None)
        if not isinstance(loop, asyncio.BaseEventLoop) or selector is None or not hasattr(loop, "_scheduled"):
            raise ConfigError(
                f"FakeClock needs asyncio's own selector event loop, not {type(loop).__name__} (uvloop and"
                " Windows' proactor loop keep their time where it cannot be replaced)"
            )
        if isinstance(selector, _JumpingSelector) or self._loop is not None:
            raise ConfigError("a FakeClock is installed on this event loop already")
        self._loop = loop
        self._loop_base, self._ns_base = loop.time(), self._ns
        self._saved = {"selector": selector, "time": time.time, "time_ns": time.time_ns}
        loop.time = self._loop_time  # type: ignore[method-assign]
        loop._selector = _JumpingSelector(selector, self)  # type: ignore[attr-defined]  # noqa: SLF001
        time.time = self.time
        time.time_ns = self.time_ns
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop = self._loop
        if loop is None:
            return
        virtual = self._loop_time()
        del loop.time  # the class's time() again
        loop._selector = self._saved["selector"]  # type: ignore[attr-defined]  # noqa: SLF001
        time.time = self._saved["time"]
        time.time_ns = self._saved["time_ns"]
        # Timers still pending keep the delay they had left; a uniform shift keeps the heap's order.
        shift = loop.time() - virtual
        for handle in loop._scheduled:  # type: ignore[attr-defined]  # noqa: SLF001
            handle._when += shift  # noqa: SLF001
        self._loop = None
        self._saved = {}

    def __repr__(self) -> str:
        return f"FakeClock({self.now().isoformat()}, autojump={self.autojump})"


class _JumpingSelector:
    """The loop's selector, but a wait for a timer with no I/O ready moves virtual time to it at once."""

    def __init__(self, inner: Any, clock: FakeClock) -> None:
        self._inner = inner
        self._clock = clock

    def select(self, timeout: float | None = None) -> Any:
        clock = self._clock
        if timeout is None or timeout <= 0 or not clock._jumping():  # noqa: SLF001
            return self._inner.select(timeout)
        ready = self._inner.select(min(clock.autojump_threshold, timeout))
        if not ready:
            clock._jump(timeout)  # noqa: SLF001
        return ready

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
