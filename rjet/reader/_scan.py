"""The intake: frames off the wire into the read buffer, in bulk where it can.

Each delivery's reply subject gives its stream sequence, consumer sequence, stored time and the
consumer's remaining count (both forms: 9-token v1, 11/12-token v2). Duplicates are dropped by STREAM
sequence (never by consumer sequence, which restarts at 1 with a new consumer); a consumer-sequence
jump inside one consumer means a message was lost in transit, and the session recovers (a new
consumer from right after the last sequence taken). A stream-sequence jump goes to gap verification.
The key filter passes other keys' events over before they are decoded, marking how far.

:meth:`Intake.on_frame` does this one frame at a time (a consumer's first frame, statuses, other
header layouts; every frame without the fast lane). :meth:`Intake.scan` takes runs of frames laid out
as ``insert`` writes them straight from the parser's buffer (the ``Scanner`` of
``rjet/_nats/parser.py``) and comes to the same state: ``tests/test_wire.py`` holds the two together.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from rjet._keyhash import hash_bytes
from rjet._nats.frames import frame_pattern, parse_ack
from rjet._nats.parser import raw_block
from rjet.errors import DecodeError
from rjet.reader._decode import fid_value, foreign_id
from rjet.reader._filter import ShardFilter

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    from rjet.reader._gaps import GapCheck
    from rjet.reader._session import Session, Sessions
    from rjet.reader._state import ReadState

__all__ = ["Intake"]

_STATUS = "Status"
_DESCRIPTION = "Description"
_Match = Callable[[bytes, int], "re.Match[bytes] | None"]  # a frame pattern's bound match


class _Gap(Exception):
    """Raised by the bulk scan's helpers: a sequence jumped among the frames in ``buf[start:end]``,
    which :meth:`Intake.scan` hands to the frame handler one by one to find where and why."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__(start, end)
        self.start = start
        self.end = end


class _Counted(Protocol):
    """What the intake counts on its client."""

    skipped: int


