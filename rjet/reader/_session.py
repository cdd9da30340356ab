"""The session: the ephemeral consumer behind a reader, and the pull flow control that feeds it.

- :class:`Session` is one consumer, from its creation to its loss or the reader's close: its name and
  subjects, its consumer sequence, the pull requests it owes (:class:`Requests`), the patterns the
  bulk scan takes its frames with.
- :class:`Sessions` keeps one going: it subscribes the reader's inbox, creates the consumer (AckPolicy
  NONE, memory storage, from right after the last sequence taken), sends pull requests within the
  read buffer's bounds, handles the server's statuses, watches for silence (the watchdog: three
  missed heartbeats with a pull open) and for a reconnect (frames in flight lost), and recreates the
  consumer when it is lost (recovery), after checking the stream is the same one and still holds
  what comes next.

A new consumer gets a new :class:`Session`, swapped in whole once the server has made the consumer; a
frame of an earlier one (its name, its deliver subject) matches nothing in it and is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Protocol

import nats.errors
import nats.js.errors
from nats.js import api
from nats.nuid import NUID

from rjet._nats.client import api_prefix, connection, subscription_id
from rjet._nats.denials import denials, starts
from rjet._nats.frames import COMPLETED, PENDING_KEY, TOO_BIG, header
from rjet._nats.parser import FastParser, FrameHandler, Scanner, fast_parser, keep_raw_headers
from rjet.errors import (
    ConsumerLost,
    CursorAhead,
    CursorExpired,
    PermissionDenied,
    Stopped,
    StreamNotFound,
    StreamRecreated,
)

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

    from rjet.reader._config import ReadConfig
    from rjet.reader._gaps import GapCheck
    from rjet.reader._state import ReadState

__all__ = [
    "FINAL_ERRORS", "Bounds", "Requests", "Session", "Sessions", "check_cursor", "identity", "start_after",
    "stream_info",
]  # fmt: skip

log = logging.getLogger("rjet.stream")

_NS: Final = 1_000_000_000
FINAL_ERRORS: Final = (StreamNotFound, StreamRecreated, CursorExpired, CursorAhead, PermissionDenied)
"""Errors that end a reader: no new consumer can fix them."""


def identity(info: api.StreamInfo) -> str:
    """Which stream this is: its name and creation time (a stream deleted and created again under
    the same name has another)."""
    created = info.created.isoformat() if info.created is not None else "?"
    return f"{info.config.name}@{created}"


async def stream_info(js: JetStreamContext, stream: str) -> api.StreamInfo:
    """The stream's info; :class:`StreamNotFound` when it is gone (or JetStream is off)."""
    try:
        return await denials(connection(js)).guard(
            starts(f"{api_prefix(js)}.STREAM.INFO.{stream}"), js.stream_info(stream)
        )
    except nats.js.errors.NotFoundError:
        raise StreamNotFound(stream) from None
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
        raise StreamNotFound(stream, "JetStream is not enabled on the server") from None


class Bounds(Protocol):
    """A stream's first and last sequence, as JetStream reports them (its ``StreamState``; a
    :class:`rjet.testing.MemoryStream`)."""

    @property
    def first_seq(self) -> int: ...

    @property
    def last_seq(self) -> int: ...


def check_cursor(stream: str, state: Bounds, after: int) -> None:
    """:class:`CursorAhead` or :class:`CursorExpired` when the stream cannot go on right after ``after``."""
    if after > state.last_seq:
        raise CursorAhead(stream, after, state.last_seq)
    if after and after + 1 < state.first_seq:
        raise CursorExpired(stream, after, state.first_seq)


def start_after(
    stream: str, stream_id: str, state: Bounds, after: int, *, from_head: bool, expect_id: str | None
) -> int:
    """The sequence a reader opening after ``after`` starts past (its ``last``), or the error that
    stops it: :class:`StreamRecreated` when ``after`` was recorded in stream ``expect_id``, not this
    one, ``stream_id``; as :func:`check_cursor`."""
    if from_head:
        return state.last_seq
    if expect_id and after and expect_id != stream_id:
        raise StreamRecreated(stream, after, expect_id, stream_id)
    check_cursor(stream, state, after)
    # No cursor: from the first event still there (those before it are not a gap).
    return after if after or state.first_seq <= 1 else state.first_seq - 1


