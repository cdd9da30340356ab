"""Events, and how rjet lays them out in JetStream messages.

An event is stored as one JetStream message:

- the stream sequence is the event ID, the stored time its timestamp (both from the server);
- header :data:`TYPE_HEADER` holds the event type as a decimal integer (the Go original's name);
- header :data:`FOREIGN_ID_HEADER` holds the foreign ID, percent-encoded (UTF-8) so that any string
  survives NATS header rules (no CR/LF, no leading or trailing blanks);
- the body is the event's metadata, byte for byte.

Messages that others published without these headers still decode: type 0, foreign ID = subject.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import quote, unquote_to_bytes

from rjet.errors import DecodeError, InvalidEvent

__all__ = ["FOREIGN_ID_HEADER", "MSG_ID_HEADER", "TYPE_HEADER", "Event"]

TYPE_HEADER: Final = "reflex_type"
"""Header carrying the event type (decimal integer); the name the Go rjet used."""

FOREIGN_ID_HEADER: Final = "rjet_foreign_id"
"""Header carrying the percent-encoded foreign ID."""

MSG_ID_HEADER: Final = "Nats-Msg-Id"
"""JetStream's de-duplication header, set by ``insert(..., msg_id=...)``."""

# Everything printable in ASCII except '%' (the escape) and ' ' (NATS strips blanks at the ends).
_TYPE_B: Final = TYPE_HEADER.encode()
_FOREIGN_ID_B: Final = FOREIGN_ID_HEADER.encode()
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)
_PLAIN: Final = re.compile(r"[!-$&-~]+")  # printable ASCII but '%' and ' ': stored as it is
_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%")


@dataclasses.dataclass(frozen=True, slots=True, init=False)
class Event:
    """One reflex event read from a stream.

    ``id`` is the JetStream stream sequence as a decimal string, so cursors are event IDs.
    ``timestamp`` (a UTC datetime) is the time the server stored the event; the reader keeps it as
    :attr:`timestamp_us` and builds the datetime only when asked (a third of the cost of decoding).

    >>> e = Event("7", 1, "user-42", datetime(2026, 1, 1, tzinfo=UTC), b"{}")
    >>> e.id_int, e.is_type(1), e.timestamp.year
    (7, True, 2026)
    """

    id: str
    type: int
    foreign_id: str
    timestamp_us: int
    """The stored time in microseconds since the Unix epoch (what ``timestamp`` holds, as an int)."""
    metadata: bytes = b""
    # The datetime, once built (or given); not an __init__ field, so dataclasses.replace leaves it out.
    _timestamp: datetime | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __init__(
        self,
        id: str,
        type: int,
        foreign_id: str,
        timestamp: datetime | None = None,
        metadata: bytes = b"",
        *,
        timestamp_us: int | None = None,
    ) -> None:
        """``Event(id, type, foreign_id, timestamp, metadata)`` with an aware datetime, or
        ``timestamp_us=`` instead of ``timestamp``."""
        if timestamp is not None:
            if timestamp.tzinfo is None:
                raise InvalidEvent(f"event timestamp {timestamp!r} has no time zone (rjet's are UTC)")
            timestamp_us = (timestamp - _EPOCH) // _US
        elif timestamp_us is None:
            raise InvalidEvent("an Event needs a timestamp (an aware datetime) or timestamp_us")
        setattr_ = object.__setattr__
        setattr_(self, "id", id)
        setattr_(self, "type", type)
        setattr_(self, "foreign_id", foreign_id)
        setattr_(self, "timestamp_us", timestamp_us)
        setattr_(self, "metadata", metadata)
        setattr_(self, "_timestamp", timestamp)

    @property
    def timestamp(self) -> datetime:
        """When the server stored the event: a UTC datetime (microsecond precision)."""
        ts = self._timestamp
        if ts is None:
            ts = _EPOCH + timedelta(microseconds=self.timestamp_us)
            object.__setattr__(self, "_timestamp", ts)
        return ts

    def __repr__(self) -> str:
        return (
            f"Event(id={self.id!r}, type={self.type!r}, foreign_id={self.foreign_id!r},"
            f" timestamp={self.timestamp!r}, metadata={self.metadata!r})"
        )

    @property
    def id_int(self) -> int:
        """The stream sequence as an integer."""
        return int(self.id)

    @property
    def foreign_id_int(self) -> int:
        """The foreign ID as an integer (raises ``ValueError`` when it is not one)."""
        return int(self.foreign_id)

    def is_type(self, *types: int) -> bool:
        """Whether the event's type is one of ``types``."""
        return self.type in types


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
    if isinstance(type, bool) or not isinstance(type, int):
        raise InvalidEvent(f"event type must be an int, not {type!r}")
    headers = {TYPE_HEADER: str(type), FOREIGN_ID_HEADER: encode_foreign_id(foreign_id)}
    if msg_id is not None:
        headers[MSG_ID_HEADER] = _check_msg_id(msg_id)
    return headers


def _check_msg_id(msg_id: str) -> str:
    if not isinstance(msg_id, str) or not msg_id.strip() or "\r" in msg_id or "\n" in msg_id:
        raise InvalidEvent(f"msg_id {msg_id!r} must be non-empty text on one line")
    return msg_id.strip()


def encode_header_block(foreign_id: str, type: int, msg_id: str | None = None) -> bytes:
    """The raw NATS header block for an event, as :func:`encode_headers` lays it out."""
    if isinstance(type, bool) or not isinstance(type, int):
        raise InvalidEvent(f"event type must be an int, not {type!r}")
    block = b"NATS/1.0\r\n%s: %d\r\n%s: %s\r\n" % (_TYPE_B, type, _FOREIGN_ID_B, encode_foreign_id(foreign_id).encode())
    if msg_id is None:
        return block + b"\r\n"
    return block + b"%s: %s\r\n\r\n" % (MSG_ID_HEADER.encode(), _check_msg_id(msg_id).encode())


def decode_type(value: str | None, stream: str, seq: int) -> int:
    """The event type from its header value (0 when absent); :class:`DecodeError` when malformed."""
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise DecodeError(stream, seq, f"header {TYPE_HEADER} {value!r} is not an integer") from None


def timestamp_from_ns(ns: int) -> datetime:
    """A UTC datetime from nanoseconds since the epoch (microsecond precision, as datetime has)."""
    return _EPOCH + timedelta(microseconds=ns // 1000)
