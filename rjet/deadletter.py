"""Dead letters: give up on a poison event after k attempts, record it, and move on.

Reflex retries a failing event forever, which is right for transient failures and wrong for an
event that can never succeed: it blocks its consumer (or its shard, with sharding) for good. With
``Consumer(..., dead_letter=DeadLetter(attempts=5, sink=...))`` an event whose handler fails
``attempts`` times in a row (with backoff between tries) is handed to the sink and the cursor
moves past it. An event whose rjet headers cannot be decoded is recorded the same way. Nothing is
skipped without a record: if the sink fails, ``run`` raises and the cursor stays before the event.
Errors injected by fate (:class:`rjet.Tempted`) are never dead-lettered.

::

    dlq = await DeadLetterStream.create(js, "orders_dlq")
    consumer = Consumer("billing", bill, dead_letter=DeadLetter(attempts=5, sink=dlq))
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

from rjet.errors import ConfigError
from rjet.retry import ATTEMPTS, BACKOFF, MAX_BACKOFF, RetryPolicy

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from rjet.errors import DecodeError
    from rjet.event import Event
    from rjet.stream import Stream

__all__ = ["DeadLetter", "DeadLetterRecord", "DeadLetterSink", "DeadLetterStream", "StoredDeadLetter"]

log = logging.getLogger("rjet.deadletter")


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """An event a consumer gave up on, and why.

    ``event`` is None when the stored message could not be decoded into an event.
    """

    consumer: str
    stream: str
    event_id: str
    event: Event | None
    error: str
    attempts: int
    at: datetime

    def to_json(self, max_size: int | None = None) -> bytes:
        """The record as JSON, the event's metadata base64-encoded.

        With ``max_size``, a record that would be larger leaves the metadata out
        (``"metadata": null, "metadata_omitted": <its size>``: the original is still in ``stream`` at
        sequence ``event_id``) and, if that is not enough, cuts the error message, so that a record
        always fits where it is stored.
        """
        e = self.event
        body: dict[str, Any] = {
            "consumer": self.consumer,
            "stream": self.stream,
            "event_id": self.event_id,
            "type": e.type if e else None,
            "foreign_id": e.foreign_id if e else None,
            "timestamp": e.timestamp.isoformat() if e else None,
            "metadata": base64.b64encode(e.metadata).decode() if e else None,
            "error": self.error,
            "attempts": self.attempts,
            "at": self.at.isoformat(),
        }
        out = json.dumps(body).encode()
        if max_size is None or len(out) <= max_size:
            return out
        if e is not None:
            body["metadata"] = None
            body["metadata_omitted"] = len(e.metadata)
            out = json.dumps(body).encode()
        if len(out) > max_size:
            over = len(out) - max_size + len(" [cut]")
            body["error"] = self.error[: max(0, len(self.error) - over)] + " [cut]"
            out = json.dumps(body).encode()
        return out

    @classmethod
    def from_json(cls, data: bytes | str) -> DeadLetterRecord:
        """The record :meth:`to_json` wrote; ``ValueError`` for anything else. A record stored without
        its metadata comes back with empty metadata (:class:`StoredDeadLetter` says how much was left out)."""
        return _parse_record(data)[0]


DeadLetterSink: TypeAlias = Callable[[DeadLetterRecord], Awaitable[None]]
"""``await sink(record)`` stores a dead letter; raising means it was not stored."""


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """Try a failing event ``attempts`` times (``backoff`` seconds between tries, doubling up to
    ``max_backoff``: the :class:`rjet.RetryPolicy` defaults), then hand it to ``sink`` and move on.

    A consumer given a ``retry`` policy as well takes ``attempts``, ``backoff`` and ``max_backoff``
    from that policy."""

    sink: DeadLetterSink
    attempts: int = ATTEMPTS
    backoff: float = BACKOFF
    max_backoff: float = MAX_BACKOFF

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"DeadLetter: attempts must be >= 1, not {self.attempts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ConfigError("DeadLetter: backoff and max_backoff must be >= 0")
        if not callable(self.sink):
            raise ConfigError(f"DeadLetter: sink {self.sink!r} is not callable")

    @property
    def retry(self) -> RetryPolicy:
        """Its attempts and backoff, as a :class:`rjet.RetryPolicy`."""
        return RetryPolicy(self.backoff, self.max_backoff, self.attempts)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return self.retry.delay(attempt)


class DeadLetterStream:
    """A sink that stores dead letters as events in a JetStream stream.

    Each record is an rjet event with the original foreign ID and type, and the record's JSON
    (:meth:`DeadLetterRecord.to_json`) as metadata, so the stream can be read, inspected and
    replayed with rjet itself. ``recorded`` counts what this sink stored.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.recorded = 0

    @classmethod
    async def create(cls, js: JetStreamContext, name: str, **overrides: Any) -> DeadLetterStream:
        """Create (or bind) the dead-letter stream ``name`` with rjet's stream defaults."""
        from rjet.stream import Stream

        return cls(await Stream.create(js, name, **overrides))

    async def __call__(self, record: DeadLetterRecord) -> None:
        """Store ``record``; raises when the stream does not acknowledge it."""
        from rjet._nats.client import connection
        from rjet._nats.frames import encode_header_block

        fid = record.event.foreign_id if record.event else f"{record.stream}:{record.event_id}"
        typ = record.event.type if record.event else 0
        msg_id = f"{record.consumer}:{record.event_id}"
        # The record must fit a message whatever the event's size, or the consumer could never move on.
        room = connection(self.stream.js).max_payload - len(encode_header_block(fid, typ, msg_id))
        await self.stream.insert(fid, typ, record.to_json(room), msg_id=msg_id)
        self.recorded += 1

    async def get(self, seq: int) -> StoredDeadLetter | None:
        """The dead letter stored at sequence ``seq``, None when there is none (never stored, or
        removed since). :class:`rjet.StreamNotFound` when the stream does not exist,
        :class:`rjet.DecodeError` when the message there is not a dead-letter record."""
        import nats.js.errors

        from rjet._nats.denials import guard_api
        from rjet.errors import StreamNotFound

        js, name = self.stream.js, self.stream.name
        try:
            msg = await guard_api(js, name, js.get_msg(name, seq))
        except nats.js.errors.NotFoundError as e:
            if e.err_code == _STREAM_NOT_FOUND:
                raise StreamNotFound(name) from None
            return None
        return StoredDeadLetter.parse(name, seq, msg.data or b"")

    async def records(
        self, after: int = 0, *, on_invalid: Callable[[DecodeError], None] | None = None
    ) -> AsyncGenerator[StoredDeadLetter, None]:
        """The dead letters stored after sequence ``after`` (from the first one still there), in
        order, up to the last one present when reading starts.

        A message that is not a dead-letter record (not an rjet event, or not a record's JSON) raises
        :class:`rjet.DecodeError`; given ``on_invalid``, it is handed the error instead and reading goes
        on. Records removed from this stream (its limits, a purge) are passed over.
        """
        import dataclasses as dc

        from rjet.errors import DecodeError, HeadReached
        from rjet.stream import Stream

        state = (await self.stream.info()).state
        if not state.messages or after >= state.last_seq:
            return
        after = max(after, state.first_seq - 1)
        view = Stream(self.stream.js, self.stream.name, read=dc.replace(self.stream.read, on_removed="skip"))
        async with await view.stream(str(after) if after else "", to_head=True) as client:
            while True:
                try:
                    event = await client.recv()
                except HeadReached:
                    return
                except DecodeError as e:
                    if on_invalid is None:
                        raise
                    on_invalid(e)  # the reader has passed it
                    continue
                try:
                    letter = StoredDeadLetter.parse(self.stream.name, event.id_int, event.metadata)
                except DecodeError as e:
                    if on_invalid is None:
                        raise
                    on_invalid(e)
                    continue
                yield letter


