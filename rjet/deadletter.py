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
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

from rjet.errors import ConfigError
from rjet.retry import ATTEMPTS, BACKOFF, MAX_BACKOFF, RetryPolicy

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from rjet.event import Event
    from rjet.stream import Stream

__all__ = ["DeadLetter", "DeadLetterRecord", "DeadLetterSink", "DeadLetterStream"]

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
        from rjet._frames import encode_header_block
        from rjet._natsio import connection

        fid = record.event.foreign_id if record.event else f"{record.stream}:{record.event_id}"
        typ = record.event.type if record.event else 0
        msg_id = f"{record.consumer}:{record.event_id}"
        # The record must fit a message whatever the event's size, or the consumer could never move on.
        room = connection(self.stream.js).max_payload - len(encode_header_block(fid, typ, msg_id))
        await self.stream.insert(fid, typ, record.to_json(room), msg_id=msg_id)
        self.recorded += 1


def record_for(
    consumer: str, stream: str, event_id: str, event: Event | None, error: BaseException, attempts: int
) -> DeadLetterRecord:
    """A :class:`DeadLetterRecord` for ``error`` on ``event``, stamped now."""
    return DeadLetterRecord(
        consumer, stream, event_id, event, f"{type(error).__name__}: {error}", attempts, datetime.now(UTC)
    )
