"""The rjet error tree. Every error rjet raises on purpose derives from :class:`RjetError`.

::

    RjetError
    ├── HeadReached            the stream client delivered every event present at open (to_head)
    ├── Stopped                the stream client or runner was closed
    ├── Tempted                fate injected an error on purpose (expected, not an alarm)
    ├── ConfigError            wrong arguments or configuration (also a ValueError)
    │   └── InvalidEvent       an event rjet refuses to insert (also a ValueError)
    ├── ConnectError           no NATS server could be reached
    ├── StreamError            something about a JetStream stream
    │   ├── StreamNotFound
    │   ├── StreamConfigMismatch
    │   ├── DecodeError        a stored message carries a malformed rjet header
    │   ├── InsertError        a publish was not acknowledged (says which event)
    │   └── ConsumerLost       the server-side consumer could not be (re)created
    └── CursorError            something about a cursor
        ├── InvalidCursor      a cursor value that is not a stream sequence
        ├── CursorExpired      the events after the cursor are gone from the stream
        ├── CursorAhead        the cursor is past the stream's last sequence
        ├── CursorConflict     another runner holds the cursor (compare-and-swap failed)
        └── CursorStoreError   the cursor store cannot be read or written

Errors that callers may expect in normal operation (:func:`is_expected`) are :class:`HeadReached`,
:class:`Stopped`, :class:`Tempted` and cancellation.
"""

from __future__ import annotations

import asyncio

__all__ = [
    "ConfigError",
    "ConnectError",
    "ConsumerLost",
    "CursorAhead",
    "CursorConflict",
    "CursorError",
    "CursorExpired",
    "CursorStoreError",
    "DecodeError",
    "HeadReached",
    "InsertError",
    "InvalidCursor",
    "InvalidEvent",
    "RjetError",
    "Stopped",
    "StreamConfigMismatch",
    "StreamError",
    "StreamNotFound",
    "Tempted",
    "is_expected",
]


class RjetError(Exception):
    """Root of every error rjet raises on purpose."""


class HeadReached(RjetError):
    """Every event present when a ``to_head`` stream client opened has been delivered."""

    def __init__(self, stream: str, head: int) -> None:
        super().__init__(f"stream {stream!r}: head reached (every event up to sequence {head} delivered)")
        self.stream = stream
        self.head = head


class Stopped(RjetError):
    """The stream client or runner was closed while in use."""


class Tempted(RjetError):
    """An error injected on purpose by :mod:`rjet.fate`; the event will be delivered again."""


class ConfigError(RjetError, ValueError):
    """Wrong arguments or configuration; the message says which and why."""


class InvalidEvent(ConfigError):
    """An event rjet refuses to insert (empty foreign ID, not encodable, too large)."""


class ConnectError(RjetError, ConnectionError):
    """No NATS server could be reached."""


class StreamError(RjetError):
    """Something went wrong with a JetStream stream."""

    def __init__(self, message: str, *, stream: str) -> None:
        super().__init__(message)
        self.stream = stream


class StreamNotFound(StreamError):
    """The named stream does not exist on the server."""

    def __init__(self, stream: str, detail: str = "") -> None:
        msg = f"stream {stream!r} not found"
        super().__init__(f"{msg}: {detail}" if detail else msg, stream=stream)


class StreamConfigMismatch(StreamError):
    """A stream exists with a configuration that differs from the one asked for."""


class DecodeError(StreamError):
    """A stored message carries a malformed rjet header."""

    def __init__(self, stream: str, seq: int, detail: str) -> None:
        super().__init__(f"stream {stream!r} sequence {seq}: {detail}", stream=stream)
        self.seq = seq


class InsertError(StreamError):
    """An insert was not acknowledged by the stream.

    ``index`` is the position in the batch (0 for :meth:`rjet.Stream.insert`), ``stored`` the number of
    events of the batch that are known to be stored, in order, before it.
    """

    def __init__(self, stream: str, index: int, foreign_id: str, detail: str, *, stored: int = 0) -> None:
        super().__init__(
            f"stream {stream!r}: insert #{index} (foreign id {foreign_id!r}) failed: {detail}"
            f" ({stored} earlier event(s) of this call stored)",
            stream=stream,
        )
        self.index = index
        self.foreign_id = foreign_id
        self.stored = stored


class ConsumerLost(StreamError):
    """The server-side consumer that feeds a stream client could not be (re)created."""


class CursorError(RjetError):
    """Something went wrong with a cursor."""


class InvalidCursor(CursorError, ValueError):
    """A cursor value that is not a stream sequence."""

    def __init__(self, cursor: str, where: str) -> None:
        super().__init__(f"{where}: cursor {cursor!r} is not a stream sequence (a decimal integer >= 0)")
        self.cursor = cursor


class CursorExpired(CursorError):
    """The events right after the cursor are no longer in the stream (expired or purged)."""

    def __init__(self, stream: str, cursor: int, first_seq: int) -> None:
        super().__init__(
            f"stream {stream!r}: cursor {cursor} has expired: the stream's first retained sequence is"
            f" {first_seq}, so events {cursor + 1}..{first_seq - 1} are gone; move the cursor on purpose"
            f" to go on (`rjet cursor NAME --namespace NS --set first --stream {stream}`)"
        )
        self.stream = stream
        self.cursor = cursor
        self.first_seq = first_seq


class CursorAhead(CursorError):
    """The cursor is past the stream's last sequence (was the stream deleted and created again?)."""

    def __init__(self, stream: str, cursor: int, last_seq: int) -> None:
        super().__init__(
            f"stream {stream!r}: cursor {cursor} is past the stream's last sequence {last_seq};"
            f" was the stream recreated? Move the cursor on purpose to go on"
            f" (`rjet cursor NAME --namespace NS --set beginning`)"
        )
        self.stream = stream
        self.cursor = cursor
        self.last_seq = last_seq


class CursorConflict(CursorError):
    """Another runner wrote the cursor since this one read it: two runners share a consumer name."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"cursor {name!r}: {detail}")
        self.name = name


class CursorStoreError(CursorError):
    """The cursor store cannot be read or written."""


def is_expected(err: BaseException) -> bool:
    """Whether ``err`` is part of normal operation (reflex's "expected" errors), not an alarm."""
    return isinstance(err, HeadReached | Stopped | Tempted | asyncio.CancelledError)
