"""Exact progress: a watermark cursor plus the set of sequences done above it.

A consumer handles many events at once (one at a time per key), so they finish out of order. Its
progress is a *watermark* W (every stream sequence <= W is done) and the *done set* D: sequences
above W already handled. Both are stored together (W as a decimal string, D as the text below), so
that a restart from W does not hand the events in D to the handler again. :class:`Progress` keeps
them on the per-event path; :func:`encode_done` / :func:`decode_done` are the stored format.

Stored format of D (this is on-disk data; the record that holds it carries the version)
------------------------------------------------------------------------------------------
D is a set of stream sequences, all > W. Position ``i`` (``i >= 0``) stands for sequence ``W + 1 + i``.
Its text is exactly one of:

``""``
    D is empty.
``"r" + B64(V)``
    Run-length. V is a byte string of unsigned LEB128 varints (7 bits a byte, least significant group
    first, high bit set on every byte but the last), alternating *gap*, *run*, *gap*, *run*, ...,
    ending with a run. The first gap is the number of positions before the first run (``>= 0``); each
    later gap is the number of positions not in D between two runs (``>= 1``); each run is a number of
    consecutive positions in D (``>= 1``).
``"b" + B64(M)``
    Bitmap. Bit ``i % 8`` (least significant first) of byte ``i // 8`` of M is set iff position ``i``
    is in D. M is as long as the highest position needs: its last byte is not zero.

B64 is base64url (RFC 4648 section 5: ``A-Z a-z 0-9 - _``) without ``=`` padding, so the text needs no
escaping in JSON. The encoder writes whichever of the two is shorter, the run-length one on a tie.
The decoder accepts exactly what the encoder can write, and raises :class:`ValueError` otherwise: an
unknown prefix, a prefix with nothing after it, characters outside the alphabet (``=`` included), a
base64 length of 1 mod 4 or nonzero unused bits in its last character, a varint that is truncated,
overlong (a trailing zero byte) or longer than 10 bytes, a run of length 0, a gap of 0 between runs,
varints that end with a gap, a bitmap whose last byte is zero, a sequence above ``2**64 - 1``, a text
longer than :data:`MAX_DONE_CHARS` or a set larger than :data:`MAX_DONE_COUNT`. (The encoder refuses
to write those last two, so that what is stored can always be read back.)

Sizes
-----
``len(encode_done(W, D))`` for K sequences drawn at random within ``(W, W + span]`` (the largest of
20 seeded draws), next to :func:`done_size_bound` (the most any K sequences within that span can
take); ``tests/test_progress.py`` asserts these figures:

=======  ========  ========  ========  =====
K        span      measured  bound     form
=======  ========  ========  ========  =====
100      200       35        35        b
100      100,000   392       535       r
1,000    2,000     335       335       b
1,000    100,000   3,033     6,668     r
10,000   20,000    3,335     3,335     b
10,000   100,000   16,668    16,668    b
=======  ========  ========  ========  =====

Whatever K is, a contiguous D (every event after one slow one done) takes a handful of characters,
and the bitmap caps the text at ``span / 6`` characters and a bit. A sparse D takes 4/3 of
(1 + the gap's varint bytes) a sequence: 2.7 characters each for gaps under 128, 4 under 16,384.
"""

from __future__ import annotations

import base64
import itertools
import re
from collections import deque
from collections.abc import Iterable
from typing import Final

__all__ = ["MAX_DONE_CHARS", "MAX_DONE_COUNT", "Progress", "decode_done", "done_size_bound", "encode_done"]

MAX_DONE_CHARS: Final = 1_000_000
"""The longest done-set text :func:`decode_done` reads (and :func:`encode_done` writes)."""

MAX_DONE_COUNT: Final = 6_000_000
"""The most sequences a done set may hold: about what a bitmap of :data:`MAX_DONE_CHARS` holds. It
bounds what a short run-length text can make :func:`decode_done` build."""

# JetStream stream sequences are uint64; a varint of 10 bytes holds any offset between two of them.
_MAX_SEQ: Final = 2**64 - 1
_MAX_VARINT_BYTES: Final = 10
_NOT_B64: Final = re.compile(r"[^A-Za-z0-9_-]")
_B64_INDEX: Final = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
# The set bits of each byte value, so that decoding a bitmap costs a lookup a byte, not a loop a bit.
_BITS: Final = tuple(tuple(i for i in range(8) if b >> i & 1) for b in range(256))


