"""The stream client's wire codec: JetStream reply subjects, rjet's headers in raw frames, the frame
pattern the bulk scanner matches, and the layout of a buffered frame. Pure functions and constants,
no asyncio: unit-tested without a server (``tests/test_frames.py``).
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias
from urllib.parse import quote, unquote_to_bytes

from rjet.errors import DecodeError, InvalidEvent
from rjet.event import FOREIGN_ID_HEADER, MSG_ID_HEADER, TYPE_HEADER

__all__ = [
    "BODY",
    "COMPLETED",
    "FOREIGN_ID",
    "FOREIGN_ID_RAW",
    "HEADERS",
    "HELD_BEFORE",
    "MAX_TYPE",
    "PENDING_KEY",
    "SEQ",
    "SUBJECT",
    "TIME_US",
    "TOO_BIG",
    "TYPE_RAW",
    "Frame",
    "check_type",
    "decode_foreign_id",
    "decode_type",
    "encode_foreign_id",
    "encode_header_block",
    "encode_headers",
    "foreign_id_of",
    "frame_pattern",
    "header",
    "parse_ack",
    "rjet_headers",
    "trace_headers",
]

PENDING_KEY: Final = b"\r\nNats-Pending-Messages:"
TOO_BIG: Final = b" Message Size Exceeds MaxBytes\r\n"  # a 409: the next message would pass max_bytes
COMPLETED: Final = b" Batch Completed\r\n"  # a 409: a request with max_bytes got its whole batch
_TYPE_KEY: Final = b"\r\n" + TYPE_HEADER.encode() + b":"
_FOREIGN_ID_KEY: Final = b"\r\n" + FOREIGN_ID_HEADER.encode() + b":"
_TYPE_B: Final = TYPE_HEADER.encode()
_FOREIGN_ID_B: Final = FOREIGN_ID_HEADER.encode()
# Everything printable in ASCII except '%' (the escape) and ' ' (NATS strips blanks at the ends).
_PLAIN: Final = re.compile(r"[!-$&-~]+")
_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")
MAX_TYPE: Final = 2**63 - 1
"""The largest event type: reflex's types are Go ints (int64); rjet stores 0..MAX_TYPE."""
# What Go's strconv.Atoi takes (a sign, ASCII digits; no blanks, no '_'), as bytes or text.
_INT_B: Final = re.compile(rb"[+-]?[0-9]+")
_INT_S: Final = re.compile(r"[+-]?[0-9]+")
_MIN_READ: Final = -(2**63)  # Go reads negative types; rjet never writes them


# ----------------------------------------------------------------- rjet's headers, written


def encode_foreign_id(foreign_id: str) -> str:
    """The header value for ``foreign_id``; raises :class:`InvalidEvent` for an unusable one."""
    if type(foreign_id) is str and _PLAIN.fullmatch(foreign_id):
        return foreign_id
    if not isinstance(foreign_id, str):
        raise InvalidEvent(f"foreign id must be a str, not {type(foreign_id).__name__}: {foreign_id!r}")
    if not foreign_id:
        raise InvalidEvent("foreign id is empty: every rjet event names the entity it is about")
    try:
        return quote(foreign_id, safe=_SAFE, encoding="utf-8", errors="strict")
    except UnicodeEncodeError as e:
        raise InvalidEvent(f"foreign id {foreign_id!r} is not valid Unicode text: {e.reason}") from None


def check_type(type: int, what: str = "event type") -> int:
    """``type`` when rjet may store it as an event type (an int from 0 to :data:`MAX_TYPE`); else
    :class:`InvalidEvent` naming the value. The one check of every way in: ``insert``,
    ``insert_many``, ``rjet insert --type`` and its JSON lines."""
    if type.__class__ is int and 0 <= type <= MAX_TYPE:
        return type
    raise InvalidEvent(f"{what} must be an integer from 0 to 2**63-1, not {type!r}")


def foreign_id_of(raw: bytes, stream: str, seq: int) -> str:
    """The foreign ID from the raw bytes of its header value: exact UTF-8 (percent-encoded or not);
    :class:`DecodeError` naming the message and the bytes that are not UTF-8."""
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.end]
        raise DecodeError(
            stream, seq, f"header {FOREIGN_ID_HEADER} {raw!r} is not UTF-8 ({bad!r} at byte {e.start}: {e.reason})"
        ) from None
    return decode_foreign_id(value, stream, seq)


