"""The stream client's wire codec: JetStream reply subjects, rjet's headers in raw frames, the frame
pattern the bulk scanner matches, and the layout of a buffered frame. Pure functions and constants,
no asyncio: unit-tested without a server (``tests/test_frames.py``).
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias

from rjet.event import FOREIGN_ID_HEADER, TYPE_HEADER

__all__ = [
    "COMPLETED",
    "PENDING_KEY",
    "TOO_BIG",
    "Frame",
    "frame_pattern",
    "header",
    "parse_ack",
    "rjet_headers",
]

PENDING_KEY: Final = b"\r\nNats-Pending-Messages:"
TOO_BIG: Final = b" Message Size Exceeds MaxBytes\r\n"  # a 409: the next message would pass max_bytes
COMPLETED: Final = b" Batch Completed\r\n"  # a 409: a request with max_bytes got its whole batch
_TYPE_KEY: Final = b"\r\n" + TYPE_HEADER.encode() + b":"
_FOREIGN_ID_KEY: Final = b"\r\n" + FOREIGN_ID_HEADER.encode() + b":"


def parse_ack(reply: bytes) -> tuple[bytes, int, int, int, int] | None:
    """(consumer, stream seq, consumer seq, stored time ns, pending) from a JetStream reply subject.

    v1: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens);
    v2: ``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<rand>]``.
    None for anything else.
    """
    t = reply.split(b".")
    n = len(t)
    if n == 9:
        b = 2
    elif n == 11 or n == 12:
        b = 4
    else:
        return None
    if t[0] != b"$JS" or t[1] != b"ACK":
        return None
    try:
        return t[b + 1], int(t[b + 3]), int(t[b + 4]), int(t[b + 5]), int(t[b + 6])
    except ValueError:
        return None


def header(hdr: bytes, key: bytes) -> bytes | None:
    """The value of header ``key`` (given as ``b"\\r\\n<name>:"``) in raw NATS header bytes."""
    i = hdr.find(key)
    if i < 0:
        return None
    i += len(key)
    return hdr[i : hdr.find(b"\r\n", i)].strip()


_RJET_PREFIX: Final = b"NATS/1.0\r\n" + TYPE_HEADER.encode() + b": "
_FID_PREFIX: Final = FOREIGN_ID_HEADER.encode() + b": "
_T: Final = len(_RJET_PREFIX)
_F: Final = 2 + len(_FID_PREFIX)


def rjet_headers(hdr: bytes) -> tuple[bytes | None, bytes | None]:
    """(type, foreign ID) raw header values; positional for the layout ``insert`` writes."""
    if hdr.startswith(_RJET_PREFIX):
        i = hdr.find(b"\r\n", _T)
        j = i + _F
        if hdr.startswith(_FID_PREFIX, i + 2):
            return hdr[_T:i].strip(), hdr[j : hdr.find(b"\r\n", j)].strip()
    return header(hdr, _TYPE_KEY), header(hdr, _FOREIGN_ID_KEY)


# A buffered message: stream sequence, stored time (ns), subject, raw headers or None, body, the
# foreign ID when the key filter decoded it already, for frames the scanner took the raw type and
# foreign ID header values instead of the headers, and the client's count of bytes buffered before
# this message (so the bytes held are known at the next pull without a sum or a count per pop).
Frame: TypeAlias = tuple[int, int, bytes, bytes | None, bytes, str | None, bytes | None, bytes | None, int]

# One HMSG frame of a stream client's consumer whose headers start as ``insert`` writes them, after
# "HMSG <subject> <sid> <reply prefix>" (see frame_pattern): groups 1 the reply's tail
# (delivered.sseq.cseq.ts.pending[.token]), 2 header size, 3 total size, 4 type (an integer),
# 5 foreign ID (printable ASCII: plain or percent-encoded; only plain for ``plain=True``).
_FRAME_TAIL: Final = (
    rb"([^ ]+) (\d+) (\d+)\r\nNATS/1\.0\r\n" + TYPE_HEADER.encode() + rb": (-?\d+)\r\n" + FOREIGN_ID_HEADER.encode()
)


def frame_pattern(sid: int, reply_prefix: bytes, *, plain: bool = False) -> re.Pattern[bytes]:
    """Matches a frame of subscription ``sid`` whose reply subject starts with ``reply_prefix``
    (``$JS.ACK.[<domain>.<account>.]<stream>.<consumer>.``)."""
    # Literals and single-character negations only, few groups: ~0.3 us a frame.
    fid = rb": ([!-$&-~]+)\r\n" if plain else rb": ([!-~]+)\r\n"
    return re.compile(b"HMSG [^ ]+ %d %s" % (sid, re.escape(reply_prefix)) + _FRAME_TAIL + fid)