class Requests:
    """A consumer's open pull requests, oldest first (the server fills them in that order), kept for
    the byte budget: the requests that may still send messages, and the ``max_bytes`` they allow.

    ``delivered`` is the consumer sequence: messages this consumer has sent.
    """

    __slots__ = ("_asked", "_ended", "_open", "oversize")

    def __init__(self) -> None:
        # (the count of messages sent or ended at which it is filled, its batch, its max_bytes or 0)
        self._open: deque[tuple[int, int, int]] = deque()
        self._asked = 0  # messages asked for
        self._ended = 0  # of those, messages of requests the server ended unfilled
        self.oversize = False  # a message did not fit a request's max_bytes: ask for it alone

    def add(self, want: int, max_bytes: int) -> None:
        self._asked += want
        self._open.append((self._asked, want, max_bytes))

    def ended(self, delivered: int, left: int, *, too_big: bool) -> None:
        """The server ended the oldest open request with ``left`` messages unsent: it expired (408),
        the next message would pass its ``max_bytes`` (409), or it is complete (409, ``left`` 0)."""
        self._drop_filled(delivered)
        if left and self._open:
            _, want, _ = self._open.popleft()
            if too_big and want == left:
                self.oversize = True  # none of it sent: the next message is larger than its room
        self._ended += left

    def max_bytes(self, delivered: int, held: int, budget: int, pending: int, share: int) -> int:
        """``max_bytes`` for the next request: its ``share`` of the budget, or what is left of the
        budget after the bytes ``held`` and the open requests' ``max_bytes`` if that is less; -1 to
        wait (less than the share and than a quarter of the budget left); 0 for a request of one
        message without a byte limit, once nothing is held or open, after a message did not fit."""
        if pending <= 0:
            self._open.clear()  # nothing is owed, so nothing is open, whatever a lost status said
        self._drop_filled(delivered)
        if self.oversize:
            if held or self._open:
                return -1
            self.oversize = False
            return 0
        room = budget - held - sum(r[2] or budget for r in self._open)  # one without max_bytes: all of it
        return min(room, share) if room >= min(share, budget >> 2) else -1

    def _drop_filled(self, delivered: int) -> None:
        filled = delivered + self._ended
        while self._open and self._open[0][0] <= filled:
            self._open.popleft()


class Session:
    """One ephemeral consumer (see the module docstring)."""

    __slots__ = (
        "blind",
        "cseq",
        "deliver",
        "frames",
        "name",
        "next_subject",
        "pattern",
        "pending",
        "plain",
        "prefix",
        "reconnects",
        "requests",
        "traced",
        "traced_pattern",
        "traced_plain",
    )

    def __init__(self, name: bytes, deliver: bytes, next_subject: str, reconnects: int) -> None:
        self.name = name  # the consumer's name, in the reply subject of each of its deliveries
        self.reconnects = reconnects  # the connection's reconnects when the consumer was made
        self.deliver = deliver  # the reply subject of its pull requests: its messages and statuses come there
        self.next_subject = next_subject  # where its pull requests go
        self.cseq = 0  # its consumer sequence: messages it has sent
        self.pending = 0  # messages asked for and neither received nor expired
        self.frames = 0  # frames received from it, data and status alike (the watchdog's sign of life)
        # A moment without an open pull request since its last frame: the server would not have sent
        # what arrived then (gap verification cannot take a filtered jump as explained).
        self.blind = False
        self.requests = Requests()
        # Set by its first frame (with the fast lane): the bulk scan takes the frames after it.
        self.prefix = b""  # its reply subjects up to and with the consumer's token
        self.pattern: re.Pattern[bytes] | None = None  # its frames
        self.plain: re.Pattern[bytes] | None = None  # those of them with a plain foreign ID
        # The same two for frames with a trace context before rjet's headers (insert with tracing).
        self.traced_pattern: re.Pattern[bytes] | None = None
        self.traced_plain: re.Pattern[bytes] | None = None
        self.traced = False  # the layout the scan met last: it tries that one first


class _Counted(Protocol):
    """What the session counts on its client."""

    recoveries: int


