"""Gap verification: events removed from the stream ahead of the reader are never skipped silently.

- Without subject filters stream sequences must follow each other exactly: a jump is a removed range,
  known at once (:meth:`GapCheck.jump`).
- With them, a jump is explained by the filter when nothing of ours was waiting at the previous frame
  and a pull request stayed open since; otherwise frames are held above :attr:`GapCheck.verified`
  until the stream's first sequence, asked for after they arrived, says whether anything was removed
  under them (:meth:`GapCheck.settle`, the verification task).
- A ``to_head`` reader that waits, short of its head, for events the server said were coming, asks
  its consumer once it has been quiet for a whole heartbeat: events removed from the stream's tail
  send no frame that would show a jump (:meth:`GapCheck.tick`).

A removed range ends the reader (:class:`rjet.EventsRemoved`, once every event before it was handed
over) or, under ``ReadConfig(on_removed="skip")``, is logged, counted and handed over in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

import nats.errors
import nats.js.errors

from rjet._nats.client import api_prefix, api_timeout, connection
from rjet._nats.denials import denials, starts
from rjet.errors import EventsRemoved, PermissionDenied
from rjet.reader._session import FINAL_ERRORS, stream_info

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from rjet.reader._config import ReadConfig
    from rjet.reader._session import Session
    from rjet.reader._state import ReadState

__all__ = ["ALL", "GapCheck"]

log = logging.getLogger("rjet.stream")

ALL: Final = 1 << 62  # "every sequence is verified", for readers without subject filters
_FIRST_SEQ: Final = re.compile(rb'"first_seq":(\d+)')
_VERIFY_EVERY: Final = 0.01  # seconds between checks of held frames while nobody waits on them
_VERIFY_MIN: Final = 0.005  # and while the reader waits on one (a behind reader waits that long at most)
_REQUEST_ERRORS: Final = (nats.errors.Error, TimeoutError, OSError, nats.js.errors.Error)


class _Counted(Protocol):
    """What gap verification counts on its client."""

    removed: int


class GapCheck:
    """A reader's gap verification (see the module docstring). Its task: one check under way."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        config: ReadConfig,
        state: ReadState,
        counted: _Counted,
        *,
        filtered: bool,
    ) -> None:
        self._js = js
        self._nc = connection(js)
        self._stream = stream
        self._state = state
        self._counted = counted
        self._skip = config.on_removed == "skip"
        self._denials = denials(self._nc)
        self._loop = asyncio.get_running_loop()
        self.filtered = filtered
        self.verified = 0 if filtered else ALL  # frames up to here may be handed over
        self.prev_pending = 0  # the server's pending count at the last frame (filtered readers)
        self.ranges: deque[EventsRemoved] = deque()  # skipped under on_removed="skip", not yet handed over
        self._checking: asyncio.Task[None] | None = None
        self._verify_now = asyncio.Event()
        self._checked_at = 0.0  # loop time of the last check the verification made
        self._quiet_at = -1  # the last sequence a waiting to_head reader had at the watchdog's last tick

    def tasks(self) -> list[asyncio.Task[None]]:
        """Its task running now."""
        return [] if self._checking is None else [self._checking]

    def start_at(self, last: int) -> None:
        """The reader starts after ``last``: nothing before it is held."""
        if self.filtered:
            self.verified = last

    # ----------------------------------------------------------------- frame by frame

    def jump(self, prev: int, sseq: int) -> bool:
        """A frame's stream sequence jumped from ``prev``: True when the gap ends the reader (the frame
        is dropped; every frame before it is still handed over, then the error is raised)."""
        if self.filtered:
            return False  # explained by the filter, or settled by verification before it is handed over
        return not self.removed(EventsRemoved(self._stream, prev + 1, sseq - 1))

    def settle(self, s: Session, prev: int, upto: int, run: int, pending: int) -> None:
        """A filtered reader took ``run`` frames after ``prev``, up to ``upto``, the server's pending
        count at the last ``pending``: contiguous, or one frame after a jump the filter explains, they
        are verified; else held for verification. (The bulk scan inlines this for one frame.)"""
        if self.verified == prev and (upto == prev + run or (run == 1 and not (self.prev_pending or s.blind))):
            self.verified = upto
        else:
            self.hold()
        self.prev_pending = pending
        s.blind = s.pending <= 0

    def hold(self) -> None:
        """Frames are held above :attr:`verified`: start verifying them."""
        if self._checking is None:
            self._checking = self._loop.create_task(self._verify())

    def soon(self) -> None:
        """The reader waits on held frames: verify without waiting for the next round."""
        self._verify_now.set()

    def removed(self, gap: EventsRemoved) -> bool:
        """A range removed ahead of the reader: skipped (True) under ``on_removed="skip"``, else the
        reader's error (every frame before it is still handed over)."""
        if not self._skip:
            self._state.fail(gap)
            return False
        log.warning("stream %r: skipping events %d..%d, removed before they were read (on_removed='skip')",
                    self._stream, gap.first, gap.last)  # fmt: skip
        self._counted.removed += gap.last - gap.first + 1
        self.ranges.append(gap)
        self._state.wake()
        return True

    # ----------------------------------------------------------------- asking the server

    async def _verify(self) -> None:
        """Settles frames held above ``verified``: the stream's first sequence, asked for after they
        arrived, says whether it removed anything above ``verified`` in the meantime."""
        st = self._state
        try:
            while not st.closed and st.error is None and self.verified < st.last:
                # While catching up, frames arrive all the time and one check covers every frame
                # that came before it: check every _VERIFY_EVERY seconds, or sooner once the reader
                # waits on a held frame, but never more often than every _VERIFY_MIN seconds.
                since = self._loop.time() - self._checked_at
                if since < _VERIFY_EVERY and not self._verify_now.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._verify_now.wait(), _VERIFY_EVERY - since)
                    since = self._loop.time() - self._checked_at
                if since < _VERIFY_MIN:
                    await asyncio.sleep(_VERIFY_MIN - since)
                self._verify_now.clear()
                self._checked_at = self._loop.time()
                upto = st.last
                try:
                    first = await self._first_seq()
                except FINAL_ERRORS as e:
                    return st.fail(e)
                except _REQUEST_ERRORS as e:
                    log.debug("stream %r: cannot check for removed events yet (%r)", self._stream, e)
                    await asyncio.sleep(0.1)
                    continue
                if first > self.verified + 1:
                    if not self.removed(EventsRemoved(self._stream, self.verified + 1, first - 1, certain=False)):
                        return
                    upto = max(upto, first - 1)
                self.verified = max(self.verified, upto)
                st.wake()
        finally:
            if self._checking is asyncio.current_task():
                self._checking = None

    async def _first_seq(self) -> int:
        """The stream's first sequence, from a stream-info request read for that field alone (nats-py's
        full decoding of the reply costs several times the round trip, and verification asks often)."""
        subject = f"{api_prefix(self._js)}.STREAM.INFO.{self._stream}"
        reply = await self._denials.guard(
            starts(subject), self._nc.request(subject, b"", timeout=api_timeout(self._js))
        )
        found = _FIRST_SEQ.search(reply.data)
        if found is None or b'"error"' in reply.data[:16]:
            return (await stream_info(self._js, self._stream)).state.first_seq  # raises what the server said
        return int(found.group(1))

    def tick(self) -> None:
        """Each heartbeat (the watchdog): a ``to_head`` reader that waits with nothing buffered, short
        of its head though the server has not said it caught up, asks its consumer whether anything is
        left for it once it has been quiet for a whole heartbeat."""
        st = self._state
        if not (
            st.to_head
            and st.waiter is not None
            and not st.caught_up
            and st.last < st.head
            and not st.buf
            and not st.skipped_at
            and not self.ranges
            and st.error is None
        ):
            self._quiet_at = -1
        elif self._quiet_at != st.last:
            self._quiet_at = st.last
        elif self._checking is None:
            self._checking = self._loop.create_task(self._check_tail())

    async def _check_tail(self) -> None:
        """Events up to the head removed from the stream's tail send no frame: when the consumer has
        nothing left for the reader and sent it nothing it has not taken, they are gone. (Its answer
        comes on the connection after any frame it sent before it, so those have been taken then.)"""
        st = self._state
        s = st.session
        try:
            if s is None:
                return
            subject = f"{api_prefix(self._js)}.CONSUMER.INFO.{self._stream}.{s.name.decode()}"
            try:
                info = await self._denials.guard(starts(subject), self._js.consumer_info(self._stream, s.name.decode()))
            except (*_REQUEST_ERRORS, PermissionDenied) as e:
                log.debug("stream %r: cannot ask the consumer what is left (%r)", self._stream, e)
                return
            # Its consumer sequence counts what it sent (its stream sequence moves past a purge too).
            sent = info.delivered.consumer_seq if info.delivered is not None else None
            if (
                st.session is not s
                or st.closed
                or st.error is not None
                or st.buf
                or st.caught_up
                or st.last >= st.head
                or info.num_pending
                or sent != s.cseq
            ):
                return
            gap = EventsRemoved(self._stream, st.last + 1, st.head, certain=not self.filtered)
            if self.removed(gap):  # skipped: read on past it, to the head
                st.last = st.head
                if self.filtered:
                    self.verified = max(self.verified, st.head)
        finally:
            if self._checking is asyncio.current_task():
                self._checking = None
