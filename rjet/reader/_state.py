"""What a reader's jobs share: :class:`ReadState`.

A stream client is four jobs on one reader (``rjet/reader/__init__.py``): the client loop hands events
over, the session keeps a consumer and feeds it pull requests, the intake takes frames off the wire,
gap verification settles what the sequences cannot. They meet here, in the state that outlives any
one consumer: the frames taken and not yet handed over, where the reader is in the stream, and how
reading ended. Each field says who writes it; everything else stays with the job that owns it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from rjet._nats.frames import HELD_BEFORE, Frame

if TYPE_CHECKING:
    from rjet.reader._session import Session

__all__ = ["ReadState"]


class ReadState:
    """One reader's shared state (see the module docstring)."""

    __slots__ = (
        "buf",
        "caught_up",
        "closed",
        "error",
        "head",
        "in_bytes",
        "last",
        "marks",
        "returned",
        "server_pending",
        "session",
        "skipped_at",
        "to_head",
        "waiter",
    )

    def __init__(self, *, to_head: bool) -> None:
        # Written by the intake (appends) and the client loop (pops); cleared on close.
        self.buf: deque[Frame] = deque()  # frames taken, not yet handed over
        self.in_bytes = 0  # bytes of bodies ever put into buf (each frame holds the count before it)
        # The highest stream sequence taken (delivered, buffered or passed over): set at open, moved
        # by the intake, and by gap verification past a tail skipped as removed.
        self.last = 0
        self.head = 0  # the stream's last sequence at open
        self.to_head = to_head  # reading ends at head
        self.session: Session | None = None  # the current consumer's; the session job swaps it whole
        # The key filter's passed-over events (the intake marks them, the client loop reports them):
        # the sequence of the last one not yet reported, and runs of them the caller has not moved past
        # yet, as (the run's last sequence, StreamClient.skipped after it).
        self.skipped_at = 0
        self.marks: deque[tuple[int, int]] = deque()
        self.returned = 0  # the position last handed to the caller while marks were waiting
        # The server's word (intake, and the session when it creates a consumer).
        self.server_pending = 0  # events the server has not sent yet, as of the last message
        self.caught_up = False  # the server said nothing of ours was left to send
        # How reading ends, and who waits for it.
        self.waiter: asyncio.Future[None] | None = None  # the client loop, waiting for a frame
        self.error: BaseException | None = None  # what ended reading (raised once buf is drained)
        self.closed = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes of bodies in buf."""
        return self.in_bytes - self.buf[0][HELD_BEFORE] if self.buf else 0

    def handed(self, seq: int) -> None:
        """The caller got the events up to ``seq``: a position passed over before it is no place for
        its cursor any more."""
        if self.marks:
            self.returned = seq
        if self.skipped_at <= seq:
            self.skipped_at = 0

    def pass_marks(self, passed: int) -> int:
        """Drop the runs of passed-over events up to the position last handed to the caller (it moved
        past them) and return the client's ``skipped_passed`` after them (``passed`` when none)."""
        marks, upto = self.marks, self.returned
        while marks and marks[0][0] <= upto:
            passed = marks.popleft()[1]
        return passed

    def wake(self) -> None:
        """Wake the client loop if it waits."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, err: BaseException) -> None:
        """End reading with ``err`` (the first one counts): raised once the frames before it are handed over."""
        if self.error is None:
            self.error = err
        self.wake()