def _b64_len(nbytes: int) -> int:
    return (4 * nbytes + 2) // 3


def _varint_len(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _put_varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _check_cursor(cursor: int) -> None:
    if not 0 <= cursor <= _MAX_SEQ:
        raise ValueError(f"cursor {cursor} is not a stream sequence (0 to 2**64-1)")


def encode_done(cursor: int, done: Iterable[int]) -> str:
    """The stored text of the done set ``done`` above the watermark ``cursor`` (the module docstring
    describes it): ``""`` for an empty set, else the shorter of run-length and bitmap.

    ``done`` may come in any order, with duplicates. Raises :class:`ValueError` for a sequence
    ``<= cursor`` or above ``2**64 - 1``, or for a set :func:`decode_done` would refuse (more than
    :data:`MAX_DONE_COUNT` sequences, or a text over :data:`MAX_DONE_CHARS`).
    """
    _check_cursor(cursor)
    seqs = sorted(set(done))
    if not seqs:
        return ""
    if seqs[0] <= cursor:
        raise ValueError(f"done seq {seqs[0]} is not above the cursor {cursor}")
    if seqs[-1] > _MAX_SEQ:
        raise ValueError(f"done seq {seqs[-1]} is above 2**64-1")
    if len(seqs) > MAX_DONE_COUNT:
        raise ValueError(f"done set of {len(seqs)} seqs is over MAX_DONE_COUNT ({MAX_DONE_COUNT})")
    runs = bytearray()
    end = cursor + 1  # the position after the previous run: the first gap counts from the cursor
    start = prev = seqs[0]
    for seq in itertools.islice(seqs, 1, None):
        if seq != prev + 1:
            _put_varint(runs, start - end)
            _put_varint(runs, prev + 1 - start)
            end = prev + 1
            start = seq
        prev = seq
    _put_varint(runs, start - end)
    _put_varint(runs, prev + 1 - start)
    bitmap_len = (prev - cursor - 1) // 8 + 1
    # Only the shorter form is built: a bitmap of a sparse set far above the cursor could be huge.
    if _b64_len(len(runs)) <= _b64_len(bitmap_len):
        text = "r" + _b64(runs)
    else:
        bitmap = bytearray(bitmap_len)
        base = cursor + 1
        for seq in seqs:
            offset = seq - base
            bitmap[offset >> 3] |= 1 << (offset & 7)
        text = "b" + _b64(bitmap)
    if len(text) > MAX_DONE_CHARS:
        raise ValueError(f"done set text of {len(text)} chars is over MAX_DONE_CHARS ({MAX_DONE_CHARS})")
    return text


def _b64(data: bytearray) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode_done(cursor: int, text: str) -> frozenset[int]:
    """The done set above the watermark ``cursor`` that ``text`` (from :func:`encode_done`) stands for.

    Strict: anything :func:`encode_done` would not have written raises :class:`ValueError` saying what
    is wrong (the module docstring lists the checks). Bounded: a text over :data:`MAX_DONE_CHARS` or a
    set over :data:`MAX_DONE_COUNT` is refused before it is built.
    """
    _check_cursor(cursor)
    if not text:
        return frozenset()
    if len(text) > MAX_DONE_CHARS:
        raise ValueError(f"done set text of {len(text)} chars is over MAX_DONE_CHARS ({MAX_DONE_CHARS})")
    kind = text[0]
    if kind not in ("r", "b"):
        raise ValueError(f"done set: unknown prefix {kind!r} (expected 'r' or 'b')")
    data = _unb64(text[1:])
    if not data:
        raise ValueError(f"done set: nothing after the prefix {kind!r} (an empty set is '')")
    return _decode_runs(cursor, data) if kind == "r" else _decode_bitmap(cursor, data)


def _unb64(body: str) -> bytes:
    bad = _NOT_B64.search(body)
    if bad is not None:
        what = "base64 padding '='" if bad.group() == "=" else f"character {bad.group()!r}"
        raise ValueError(f"done set: {what} at index {bad.start() + 1} is not allowed (base64url, no padding)")
    tail = len(body) % 4
    if tail == 1:
        raise ValueError(f"done set: base64 length {len(body)} is 1 mod 4 (truncated)")
    # A last character with unused bits set decodes like one without: two texts for one set.
    if tail and _B64_INDEX[body[-1]] & (0x0F if tail == 2 else 0x03):
        raise ValueError("done set: the last base64 character has nonzero unused bits")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _decode_runs(cursor: int, data: bytes) -> frozenset[int]:
    out: set[int] = set()
    pos = cursor + 1  # the first position not yet accounted for
    count = value = shift = nbytes = 0
    is_run = False
    first = True
    for index, byte in enumerate(data):
        value |= (byte & 0x7F) << shift
        nbytes += 1
        if byte & 0x80:
            if nbytes == _MAX_VARINT_BYTES:
                raise ValueError(f"done set: varint at byte {index + 1 - nbytes} is longer than 10 bytes")
            shift += 7
            continue
        at = index + 1 - nbytes
        if byte == 0 and nbytes > 1:
            raise ValueError(f"done set: overlong varint at byte {at} (ends with a zero byte)")
        if is_run:
            if value == 0:
                raise ValueError(f"done set: run of length 0 at byte {at}")
            count += value
            if count > MAX_DONE_COUNT:
                raise ValueError(f"done set: more than MAX_DONE_COUNT ({MAX_DONE_COUNT}) seqs")
            if pos + value - 1 > _MAX_SEQ:
                raise ValueError(f"done set: run at byte {at} goes above 2**64-1")
            out.update(range(pos, pos + value))
            pos += value
            first = False
        else:
            if value == 0 and not first:
                raise ValueError(f"done set: gap of 0 between runs at byte {at}")
            pos += value
        is_run = not is_run
        value = shift = nbytes = 0
    if nbytes:
        raise ValueError(f"done set: truncated varint at byte {len(data) - nbytes}")
    if is_run:
        raise ValueError("done set: the varints end with a gap (an odd number of them; the last must be a run)")
    return frozenset(out)


def _decode_bitmap(cursor: int, data: bytes) -> frozenset[int]:
    if data[-1] == 0:
        raise ValueError("done set: bitmap ends with a zero byte")
    base = cursor + 1
    if base + 8 * (len(data) - 1) + data[-1].bit_length() - 1 > _MAX_SEQ:
        raise ValueError("done set: bitmap goes above 2**64-1")
    out: list[int] = []
    for index, byte in enumerate(data):
        if byte:
            at = base + 8 * index
            out.extend(at + bit for bit in _BITS[byte])
    return frozenset(out)


def done_size_bound(span: int, count: int) -> int:
    """An upper bound, in O(1), on ``len(encode_done(c, s))`` for any set ``s`` of ``count`` sequences
    within ``(c, c + span]``.

    The smaller of the bitmap's length for ``span`` positions and the run-length form's for at most
    ``min(count, span - count + 1)`` runs, each a gap ``<= span - count`` and a run ``<= count``.
    Raises :class:`ValueError` unless ``0 <= count <= span``.
    """
    if not 0 <= count <= span:
        raise ValueError(f"no set of {count} seqs fits in a span of {span}")
    if count == 0:
        return 0
    bitmap = 1 + _b64_len((span + 7) // 8)
    # Runs need a position not in the set between each two of them.
    runs = min(count, span - count + 1)
    run_length = 1 + _b64_len(runs * (_varint_len(span - count) + _varint_len(count)))
    return min(bitmap, run_length)


class Progress:
    """One consumer's exact progress: which events it read, which of them are done, and the watermark.

    ``cursor`` is the stored watermark and ``restored`` the done set stored with it (entries
    ``<= cursor`` are ignored): those events are not handed to the handler again (:meth:`read` says
    so). Positions are given in strictly increasing order, by :meth:`read` (an event of this consumer)
    or :meth:`passed` (positions that are not its work). Every call is O(1) amortized.
    """

    __slots__ = ("_done", "_last", "_max_done", "_pending", "_queue", "_restored", "_restored_at")

    def __init__(self, cursor: int, restored: Iterable[int] = ()) -> None:
        _check_cursor(cursor)
        self._last = cursor
        # Read seqs in order, pending or done; its head, if any, is always pending.
        self._queue: deque[int] = deque()
        self._pending: set[int] = set()
        self._done: set[int] = set()  # the queue's done entries
        # Removal only ever takes the lowest done entries, so while _done is not empty this is its max.
        self._max_done = cursor
        self._restored = sorted({seq for seq in restored if seq > cursor})
        self._restored_at = 0  # _restored[:_restored_at] were reached (read, or passed over and dropped)

    def _advance(self, seq: int) -> None:
        if seq <= self._last:
            raise ValueError(f"seq {seq} is not above the last position given, {self._last}")
        self._last = seq

    def read(self, seq: int) -> bool:
        """Record an event of this consumer read at ``seq``: True if it is to be handled (it is now
        pending), False if the restored done set has it (it counts as done already).

        Raises :class:`ValueError` if ``seq`` is not above every position given before.
        """
        if seq <= self._last:
            raise ValueError(f"seq {seq} is not above the last position given, {self._last}")
        self._last = seq
        restored = self._restored
        at = self._restored_at
        if at == len(restored):  # nothing restored is left above: the common case, kept short
            self._queue.append(seq)
            self._pending.add(seq)
            return True
        while at < len(restored) and restored[at] < seq:
            at += 1
        if at < len(restored) and restored[at] == seq:
            self._restored_at = at + 1
            # With nothing pending the watermark moves past it by itself; else it waits its turn.
            if self._queue:
                self._queue.append(seq)
                self._done.add(seq)
                self._max_done = seq
            return False
        self._restored_at = at
        self._queue.append(seq)
        self._pending.add(seq)
        return True

    def passed(self, seq: int) -> None:
        """Record that every position up to ``seq`` was read and none of them is this consumer's work.

        Restored entries passed over are dropped: the stream no longer has them, or they are not ours.
        Raises :class:`ValueError` if ``seq`` is not above every position given before.
        """
        self._advance(seq)
        restored = self._restored
        at = self._restored_at
        while at < len(restored) and restored[at] <= seq:
            at += 1
        self._restored_at = at

    def done(self, seq: int) -> None:
        """Record that the pending event at ``seq`` is done; the watermark moves up to the first one still
        pending. Raises :class:`ValueError` if ``seq`` is not pending."""
        try:
            self._pending.remove(seq)
        except KeyError:
            raise ValueError(f"seq {seq} is not pending") from None
        queue = self._queue
        if queue[0] != seq:
            self._done.add(seq)
            if seq > self._max_done:
                self._max_done = seq
            return
        queue.popleft()
        done = self._done
        while queue and queue[0] in done:
            done.remove(queue.popleft())

    @property
    def watermark(self) -> int:
        """Every position up to it is done or not this consumer's: the first pending seq - 1, or, with
        nothing pending, the last position given (or the cursor). Never decreases."""
        return self._queue[0] - 1 if self._queue else self._last

    @property
    def pending(self) -> int:
        """How many events were read and are not done yet."""
        return len(self._pending)

    def done_set(self) -> list[int]:
        """The sorted seqs done above the watermark: those done while an earlier one is pending, and the
        restored ones not reached yet."""
        return sorted(self._done) + self._restored[self._restored_at :]

    def snapshot(self) -> tuple[str, str]:
        """What to store: ``(str(watermark), encode_done(watermark, done_set()))``.

        Raises :class:`ValueError` where :func:`encode_done` does (a done set too large to read back);
        :meth:`size_bound` says in advance how long the text can be.
        """
        watermark = self.watermark
        return str(watermark), encode_done(watermark, self.done_set())

    def size_bound(self) -> int:
        """An upper bound, in O(1), on ``len(snapshot()[1])``."""
        restored_left = len(self._restored) - self._restored_at
        count = len(self._done) + restored_left
        if not count:
            return 0
        # Restored entries not reached are above every read seq, so above every done one.
        top = self._restored[-1] if restored_left else self._max_done
        return done_size_bound(top - self.watermark, count)

    def read_size_bound(self) -> int:
        """An upper bound, in O(1), on the encoded length of the done entries reading reached: the done
        set less the restored entries not reached yet (those only ever shrink, and were stored once).
        A reader that bounds this never waits on entries it has not read."""
        count = len(self._done)
        return done_size_bound(self._max_done - self.watermark, count) if count else 0