def decode_foreign_id(value: str, stream: str, seq: int) -> str:
    """Inverse of :func:`encode_foreign_id`; raises :class:`DecodeError` naming the message."""
    if "%" not in value:
        if not value:
            raise DecodeError(stream, seq, f"header {FOREIGN_ID_HEADER} is empty")
        return value
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(stream, seq, f"header {FOREIGN_ID_HEADER} {value!r} is not percent-encoded UTF-8") from None


def encode_headers(foreign_id: str, type: int, msg_id: str | None = None) -> dict[str, str]:
    """The NATS headers that store an event of ``type`` about ``foreign_id``."""
    headers = {TYPE_HEADER: str(check_type(type)), FOREIGN_ID_HEADER: encode_foreign_id(foreign_id)}
    if msg_id is not None:
        headers[MSG_ID_HEADER] = _check_msg_id(msg_id)
    return headers


def _check_msg_id(msg_id: str) -> str:
    if not isinstance(msg_id, str) or not msg_id.strip() or "\r" in msg_id or "\n" in msg_id:
        raise InvalidEvent(f"msg_id {msg_id!r} must be non-empty text on one line")
    return msg_id.strip()


def encode_header_block(foreign_id: str, type: int, msg_id: str | None = None) -> bytes:
    """The raw NATS header block for an event, as :func:`encode_headers` lays it out."""
    block = b"NATS/1.0\r\n%s: %d\r\n%s: %s\r\n" % (
        _TYPE_B, check_type(type), _FOREIGN_ID_B, encode_foreign_id(foreign_id).encode()
    )  # fmt: skip
    if msg_id is None:
        return block + b"\r\n"
    return block + b"%s: %s\r\n\r\n" % (MSG_ID_HEADER.encode(), _check_msg_id(msg_id).encode())


def decode_type(value: bytes | str | None, stream: str, seq: int) -> int:
    """The event type from its header value, as Go rjet reads it (``strconv.Atoi``): 0 when absent
    or empty; :class:`DecodeError` when not a (signed, ASCII) decimal integer or outside int64."""
    if value is None:
        return 0
    value = value.strip()
    if not value:
        return 0
    if isinstance(value, bytes):
        digits = _INT_B.fullmatch(value) is not None
        shown = value.decode("utf-8", "backslashreplace")
    else:
        digits = _INT_S.fullmatch(value) is not None
        shown = value
    if not digits:
        raise DecodeError(stream, seq, f"header {TYPE_HEADER} {shown!r} is not an integer")
    typ = int(value)
    if not _MIN_READ <= typ <= MAX_TYPE:
        raise DecodeError(stream, seq, f"header {TYPE_HEADER} {shown!r} is outside the 64-bit integer range")
    return typ


# ----------------------------------------------------------------- frames, read


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


_TRACEPARENT_KEY: Final = b"\r\ntraceparent:"
_TRACESTATE_KEY: Final = b"\r\ntracestate:"


def trace_headers(hdr: bytes) -> dict[str, str] | None:
    """The W3C trace headers in raw NATS header bytes (``traceparent``, and ``tracestate`` when
    present), or None without a ``traceparent``."""
    parent = header(hdr, _TRACEPARENT_KEY)
    if parent is None:
        return None
    out = {"traceparent": parent.decode("ascii", "replace")}
    state = header(hdr, _TRACESTATE_KEY)
    if state is not None:
        out["tracestate"] = state.decode("ascii", "replace")
    return out


# A buffered message: stream sequence, stored time (microseconds, what an Event keeps), subject, raw
# headers or None, body, the foreign ID when the key filter decoded it already, for frames the
# scanner took the raw type and foreign ID header values instead of the headers, and the client's
# count of bytes buffered before this message (so the bytes held are known at the next pull without
# a sum or a count per pop).
Frame: TypeAlias = tuple[int, int, bytes, bytes | None, bytes, str | None, bytes | None, bytes | None, int]
# Its fields by index. A plain tuple, not a named one: building a NamedTuple costs a class call per
# event on the hot path, where the reader indexes frames by these numbers directly.
SEQ: Final = 0
TIME_US: Final = 1
SUBJECT: Final = 2
HEADERS: Final = 3
BODY: Final = 4
FOREIGN_ID: Final = 5
TYPE_RAW: Final = 6
FOREIGN_ID_RAW: Final = 7
HELD_BEFORE: Final = 8

