"""An in-memory stream that behaves as a real :class:`rjet.Stream` does, for handler tests.

What it models, and how (the conformance suite, :func:`rjet.testing.check_stream`, holds it to the
real stream on a nats-server):

- Storage: events with stream sequences from 1, the stream's first and last sequence as JetStream
  reports them (0 and 0 when nothing was ever stored; after a removal through ``s`` the first is
  ``s + 1``, and the last too is ``s`` when ``s`` was past it), ``msg_id`` de-duplication within the
  duplicate window (which outlives a removal, as JetStream's does), the stream's identity (its name
  and creation time), which :meth:`MemoryStream.recreate` changes.
- Inserts: the same checks, in the same order, with the same errors as ``Stream.insert`` and
  ``insert_many`` (the same functions do them), against a max payload of 1 MiB (nats-server's default).
- Readers: :class:`MemoryStreamClient` has the real :class:`rjet.StreamClient`'s interface, so ``run``
  treats it as the real one (key-filtered positions move the cursor, concurrent consumers take runs
  of events, dead letters name the stream). It keeps the real reader's pull accounting (``ReadConfig.batch`` and
  ``max_buffered``: what a reader fetched ahead before a removal is still delivered), as if the
  server answered every pull request at once; it raises the real reader's errors at the same points
  with the same fields and messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from rjet._nats.frames import encode_header_block, encode_headers
from rjet.errors import (
    ConfigError,
    EventsRemoved,
    HeadReached,
    InvalidEvent,
    Stopped,
    StreamRecreated,
)
from rjet.event import Event
from rjet.reader import ReadConfig, StreamClient
from rjet.reader._base import ClientBase
from rjet.reader._session import start_after
from rjet.reader._state import ReadState
from rjet.stream import _NAME_RE, _as_bytes, parse_cursor

if TYPE_CHECKING:
    from rjet.deadletter import DeadLetterRecord

__all__ = ["MemoryDeadLetterStream", "MemoryStream", "MemoryStreamClient"]

log = logging.getLogger("rjet.testing")

MAX_PAYLOAD: Final = 1024 * 1024
"""nats-server's default max payload: the most bytes of data and headers one event may have."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _wall() -> float:
    return time.time()  # looked up on each call: a FakeClock installed later is seen