def record_for(
    consumer: str, stream: str, event_id: str, event: Event | None, error: BaseException, attempts: int
) -> DeadLetterRecord:
    """A :class:`DeadLetterRecord` for ``error`` on ``event``, stamped now."""
    return DeadLetterRecord(
        consumer, stream, event_id, event, f"{type(error).__name__}: {error}", attempts, datetime.now(UTC)
    )


_STREAM_NOT_FOUND = 10059  # JetStream's error code for "stream not found" (10037 is "no message found")


@dataclasses.dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter read back from a :class:`DeadLetterStream`: its sequence there and its record.

    ``metadata_omitted`` is the size of the event's metadata when the record was stored without it
    (it did not fit a message): the record's event then has empty metadata, and the original is
    still in the source stream at sequence ``record.event_id`` unless removed since. None otherwise.
    """

    seq: int
    record: DeadLetterRecord
    metadata_omitted: int | None = None

    @property
    def removed(self) -> tuple[int, int] | None:
        """``(first, last)`` when the record stands for a range of events removed from the source
        stream before the consumer read them (``event_id`` ``first..last``), else None."""
        first, sep, last = self.record.event_id.partition("..")
        return (int(first), int(last)) if sep else None

    @property
    def source_seq(self) -> int | None:
        """The event's sequence in the source stream (None for a removed range)."""
        return None if self.removed else int(self.record.event_id)

    def to_dict(self) -> dict[str, Any]:
        """The stored record as a JSON-ready dict (:meth:`DeadLetterRecord.to_json`'s fields), after
        ``"seq"`` (this sequence), with ``"metadata": null`` and ``"metadata_omitted"`` when left out."""
        body: dict[str, Any] = {"seq": self.seq, **json.loads(self.record.to_json())}
        if self.metadata_omitted is not None:
            body["metadata"] = None
            body["metadata_omitted"] = self.metadata_omitted
        return body

    @classmethod
    def parse(cls, stream: str, seq: int, data: bytes | str) -> StoredDeadLetter:
        """The dead letter stored at ``seq`` of ``stream`` with body ``data``;
        :class:`rjet.DecodeError` naming the message when ``data`` is not a dead-letter record."""
        from rjet.errors import DecodeError

        try:
            record, omitted = _parse_record(data)
            letter = cls(seq, record, omitted)
            letter.source_seq  # noqa: B018 (checks event_id: a sequence or a range)
        except ValueError as e:
            raise DecodeError(stream, seq, f"not a dead-letter record ({e})") from None
        return letter


