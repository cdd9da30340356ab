"""The rjet error tree. Every error rjet raises on purpose derives from :class:`RjetError`.

::

    RjetError
    ├── HeadReached            the stream client delivered every event present at open (to_head)
    ├── Stopped                the stream client or runner was closed
    ├── Tempted                fate injected an error on purpose (expected, not an alarm)
    ├── ConfigError            wrong arguments or configuration (also a ValueError)
    │   └── InvalidEvent       an event rjet refuses to insert (also a ValueError)
    ├── ConnectError           no NATS server could be reached
    ├── PermissionDenied       the server refused a publish or subscription (names the subject)
    ├── StreamError            something about a JetStream stream
    │   ├── StreamNotFound
    │   ├── StreamConfigMismatch
    │   ├── DecodeError        a stored message carries a malformed rjet header
    │   ├── InsertError        a publish was not acknowledged (says which event)
    │   └── ConsumerLost       the server-side consumer could not be (re)created
    └── CursorError            something about a cursor
        ├── InvalidCursor      a cursor value that is not a stream sequence
        ├── CursorExpired      the events after the cursor are gone from the stream
        │   └── EventsRemoved  events were removed ahead of a running reader (retention, purge)
        ├── CursorAhead        the cursor is past the stream's last sequence
        ├── StreamRecreated    the cursor counts in another stream of the same name (deleted, created again)
        ├── CursorConflict     another runner holds the cursor (it saw that runner's claim)
        └── CursorStoreError   the cursor store cannot be read or written
            ├── CursorBucketGone      the bucket, or the cursor's key in it, vanished while in use
            └── CursorBucketUnusable  the bucket's configuration cannot keep cursors (a TTL, say)

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
    "CursorBucketGone",
    "CursorBucketUnusable",
    "CursorConflict",
    "CursorError",
    "CursorExpired",
    "CursorStoreError",
    "DecodeError",
    "EventsRemoved",
    "HeadReached",
    "InsertError",
    "InvalidCursor",
    "InvalidEvent",
    "PermissionDenied",
    "RjetError",
    "Stopped",
    "StreamConfigMismatch",
    "StreamError",
    "StreamNotFound",
    "StreamRecreated",
    "Tempted",
    "is_expected",
    "is_permanent",
]


class RjetError(Exception):
    """Root of every error rjet raises on purpose.

    Every rjet error survives pickling with its message, fields and notes (errors cross process
    boundaries in :mod:`rjet.parallel` and in users' own multiprocessing), whatever its constructor.
    """

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.args, dict(vars(self))))


def _rebuild(cls: type[RjetError], args: tuple[object, ...], state: dict[str, object]) -> RjetError:
    err = cls.__new__(cls, *args)
    Exception.__init__(err, *args)
    vars(err).update(state)
    return err


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


class PermissionDenied(RjetError):
    """The server refused a publish or a subscription: the user lacks that permission.

    ``operation`` is ``"publish"`` or ``"subscription"``, ``subject`` the refused subject. See
    docs/reliability.md for the permissions a consumer, an inserter and a Parallel group need.
    """

    def __init__(self, operation: str, subject: str) -> None:
        super().__init__(
            f"permission denied: the server refused {operation} to {subject!r}; grant it to this user"
            " (docs/reliability.md lists what rjet needs)"
        )
        self.operation = operation
        self.subject = subject


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


def _cursor_command(consumer: str | None, namespace: str | None, move: str) -> str:
    """The ``rjet cursor`` command line that moves the cursor; NAME and NS stand for what is unknown."""
    if consumer is None:
        return f"`rjet cursor NAME --namespace {namespace or 'NS'} {move}`"
    # A consumer known without a namespace keeps its cursors in a store of another kind.
    return f"`rjet cursor {consumer}{f' --namespace {namespace}' if namespace else ''} {move}`"


class CursorExpired(CursorError):
    """The events right after the cursor are no longer in the stream (expired or purged).

    ``consumer`` and ``namespace`` name the consumer and its cursor namespace where the raiser knew
    them (the hint then gives the real command line); :meth:`named` fills them in.
    """

    def __init__(
        self,
        stream: str,
        cursor: int,
        first_seq: int,
        hint: str = "",
        *,
        consumer: str | None = None,
        namespace: str | None = None,
    ) -> None:
        move = f"--set first --stream {stream}"
        super().__init__(
            f"stream {stream!r}: cursor {cursor} has expired: the stream's first retained sequence is"
            f" {first_seq}, so events {cursor + 1}..{first_seq - 1} are gone; move the cursor on purpose"
            f" to go on ({hint or _cursor_command(consumer, namespace, move)})"
        )
        self.stream = stream
        self.cursor = cursor
        self.first_seq = first_seq
        self.hint = hint
        self.consumer = consumer
        self.namespace = namespace

    def named(self, consumer: str, namespace: str | None) -> CursorExpired:
        """This error again, naming ``consumer`` (and its cursor ``namespace``) in its hint."""
        return CursorExpired(self.stream, self.cursor, self.first_seq, consumer=consumer, namespace=namespace)


class EventsRemoved(CursorExpired):
    """Events were removed from the stream ahead of a running reader, before it could deliver them.

    ``first``..``last`` is the missing range of stream sequences. Every event before the hole was
    delivered; none after it is. For an unfiltered reader every sequence in the range was an event
    it would have delivered (``certain``); a reader with subject filters knows only that the stream
    removed those sequences while events of its own were waiting (``certain`` is False: some of
    them may have belonged to other subjects). See docs/reliability.md.
    """

    def __init__(
        self,
        stream: str,
        first: int,
        last: int,
        *,
        certain: bool = True,
        hint: str = "",
        consumer: str | None = None,
        namespace: str | None = None,
    ) -> None:
        move = f"--set {last} --stream {stream}"
        CursorError.__init__(
            self,
            f"stream {stream!r}: events {first}..{last} were removed (retention limits, a purge or a delete)"
            f" before this reader got to them"
            + (
                ""
                if certain
                else ", while events for its subject filter were waiting (some may have been other subjects')"
            )
            + f"; every event before {first} was delivered, none after {last}; move the cursor on purpose to go"
            f" on ({hint or _cursor_command(consumer, namespace, move)})",
        )
        self.stream = stream
        self.cursor = first - 1
        self.first_seq = last + 1
        self.first = first
        self.last = last
        self.certain = certain
        self.hint = hint
        self.consumer = consumer
        self.namespace = namespace

    def named(self, consumer: str, namespace: str | None) -> EventsRemoved:
        """This error again, naming ``consumer`` (and its cursor ``namespace``) in its hint."""
        return EventsRemoved(
            self.stream, self.first, self.last, certain=self.certain, consumer=consumer, namespace=namespace
        )


class StreamRecreated(CursorError):
    """The cursor was recorded in another stream of the same name (deleted and created again since).

    ``recorded`` and ``current`` are the two streams' identities (name and creation time);
    ``consumer`` and ``namespace`` as for :class:`CursorExpired`.
    """

    def __init__(
        self,
        stream: str,
        cursor: int,
        recorded: str,
        current: str,
        hint: str = "",
        *,
        consumer: str | None = None,
        namespace: str | None = None,
    ) -> None:
        super().__init__(
            f"stream {stream!r}: cursor {cursor} was recorded in stream {recorded}, but the stream now is"
            f" {current} (deleted and created again): its sequences are not the old ones; move the cursor"
            f" on purpose to go on ({hint or _cursor_command(consumer, namespace, '--set beginning')})"
        )
        self.stream = stream
        self.cursor = cursor
        self.recorded = recorded
        self.current = current
        self.hint = hint
        self.consumer = consumer
        self.namespace = namespace

    def named(self, consumer: str, namespace: str | None) -> StreamRecreated:
        """This error again, naming ``consumer`` (and its cursor ``namespace``) in its hint."""
        return StreamRecreated(
            self.stream, self.cursor, self.recorded, self.current, consumer=consumer, namespace=namespace
        )


class CursorAhead(CursorError):
    """The cursor is past the stream's last sequence (was the stream deleted and created again?).

    ``consumer`` and ``namespace`` as for :class:`CursorExpired`.
    """

    def __init__(
        self, stream: str, cursor: int, last_seq: int, *, consumer: str | None = None, namespace: str | None = None
    ) -> None:
        super().__init__(
            f"stream {stream!r}: cursor {cursor} is past the stream's last sequence {last_seq};"
            f" was the stream recreated? Move the cursor on purpose to go on"
            f" ({_cursor_command(consumer, namespace, '--set beginning')})"
        )
        self.stream = stream
        self.cursor = cursor
        self.last_seq = last_seq
        self.consumer = consumer
        self.namespace = namespace

    def named(self, consumer: str, namespace: str | None) -> CursorAhead:
        """This error again, naming ``consumer`` (and its cursor ``namespace``) in its hint."""
        return CursorAhead(self.stream, self.cursor, self.last_seq, consumer=consumer, namespace=namespace)


class CursorConflict(CursorError):
    """Another runner wrote the cursor since this one read it: two runners share a consumer name."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"cursor {name!r}: {detail}")
        self.name = name


class CursorStoreError(CursorError):
    """The cursor store cannot be read or written."""


class CursorBucketGone(CursorStoreError):
    """The cursor bucket, or a claimed cursor's key in it, vanished while a runner held the claim
    (deleted, or deleted and created again). No other runner was seen: this is not a
    :class:`CursorConflict`. Retrying cannot tell where to go on (starting over would hand the
    whole stream to the handler again), so ``run_forever`` and Parallel shards stop; the message
    names the bucket, the last cursor this runner knew, and the ``rjet cursor ... --set`` that
    goes on from it.

    ``name``: the consumer; ``bucket``; ``cursor``: the last cursor this runner read or wrote
    ("" when unknown); ``stream``: the identity of the stream it counts in (None when unknown).
    """

    def __init__(
        self,
        message: str,
        *,
        name: str = "",
        bucket: str = "",
        namespace: str | None = None,
        cursor: str = "",
        stream: str | None = None,
    ) -> None:
        if name:
            stream_name = stream.partition("@")[0] if stream else "STREAM"
            move = f"--set {cursor} --stream {stream_name}" if cursor else f"--set N --stream {stream_name}"
            message += f"; to go on from where this runner was: {_cursor_command(name, namespace, move)}"
        super().__init__(message)
        self.name = name
        self.bucket = bucket
        self.namespace = namespace
        self.cursor = cursor
        self.stream = stream


class CursorBucketUnusable(CursorStoreError, ConfigError):
    """The cursor bucket exists with a configuration that cannot keep cursors (a TTL would expire them)."""


PERMANENT: tuple[type[RjetError], ...] = (
    CursorConflict,
    CursorExpired,
    CursorAhead,
    StreamRecreated,
    InvalidCursor,
    ConfigError,
    PermissionDenied,
    CursorBucketGone,
)
"""Errors that running again cannot fix: ``run_forever`` raises them, a Parallel shard ends ``failed``
(``fenced`` for :class:`CursorConflict`) instead of being restarted."""


def is_permanent(err: BaseException) -> bool:
    """Whether running again cannot fix ``err`` (see :data:`PERMANENT`)."""
    return isinstance(err, PERMANENT)


def is_expected(err: BaseException) -> bool:
    """Whether ``err`` is part of normal operation (reflex's "expected" errors), not an alarm."""
    return isinstance(err, HeadReached | Stopped | Tempted | asyncio.CancelledError)