class MemoryStream:
    """A stream of reflex events in memory: :meth:`insert` and :meth:`insert_many` as
    :class:`rjet.Stream` has them, :meth:`stream` to read (a stream function for :class:`rjet.Spec`),
    and the operations that are hard to provoke on a real stream: :meth:`remove_through` (retention
    or a purge) and :meth:`recreate` (the stream deleted and created again).

    ``read`` is the reader's :class:`rjet.ReadConfig` (its ``batch`` and ``max_buffered`` say how far a
    reader fetches ahead; ``on_removed`` as for a real stream). ``clock`` gives event timestamps, in
    seconds since the epoch (default ``time.time``, which a running :class:`rjet.testing.FakeClock`
    replaces). ``duplicate_window`` (seconds) and ``max_payload`` (bytes) are the stream's and the
    server's limits. Inserting and reading take no real time; nothing is shared between instances.
    ``stream_id`` is the stream's identity (its name and creation time), as readers report it.

    >>> ms = MemoryStream("orders")
    """

    def __init__(
        self,
        name: str = "memory",
        *,
        read: ReadConfig | None = None,
        clock: Callable[[], float] | None = None,
        duplicate_window: float = 120.0,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"stream name {name!r} is invalid: use letters, digits, '_' and '-' only")
        if duplicate_window < 0 or max_payload < 1:
            raise ConfigError("MemoryStream: duplicate_window must be >= 0 and max_payload >= 1")
        self.name = name
        self.read = read or ReadConfig()
        self.duplicate_window = duplicate_window
        self.max_payload = max_payload
        self._clock = clock or _wall
        self._events: dict[int, Event] = {}
        self._first = 0
        self._last = 0
        self._msg_ids: dict[str, tuple[int, float]] = {}
        self._clients: weakref.WeakSet[MemoryStreamClient] = weakref.WeakSet()  # open readers
        self._created: datetime | None = None
        self.stream_id = self._new_identity()

    # ----------------------------------------------------------------- state

    @property
    def first_seq(self) -> int:
        """The stream's first retained sequence, as JetStream reports it (0 before the first insert)."""
        return self._first

    @property
    def last_seq(self) -> int:
        """The stream's last sequence (0 before the first insert)."""
        return self._last

    def events(self) -> list[Event]:
        """The events stored now, in stream order."""
        return [self._events[s] for s in range(max(self._first, 1), self._last + 1) if s in self._events]

    def _new_identity(self) -> str:
        created = _EPOCH + timedelta(microseconds=round(self._clock() * 1e6))
        if self._created is not None and created <= self._created:
            created = self._created + timedelta(microseconds=1)  # two creations never share an identity
        self._created = created
        return f"{self.name}@{created.isoformat()}"

    # ----------------------------------------------------------------- inserts

    async def insert(self, foreign_id: str, type: int, data: bytes = b"", *, msg_id: str | None = None) -> int:
        """Store one event and return its stream sequence, as :meth:`rjet.Stream.insert` does."""
        return (await self._insert(foreign_id, type, data, msg_id))[0]

    async def insert_once(self, foreign_id: str, type: int, data: bytes = b"", *, msg_id: str) -> tuple[int, bool]:
        """As :meth:`rjet.Stream.insert_once`: ``(sequence, True)``, or ``(the first insert's sequence,
        False)`` when ``msg_id`` was inserted within the duplicate window."""
        return await self._insert(foreign_id, type, data, msg_id)

    async def _insert(self, foreign_id: str, type: int, data: bytes, msg_id: str | None) -> tuple[int, bool]:
        encode_headers(foreign_id, type, msg_id)  # the checks Stream.insert makes, in its order
        data = _as_bytes(data)
        if len(data) + len(encode_header_block(foreign_id, type, msg_id)) > self.max_payload:
            raise self._too_large(0, foreign_id, data)
        stored = self._store(foreign_id, type, data, msg_id)
        await asyncio.sleep(0)  # an insert is a round trip: other tasks run meanwhile
        return stored

    async def insert_many(
        self, events: Iterable[tuple[str, int, bytes] | tuple[str, int, bytes, str]], *, timeout: float | None = None
    ) -> list[int]:
        """Store events in order and return their sequences, as :meth:`rjet.Stream.insert_many` does:
        every event is checked before the first is stored. (``timeout`` is accepted and unused.)"""
        items = []
        msg_ids: list[str | None] = []
        for item in events:
            items.append((item[0], item[1], _as_bytes(item[2])))
            msg_ids.append(item[3] if len(item) > 3 else None)
        for i, (fid, typ, data) in enumerate(items):
            try:
                hdr = encode_header_block(fid, typ, msg_ids[i])
            except InvalidEvent as e:
                raise InvalidEvent(f"stream {self.name!r}: event #{i}: {e}") from None
            if len(hdr) + len(data) > self.max_payload:
                raise self._too_large(i, fid, data)
        if not items:
            return []
        seqs = [self._store(fid, typ, data, msg_ids[i])[0] for i, (fid, typ, data) in enumerate(items)]
        await asyncio.sleep(0)
        return seqs

    def _store(self, foreign_id: str, type: int, data: bytes, msg_id: str | None) -> tuple[int, bool]:
        now = self._clock()
        key = msg_id.strip() if msg_id is not None else None
        if key is not None:
            seen = self._msg_ids.get(key)
            if seen is not None and now - seen[1] < self.duplicate_window:
                return seen[0], False
        seq = self._last + 1
        self._last = seq
        if self._first == 0:
            self._first = seq
        self._events[seq] = Event(str(seq), type, foreign_id, timestamp_us=round(now * 1e6), metadata=data)
        if key is not None:
            if len(self._msg_ids) >= 4096:  # forget what is out of the window now and then
                self._msg_ids = {k: v for k, v in self._msg_ids.items() if now - v[1] < self.duplicate_window}
            self._msg_ids[key] = (seq, now)
        for client in list(self._clients):
            client._arrived()  # noqa: SLF001 (the stream feeds its readers)
        return seq, True

    def _too_large(self, index: int, foreign_id: str, data: bytes) -> InvalidEvent:
        return InvalidEvent(
            f"stream {self.name!r}: event #{index} (foreign id {foreign_id!r}) has {len(data)} bytes of"
            f" data, more than the server's max payload of {self.max_payload} bytes with headers"
        )

    # ----------------------------------------------------------------- what makes a real stream hard

    async def remove_through(self, seq: int) -> None:
        """Remove every event up to and with sequence ``seq``, as retention limits or a purge
        (``purge_stream(name, seq=seq + 1)``) do: the first sequence becomes ``seq + 1``.

        A reader opened later after a cursor before it raises :class:`rjet.CursorExpired`; a reader
        open now delivers what it has fetched and then raises :class:`rjet.EventsRemoved` once the
        next event after the removed ones reaches it (as the real reader does, nothing tells it
        before: a ``to_head`` reader whose remaining events were all removed waits for the next one)."""
        if not isinstance(seq, int) or seq < 0:
            raise ConfigError(f"remove_through: seq must be an int >= 0, not {seq!r}")
        if seq + 1 <= self._first:
            return
        for s in range(max(self._first, 1), min(seq, self._last) + 1):
            self._events.pop(s, None)
        self._first = seq + 1
        self._last = max(self._last, seq)
        await asyncio.sleep(0)

    async def recreate(self) -> None:
        """Delete the stream and create it again, empty, under the same name: sequences start again
        at 1, the identity (:attr:`stream_id`) changes, ``msg_id`` de-duplication starts afresh.

        A reader open now delivers what it has fetched and then raises :class:`rjet.StreamRecreated`
        (a real one raises it once it notices, within three heartbeats; or ``StreamNotFound`` if it
        looks while the stream is gone); one opened with the old ``stream_id`` and a cursor raises it at open."""
        old = self.stream_id
        self._events.clear()
        self._first = self._last = 0
        self._msg_ids.clear()
        self.stream_id = self._new_identity()
        for client in list(self._clients):
            client._fail(StreamRecreated(self.name, client.last_sequence, old, self.stream_id))  # noqa: SLF001
        await asyncio.sleep(0)

    def dead_letter_sink(self) -> MemoryDeadLetterStream:
        """A dead-letter sink that records into this stream (``rjet.DeadLetter(ms.dead_letter_sink())``)."""
        return MemoryDeadLetterStream(self)

    # ----------------------------------------------------------------- reading

    async def stream(
        self,
        after: str = "",
        *,
        from_head: bool = False,
        to_head: bool = False,
        stream_id: str | None = None,
        key_filter: Callable[[str], bool] | None = None,
    ) -> MemoryStreamClient:
        """Open a reader of the events after ``after``, as :meth:`rjet.Stream.stream` does (the same
        arguments, the same errors: :class:`rjet.InvalidCursor`, :class:`rjet.CursorAhead`,
        :class:`rjet.CursorExpired`, :class:`rjet.StreamRecreated`)."""
        start = parse_cursor(after, f"stream {self.name!r}")
        client = MemoryStreamClient(
            self, after=start, from_head=from_head, to_head=to_head, stream_id=stream_id, key_filter=key_filter
        )
        await asyncio.sleep(0)
        return client

    def _next_after(self, seq: int) -> Event | None:
        """The first stored event after sequence ``seq``."""
        nxt = max(seq + 1, self._first)
        return self._events.get(nxt) if nxt <= self._last else None

    def _count_after(self, seq: int) -> int:
        return max(0, self._last - max(seq, self._first - 1))

    def __repr__(self) -> str:
        return f"MemoryStream({self.name!r}, first_seq={self._first}, last_seq={self._last})"