def _parse_record(data: bytes | str) -> tuple[DeadLetterRecord, int | None]:
    """(record, size of the metadata left out or None) from :meth:`DeadLetterRecord.to_json`'s output."""
    from rjet.event import Event

    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")

    def field(key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        value = body.get(key)
        if (value is None and optional) or (isinstance(value, kind) and not isinstance(value, bool)):
            return value
        raise ValueError(f"{key!r} is {value!r}")

    try:
        event = None
        if field("type", int, optional=True) is not None:
            metadata = field("metadata", str, optional=True)
            omitted = field("metadata_omitted", int, optional=True)
            if metadata is None and omitted is None:
                raise ValueError("'metadata' is None")
            event = Event(
                field("event_id", str),
                body["type"],
                field("foreign_id", str),
                datetime.fromisoformat(field("timestamp", str)),
                base64.b64decode(metadata, validate=True) if metadata is not None else b"",
            )
        at = datetime.fromisoformat(field("at", str))
        record = DeadLetterRecord(
            field("consumer", str), field("stream", str), field("event_id", str), event, field("error", str),
            field("attempts", int), at,
        )  # fmt: skip
    except (ValueError, TypeError, binascii.Error) as e:
        raise ValueError(str(e)) from None
    return record, (body.get("metadata_omitted") if event is not None and body.get("metadata") is None else None)
