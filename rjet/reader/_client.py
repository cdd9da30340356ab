"""The client loop: :class:`StreamClient`, which hands a stream's events over in order.

It opens in one step (:meth:`StreamClient.open`, or :meth:`rjet.Stream.stream`) and puts the reader's
jobs together over one :class:`~rjet.reader._state.ReadState`: the session keeps a consumer and feeds
it pull requests (``_session.py``), the intake takes frames into the buffer (``_scan.py``), gap
verification settles what sequences cannot (``_gaps.py``); the loop here pops and decodes
(``_decode.py``), and reports the key filter's passed-over events and skipped removed ranges in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Self

import nats.js.errors

from rjet._nats.client import connection
from rjet._nats.frames import SEQ
from rjet._tasks import cancel_and_wait
from rjet.errors import ConfigError, DecodeError, EventsRemoved, HeadReached, RjetError, Stopped
from rjet.event import Event, EventSlots
from rjet.reader._base import ClientBase
from rjet.reader._config import ReadConfig
from rjet.reader._decode import PERCENT, TYPES, Decode, decoder
from rjet.reader._gaps import GapCheck
from rjet.reader._scan import Intake
from rjet.reader._session import Session, Sessions, identity, start_after
from rjet.reader._state import ReadState

if TYPE_CHECKING:
    from nats.js import JetStreamContext

__all__ = ["StreamClient"]


class StreamClient(ClientBase):
    """Delivers a stream's events in stream order; open one with :meth:`open` or :meth:`rjet.Stream.stream`.

    ``await client.recv()`` returns the next :class:`rjet.Event`; ``async for`` iterates (and ends
    cleanly at the head with ``to_head``); ``async with`` closes it. :attr:`num_pending` is the
    server's count of events not yet delivered (a free lag figure).

    Counters: ``recoveries`` (consumers recreated), ``skipped`` (events the key filter passed over as
    they arrived, read ahead included), ``skipped_passed`` (of those, the ones the caller has moved
    past, see :meth:`next_or_skip`), ``removed`` (sequences skipped under ``on_removed="skip"``).
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        *,
        config: ReadConfig,
        to_head: bool = False,
        filter_subjects: tuple[str, ...] = (),
        key_filter: Callable[[str], bool] | None = None,
    ) -> None:
        """A client that is not open yet (reading raises :class:`rjet.ConfigError`): use :meth:`open`."""
        self.stream = stream
        self.stream_id = ""  # which stream this is: its name and creation time, known once open
        self.recoveries = 0
        self.skipped = 0
        self.skipped_passed = 0
        self.removed = 0
        # With ReadConfig(keep_raw=True): the NATS subject and header block of the event handed over last.
        self.last_subject = ""
        self.last_headers: bytes | None = None
        self._cfg = config
        self._low = max(1, config.batch // 2)
        self._loop = asyncio.get_running_loop()
        st = self._state = ReadState(to_head=to_head)
        st.error = ConfigError(
            f"stream {stream!r}: the stream client is not open: use `await StreamClient.open(...)` or"
            " `await stream.stream(...)`"
        )
        self._gap_check = GapCheck(js, stream, config, st, self, filtered=bool(filter_subjects))
        self._sessions = Sessions(js, stream, config, filter_subjects, st, self._gap_check, self)
        self._intake = Intake(connection(js), stream, self._low, st, self._sessions, self._gap_check, self, key_filter)
        self._decode = self._keeping_raw(decoder(stream)) if config.keep_raw else decoder(stream)

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        stream: str,
        *,
        after: int = 0,
        from_head: bool = False,
        to_head: bool = False,
        filter_subjects: Sequence[str] = (),
        config: ReadConfig | None = None,
        stream_id: str | None = None,
        key_filter: Callable[[str], bool] | None = None,
    ) -> Self:
        """Open a client that delivers ``stream``'s events after sequence ``after``: see
        :meth:`rjet.Stream.stream` for the options and the errors."""
        client = cls(
            js,
            stream,
            config=config or ReadConfig(),
            to_head=to_head,
            filter_subjects=tuple(filter_subjects),
            key_filter=key_filter,
        )
        await client._start(after, from_head, stream_id)
        return client

    async def _start(self, after: int, from_head: bool, expect_id: str | None) -> None:
        st, sessions = self._state, self._sessions
        info = await sessions.stream_info()
        state = info.state
        self.stream_id = sessions.identity = identity(info)
        st.last = start_after(self.stream, self.stream_id, state, after, from_head=from_head, expect_id=expect_id)
        self._gap_check.start_at(st.last)
        st.head = state.last_seq
        st.error = None
        intake = self._intake
        await sessions.subscribe(intake.on_msg, intake.on_lane_frame, None if self._cfg.keep_raw else intake.scan)
        try:
            await sessions.create()
            await sessions.pull()
        except nats.js.errors.APIError as e:
            await self.close()
            raise RjetError(f"stream {self.stream!r}: cannot create a consumer: {e.description}") from e
        except BaseException:
            await self.close()
            raise
        sessions.watch()

    def _keeping_raw(self, decode: Decode) -> Decode:
        def keep(
            sseq: int,
            ts: int,
            subject: bytes,
            hdr: bytes | None,
            data: bytes,
            fid: str | None,
            typ_value: bytes | None,
            fid_value: bytes | None,
            held: int,
        ) -> Event:
            event = decode(sseq, ts, subject, hdr, data, fid, typ_value, fid_value, held)
            self.last_subject = subject.decode("utf-8", "replace")
            self.last_headers = hdr
            return event

        return keep

    # ----------------------------------------------------------------- the hot path

    async def next_or_skip(self) -> Event | int | EventsRemoved:  # noqa: C901 (the hot path, kept in one piece)
        """The next event (whose foreign ID passed the key filter); or, before it would wait, the
        sequence of the last event the key filter passed over, so the caller's cursor can move past
        other shards' events; or, under ``on_removed="skip"``, a range removed before the next event.

        Asking for the next item says the caller is done with the one it got before (its cursor moved
        there): the events passed over up to that one then count in ``skipped_passed``; those only read
        ahead of it when the caller stops never do."""
        st, gaps = self._state, self._gap_check
        marks = st.marks
        if marks and marks[0][0] <= st.returned:
            self.skipped_passed = st.pass_marks(self.skipped_passed)
        try:
            buf, ranges = st.buf, gaps.ranges
            while True:
                if buf:
                    frame = buf[0]
                    sseq = frame[0]
                    if ranges and sseq > ranges[0].last:
                        return ranges.popleft()
                    if gaps.filtered and sseq > gaps.verified:
                        pass  # held until gap verification settles it (see __anext__ for the order)
                    elif not (st.to_head and sseq > st.head):
                        buf.popleft()
                        if marks:
                            st.returned = sseq
                        if st.skipped_at <= sseq:
                            st.skipped_at = 0
                        if ((s := st.session) is None or s.pending <= self._low) and self._pull_due(s):
                            await self._sessions.pull()
                        return self._decode(*frame)
                if (s := st.session) is None or s.pending <= self._low:
                    await self._sessions.pull()
                if ranges:
                    return ranges.popleft()
                if st.skipped_at and st.skipped_at <= gaps.verified:
                    sseq, st.skipped_at = st.skipped_at, 0
                    st.returned = sseq
                    return sseq
                if buf and buf[0][SEQ] <= gaps.verified:
                    raise HeadReached(self.stream, st.head)
                if st.error is not None:
                    raise st.error
                if st.closed:
                    raise Stopped(f"stream {self.stream!r}: the stream client is closed")
                if st.to_head and not buf and (st.caught_up or st.last >= st.head):
                    raise HeadReached(self.stream, st.head)
                if buf or st.skipped_at:
                    gaps.soon()  # held for verification: it should not wait for its next round
                st.waiter = self._loop.create_future()
                try:
                    await st.waiter
                finally:
                    st.waiter = None
        except DecodeError:
            st.skipped_at = 0  # the caller moves its cursor to the bad event, or stops
            raise

    def _pull_due(self, s: Session | None) -> bool:
        """Whether a pull request is due as an event is handed over and the consumer ``s`` owes few
        messages: not when the buffer leaves no room to ask for more (a consumer that reads slower
        than the server sends), which is what Sessions.pull would conclude, without its coroutine."""
        if s is not None and self._cfg.max_buffered - len(self._state.buf) - s.pending < self._low:
            if s.pending <= 0:
                s.blind = True
            return False
        return True

    async def __anext__(self) -> Event:
        # next_or_skip's usual case, without its coroutine (one less an event): the next frame is
        # buffered and verified, and no marks or removed ranges wait. Anything else goes there.
        st, gaps = self._state, self._gap_check
        buf = st.buf
        if buf and not st.marks and not gaps.ranges:
            frame = buf[0]
            sseq = frame[0]
            # Without subject filters every sequence is verified (GapCheck.verified is ALL, 1 << 62,
            # for good): asking the flag first spares a comparison with an int of three digits, which
            # the interpreter does not specialise (164 instructions a frame on 3.13, 115 on 3.11).
            if (not gaps.filtered or sseq <= gaps.verified) and not (st.to_head and sseq > st.head):
                buf.popleft()
                if st.skipped_at <= sseq:
                    st.skipped_at = 0
                if ((s := st.session) is None or s.pending <= self._low) and self._pull_due(s):
                    await self._sessions.pull()
                try:
                    return self._decode(*frame)
                except DecodeError:
                    st.skipped_at = 0  # as next_or_skip: the caller moves its cursor to the bad event, or stops
                    raise
        return await super().__anext__()

    def take(self, limit: int) -> list[Event]:
        """Up to ``limit`` events that :meth:`next_or_skip` would return now, one call after the other,
        without waiting (a concurrent consumer's reader takes a run of them at once).

        It stops short, leaving the rest to :meth:`next_or_skip`, wherever that one does more than pop
        and decode: a removed range to report, a frame held for verification, the head of a
        ``to_head`` read, a pull request to send, an undecodable message (which next_or_skip raises)."""
        st = self._state
        buf = st.buf
        if not buf or self._gap_check.ranges:
            return []
        marks = st.marks
        if marks and marks[0][0] <= st.returned:
            self.skipped_passed = st.pass_marks(self.skipped_passed)
        s, low, decode = st.session, self._low, self._decode
        verified = self._gap_check.verified
        until = min(verified, st.head) if st.to_head else verified
        # Nothing here changes the session: whether a pull may be due is known before the loop.
        due = s is None or s.pending <= low
        out: list[Event] = []
        while buf and len(out) < limit:
            frame = buf[0]
            if frame[0] > until:
                break
            if due:
                if s is None or self._cfg.max_buffered - len(buf) - s.pending >= low:
                    break  # a pull is due: next_or_skip sends it
                if s.pending <= 0:
                    s.blind = True  # as next_or_skip notes it (no room to ask for more)
            sseq = frame[0]
            typ_value, fid_value = frame[6], frame[7]
            if (
                typ_value is not None
                and fid_value is not None
                and frame[5] is None
                and frame[3] is None
                and PERCENT not in fid_value
            ):
                # As decode does for a frame the scan took without a trace context (a call per event
                # was a tenth of this loop).
                slots = EventSlots()
                slots.id = str(sseq)
                typ = TYPES.get(typ_value)
                slots.type = int(typ_value) if typ is None else typ
                slots.foreign_id = fid_value.decode()
                slots.timestamp_us = frame[1]
                slots._timestamp = None  # noqa: SLF001 (EventSlots is an Event being built)
                slots.metadata = frame[4]
                slots.__class__ = Event  # type: ignore[assignment]
                event: Event = slots  # type: ignore[assignment]
            else:
                try:
                    event = decode(*frame)
                except DecodeError:
                    break  # next_or_skip pops it and raises, in its place
            buf.popleft()
            out.append(event)
        if out:
            st.handed(int(out[-1].id))
        return out

    # ----------------------------------------------------------------- what it knows

    @property
    def key_filter(self) -> Callable[[str], bool] | None:
        """The foreign-ID filter the client was opened with: other keys' events are passed over
        before decoding, and ``next_or_skip`` returns how far (ints) so a caller's cursor can move past them."""
        return self._intake.key_filter

    @property
    def num_pending(self) -> int:
        """Events not yet returned by ``recv``: buffered here, or still on the server (a lag figure)."""
        return self._state.server_pending + len(self._state.buf)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of event bodies held here, not yet returned by ``recv`` (see ``ReadConfig.max_buffered_bytes``)."""
        return self._state.buffered_bytes

    # ----------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Stop reading and delete the server-side consumer. Safe to call twice."""
        st = self._state
        if st.closed:
            return
        st.closed = True
        st.buf.clear()  # nothing more is delivered; the next reader reads these again
        st.skipped_at = 0  # passed over after the frames just dropped: not a place for a cursor now
        st.marks.clear()  # read ahead, never moved past: the next reader passes over them again
        self._gap_check.ranges.clear()
        me = asyncio.current_task()
        # A recovery that swallowed its cancellation would go on: cancel_and_wait cancels again.
        await cancel_and_wait(t for t in (*self._sessions.tasks(), *self._gap_check.tasks()) if t is not me)
        st.wake()
        await self._sessions.close()
