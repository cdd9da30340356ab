"""The stream client: an ordered reader over an ephemeral JetStream pull consumer.

How it stays ordered and loses nothing:

- It creates an ephemeral consumer (AckPolicy NONE, memory storage) starting right after the last
  stream sequence it took, and feeds it explicit pull requests (``CONSUMER.MSG.NEXT``) into one
  callback subscription, keeping at most ``max_buffered`` messages, and about ``max_buffered_bytes``
  bytes, requested or held (requests carry ``max_bytes``; one larger event is asked for alone).
- Each message's reply subject gives its stream sequence, consumer sequence, stored time and the
  consumer's remaining count; both reply-subject forms (9-token v1, 11/12-token v2) are parsed.
- Duplicates are dropped by STREAM sequence (never by consumer sequence, which restarts at 1 with a
  new consumer). A consumer-sequence jump inside one consumer means a message was lost in transit:
  the client recovers, which is always the same move: a new consumer from ``last + 1``.
- Pull requests carry idle heartbeats; no traffic for three heartbeats while a pull is open (server
  restart, consumer deleted or reaped, connection cut), a 409/503 status (but the two that end a
  request with ``max_bytes``: full, or the next message too large), or a gap all trigger recovery.
  Recovery re-checks the stream first, so events that expired meanwhile raise :class:`CursorExpired`
  instead of being skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal, Self

import nats.errors
import nats.js.errors
from nats.js import api
from nats.nuid import NUID

from rjet._keyhash import hash_bytes
from rjet._nats.client import api_prefix, api_timeout, connection, subscription_id
from rjet._nats.denials import denials, starts
from rjet._nats.frames import (
    COMPLETED,
    HELD_BEFORE,
    PENDING_KEY,
    SEQ,
    TOO_BIG,
    Frame,
    decode_type,
    foreign_id_of,
    frame_pattern,
    header,
    parse_ack,
    rjet_headers,
)
from rjet._nats.parser import FastParser, fast_parser, keep_raw_headers, raw_block
from rjet._tasks import cancel_and_wait
from rjet.errors import (
    ConfigError,
    ConsumerLost,
    CursorAhead,
    CursorExpired,
    DecodeError,
    EventsRemoved,
    HeadReached,
    PermissionDenied,
    RjetError,
    Stopped,
    StreamNotFound,
    StreamRecreated,
)
from rjet.event import Event

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

__all__ = ["ReadConfig", "StreamClient"]

log = logging.getLogger("rjet.stream")

_NS: Final = 1_000_000_000
_new = object.__new__
_set_id, _set_type, _set_fid, _set_us, _set_ts, _set_data = (
    Event.__dict__[f].__set__ for f in ("id", "type", "foreign_id", "timestamp_us", "_timestamp", "metadata")
)
_MAKE: Final = (_new, _set_id, _set_type, _set_fid, _set_us, _set_ts, _set_data)
_STATUS: Final = "Status"
_DESCRIPTION: Final = "Description"
_FINAL_ERRORS: Final = (StreamNotFound, StreamRecreated, CursorExpired, CursorAhead, PermissionDenied)
_ALL: Final = 1 << 62  # "every sequence is verified", for readers without subject filters
_FIRST_SEQ: Final = re.compile(rb'"first_seq":(\d+)')
_VERIFY_EVERY: Final = 0.01  # seconds between checks of held frames while nobody waits on them
_VERIFY_MIN: Final = 0.005  # and while the reader waits on one (a behind reader waits that long at most)
_PERCENT: Final = ord("%")  # `int in bytes` is a memchr; `b"%" in bytes` costs ~8 times as much


@dataclasses.dataclass(frozen=True, slots=True)
class ReadConfig:
    """How a stream client reads. The defaults suit most consumers.

    - ``batch``: messages asked for in one pull request.
    - ``max_buffered``: messages requested or held client-side at most.
    - ``max_buffered_bytes``: about how many bytes of messages are requested or held client-side at
      most (pull requests carry JetStream's ``max_bytes``). Of the two bounds the tighter one holds,
      so large events cannot pile up ``max_buffered`` of them in memory. One event larger than the
      whole budget is still delivered, alone, once the client's buffer has drained.
    - ``heartbeat``: the server's idle heartbeat on open pull requests, in seconds; three missed in a
      row make the client recreate its consumer.
    - ``expires``: lifetime of one pull request, in seconds.
    - ``inactive_threshold``: the server deletes the ephemeral consumer after this many idle seconds.
    - ``recover_timeout``: how long the client keeps trying to recreate a lost consumer (server down,
      connection cut) before ``recv()`` raises :class:`rjet.ConsumerLost`.
    - ``fast_lane``: read frames straight off nats-py's parser (see ``rjet/_nats/parser.py``); False uses
      an ordinary nats-py subscription (about half the speed, same results).
    - ``on_removed``: what a range of events removed from the stream ahead of the reader does
      (retention limits, a purge, a delete). ``"raise"`` (the default): :class:`rjet.EventsRemoved`
      once every event before it was delivered. ``"skip"``, a deliberate policy: the range is logged
      at WARNING, counted (``StreamClient.removed``, ``ConsumerStats``, ``rjet_events_removed_total``),
      recorded as a dead letter by a consumer that has them, and reading goes on after it.
    """

    # Measured on 2 cores, 100k small events: batch 1000 / 4000 buffered read 4.1 us an event, 2000 /
    # 8000 3.65 us (fewer pull round trips; the pipeline drains less while the handler runs).
    batch: int = 2000
    max_buffered: int = 8000
    # Well under nats-server's 64 MB max_pending, past which the server cuts a slow client off.
    max_buffered_bytes: int = 32 * 1024 * 1024
    heartbeat: float = 1.0
    expires: float = 30.0
    inactive_threshold: float = 60.0
    recover_timeout: float = 60.0
    fast_lane: bool = True
    on_removed: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        if self.on_removed not in ("raise", "skip"):
            raise ConfigError(f"ReadConfig: on_removed is 'raise' or 'skip', not {self.on_removed!r}")
        if self.batch < 1 or self.max_buffered < self.batch:
            raise ConfigError(f"ReadConfig: need 1 <= batch <= max_buffered, got {self.batch}, {self.max_buffered}")
        if self.max_buffered_bytes < 1:
            raise ConfigError(f"ReadConfig: need max_buffered_bytes >= 1, got {self.max_buffered_bytes}")
        if not 0 < self.heartbeat * 2 <= self.expires:
            raise ConfigError(f"ReadConfig: need 0 < 2 * heartbeat <= expires, got {self.heartbeat}, {self.expires}")
        if self.inactive_threshold <= 0 or self.recover_timeout <= 0:
            raise ConfigError("ReadConfig: inactive_threshold and recover_timeout must be > 0")


def _shard_of_filter(key_filter: object) -> tuple[int, int] | None:
    """(m, n) when ``key_filter`` says it keeps shard m of n (``xxh3_shard``), so the scanner may hash
    raw header values itself; None otherwise."""
    shard = getattr(key_filter, "xxh3_shard", None)
    if isinstance(shard, tuple) and len(shard) == 2 and all(type(x) is int for x in shard):
        m, n = shard
        return (m, n) if 0 <= m < n else None
    return None


def _identity(info: api.StreamInfo) -> str:
    """Which stream this is: its name and creation time (a stream deleted and created again under
    the same name has another)."""
    created = info.created.isoformat() if info.created is not None else "?"
    return f"{info.config.name}@{created}"


class _Requests:
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


class _Session:
    """One ephemeral consumer, from its creation to its loss (recovery drops it) or the client's close:
    its name and subjects, its consumer sequence, the pull requests it owes, and the patterns
    :meth:`StreamClient._scan` takes its frames with.

    A new consumer gets a new session, created whole once the server has made the consumer and swapped
    in with one assignment; a frame of an earlier one (its name, its deliver subject) matches nothing
    in it and is ignored. What outlives consumers (the last sequence taken, the buffer, the counters)
    stays on the client.
    """

    __slots__ = ("cseq", "deliver", "name", "next_subject", "pattern", "pending", "plain", "prefix", "requests")

    def __init__(self, name: bytes, deliver: bytes, next_subject: str) -> None:
        self.name = name  # the consumer's name, in the reply subject of each of its deliveries
        self.deliver = deliver  # the reply subject of its pull requests: its messages and statuses come there
        self.next_subject = next_subject  # where its pull requests go
        self.cseq = 0  # its consumer sequence: messages it has sent
        self.pending = 0  # messages asked for and neither received nor expired
        self.requests = _Requests()
        # Set by its first frame (with the fast lane): _scan takes the frames after it in bulk.
        self.prefix = b""  # its reply subjects up to and with the consumer's token
        self.pattern: re.Pattern[bytes] | None = None  # its frames
        self.plain: re.Pattern[bytes] | None = None  # those of them with a plain foreign ID


class _Gap(Exception):
    """Raised by the bulk scanner's helpers: a sequence jumped among the frames in ``buf[start:end]``,
    which :meth:`StreamClient._scan` hands to the frame handler one by one to find where and why."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__(start, end)
        self.start = start
        self.end = end


_Match = Callable[[bytearray, int], "re.Match[bytes] | None"]  # a frame pattern's bound match


class StreamClient:
    """Delivers a stream's events in stream order; open it with :meth:`rjet.Stream.stream`.

    ``await client.recv()`` returns the next :class:`rjet.Event`; ``async for`` iterates (and ends
    cleanly at the head with ``to_head``); ``async with`` closes it. :attr:`num_pending` is the
    server's count of events not yet delivered (a free lag figure).
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        *,
        after: int,
        from_head: bool,
        to_head: bool,
        filter_subjects: tuple[str, ...],
        config: ReadConfig,
        stream_id: str | None = None,
        key_filter: Callable[[str], bool] | None = None,
    ) -> None:
        self.stream = stream
        self.stream_id = ""  # which stream this is: its name and creation time (see _identity)
        self._expect_id = stream_id
        self._js = js
        self._nc = connection(js)
        self._cfg = config
        self._after = after
        self._from_head = from_head
        self._to_head = to_head
        self._filters = filter_subjects
        self._low = max(1, config.batch // 2)
        self._loop = asyncio.get_running_loop()
        self._buf: deque[Frame] = deque()
        self._last = after  # highest stream sequence taken into the buffer
        # Gap detection. Without subject filters stream sequences must follow each other exactly. With
        # them a jump is explained by the filter when nothing of ours was waiting at the previous frame
        # and a pull request stayed open since; otherwise events are held above _verified until the
        # stream's first sequence says nothing was removed under them (see _verify).
        self._filtered = bool(filter_subjects)
        self._verified = after if self._filtered else _ALL
        self._prev_pending = 0  # the server's pending count at the last frame (filtered readers)
        self._blind = False  # a moment without an open pull request since the last frame
        self._verifying: asyncio.Task[None] | None = None
        self._verify_now = asyncio.Event()
        self._checked_at = 0.0  # loop time of the last check _verify made
        self._skip_removed = config.on_removed == "skip"
        self._gaps: deque[EventsRemoved] = deque()  # ranges skipped under on_removed="skip", not yet returned
        self.removed = 0  # stream sequences removed ahead of the reader and skipped (on_removed="skip")
        self._denials = denials(self._nc)
        self._unwatch: Callable[[], None] | None = None
        self._head = 0
        self._caught_up = False
        # Set before the first frame can arrive: no frame is ever buffered unfiltered.
        self._key_filter = key_filter
        self._shard = _shard_of_filter(key_filter)  # (m, n) when it is xxh3 % n == m: _scan hashes itself
        self._skipped = 0  # sequence of the last event the key filter passed over, not yet reported
        self._inbox = self._nc.new_inbox()
        self._gen = 0  # consumers created: the current one's deliver subject is _inbox.<_gen>
        self._session: _Session | None = None  # the current consumer's (None while there is none)
        self._in_bytes = 0  # bytes of messages ever put into _buf
        self._passed_bytes = 0  # bytes of messages _scan ever passed over, as nats-py's statistics count them
        self._pulling: asyncio.Task[None] | None = None
        self._activity = 0.0  # when the watchdog last saw _frames change
        self._frames = 0  # frames received, data and status alike
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._sub: Subscription | None = None
        self._parser: FastParser | None = None
        self._sid = 0
        self._watchdog: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._nuid = NUID()
        self._server_pending = 0  # events the server has not sent yet, as of the last message
        self.recoveries = 0
        self.skipped = 0  # events the key filter passed over as they arrived (read ahead included)
        self.skipped_passed = 0  # of those, the ones the caller has moved past (see next_or_skip)
        # Runs of passed-over events the caller has not moved past yet: (the run's last sequence,
        # self.skipped after it). A kept event or the end of the buffer separates two of them.
        self._marks: deque[tuple[int, int]] = deque()
        self._returned = 0  # the position last handed to the caller while marks were waiting

    # ----------------------------------------------------------------- the hot path

    async def recv(self) -> Event:
        """The next event in stream order; waits for one.

        Raises :class:`rjet.HeadReached` (``to_head``), :class:`rjet.Stopped` after :meth:`close`,
        or the stream error that ended the client.
        """
        while True:
            item = await self.next_or_skip()
            if type(item) is Event:
                return item

    async def next_or_skip(self) -> Event | int | EventsRemoved:  # noqa: C901 (the hot path, kept in one piece)
        """The next event (whose foreign ID passed the key filter); or, before it would wait, the
        sequence of the last event the key filter passed over, so the caller's cursor can move past
        other shards' events; or, under ``on_removed="skip"``, a range removed before the next event.

        Asking for the next item says the caller is done with the one it got before (its cursor moved
        there): the events passed over up to that one then count in ``skipped_passed``; those only read
        ahead of it when the caller stops never do."""
        marks = self._marks
        if marks and marks[0][0] <= self._returned:
            self._pass_marks()
        try:
            buf = self._buf
            gaps = self._gaps
            while True:
                if buf:
                    frame = buf[0]
                    sseq = frame[0]
                    if gaps and sseq > gaps[0].last:
                        return gaps.popleft()
                    if sseq > self._verified:
                        pass  # held until _verify settles it
                    elif not (self._to_head and sseq > self._head):
                        buf.popleft()
                        if marks:
                            self._returned = sseq
                        if self._skipped <= sseq:
                            self._skipped = 0
                        if (s := self._session) is None or s.pending <= self._low:
                            if s is not None and self._cfg.max_buffered - len(buf) - s.pending < self._low:
                                # No room to ask for more (a consumer that reads slower than the
                                # server sends): what _pull would conclude, without its coroutine.
                                if s.pending <= 0:
                                    self._blind = True
                            else:
                                await self._pull()
                        return self._decode(*frame)
                if (s := self._session) is None or s.pending <= self._low:
                    await self._pull()
                if gaps:
                    return gaps.popleft()
                if self._skipped and self._skipped <= self._verified:
                    sseq, self._skipped = self._skipped, 0
                    self._returned = sseq
                    return sseq
                if buf and buf[0][SEQ] <= self._verified:
                    raise HeadReached(self.stream, self._head)
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise Stopped(f"stream {self.stream!r}: the stream client is closed")
                if self._to_head and not buf and (self._caught_up or self._last >= self._head):
                    raise HeadReached(self.stream, self._head)
                if buf or self._skipped:
                    self._verify_now.set()  # held for _verify: it should not wait for its next round
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        except DecodeError:
            self._skipped = 0  # the caller moves its cursor to the bad event, or stops
            raise

    def take(self, limit: int) -> list[Event]:
        """Up to ``limit`` events that :meth:`next_or_skip` would return now, one call after the other,
        without waiting (a concurrent consumer's reader takes a run of them at once).

        It stops short, leaving the rest to :meth:`next_or_skip`, wherever that one does more than pop
        and decode: a removed range to report, a frame held for verification, the head of a
        ``to_head`` read, a pull request to send, an undecodable message (which next_or_skip raises)."""
        buf = self._buf
        if not buf or self._gaps:
            return []
        marks = self._marks
        if marks and marks[0][0] <= self._returned:
            self._pass_marks()
        s, low, decode = self._session, self._low, self._decode
        until = min(self._verified, self._head) if self._to_head else self._verified
        # Nothing here changes the session: whether a pull may be due is known before the loop.
        due = s is None or s.pending <= low
        new, set_id, set_type, set_fid, set_us, set_ts, set_data = _MAKE
        out: list[Event] = []
        while buf and len(out) < limit:
            frame = buf[0]
            if frame[0] > until:
                break
            if due:
                if s is None or self._cfg.max_buffered - len(buf) - s.pending >= low:
                    break  # a pull is due: next_or_skip sends it
                if s.pending <= 0:
                    self._blind = True  # as next_or_skip notes it (no room to ask for more)
            sseq = frame[0]
            typ_value, fid_value = frame[6], frame[7]
            if typ_value is not None and fid_value is not None and frame[5] is None and _PERCENT not in fid_value:
                # As _decode does for a frame _scan took (a call per event was a tenth of this loop).
                event = new(Event)
                set_id(event, str(sseq))
                set_type(event, int(typ_value))
                set_fid(event, fid_value.decode())
                set_us(event, frame[1] // 1000)
                set_ts(event, None)
                set_data(event, frame[4])
            else:
                try:
                    event = decode(*frame)
                except DecodeError:
                    break  # next_or_skip pops it and raises, in its place
            buf.popleft()
            out.append(event)
        if out:
            last = int(out[-1].id)
            if marks:
                self._returned = last
            if self._skipped <= last:
                self._skipped = 0
        return out

    def _pass_marks(self) -> None:
        """Count the runs of passed-over events up to the position last handed to the caller."""
        marks, upto = self._marks, self._returned
        while marks and marks[0][0] <= upto:
            self.skipped_passed = marks.popleft()[1]

    def _mark(self, prev: int) -> None:
        """Note the passed-over events up to ``self._last`` (the frame before them was ``prev``)."""
        marks = self._marks
        if marks and marks[-1][0] == prev and prev > self._returned:
            marks[-1] = (self._last, self.skipped)  # the same run, longer (and not yet moved past)
        else:
            marks.append((self._last, self.skipped))

    def _on_frame(self, subject: bytes, reply: bytes, hdr: bytes | None, data: bytes) -> None:  # noqa: C901 (hot path)
        s = self._session
        if not reply:
            if s is not None and subject == s.deliver and hdr is not None:
                self._on_status(s, hdr)
            return
        # Only the frames _scan leaves come here (a consumer's first, statuses, other header layouts),
        # or every frame without the fast lane.
        ack = parse_ack(reply)
        if ack is None or s is None or ack[0] != s.name or self._error is not None:
            return  # not a JetStream delivery, left over from an earlier consumer, or after a gap
        _, sseq, cseq, ts, pending = ack
        self._frames += 1
        s.pending -= 1
        if cseq != s.cseq + 1:
            return self._recover(f"consumer sequence jumped from {s.cseq} to {cseq}")
        s.cseq = cseq
        if s.pattern is None and self._parser is not None:
            # The consumer's first frame: from the next one on, _scan takes its frames in bulk.
            # Up to and with the consumer token: 4 tokens of the 9-token form, 6 of the 11/12-token one.
            tokens = reply.split(b".")  # parse_ack took it: 9, 11 or 12 of them
            s.prefix = b".".join(tokens[: 4 if len(tokens) == 9 else 6]) + b"."
            s.pattern = frame_pattern(self._sid, s.prefix)
            s.plain = frame_pattern(self._sid, s.prefix, plain=True)
        if sseq > self._last:
            prev = self._last
            if sseq != prev + 1 and self._jump(prev, sseq):
                return
            if self._filtered:
                if self._verified == prev and (sseq == prev + 1 or not (self._prev_pending or self._blind)):
                    self._verified = sseq
                elif self._verifying is None:
                    self._verifying = self._loop.create_task(self._verify())
                self._prev_pending = pending
                self._blind = s.pending <= 0
            self._last = sseq
            self._server_pending = pending
            if pending == 0:
                self._caught_up = True
            fid = None
            key_filter = self._key_filter
            if key_filter is not None:
                # Other keys' events stop here, with only the foreign ID decoded. (One whose header
                # does not decode is buffered, so that next_or_skip raises its DecodeError in order.)
                try:
                    fid = self._foreign_id(subject, hdr, sseq)
                    wanted = key_filter(fid)
                except DecodeError:
                    wanted = True
                except Exception as e:  # a broken key filter: end the client, do not break the parser
                    return self._fail(e)
                if not wanted:
                    self._skipped = sseq
                    self.skipped += 1
                    self._mark(prev)
                    if not self._buf:
                        waiter = self._waiter
                        if waiter is not None and not waiter.done():
                            waiter.set_result(None)
                    if s.pending <= self._low:
                        self._kick()
                    return
            self._buf.append((sseq, ts, subject, hdr, data, fid, None, None, self._in_bytes))
            self._in_bytes += len(data)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if s.pending <= self._low:
            self._kick()

    def _scan(self, buf: bytearray, pos: int, size: int) -> int:
        """Takes the current consumer's complete frames from ``buf[pos:size]`` in one go, as long as
        they are laid out as ``insert`` writes them (the ``Scanner`` of ``rjet/_nats/parser.py``).

        The same as :meth:`_on_frame` per frame: :meth:`_take_runs` takes the frames the key filter
        keeps, :meth:`_pass_run` each run of those it passes over. A sequence jump sends the frames
        concerned through :meth:`_on_frame` one by one, which finds the gap. A frame the pattern does
        not fit (other headers, a status) ends the call and goes to :meth:`_on_frame` too.
        """
        s = self._session
        if s is None or (pattern := s.pattern) is None or (plain := s.plain) is None or self._error is not None:
            return pos
        frames0, held0, passed0 = self._frames, self._in_bytes, self._passed_bytes
        gap: _Gap | None = None
        end = pos
        view = memoryview(buf)  # one copy per body, not two (bytes(buf[a:b]) copies twice)
        try:
            end = self._take_runs(s, pattern.match, plain.match, buf, view, pos, size)
        except _Gap as e:
            gap = e
        finally:
            view.release()  # the parser resizes buf next
        if self._frames != frames0:
            # nats-py's statistics, kept as it would: messages, and their body bytes; for frames passed
            # over in the shard loop their headers too (their size would cost a shard worker 13% per frame).
            stats = self._nc.stats
            stats["in_msgs"] += self._frames - frames0
            stats["in_bytes"] += self._in_bytes - held0 + self._passed_bytes - passed0
        if gap is not None:
            return self._one_by_one(s, buf, gap.start, gap.end)  # _on_lane_frame counts these
        if end != pos:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if s.pending <= self._low:
                self._kick()
        return end

    def _take_runs(
        self, s: _Session, match: _Match, plain: _Match, buf: bytearray, view: memoryview, pos: int, size: int
    ) -> int:
        """Takes the consumer's frames that the key filter keeps from ``buf[pos:size]`` into the
        buffer, and hands each run of those it passes over to :meth:`_pass_run`; returns where it
        stopped. Raises :class:`_Gap` at a sequence jump."""
        key_filter, filtered = self._key_filter, self._filtered
        mine, n = self._shard or (-1, 0)
        append = self._buf.append
        held = self._in_bytes  # written back before anything else may read or change it
        passed = 0  # bytes of the frames passed over
        tail: list[bytes] | None = None  # of the frame after a run of them, found by _pass_run
        try:
            while True:
                m = plain(buf, pos) if n else None  # a shard worker hashes a plain foreign ID as it is
                hashed = m is not None
                m = m or match(buf, pos)
                if m is None or (stop := (body := m.end(3) + 2) + int(m[3])) + 2 > size:
                    return pos  # no frame of the pattern's, or not all here yet
                if key_filter is not None:
                    try:
                        wanted = hash_bytes(m[5]) % n == mine if hashed else key_filter(self._fid_value(m[5], 0))
                    except Exception:  # DecodeError, a broken filter: _on_frame handles it
                        return pos
                    if not wanted:
                        # Its size as _pass_run counts: headers included for a hashed one.
                        nbytes = stop - body if hashed else stop - body - int(m[2])
                        pos, nbytes, m, tail, body, stop, cseq, sseq = self._pass_run(
                            s, match, plain, buf, pos, stop + 2, size, m, nbytes
                        )
                        passed += nbytes
                        if m is None:
                            return pos
                if tail is None:
                    tail = m[1].split(b".")
                    if len(tail) < 5:
                        return pos
                    cseq, sseq = int(tail[2]), int(tail[1])
                    # A consumer-sequence jump (lost in transit) or, without subject filters, a stream
                    # sequence jump (events removed): _on_frame, frame by frame, finds which.
                    if cseq != s.cseq + 1 or (sseq != self._last + 1 and not filtered):
                        raise _Gap(pos, stop + 2)
                s.cseq = cseq
                s.pending -= 1
                self._frames += 1
                self._server_pending = pending = int(tail[4])
                if pending == 0:
                    self._caught_up = True
                if filtered:
                    # Explained by the filter (see __init__), or held until _verify settles it.
                    if self._verified == self._last and (
                        sseq == self._last + 1 or not (self._prev_pending or self._blind)
                    ):
                        self._verified = sseq
                    elif self._verifying is None:
                        self._verifying = self._loop.create_task(self._verify())
                    self._prev_pending = pending
                    self._blind = s.pending <= 0
                self._last = sseq
                data = view[body + int(m[2]) : stop].tobytes()
                append((sseq, int(tail[3]), b"", None, data, None, m[4], m[5], held))
                held += len(data)
                pos = stop + 2
                tail = None
        finally:
            self._in_bytes = held
            self._passed_bytes += passed

    def _pass_run(
        self,
        s: _Session,
        match: _Match,
        plain: _Match,
        buf: bytearray,
        start: int,
        pos: int,
        size: int,
        last: re.Match[bytes],
        run_bytes: int,
    ) -> tuple[int, int, re.Match[bytes] | None, list[bytes] | None, int, int, int, int]:
        """Passes over a run of the consumer's frames that the key filter passes over, from ``last``
        (at ``start``, of ``run_bytes`` bytes; the next frame begins at ``pos``), and commits it.

        The run's consumer sequences are checked with the frame the filter keeps after it, or with the
        last of the run where that one cannot be taken: every frame matched is this consumer's (its
        name is in the pattern) and sequences only grow, so the run is gapless exactly when the later
        sequence is the count further on. When it is not, :class:`_Gap`: the run (and that frame) go
        through :meth:`_on_frame` frame by frame.

        Returns where the run ends, its bytes (for nats-py's statistics) and the frame kept after it,
        checked, as :meth:`_take_runs` takes one (its match, reply tail, body start and end, consumer
        and stream sequences; None, None, 0... where none can be taken).
        """
        key_filter = self._key_filter
        assert key_filter is not None  # it passed the first over
        mine, n = self._shard or (-1, 0)
        run = 1
        tail: list[bytes] | None = None  # of the frame kept after the run, when it can be taken
        while True:
            wanted = False
            m: re.Match[bytes] | None = None
            if n:
                # A shard worker's loop: another shard's event (with a plain foreign ID, which is
                # hashed as it is) costs a match and a hash.
                while (m := plain(buf, pos)) is not None:
                    total = int(m[3])
                    nxt = m.end(3) + total + 4
                    if nxt > size or hash_bytes(m[5]) % n == mine:
                        wanted = nxt <= size  # ours, unless not all here yet
                        break
                    run += 1
                    run_bytes += total  # headers included: their size would cost another int()
                    last = m
                    pos = nxt
            m = m or match(buf, pos)  # a percent-encoded foreign ID (the filter decides), or none
            if m is None or (stop := (body := m.end(3) + 2) + int(m[3])) + 2 > size:
                break  # no frame of the pattern's, or not all here yet
            if not wanted:
                try:
                    wanted = key_filter(self._fid_value(m[5], 0))
                except Exception:  # DecodeError, a broken filter: _on_frame handles it
                    break
                if not wanted:
                    run += 1
                    run_bytes += stop - body - int(m[2])
                    last = m
                    pos = stop + 2
                    continue
            tail = t if len(t := m[1].split(b".")) >= 5 else None
            break
        ltail = last[1].split(b".")
        ref, more, end = (tail, 1, stop + 2) if tail is not None else (ltail, 0, pos)
        cseq, sseq = int(ref[2]), int(ref[1])
        if cseq != s.cseq + run + more or (not self._filtered and sseq != self._last + run + more):
            raise _Gap(start, end)
        s.cseq += run
        s.pending -= run
        self._frames += run
        prev = self._last
        self._last = self._skipped = int(ltail[1])
        self.skipped += run
        self._mark(prev)
        self._server_pending = pending = int(ltail[4])
        if pending == 0:
            self._caught_up = True
        if self._filtered:
            # Contiguous, or one frame after a jump the filter explains; else held for _verify.
            explained = not (self._prev_pending or self._blind)
            if self._verified == prev and (self._last == prev + run or (run == 1 and explained)):
                self._verified = self._last
            elif self._verifying is None:
                self._verifying = self._loop.create_task(self._verify())
            self._prev_pending = pending
            self._blind = s.pending <= 0
        if tail is None:
            return pos, run_bytes, None, None, 0, 0, 0, 0
        return pos, run_bytes, m, tail, body, stop, cseq, sseq

    def _jump(self, prev: int, sseq: int) -> bool:
        """A frame's stream sequence jumped from ``prev``: True when the gap ends the reader (the frame
        is dropped; every frame before it is still delivered, then the error is raised)."""
        if self._filtered:
            return False  # explained by the filter, or checked by _verify before it is delivered
        return not self._removed(EventsRemoved(self.stream, prev + 1, sseq - 1))

    def _removed(self, gap: EventsRemoved) -> bool:
        """A range removed ahead of the reader: skipped (True) under ``on_removed="skip"``, else the
        client's error (every frame before it is still delivered)."""
        if not self._skip_removed:
            self._fail(gap)
            return False
        log.warning("stream %r: skipping events %d..%d, removed before they were read (on_removed='skip')",
                    self.stream, gap.first, gap.last)  # fmt: skip
        self.removed += gap.last - gap.first + 1
        self._gaps.append(gap)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    async def _verify(self) -> None:
        """Settles frames held above ``_verified``: the stream's first sequence, asked for after they
        arrived, says whether it removed anything above ``_verified`` in the meantime."""
        try:
            while not self._closed and self._error is None and self._verified < self._last:
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
                upto = self._last
                try:
                    first = await self._first_seq()
                except _FINAL_ERRORS as e:
                    return self._fail(e)
                except (nats.errors.Error, TimeoutError, OSError, nats.js.errors.Error) as e:
                    log.debug("stream %r: cannot check for removed events yet (%r)", self.stream, e)
                    await asyncio.sleep(0.1)
                    continue
                if first > self._verified + 1:
                    if not self._removed(EventsRemoved(self.stream, self._verified + 1, first - 1, certain=False)):
                        return
                    upto = max(upto, first - 1)
                self._verified = max(self._verified, upto)
                waiter = self._waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        finally:
            if self._verifying is asyncio.current_task():
                self._verifying = None

    def _one_by_one(self, s: _Session, buf: bytearray, pos: int, end: int) -> int:
        """Hands the frames in ``buf[pos:end]`` (all matched by the session's pattern) to :meth:`_on_frame`."""
        pattern, prefix = s.pattern, s.prefix
        while pattern is not None and pos < end and (m := pattern.match(buf, pos)) is not None:
            body = m.end(3) + 2
            hlen = int(m[2])
            stop = body + int(m[3])
            self._on_lane_frame(b"", prefix + m[1], bytes(buf[body : body + hlen]), bytes(buf[body + hlen : stop]))
            pos = stop + 2
        return pos

    def _on_lane_frame(self, subject: bytes, reply: bytes, hdr: bytes | None, data: bytes) -> None:
        """A frame off the fast lane: counted in nats-py's statistics (its own path counts the rest)."""
        stats = self._nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        self._on_frame(subject, reply, hdr, data)

    async def _on_msg(self, msg: Msg) -> None:
        """The same as :meth:`_on_frame`, for a connection whose parser has no fast lane."""
        hdr = raw_block(msg.headers)  # as the server sent it (keep_raw_headers), so it decodes as there
        if hdr is None and msg.headers is not None:
            # Rebuilt from nats-py's dict: a repeated header's last value, non-UTF-8 bytes as U+FFFD.
            h = dict(msg.headers)
            status = h.pop(_STATUS, "")
            desc = h.pop(_DESCRIPTION, "")
            first = f"NATS/1.0 {status} {desc}".rstrip() if status else "NATS/1.0"
            hdr = "".join([first, "\r\n", *(f"{k}: {v}\r\n" for k, v in h.items()), "\r\n"]).encode()
        self._on_frame(msg.subject.encode(), msg.reply.encode(), hdr, msg.data)

    def _foreign_id(self, subject: bytes, hdr: bytes | None, sseq: int) -> str:
        value = rjet_headers(hdr)[1] if hdr is not None else None
        if value is None:
            return subject.decode("utf-8", "replace")
        return self._fid_value(value, sseq)

    def _fid_value(self, value: bytes, sseq: int) -> str:
        if _PERCENT in value or not value or not value.isascii():
            return foreign_id_of(value, self.stream, sseq)  # exact UTF-8, or DecodeError
        return value.decode()

    def _decode(
        self,
        sseq: int,
        ts: int,
        subject: bytes,
        hdr: bytes | None,
        data: bytes,
        fid: str | None,
        typ_value: bytes | None,
        fid_value: bytes | None,
        _held: int,
    ) -> Event:
        if typ_value is not None and fid_value is not None:  # taken by _scan: digits, printable ASCII
            typ = int(typ_value)
            if fid is None:
                fid = fid_value.decode() if _PERCENT not in fid_value else self._fid_value(fid_value, sseq)
        else:
            typ = 0
            if hdr is not None:
                typ_raw, fid_raw = rjet_headers(hdr)
                if typ_raw is not None:
                    # Go's strconv.Atoi, within int64, empty as 0 (decode_type); bytes.isdigit is ASCII only.
                    if typ_raw.isdigit() and len(typ_raw) < 19:
                        typ = int(typ_raw)
                    else:
                        typ = decode_type(typ_raw, self.stream, sseq)
                if fid is None:
                    fid = subject.decode("utf-8", "replace") if fid_raw is None else self._fid_value(fid_raw, sseq)
            elif fid is None:
                fid = subject.decode("utf-8", "replace")
        # Event(...) through the frozen dataclass's __init__ costs twice as much as setting the
        # slots directly (its __init__ calls object.__setattr__ per field); the result is the same.
        event = _new(Event)
        _set_id(event, str(sseq))
        _set_type(event, typ)
        _set_fid(event, fid)
        _set_us(event, ts // 1000)
        _set_ts(event, None)  # the datetime is built when a handler asks for it
        _set_data(event, data)
        return event

    def _kick(self) -> None:
        if self._pulling is None and self._session is not None and not self._closed:
            self._pulling = self._loop.create_task(self._pull())

    async def _pull(self) -> None:
        try:
            s = self._session
            pending = 0 if s is None else s.pending  # none owed without a consumer
            room = self._cfg.max_buffered - len(self._buf) - pending
            if s is None or self._closed or room < self._low:
                if pending <= 0:
                    self._blind = True  # nothing asked for: the server would not send what it gets now
                return
            want = min(room, self._cfg.batch)
            budget = self._cfg.max_buffered_bytes
            share = max(1, budget * want // self._cfg.max_buffered)  # its part of the budget, as of the count
            max_bytes = s.requests.max_bytes(s.cseq, self.buffered_bytes, budget, pending, share)
            if max_bytes < 0:
                if pending <= 0:
                    self._blind = True
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
                self._fail(Stopped(f"stream {self.stream!r}: the NATS connection is closed"))
            except nats.errors.Error as e:
                # Disconnected with a full outgoing buffer, say: the watchdog recovers once traffic stops.
                log.debug("stream %r: pull request not sent: %r", self.stream, e)
        finally:
            if self._pulling is asyncio.current_task():
                self._pulling = None

    # ----------------------------------------------------------------- status and recovery

    def _on_status(self, s: _Session, hdr: bytes) -> None:
        self._frames += 1
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
            return self._kick()
        line = hdr[: hdr.find(b"\r\n")].decode("utf-8", "replace")
        self._recover(f"server said {line[9:]!r}")

    def _recover(self, reason: str) -> None:
        if self._recovery is None and not self._closed and self._error is None:
            self._session = None  # the consumer is lost: its frames are ignored from here on
            self._recovery = asyncio.create_task(self._recover_loop(reason))

    async def _recover_loop(self, reason: str) -> None:
        self.recoveries += 1
        log.info("stream %r: recreating the consumer after sequence %d: %s", self.stream, self._last, reason)
        deadline = self._loop.time() + self._cfg.recover_timeout
        delay = 0.05
        try:
            while not self._closed:
                try:
                    info = await self._stream_info()
                    if _identity(info) != self.stream_id:
                        raise StreamRecreated(self.stream, self._last, self.stream_id, _identity(info))
                    self._check_cursor(info.state, self._last)
                    self._blind = False  # the check above covers the time without a consumer
                    await self._create_consumer()
                    await self._pull()
                    return
                except _FINAL_ERRORS as e:
                    return self._fail(e)
                except (nats.errors.Error, TimeoutError, OSError, nats.js.errors.Error) as e:
                    if self._nc.is_closed:
                        return self._fail(Stopped(f"stream {self.stream!r}: the NATS connection is closed"))
                    if self._loop.time() > deadline:
                        return self._fail(
                            ConsumerLost(
                                f"stream {self.stream!r}: could not recreate the consumer after sequence"
                                f" {self._last} within {self._cfg.recover_timeout}s ({reason}; last error:"
                                f" {e!r})",
                                stream=self.stream,
                            )
                        )
                    log.warning("stream %r: recreating the consumer failed (%r); retrying", self.stream, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        finally:
            self._recovery = None

    async def _watch(self) -> None:
        hb = self._cfg.heartbeat
        seen = -1
        while not self._closed:
            await asyncio.sleep(hb)
            if self._nc.is_closed:
                return self._fail(Stopped(f"stream {self.stream!r}: the NATS connection is closed"))
            now = self._loop.time()
            if self._frames != seen:
                seen = self._frames
                self._activity = now
            s = self._session
            if self._recovery is not None or s is None:
                continue
            if s.pending > 0 and now - self._activity > 3 * hb:
                self._recover(f"no message or heartbeat for {3 * hb:g}s")
            elif s.pending == 0:
                await self._pull()

    def _fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ----------------------------------------------------------------- set-up

    async def _stream_info(self) -> api.StreamInfo:
        try:
            subject = f"{api_prefix(self._js)}.STREAM.INFO.{self.stream}"
            return await self._denials.guard(starts(subject), self._js.stream_info(self.stream))
        except nats.js.errors.NotFoundError:
            raise StreamNotFound(self.stream) from None
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            raise StreamNotFound(self.stream, "JetStream is not enabled on the server") from None

    async def _first_seq(self) -> int:
        """The stream's first sequence, from a stream-info request read for that field alone (nats-py's
        full decoding of the reply costs several times the round trip, and _verify asks often)."""
        subject = f"{api_prefix(self._js)}.STREAM.INFO.{self.stream}"
        reply = await self._denials.guard(
            starts(subject), self._nc.request(subject, b"", timeout=api_timeout(self._js))
        )
        found = _FIRST_SEQ.search(reply.data)
        if found is None or b'"error"' in reply.data[:16]:
            return (await self._stream_info()).state.first_seq  # raises what the server said, or decodes it
        return int(found.group(1))

    def _check_cursor(self, state: api.StreamState, after: int) -> None:
        if after > state.last_seq:
            raise CursorAhead(self.stream, after, state.last_seq)
        if after and after + 1 < state.first_seq:
            raise CursorExpired(self.stream, after, state.first_seq)

    async def _create_consumer(self) -> None:
        self._session = None  # one being replaced (recovery has dropped it already) is dropped first
        self._gen += 1
        deliver = f"{self._inbox}.{self._gen}".encode()
        config = api.ConsumerConfig(
            name=self._nuid.next().decode(),
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._last + 1,
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
            starts(f"{api_prefix(self._js)}.CONSUMER.CREATE.{self.stream}"), self._js.add_consumer(self.stream, config)
        )
        if info.num_pending == 0:
            self._caught_up = True
        self._server_pending = info.num_pending or 0
        self._activity = self._loop.time()
        next_subject = f"{api_prefix(self._js)}.CONSUMER.MSG.NEXT.{self.stream}.{info.name}"
        self._session = _Session(info.name.encode(), deliver, next_subject)

    async def _open(self) -> None:
        info = await self._stream_info()
        state = info.state
        self.stream_id = _identity(info)
        if self._from_head:
            self._last = state.last_seq
            if self._filtered:
                self._verified = self._last
        else:
            if self._expect_id and self._after and self._expect_id != self.stream_id:
                raise StreamRecreated(self.stream, self._after, self._expect_id, self.stream_id)
            self._check_cursor(state, self._after)
            if not self._after and state.first_seq > 1:
                # No cursor: from the first event still there (those before it are not a gap).
                self._last = state.first_seq - 1
                if self._filtered:
                    self._verified = self._last
        self._head = state.last_seq
        # Pull requests and deliveries are not requests: a refusal of either ends the client at once.
        self._unwatch = self._denials.watch(
            starts(f"{api_prefix(self._js)}.CONSUMER.MSG.NEXT.{self.stream}.", self._inbox), self._fail
        )
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_msg)
        self._sid = subscription_id(self._sub)
        self._parser = fast_parser(self._nc) if self._cfg.fast_lane else None
        if self._parser is not None:
            self._parser.lanes[self._sid] = self._on_lane_frame
            self._parser.scanners[self._sid] = self._scan
        else:
            keep_raw_headers(self._nc)  # _on_msg decodes the raw header block, as the fast lane does
        try:
            await self._create_consumer()
            await self._pull()
        except nats.js.errors.APIError as e:
            await self.close()
            raise RjetError(f"stream {self.stream!r}: cannot create a consumer: {e.description}") from e
        except BaseException:
            await self.close()
            raise
        self._watchdog = asyncio.create_task(self._watch())

    # ----------------------------------------------------------------- lifecycle

    @property
    def key_filter(self) -> Callable[[str], bool] | None:
        """The foreign-ID filter the client was opened with: other keys' events are passed over
        before decoding, and ``next_or_skip`` returns how far (ints) so a caller's cursor can move past them."""
        return self._key_filter

    @property
    def num_pending(self) -> int:
        """Events not yet returned by ``recv``: buffered here, or still on the server (a lag figure)."""
        return self._server_pending + len(self._buf)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of event bodies held here, not yet returned by ``recv`` (see ``ReadConfig.max_buffered_bytes``)."""
        return self._in_bytes - self._buf[0][HELD_BEFORE] if self._buf else 0

    @property
    def last_sequence(self) -> int:
        """The highest stream sequence this client has taken from the server (delivered or buffered)."""
        return self._last

    @property
    def head(self) -> int:
        """The stream's last sequence when the client opened."""
        return self._head

    async def close(self) -> None:
        """Stop reading and delete the server-side consumer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._unwatch is not None:
            self._unwatch()
        self._buf.clear()  # nothing more is delivered; the next reader reads these again
        self._skipped = 0  # passed over after the frames just dropped: not a place for a cursor now
        self._marks.clear()  # read ahead, never moved past: the next reader passes over them again
        self._gaps.clear()
        tasks = [t for t in (self._watchdog, self._recovery, self._pulling, self._verifying) if t is not None]
        tasks = [t for t in tasks if t is not asyncio.current_task()]
        await cancel_and_wait(tasks)  # a recovery that swallowed its cancellation would go on
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        session, self._session = self._session, None
        if self._parser is not None:
            self._parser.lanes.pop(self._sid, None)
            self._parser.scanners.pop(self._sid, None)
        if self._nc.is_closed:
            return
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        if session is not None:
            # Without the permission to delete it, the consumer is reaped after inactive_threshold.
            subject = f"{api_prefix(self._js)}.CONSUMER.DELETE.{self.stream}.{session.name.decode()}"
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError, PermissionDenied):
                await self._denials.guard(starts(subject), self._nc.request(subject, b"", timeout=1.0))

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