class MemoryStreamClient(ClientBase):
    """A reader of a :class:`MemoryStream`; open it with :meth:`MemoryStream.stream`.

    The interface of :class:`rjet.StreamClient` (``recv``, ``async for``, ``async with``,
    ``next_or_skip``, ``take``, ``close``, ``num_pending``, ``last_sequence``, ``head``, ``stream_id``,
    ``key_filter``; what ``run`` needs is :class:`rjet.StreamClientLike`), and the same pull
    accounting, with every pull request answered at once. It is no subclass of the real client: it
    shares the real reader's code where the logic is the same (``recv`` and iteration, where a reader
    starts, the bookkeeping of passed-over events in its :class:`~rjet.reader._state.ReadState`) and
    has its own where the real one talks to a server. ``isinstance(client, rjet.StreamClient)`` holds
    (it is registered as one), for code that checks.
    """

    def __init__(
        self,
        ms: MemoryStream,
        *,
        after: int,
        from_head: bool,
        to_head: bool,
        stream_id: str | None,
        key_filter: Callable[[str], bool] | None,
    ) -> None:
        self._ms = ms
        self.stream = ms.name
        self.stream_id = ms.stream_id
        cfg = ms.read
        self._cfg = cfg
        self._low = max(1, cfg.batch // 2)
        self._skip_removed = cfg.on_removed == "skip"
        self._key_filter = key_filter
        # The real reader's state (where it is, passed-over events, how reading ended); its frame
        # buffer stays empty: the events fetched wait in _q.
        st = self._state = ReadState(to_head=to_head)
        self._q: deque[Event] = deque()  # fetched, not yet returned
        self._gaps: deque[EventsRemoved] = deque()
        self._pending = 0  # events asked for and not yet delivered (the server's side of a pull)
        self.recoveries = 0
        self.skipped = 0
        self.skipped_passed = 0
        self.removed = 0
        st.last = start_after(self.stream, self.stream_id, ms, after, from_head=from_head, expect_id=stream_id)
        st.head = ms.last_seq
        st.caught_up = ms._count_after(st.last) == 0  # noqa: SLF001
        ms._clients.add(self)  # noqa: SLF001
        self._refill()

    # ----------------------------------------------------------------- what the server would do

    def _request(self) -> None:
        """A pull request, as the real reader sends one: for what fits, in ``batch``-sized asks."""
        room = self._cfg.max_buffered - len(self._q) - self._pending
        if not self._state.closed and room >= self._low:
            self._pending += min(room, self._cfg.batch)

    def _refill(self) -> None:
        self._request()
        self._deliver()

    def _arrived(self) -> None:
        """An event was stored: an open pull request gets it at once."""
        self._deliver()

    def _deliver(self) -> None:
        ms, st = self._ms, self._state
        while self._pending > 0 and not st.closed and st.error is None:
            event = ms._next_after(st.last)  # noqa: SLF001
            if event is None:
                return
            self._pending -= 1
            sseq, prev = int(event.id), st.last
            if sseq != prev + 1 and not self._removed(EventsRemoved(self.stream, prev + 1, sseq - 1)):
                return  # the event after the hole is dropped; the error follows what is buffered
            st.last = sseq
            if sseq >= ms.last_seq:
                st.caught_up = True
            if self._key_filter is not None:
                try:
                    wanted = self._key_filter(event.foreign_id)
                except Exception as e:  # a broken key filter ends the reader
                    return st.fail(e)
                if not wanted:
                    st.skipped_at = sseq
                    self.skipped += 1
                    self._mark(prev)
                    if not self._q:
                        st.wake()
                    if self._pending <= self._low:
                        self._request()
                    continue
            self._q.append(event)
            st.wake()
            if self._pending <= self._low:
                self._request()

    def _removed(self, gap: EventsRemoved) -> bool:
        if not self._skip_removed:
            self._state.fail(gap)
            return False
        log.warning("stream %r: skipping events %d..%d, removed before they were read (on_removed='skip')",
                    self.stream, gap.first, gap.last)  # fmt: skip
        self.removed += gap.last - gap.first + 1
        self._gaps.append(gap)
        self._state.wake()
        return True

    def _fail(self, err: BaseException) -> None:
        self._state.fail(err)

    def _mark(self, prev: int) -> None:
        """As the real reader's intake notes passed-over events (``Intake.mark``)."""
        st = self._state
        if st.marks and st.marks[-1][0] == prev and prev > st.returned:
            st.marks[-1] = (st.last, self.skipped)
        else:
            st.marks.append((st.last, self.skipped))

    # ----------------------------------------------------------------- what the caller sees

    async def next_or_skip(self) -> Event | int | EventsRemoved:
        """As :meth:`rjet.StreamClient.next_or_skip`: the next event, or the position of the last
        event the key filter passed over (before it would wait), or a removed range (``on_removed="skip"``)."""
        st = self._state
        self.skipped_passed = st.pass_marks(self.skipped_passed)
        buf, gaps = self._q, self._gaps
        while True:
            if buf:
                event = buf[0]
                sseq = int(event.id)
                if gaps and sseq > gaps[0].last:
                    return gaps.popleft()
                if not (st.to_head and sseq > st.head):
                    buf.popleft()
                    st.handed(sseq)
                    if self._pending <= self._low and self._cfg.max_buffered - len(buf) - self._pending >= self._low:
                        self._refill()
                    return event
            if self._pending <= self._low:
                self._refill()
            if gaps:
                return gaps.popleft()
            if st.skipped_at:
                sseq, st.skipped_at = st.skipped_at, 0
                st.returned = sseq
                return sseq
            if buf:
                raise HeadReached(self.stream, st.head)
            if st.error is not None:
                raise st.error
            if st.closed:
                raise Stopped(f"stream {self.stream!r}: the stream client is closed")
            if st.to_head and (st.caught_up or st.last >= st.head):
                raise HeadReached(self.stream, st.head)
            st.waiter = asyncio.get_running_loop().create_future()
            try:
                await st.waiter
            finally:
                st.waiter = None

    def take(self, limit: int) -> list[Event]:
        """As :meth:`rjet.StreamClient.take`: the events :meth:`next_or_skip` would return now, without
        waiting, stopping where it would do more than hand one over."""
        st, buf = self._state, self._q
        if not buf or self._gaps:
            return []
        self.skipped_passed = st.pass_marks(self.skipped_passed)
        low, cfg = self._low, self._cfg
        until = st.head if st.to_head else None
        due = st.closed or self._pending <= low
        out: list[Event] = []
        while buf and len(out) < limit:
            event = buf[0]
            if until is not None and int(event.id) > until:
                break
            if due and (st.closed or cfg.max_buffered - len(buf) - self._pending >= low):
                break  # a pull is due: next_or_skip sends it
            out.append(buf.popleft())
        if out:
            st.handed(int(out[-1].id))
        return out

    @property
    def key_filter(self) -> Callable[[str], bool] | None:
        """The foreign-ID filter the reader was opened with."""
        return self._key_filter

    @property
    def num_pending(self) -> int:
        """Events not yet returned: fetched, or still in the stream after what was fetched."""
        return self._ms._count_after(self._state.last) + len(self._q)  # noqa: SLF001

    @property
    def buffered_bytes(self) -> int:
        """Bytes of metadata fetched and not yet returned."""
        return sum(len(e.metadata) for e in self._q)

    async def close(self) -> None:
        """Stop reading; what was fetched and not returned is dropped (the next reader reads it again).
        Safe to call twice."""
        st = self._state
        if st.closed:
            return
        st.closed = True
        self._q.clear()
        st.skipped_at = 0
        st.marks.clear()
        self._gaps.clear()
        self._pending = 0
        self._ms._clients.discard(self)  # noqa: SLF001
        st.wake()

    def __repr__(self) -> str:
        return f"MemoryStreamClient({self.stream!r}, last_sequence={self.last_sequence}, head={self.head})"


StreamClient.register(MemoryStreamClient)


class MemoryDeadLetterStream:
    """A dead-letter sink that records into a :class:`MemoryStream`, as :class:`rjet.DeadLetterStream`
    records into a real one (the same events: the original foreign ID and type, the record's JSON as
    metadata, ``msg_id`` ``<consumer>:<event id>``). ``recorded`` counts what it stored."""

    def __init__(self, stream: MemoryStream) -> None:
        self.stream = stream
        self.recorded = 0

    async def __call__(self, record: DeadLetterRecord) -> None:
        """Store ``record``."""
        fid = record.event.foreign_id if record.event else f"{record.stream}:{record.event_id}"
        typ = record.event.type if record.event else 0
        msg_id = f"{record.consumer}:{record.event_id}"
        room = self.stream.max_payload - len(encode_header_block(fid, typ, msg_id))
        await self.stream.insert(fid, typ, record.to_json(room), msg_id=msg_id)
        self.recorded += 1
