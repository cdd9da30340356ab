"""Events, and how rjet lays them out in JetStream messages.

An event is stored as one JetStream message:

- the stream sequence is the event ID, the stored time its timestamp (both from the server);
- header :data:`TYPE_HEADER` holds the event type as a decimal integer (the Go original's name), from
  0 to 2**63-1 (Go ints; ``insert`` refuses others);
- header :data:`FOREIGN_ID_HEADER` holds the foreign ID, percent-encoded (UTF-8) so that any string
  survives NATS header rules (no CR/LF, no leading or trailing blanks);
- the body is the event's metadata, byte for byte.

Messages that others published without these headers still decode: type 0, foreign ID = subject.
Every read path decodes a message as Go rjet does (the first of a repeated header; an empty type is
0; a foreign ID is exact UTF-8 or a ``DecodeError``): see docs/interop.md.
The encoding and decoding of these headers lives in ``rjet/_nats/frames.py``, with the rest of the wire codec.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from rjet.errors import InvalidEvent

__all__ = ["FOREIGN_ID_HEADER", "MSG_ID_HEADER", "TYPE_HEADER", "Event"]

TYPE_HEADER: Final = "reflex_type"
"""Header carrying the event type (decimal integer); the name the Go rjet used."""

FOREIGN_ID_HEADER: Final = "rjet_foreign_id"
"""Header carrying the percent-encoded foreign ID."""

MSG_ID_HEADER: Final = "Nats-Msg-Id"
"""JetStream's de-duplication header, set by ``insert(..., msg_id=...)``."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


@dataclasses.dataclass(frozen=True, init=False)
class Event:
    """One reflex event read from a stream.

    ``id`` is the JetStream stream sequence as a decimal string, so cursors are event IDs.
    ``timestamp`` (a UTC datetime) is the time the server stored the event; the reader keeps it as
    :attr:`timestamp_us` and builds the datetime only when asked (a third of the cost of decoding).

    >>> e = Event("7", 1, "user-42", datetime(2026, 1, 1, tzinfo=UTC), b"{}")
    >>> e.id_int, e.is_type(1), e.timestamp.year
    (7, True, 2026)
    """

    # Two slots are no fields (so dataclasses.fields, asdict, astuple, replace, == and hash see the
    # five fields only, whatever state the slots are in): ``_timestamp``, the datetime once built (or
    # given); ``_trace``, the W3C trace headers the message carried, left unset (not even None) by the
    # reader's fast path, so that an event without them costs nothing (read it through ``trace``), or
    # the raw header block, parsed on first use: with tracing off nothing reads it (parsing costs more
    # than the rest of decoding the event).
    __slots__ = ("_timestamp", "_trace", "foreign_id", "id", "metadata", "timestamp_us", "type")

    id: str
    type: int
    foreign_id: str
    timestamp_us: int
    """The stored time in microseconds since the Unix epoch (what ``timestamp`` holds, as an int)."""
    metadata: bytes
    if TYPE_CHECKING:  # slots only: no dataclass fields at run time
        _timestamp: datetime | None
        _trace: dict[str, str] | bytes | None

    def __init__(
        self,
        id: str,
        type: int,
        foreign_id: str,
        timestamp: datetime | None = None,
        metadata: bytes = b"",
        *,
        timestamp_us: int | None = None,
        trace: dict[str, str] | None = None,
    ) -> None:
        """``Event(id, type, foreign_id, timestamp, metadata)`` with an aware datetime, or
        ``timestamp_us=`` instead of ``timestamp``; ``trace``: see :attr:`trace`."""
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
        setattr_(self, "_trace", trace)

    @property
    def trace(self) -> dict[str, str] | None:
        """The trace context the event's message carried: its W3C headers, ``{"traceparent": ...}``
        (with ``"tracestate"`` when it had one), as ``insert`` writes them with tracing on; None
        when it carried none. A carrier for OpenTelemetry: ``opentelemetry.propagate.extract(event.trace)``
        gives the inserting span's context, to link to by hand (``run`` makes the handler's span its child)."""
        try:
            trace = self._trace
        except AttributeError:  # the reader's fast path leaves it unset
            return None
        if isinstance(trace, bytes):
            from rjet._nats.frames import trace_headers  # (it imports this module)

            trace = trace_headers(trace)
            object.__setattr__(self, "_trace", trace)
        return trace

    def __getstate__(self) -> list[object]:
        return [self.id, self.type, self.foreign_id, self.timestamp_us, self.metadata, self._timestamp, self.trace]

    def __setstate__(self, state: list[object]) -> None:
        for name, value in zip(
            ("id", "type", "foreign_id", "timestamp_us", "metadata", "_timestamp", "_trace"), state, strict=False
        ):
            object.__setattr__(self, name, value)

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


_STATE: Final = ("id", "type", "foreign_id", "timestamp_us", "metadata", "_timestamp", "_trace")


class EventSlots:
    """An :class:`Event`'s slots without the frozen dataclass around them, for the reader's hot path.

    The reader fills one with plain attribute stores, then makes it an Event by assigning its
    ``__class__`` (``slots.__class__ = Event``), which Python allows between classes with the same
    ``__slots__``: the result is an Event like any other (==, hash, pickling, ``dataclasses``). A
    frozen Event's slots can only be set through their descriptors, one call a slot: building one
    so costs 0.15-0.18 us more (Python 3.11 and 3.13), about 5% of what reading an event costs.
    """

    __slots__ = Event.__slots__

    id: str
    type: int
    foreign_id: str
    timestamp_us: int
    metadata: bytes
    _timestamp: datetime | None
    _trace: dict[str, str] | bytes | None


# The layouts must stay the same for the class assignment: this raises at import if they drift apart.
object.__new__(EventSlots).__class__ = Event  # type: ignore[assignment]


def timestamp_from_ns(ns: int) -> datetime:
    """A UTC datetime from nanoseconds since the epoch (microsecond precision, as datetime has)."""
    return _EPOCH + timedelta(microseconds=ns // 1000)