class Sessions:
    """Keeps a reader's consumer going (see the module docstring).

    Its tasks: the pull request being sent, the recovery under way, the watchdog.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        config: ReadConfig,
        filters: tuple[str, ...],
        state: ReadState,
        gaps: GapCheck,
        counted: _Counted,
    ) -> None:
        self._js = js
        self._nc = connection(js)
        self._stream = stream
        self._cfg = config
        self._filters = filters
        self._state = state
        self._gaps = gaps
        self._counted = counted
        self._low = max(1, config.batch // 2)
        self._loop = asyncio.get_running_loop()
        self._api = api_prefix(js)
        self._denials = denials(self._nc)
        self._unwatch: Callable[[], None] | None = None
        self._inbox = self._nc.new_inbox()
        self._gen = 0  # consumers created: the current one's deliver subject is _inbox.<_gen>
        self._nuid = NUID()
        self._sub: Subscription | None = None
        self.parser: FastParser | None = None  # the connection's fast lane, when it has one
        self.sid = 0  # the inbox subscription's
        self.identity = ""  # the stream's (see identity()), known once open
        self._activity = 0.0  # when the watchdog last saw frames arrive
        self._pulling: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    def tasks(self) -> list[asyncio.Task[None]]:
        """Its tasks running now."""
        return [t for t in (self._watchdog, self._recovery, self._pulling) if t is not None]

    # ----------------------------------------------------------------- set-up

    async def stream_info(self) -> api.StreamInfo:
        return await stream_info(self._js, self._stream)

    async def subscribe(
        self, on_msg: Callable[[Msg], Awaitable[None]], on_lane_frame: FrameHandler, scan: Scanner | None
    ) -> None:
        """Subscribe the inbox its consumers deliver to: frames go to ``on_lane_frame`` (and runs of
        them to ``scan``) on the fast lane, else to ``on_msg``."""
        # Pull requests and deliveries are not requests: a refusal of either ends the reader at once.
        self._unwatch = self._denials.watch(
            starts(f"{self._api}.CONSUMER.MSG.NEXT.{self._stream}.", self._inbox), self._state.fail
        )
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=on_msg)
        self.sid = subscription_id(self._sub)
        self.parser = fast_parser(self._nc) if self._cfg.fast_lane else None
        if self.parser is not None:
            self.parser.lanes[self.sid] = on_lane_frame
            if scan is not None:
                self.parser.scanners[self.sid] = scan
        else:
            keep_raw_headers(self._nc)  # frames decode from the raw header block, as on the fast lane

    async def create(self) -> None:
        """Create a consumer from right after the last sequence taken, and swap its session in."""
        st = self._state
        st.session = None  # one being replaced (recovery has dropped it already) is dropped first
        self._gen += 1
        deliver = f"{self._inbox}.{self._gen}".encode()
        config = api.ConsumerConfig(
            name=self._nuid.next().decode(),
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=st.last + 1,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=self._cfg.inactive_threshold,
            mem_storage=True,
            num_replicas=1,
            max_waiting=16,
        )
        if len(self._filters) == 1:
            config.filter_subject = self._filters[0]
        elif self._filters:
            config.filter_subjects = list(self._filters)
        info = await self._denials.guard(
            starts(f"{self._api}.CONSUMER.CREATE.{self._stream}"), self._js.add_consumer(self._stream, config)
        )
        if info.num_pending == 0:
            st.caught_up = True
        st.server_pending = info.num_pending or 0
        self._activity = self._loop.time()
        next_subject = f"{self._api}.CONSUMER.MSG.NEXT.{self._stream}.{info.name}"
        st.session = Session(info.name.encode(), deliver, next_subject, self._reconnects())

    def _reconnects(self) -> int:
        return int(self._nc.stats["reconnects"])

    def watch(self) -> None:
        """Start the watchdog."""
        self._watchdog = asyncio.create_task(self._watch())

    # ----------------------------------------------------------------- pull requests

    def kick(self) -> None:
        """Send a pull request soon, if one may be due."""
        st = self._state
        if self._pulling is None and st.session is not None and not st.closed:
            self._pulling = self._loop.create_task(self.pull())

    async def pull(self) -> None:
        """Ask for what fits the read buffer's bounds (count and bytes), if that is enough to ask for."""
        st = self._state
        try:
            s = st.session
            pending = 0 if s is None else s.pending  # none owed without a consumer
            room = self._cfg.max_buffered - len(st.buf) - pending
            if s is None or st.closed or room < self._low:
                if s is not None and pending <= 0:
                    s.blind = True  # nothing asked for: the server would not send what it gets now
                return
            want = min(room, self._cfg.batch)
            budget = self._cfg.max_buffered_bytes
            share = max(1, budget * want // self._cfg.max_buffered)  # its part of the budget, as of the count
            max_bytes = s.requests.max_bytes(s.cseq, st.buffered_bytes, budget, pending, share)
            if max_bytes < 0:
                if pending <= 0:
                    s.blind = True
                return
            if not max_bytes:
                want = 1
            s.pending += want
            s.requests.add(want, max_bytes)
            req = b'{"batch":%d,%s"expires":%d,"idle_heartbeat":%d}' % (
                want,
                b'"max_bytes":%d,' % max_bytes if max_bytes else b"",
                int(self._cfg.expires * _NS),
                int(self._cfg.heartbeat * _NS),
            )
            try:
                await self._nc.publish(s.next_subject, req, reply=s.deliver.decode())
            except nats.errors.ConnectionClosedError:
                st.fail(Stopped(f"stream {self._stream!r}: the NATS connection is closed"))
            except nats.errors.Error as e:
                # Disconnected with a full outgoing buffer, say: the watchdog recovers once traffic stops.
                log.debug("stream %r: pull request not sent: %r", self._stream, e)
        finally:
            if self._pulling is asyncio.current_task():
                self._pulling = None

    def on_status(self, s: Session, hdr: bytes) -> None:
        """A status frame on ``s``'s deliver subject: a heartbeat, a pull request ended, or trouble."""
        s.frames += 1
        code = hdr[9:12]
        if code == b"100":  # idle heartbeat
            return
        left = header(hdr, PENDING_KEY)
        too_big = code == b"409" and TOO_BIG in hdr
        if left is not None and (code == b"408" or too_big or (code == b"409" and COMPLETED in hdr)):
            # A pull request expired, the next message would pass its max_bytes, or it is complete.
            n = int(left)
            s.pending = max(0, s.pending - n)
            s.requests.ended(s.cseq, n, too_big=too_big)
            return self.kick()
        line = hdr[: hdr.find(b"\r\n")].decode("utf-8", "replace")
        self.recover(f"server said {line[9:]!r}")

    # ----------------------------------------------------------------- recovery and the watchdog

    def recover(self, reason: str) -> None:
        """Drop the consumer (its frames are ignored from here on) and recreate it."""
        st = self._state
        if self._recovery is None and not st.closed and st.error is None:
            st.session = None
            self._recovery = asyncio.create_task(self._recover_loop(reason))

    async def _recover_loop(self, reason: str) -> None:
        st = self._state
        self._counted.recoveries += 1
        log.info("stream %r: recreating the consumer after sequence %d: %s", self._stream, st.last, reason)
        deadline = self._loop.time() + self._cfg.recover_timeout
        delay = 0.05
        try:
            while not st.closed:
                try:
                    info = await self.stream_info()
                    if identity(info) != self.identity:
                        raise StreamRecreated(self._stream, st.last, self.identity, identity(info))
                    check_cursor(self._stream, info.state, st.last)  # covers the time without a consumer
                    await self.create()
                    await self.pull()
                    return
                except FINAL_ERRORS as e:
                    return st.fail(e)
                except (nats.errors.Error, TimeoutError, OSError, nats.js.errors.Error) as e:
                    if self._nc.is_closed:
                        return st.fail(Stopped(f"stream {self._stream!r}: the NATS connection is closed"))
                    if self._loop.time() > deadline:
                        return st.fail(
                            ConsumerLost(
                                f"stream {self._stream!r}: could not recreate the consumer after sequence"
                                f" {st.last} within {self._cfg.recover_timeout}s ({reason}; last error: {e!r})",
                                stream=self._stream,
                            )
                        )
                    log.warning("stream %r: recreating the consumer failed (%r); retrying", self._stream, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        finally:
            self._recovery = None

    async def _watch(self) -> None:
        st = self._state
        hb = self._cfg.heartbeat
        seen: tuple[Session | None, int] = (None, -1)
        while not st.closed:
            await asyncio.sleep(hb)
            if self._nc.is_closed:
                return st.fail(Stopped(f"stream {self._stream!r}: the NATS connection is closed"))
            now = self._loop.time()
            s = st.session
            if s is not None and (s, s.frames) != seen:
                seen = (s, s.frames)
                self._activity = now
            if self._recovery is not None or s is None:
                continue
            if s.reconnects != self._reconnects():
                # What the server had sent on the lost connection is lost, and nothing says so: its
                # pull request lives on (its heartbeats keep the watchdog quiet), and the consumer,
                # having sent everything, sends nothing more that could show a gap. A reader at the
                # head would wait for ever (a slow consumer cut by the server, say).
                self.recover("the connection was re-established: what the consumer sent before may be lost")
            elif s.pending > 0 and now - self._activity > 3 * hb:
                self.recover(f"no message or heartbeat for {3 * hb:g}s")
            elif s.pending == 0:
                await self.pull()
            self._gaps.tick()

    # ----------------------------------------------------------------- close

    async def close(self) -> None:
        """Once its tasks have ended: unsubscribe and delete the consumer."""
        if self._unwatch is not None:
            self._unwatch()
        session, self._state.session = self._state.session, None
        if self.parser is not None:
            self.parser.lanes.pop(self.sid, None)
            self.parser.scanners.pop(self.sid, None)
        if self._nc.is_closed:
            return
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        if session is not None:
            # Without the permission to delete it, the consumer is reaped after inactive_threshold.
            subject = f"{self._api}.CONSUMER.DELETE.{self._stream}.{session.name.decode()}"
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError, PermissionDenied):
                await self._denials.guard(starts(subject), self._nc.request(subject, b"", timeout=1.0))