# One HMSG frame of a stream client's consumer whose headers start as ``insert`` writes them, after
# "HMSG <subject> <sid> <reply prefix>" (see frame_pattern): groups 1 the reply's tail
# (delivered.sseq.cseq.ts.pending[.token], numbers), 2 its stored time in microseconds and 3 its
# pending count (the two the bulk scan reads from every frame), 4 header size, 5 total size, 6 type
# (an integer), 7 foreign ID (printable ASCII: plain or percent-encoded; only plain for
# ``plain=True``). Up to 18 digits: any of them is an int64 (a longer type goes to decode_type, which
# checks the range).
# With ``plain=True`` (a shard worker's loop over other shards' events, which splits the tail of the
# few it keeps) the tail is any token and groups 2 and 3 are empty: taking the tail apart in the
# pattern costs ~90 ns a match, a tenth of what passing over an event costs.
# Possessive quantifiers (++): what follows each one is a character it cannot take, so they match
# what the greedy ones would, and a frame of another layout fails at once instead of backtracking
# through the control line (0.24 us against 0.50 for a traced frame; 4% off a match that succeeds).
# The 12-token form's last token is an alternative, not an optional group: `(?:...)?` over more than
# one character makes the engine keep a repeat context, 15-20 ns a match (3.11 and 3.13). Digits are
# [0-9], the same as a bytes pattern's \d, which the engine tests by category, char by char: 6% fewer
# instructions a match (callgrind, 3.13). The stored time is the server's nanoseconds, 19 digits from
# 2001 to 2286; group 2 is its first 16, the microseconds an Event keeps, so the scan does not divide
# (an int() and a // of a two-digit int: 555 instructions a frame less on 3.13, 369 on 3.11,
# callgrind; the last three as three classes, not a {3} repeat: 67-79 fewer). A frame with any other
# stored time is not matched, and is taken one by one.
_REPLY_TAIL: Final = rb"([0-9]++\.[0-9]++\.[0-9]++\.([0-9]{16})[0-9][0-9][0-9]\.([0-9]++)(?:\.[^ ]++|))"
_ANY_TAIL: Final = rb"([^ ]++)()()"
_SIZES: Final = rb" ([0-9]++) ([0-9]++)\r\nNATS/1\.0\r\n"
_RJET_LINES: Final = (
    TYPE_HEADER.encode() + rb": (-?[0-9]{1,18})\r\n" + FOREIGN_ID_HEADER.encode()
)  # fmt: skip
# The trace context insert writes before rjet's headers (rjet/otel.py): a traceparent line, then maybe
# a tracestate line. The values are not captured: decoding reads them from the header block, as it
# reads any other message's (rjet/_nats/frames.py's trace_headers).
_TRACE_LINES: Final = rb"traceparent:[^\r\n]*+\r\n(?:tracestate:[^\r\n]*+\r\n)?"


def frame_pattern(sid: int, reply_prefix: bytes, *, plain: bool = False, traced: bool = False) -> re.Pattern[bytes]:
    """Matches a frame of subscription ``sid`` whose reply subject starts with ``reply_prefix``
    (``$JS.ACK.[<domain>.<account>.]<stream>.<consumer>.``); with ``traced``, one whose headers
    start with the trace context (the groups are the same)."""
    # Literals and single-character negations only, few groups: ~0.3 us a frame.
    fid = rb": ([!-$&-~]++)\r\n" if plain else rb": ([!-~]++)\r\n"
    head = b"HMSG [^ ]++ %d %s" % (sid, re.escape(reply_prefix)) + (_ANY_TAIL if plain else _REPLY_TAIL) + _SIZES
    return re.compile(head + (_TRACE_LINES if traced else b"") + _RJET_LINES + fid)