class Intake:
    """A reader's intake (see the module docstring)."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        low: int,
        state: ReadState,
        sessions: Sessions,
        gaps: GapCheck,
        counted: _Counted,
        key_filter: Callable[[str], bool] | None,
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._low = low  # a pull is due once a consumer owes this many messages or fewer
        self._state = state
        self._sessions = sessions
        self._gaps = gaps
        self._counted = counted
        # Set before the first frame can arrive: no frame is ever buffered unfiltered.
        self.key_filter = key_filter
        # (m, n) for a ShardFilter: the scan hashes a plain foreign ID's header bytes itself.
        self._shard = (key_filter.m, key_filter.n) if type(key_filter) is ShardFilter else None
        self._passed_bytes = 0  # bytes of frames the scan passed over, as nats-py's statistics count them

    # ----------------------------------------------------------------- one frame at a time

    def on_frame(self, subject: bytes, reply: bytes, hdr: bytes | None, data: bytes) -> None:  # noqa: C901 (hot path)
        st = self._state
        s = st.session
        if not reply:
            if s is not None and subject == s.deliver and hdr is not None:
                self._sessions.on_status(s, hdr)
            return
        ack = parse_ack(reply)
        if ack is None or s is None or ack[0] != s.name or st.error is not None:
            return  # not a JetStream delivery, left over from an earlier consumer, or after a gap
        _, sseq, cseq, ts, pending = ack
        s.frames += 1
        s.pending -= 1
        if cseq != s.cseq + 1:
            return self._sessions.recover(f"consumer sequence jumped from {s.cseq} to {cseq}")
        s.cseq = cseq
        if s.pattern is None and self._sessions.parser is not None:
            # The consumer's first frame: from the next one on, the scan takes its frames in bulk.
            # Up to and with the consumer token: 4 tokens of the 9-token form, 6 of the 11/12-token one.
            tokens = reply.split(b".")  # parse_ack took it: 9, 11 or 12 of them
            s.prefix = b".".join(tokens[: 4 if len(tokens) == 9 else 6]) + b"."
            sid = self._sessions.sid
            s.pattern = frame_pattern(sid, s.prefix)
            s.plain = frame_pattern(sid, s.prefix, plain=True)
            s.traced_pattern = frame_pattern(sid, s.prefix, traced=True)
            s.traced_plain = frame_pattern(sid, s.prefix, plain=True, traced=True)
        if sseq > st.last:
            prev = st.last
            gaps = self._gaps
            if sseq != prev + 1 and gaps.jump(prev, sseq):
                return
            if gaps.filtered:
                gaps.settle(s, prev, sseq, 1, pending)
            st.last = sseq
            st.server_pending = pending
            if pending == 0:
                st.caught_up = True
            fid = None
            key_filter = self.key_filter
            if key_filter is not None:
                # Other keys' events stop here, with only the foreign ID decoded. (One whose header
                # does not decode is buffered, so that next_or_skip raises its DecodeError in order.)
                try:
                    fid = foreign_id(subject, hdr, self._stream, sseq)
                    wanted = key_filter(fid)
                except DecodeError:
                    wanted = True
                except Exception as e:  # a broken key filter: end the reader, do not break the parser
                    return st.fail(e)
                if not wanted:
                    st.skipped_at = sseq
                    self._counted.skipped += 1
                    self.mark(prev)
                    if not st.buf:
                        st.wake()
                    if s.pending <= self._low:
                        self._sessions.kick()
                    return
            st.buf.append((sseq, ts // 1000, subject, hdr, data, fid, None, None, st.in_bytes))
            st.in_bytes += len(data)
            st.wake()
        if s.pending <= self._low:
            self._sessions.kick()

    def mark(self, prev: int) -> None:
        """Note the passed-over events up to the last sequence taken (the frame before them was ``prev``)."""
        st = self._state
        marks = st.marks
        if marks and marks[-1][0] == prev and prev > st.returned:
            marks[-1] = (st.last, self._counted.skipped)  # the same run, longer (and not yet moved past)
        else:
            marks.append((st.last, self._counted.skipped))

    def on_lane_frame(self, subject: bytes, reply: bytes, hdr: bytes | None, data: bytes) -> None:
        """A frame off the fast lane: counted in nats-py's statistics (its own path counts the rest)."""
        stats = self._nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        self.on_frame(subject, reply, hdr, data)

    async def on_msg(self, msg: Msg) -> None:
        """The same as :meth:`on_frame`, for a connection whose parser has no fast lane."""
        hdr = raw_block(msg.headers)  # as the server sent it (keep_raw_headers), so it decodes as there
        if hdr is None and msg.headers is not None:
            # Rebuilt from nats-py's dict: a repeated header's last value, non-UTF-8 bytes as U+FFFD.
            h = dict(msg.headers)
            status = h.pop(_STATUS, "")
            desc = h.pop(_DESCRIPTION, "")
            first = f"NATS/1.0 {status} {desc}".rstrip() if status else "NATS/1.0"
            hdr = "".join([first, "\r\n", *(f"{k}: {v}\r\n" for k, v in h.items()), "\r\n"]).encode()
        self.on_frame(msg.subject.encode(), msg.reply.encode(), hdr, msg.data)

    # ----------------------------------------------------------------- in bulk

    def scan(self, buf: bytes | bytearray, pos: int, size: int) -> int:
        """Takes the current consumer's complete frames from ``buf[pos:size]`` in one go, as long as
        they are laid out as ``insert`` writes them; returns where it stopped.

        The same as :meth:`on_frame` per frame: :meth:`_take_all` takes runs of frames where there is
        neither a key filter nor a subject filter; else :meth:`_take_runs` takes the frames the key
        filter keeps, :meth:`_pass_run` each run of those it passes over. A sequence jump sends the
        frames concerned through :meth:`on_frame` one by one, which finds the gap. Two layouts are taken:
        rjet's headers first, and a trace context before them (as ``insert`` writes it with tracing
        on); the scan goes on with the one the last frame had, and switches where the other fits. A
        frame neither fits (other headers, a status) ends the call and goes to :meth:`on_frame` too.

        The parser hands over its buffer as ``bytes``, so bodies are slices of it (a bytearray is copied).
        """
        st = self._state
        s = st.session
        if (
            s is None
            or (pattern := s.pattern) is None
            or (plain := s.plain) is None
            or (traced_pattern := s.traced_pattern) is None
            or (traced_plain := s.traced_plain) is None
            or st.error is not None
        ):
            return pos
        frames0, held0, passed0 = s.frames, st.in_bytes, self._passed_bytes
        gap: _Gap | None = None
        end = pos
        layouts = ((pattern.match, plain.match), (traced_pattern.match, traced_plain.match))
        match = pattern.match
        every = self.key_filter is None and not self._gaps.filtered
        buf = bytes(buf)  # (the same object when it is bytes)
        try:
            while True:
                traced = s.traced
                match, plain_match = layouts[traced]
                if every:
                    end = self._take_all(s, match, traced, buf, end, size)
                else:
                    end = self._take_runs(s, match, plain_match, traced, buf, end, size)
                # Stopped at a frame of the other layout; or at one the scan does not take, or one not
                # all here, which the other pattern does not match either (they differ in the first header).
                if end == size or layouts[not traced][0](buf, end) is None:
                    break
                s.traced = not traced
        except _Gap as e:
            gap = e
        if s.frames != frames0:
            # nats-py's statistics, kept as it would: messages, and their body bytes; for frames passed
            # over in the shard loop their headers too (their size would cost a shard worker 13% per frame).
            stats = self._nc.stats
            stats["in_msgs"] += s.frames - frames0
            stats["in_bytes"] += st.in_bytes - held0 + self._passed_bytes - passed0
        if gap is not None:
            return self._one_by_one(match, s.prefix, buf, gap.start, gap.end)  # on_lane_frame counts these
        if end != pos:
            st.wake()
            if s.pending <= self._low:
                self._sessions.kick()
        return end

    def _take_all(self, s: Session, match: _Match, traced: bool, buf: bytes, pos: int, size: int) -> int:
        """Takes the consumer's frames of one layout from ``buf[pos:size]`` into the buffer when every
        event is wanted and sequences do not jump (no key filter, no subject filter); returns where
        it stopped. Raises :class:`_Gap` at a sequence jump, with the frames buffered taken back.

        The sequences are checked once for the run, at its last frame, as :meth:`_pass_run` checks a
        run it passes over: every frame matched is this consumer's and both sequences only grow, so
        the run is gapless exactly when its last frame's are the count further on. So a frame costs
        a match, its groups (one call), its sizes, its body, stored time and pending count (``pending ==
        0`` marks the reader caught up at whichever frame says it), and no reply subject split.
        """
        st = self._state
        queue = st.buf
        append = queue.append
        held = st.in_bytes
        last = sseq = st.last
        start = pos
        m = None  # the last frame taken
        zero = False
        while (found := match(buf, pos)) is not None:
            _, ts, pending, hlen, total, typ, fid = found.groups()
            if (stop := (body := found.end(5) + 2) + int(total)) + 2 > size:
                break  # not all here yet
            m = found
            sseq += 1
            hdr_end = body + int(hlen)
            append((sseq, int(ts), b"", buf[body:hdr_end] if traced else None, buf[hdr_end:stop], None, typ, fid, held))
            held += stop - hdr_end
            if pending == b"0":
                zero = True
            pos = stop + 2
        if m is None:
            return pos
        run = sseq - last
        tail = m[1].split(b".")
        if int(tail[2]) != s.cseq + run or int(tail[1]) != sseq:
            # A consumer-sequence jump (lost in transit) or a stream sequence jump (events removed):
            # on_frame, frame by frame, finds where and which.
            for _ in range(run):
                queue.pop()
            raise _Gap(start, pos)
        s.cseq += run
        s.pending -= run
        s.frames += run
        st.last = sseq
        st.server_pending = int(m[3])
        if zero:
            st.caught_up = True
        st.in_bytes = held
        return pos

    def _take_runs(
        self,
        s: Session,
        match: _Match,
        plain: _Match,
        traced: bool,
        buf: bytes,
        pos: int,
        size: int,
    ) -> int:
        """Takes the consumer's frames of one layout (the patterns': ``traced`` or not) that the key
        filter keeps from ``buf[pos:size]`` into the buffer, and hands each run of those it passes
        over to :meth:`_pass_run`; returns where it stopped. Raises :class:`_Gap` at a sequence jump.

        A traced frame is buffered with its header block, which decoding reads the trace context
        from (as it does for a frame :meth:`on_frame` buffers); the others with None there."""
        st, gaps, stream = self._state, self._gaps, self._stream
        key_filter, filtered = self.key_filter, gaps.filtered
        mine, n = self._shard or (-1, 0)
        append = st.buf.append
        held = st.in_bytes  # written back before anything else may read or change it
        passed = 0  # bytes of the frames passed over
        tail: list[bytes] | None = None  # of the frame after a run of them, found by _pass_run
        try:
            while True:
                m = plain(buf, pos) if n else None  # a shard worker hashes a plain foreign ID as it is
                hashed = m is not None
                m = m or match(buf, pos)
                if m is None or (stop := (body := m.end(5) + 2) + int(m[5])) + 2 > size:
                    return pos  # no frame of the pattern's, or not all here yet
                if key_filter is not None:
                    try:
                        wanted = hash_bytes(m[7]) % n == mine if hashed else key_filter(fid_value(m[7], stream, 0))
                    except Exception:  # DecodeError, a broken filter: on_frame handles it
                        return pos
                    if not wanted:
                        # Its size as _pass_run counts: headers included for a hashed one.
                        nbytes = stop - body if hashed else stop - body - int(m[4])
                        pos, nbytes, m, tail, body, stop, cseq, sseq = self._pass_run(
                            s, match, plain, buf, pos, stop + 2, size, m, nbytes
                        )
                        passed += nbytes
                        if m is None:
                            return pos
                if tail is None:
                    tail = m[1].split(b".")
                    if len(tail) < 5:  # (the plain pattern takes any tail)
                        return pos
                    cseq, sseq = int(tail[2]), int(tail[1])
                    # A consumer-sequence jump (lost in transit) or, without subject filters, a stream
                    # sequence jump (events removed): on_frame, frame by frame, finds which.
                    if cseq != s.cseq + 1 or (sseq != st.last + 1 and not filtered):
                        raise _Gap(pos, stop + 2)
                s.cseq = cseq
                s.pending -= 1
                s.frames += 1
                st.server_pending = pending = int(tail[4])
                if pending == 0:
                    st.caught_up = True
                if filtered:  # GapCheck.settle, for one frame
                    if gaps.verified == st.last and (sseq == st.last + 1 or not (gaps.prev_pending or s.blind)):
                        gaps.verified = sseq
                    else:
                        gaps.hold()
                    gaps.prev_pending = pending
                    s.blind = s.pending <= 0
                st.last = sseq
                start = body + int(m[4])
                data = buf[start:stop]
                ts = int(tail[3]) // 1000
                append((sseq, ts, b"", buf[body:start] if traced else None, data, None, m[6], m[7], held))
                held += len(data)
                pos = stop + 2
                tail = None
        finally:
            st.in_bytes = held
            self._passed_bytes += passed

    def _pass_run(
        self,
        s: Session,
        match: _Match,
        plain: _Match,
        buf: bytes,
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
        through :meth:`on_frame` frame by frame.

        Returns where the run ends, its bytes (for nats-py's statistics) and the frame kept after it,
        checked, as :meth:`_take_runs` takes one (its match, reply tail, body start and end, consumer
        and stream sequences; None, None, 0... where none can be taken).
        """
        st, gaps, stream = self._state, self._gaps, self._stream
        key_filter = self.key_filter
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
                    total = int(m[5])
                    nxt = m.end(5) + total + 4
                    if nxt > size or hash_bytes(m[7]) % n == mine:
                        wanted = nxt <= size  # ours, unless not all here yet
                        break
                    run += 1
                    run_bytes += total  # headers included: their size would cost another int()
                    last = m
                    pos = nxt
            m = m or match(buf, pos)  # a percent-encoded foreign ID (the filter decides), or none
            if m is None or (stop := (body := m.end(5) + 2) + int(m[5])) + 2 > size:
                break  # no frame of the pattern's, or not all here yet
            if not wanted:
                try:
                    wanted = key_filter(fid_value(m[7], stream, 0))
                except Exception:  # DecodeError, a broken filter: on_frame handles it
                    break
                if not wanted:
                    run += 1
                    run_bytes += stop - body - int(m[4])
                    last = m
                    pos = stop + 2
                    continue
            tail = t if len(t := m[1].split(b".")) >= 5 else None
            break
        ltail = last[1].split(b".")
        ref, more, end = (tail, 1, stop + 2) if tail is not None else (ltail, 0, pos)
        cseq, sseq = int(ref[2]), int(ref[1])
        if cseq != s.cseq + run + more or (not gaps.filtered and sseq != st.last + run + more):
            raise _Gap(start, end)
        s.cseq += run
        s.pending -= run
        s.frames += run
        prev = st.last
        st.last = st.skipped_at = int(ltail[1])
        self._counted.skipped += run
        self.mark(prev)
        st.server_pending = pending = int(ltail[4])
        if pending == 0:
            st.caught_up = True
        if gaps.filtered:
            gaps.settle(s, prev, st.last, run, pending)
        if tail is None:
            return pos, run_bytes, None, None, 0, 0, 0, 0
        return pos, run_bytes, m, tail, body, stop, cseq, sseq

    def _one_by_one(self, match: _Match, prefix: bytes, buf: bytes, pos: int, end: int) -> int:
        """Hands the frames in ``buf[pos:end]`` (all matched by ``match``) to :meth:`on_frame`."""
        while pos < end and (m := match(buf, pos)) is not None:
            body = m.end(5) + 2
            hlen = int(m[4])
            stop = body + int(m[5])
            self.on_lane_frame(b"", prefix + m[1], buf[body : body + hlen], buf[body + hlen : stop])
            pos = stop + 2
        return pos
