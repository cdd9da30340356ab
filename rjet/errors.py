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


def _go_on(consumer: str | None, namespace: str | None, where: str, cursors: str | None = None) -> str:
    """What to do about a cursor that cannot go on by itself, in library terms: move it on purpose,
    ``where`` (the command line renders the same move as an ``rjet cursor`` hint from the fields)."""
    whose = ""
    if consumer is not None:
        whose = f" of consumer {consumer!r}"
        if namespace:
            whose += f" (cursor namespace {namespace!r})"
        elif cursors:
            whose += f" (cursors in {cursors})"
    return f"move the cursor{whose} on purpose to go on: {where}"


class CursorExpired(CursorError):
    """The events right after the cursor are no longer in the stream (expired or purged).

    The fields say what happened and which move goes on: ``stream`` (its name), ``cursor``,
    ``first_seq`` (the stream's first retained sequence), ``move`` (``"first"``: the cursor moved on
    purpose to just before the first retained event; what :func:`rjet.parallel.admin.set_cursor`
    and ``rjet cursor --set`` take), and ``consumer`` and ``namespace``, the consumer and its cursor
    namespace where the raiser knew them (:meth:`named` fills them in; ``namespace`` stays None for
    a store without one), or ``cursors``, the URL of the SQL store that keeps the cursor, its
    password left out (:attr:`rjet.sql.SqlCursorStore.cursors_url`). The message says it in words;
    the ``rjet`` command line renders the move as a hint, ``rjet cursor NAME --namespace NS --set
    first --stream STREAM`` (``--cursors URL`` for an SQL store). ``hint``: more advice from the
    raiser, added to the message.
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
        cursors: str | None = None,
    ) -> None:
        go_on = _go_on(consumer, namespace, f"to the first retained event, sequence {first_seq}", cursors)
        super().__init__(
            f"stream {stream!r}: cursor {cursor} has expired: the stream's first retained sequence is"
            f" {first_seq}, so events {cursor + 1}..{first_seq - 1} are gone; {go_on}" + (f" ({hint})" if hint else "")
        )
        self.stream = stream
        self.cursor = cursor
        self.first_seq = first_seq
        self.hint = hint
        self.consumer = consumer
        self.namespace = namespace
        self.cursors = cursors
        self.move = "first"

    def named(self, consumer: str, namespace: str | None, cursors: str | None = None) -> CursorExpired:
        """This error again, naming ``consumer`` (and its cursor ``namespace``, or the URL ``cursors``
        of the SQL store that keeps its cursor)."""
        return CursorExpired(
            self.stream, self.cursor, self.first_seq, consumer=consumer, namespace=namespace, cursors=cursors
        )


class EventsRemoved(CursorExpired):
    """Events were removed from the stream ahead of a running reader, before it could deliver them.

    ``first``..``last`` is the missing range of stream sequences. Every event before the hole was
    delivered; none after it is. For an unfiltered reader every sequence in the range was an event
    it would have delivered (``certain``); a reader with subject filters knows only that the stream
    removed those sequences while events of its own were waiting (``certain`` is False: some of
    them may have belonged to other subjects). See docs/reliability.md.

    ``move`` is ``str(last)``: the cursor moved on purpose past the hole goes on (command line:
    ``rjet cursor NAME --namespace NS --set LAST --stream STREAM``); the other fields as for
    :class:`CursorExpired`.
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
        cursors: str | None = None,
    ) -> None:
        go_on = _go_on(consumer, namespace, f"to sequence {last}, past the removed events", cursors)
        CursorError.__init__(
            self,
            f"stream {stream!r}: events {first}..{last} were removed (retention limits, a purge or a delete)"
            f" before this reader got to them"
            + (
                ""
                if certain
                else ", while events for its subject filter were waiting (some may have been other subjects')"
            )
            + f"; every event before {first} was delivered, none after {last}; {go_on}"
            + (f" ({hint})" if hint else ""),
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
        self.cursors = cursors
        self.move = str(last)

    def named(self, consumer: str, namespace: str | None, cursors: str | None = None) -> EventsRemoved:
        """This error again, naming ``consumer`` (and its cursor ``namespace``, or the URL ``cursors``
        of the SQL store that keeps its cursor)."""
        return EventsRemoved(
            self.stream,
            self.first,
            self.last,
            certain=self.certain,
            consumer=consumer,
            namespace=namespace,
            cursors=cursors,
        )


class StreamRecreated(CursorError):
    """The cursor was recorded in another stream of the same name (deleted and created again since).

    ``recorded`` and ``current`` are the two streams' identities (name and creation time); ``move``
    is ``"beginning"`` (no cursor: the new stream from its first event; command line: ``rjet cursor
    NAME --namespace NS --set beginning``); the other fields as for :class:`CursorExpired`.
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
        cursors: str | None = None,
    ) -> None:
        where = "to the beginning (no cursor: the new stream from its first event)"
        super().__init__(
            f"stream {stream!r}: cursor {cursor} was recorded in stream {recorded}, but the stream now is"
            f" {current} (deleted and created again): its sequences are not the old ones;"
            f" {_go_on(consumer, namespace, where, cursors)}" + (f" ({hint})" if hint else "")
        )
        self.stream = stream
        self.cursor = cursor
        self.recorded = recorded
        self.current = current
        self.hint = hint
        self.consumer = consumer
        self.namespace = namespace
        self.cursors = cursors
        self.move = "beginning"

    def named(self, consumer: str, namespace: str | None, cursors: str | None = None) -> StreamRecreated:
        """This error again, naming ``consumer`` (and its cursor ``namespace``, or the URL ``cursors``
        of the SQL store that keeps its cursor)."""
        return StreamRecreated(
            self.stream,
            self.cursor,
            self.recorded,
            self.current,
            consumer=consumer,
            namespace=namespace,
            cursors=cursors,
        )


class CursorAhead(CursorError):
    """The cursor is past the stream's last sequence (was the stream deleted and created again?).

    ``last_seq`` is the stream's last sequence; ``move`` is ``"beginning"`` (no cursor; command line:
    ``rjet cursor NAME --namespace NS --set beginning``); the other fields as for :class:`CursorExpired`.
    """

    def __init__(
        self,
        stream: str,
        cursor: int,
        last_seq: int,
        *,
        consumer: str | None = None,
        namespace: str | None = None,
        cursors: str | None = None,
    ) -> None:
        where = "to the beginning (no cursor: the stream from its first event)"
        super().__init__(
            f"stream {stream!r}: cursor {cursor} is past the stream's last sequence {last_seq};"
            f" was the stream recreated? M{_go_on(consumer, namespace, where, cursors)[1:]}"
        )
        self.stream = stream
        self.cursor = cursor
        self.last_seq = last_seq
        self.consumer = consumer
        self.namespace = namespace
        self.cursors = cursors
        self.move = "beginning"

    def named(self, consumer: str, namespace: str | None, cursors: str | None = None) -> CursorAhead:
        """This error again, naming ``consumer`` (and its cursor ``namespace``, or the URL ``cursors``
        of the SQL store that keeps its cursor)."""
        return CursorAhead(
            self.stream, self.cursor, self.last_seq, consumer=consumer, namespace=namespace, cursors=cursors
        )


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
    names the bucket and the last cursor this runner knew, and says to move the cursor there on
    purpose to go on.

    ``name``: the consumer; ``bucket``: where the store keeps it (a bucket, a database);
    ``namespace``: its cursor namespace (None for a store without one); ``cursor``: the last cursor
    this runner read or wrote ("" when unknown); ``stream``: the identity of the stream it counts in
    (None when unknown); ``move``: the move that goes on from there, ``cursor`` ("" when unknown).
    The ``rjet`` command line renders it as a hint, ``rjet cursor NAME --namespace NS --set CURSOR
    --stream STREAM``.
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
            stream_name = f" of stream {stream.partition('@')[0]!r}" if stream else ""
            where = (
                f"to sequence {cursor}{stream_name}, where this runner was"
                if cursor
                else f"to the last event this runner handled{stream_name}"
            )
            message += f"; {_go_on(name, namespace, where)}"
        super().__init__(message)
        self.name = name
        self.bucket = bucket
        self.namespace = namespace
        self.cursor = cursor
        self.stream = stream
        self.move = cursor


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
