"""The stream client: an ordered reader over an ephemeral JetStream pull consumer.

How it stays ordered and loses nothing:

- It creates an ephemeral consumer (AckPolicy NONE, memory storage) starting right after the last
  stream sequence it took, and feeds it explicit pull requests (``CONSUMER.MSG.NEXT``) into one
  callback subscription, keeping at most ``max_buffered`` messages requested or held.
- Each message's reply subject gives its stream sequence, consumer sequence, stored time and the
  consumer's remaining count; both reply-subject forms (9-token v1, 11/12-token v2) are parsed.
- Duplicates are dropped by STREAM sequence (never by consumer sequence, which restarts at 1 with a
  new consumer). A consumer-sequence jump inside one consumer means a message was lost in transit:
  the client recovers, which is always the same move: a new consumer from ``last + 1``.
- Pull requests carry idle heartbeats; no traffic for three heartbeats while a pull is open (server
  restart, consumer deleted or reaped, connection cut), a 409/503 status, or a gap all trigger
  recovery. Recovery re-checks the stream first, so events that expired meanwhile raise
  :class:`CursorExpired` instead of being skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import nats.errors
import nats.js.errors
from nats.js import api
from nats.nuid import NUID

from rjet.errors import (
    ConfigError,
    ConsumerLost,
    CursorAhead,
    CursorExpired,
    HeadReached,
    RjetError,
    Stopped,
    StreamNotFound,
)
from rjet.event import (
    FOREIGN_ID_HEADER,
    TYPE_HEADER,
    Event,
    decode_foreign_id,
    decode_type,
    timestamp_from_ns,
)

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

__all__ = ["ReadConfig", "StreamClient", "parse_ack"]

log = logging.getLogger("rjet.stream")

_NS: Final = 1_000_000_000
_STATUS: Final = "Status"
_DESCRIPTION: Final = "Description"
_PENDING_MSGS: Final = "Nats-Pending-Messages"
_FINAL_ERRORS: Final = (StreamNotFound, CursorExpired, CursorAhead)


@dataclasses.dataclass(frozen=True, slots=True)
class ReadConfig:
    """How a stream client reads. The defaults suit most consumers.

    - ``batch``: messages asked for in one pull request.
    - ``max_buffered``: messages requested or held client-side at most (bounds memory).
    - ``heartbeat``: the server's idle heartbeat on open pull requests, in seconds; three missed in a
      row make the client recreate its consumer.
    - ``expires``: lifetime of one pull request, in seconds.
    - ``inactive_threshold``: the server deletes the ephemeral consumer after this many idle seconds.
    - ``recover_timeout``: how long the client keeps trying to recreate a lost consumer (server down,
      connection cut) before ``recv()`` raises :class:`rjet.ConsumerLost`.
    """

    batch: int = 1000
    max_buffered: int = 4000
    heartbeat: float = 1.0
    expires: float = 30.0
    inactive_threshold: float = 60.0
    recover_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.batch < 1 or self.max_buffered < self.batch:
            raise ConfigError(f"ReadConfig: need 1 <= batch <= max_buffered, got {self.batch}, {self.max_buffered}")
        if not 0 < self.heartbeat * 2 <= self.expires:
            raise ConfigError(f"ReadConfig: need 0 < 2 * heartbeat <= expires, got {self.heartbeat}, {self.expires}")
        if self.inactive_threshold <= 0 or self.recover_timeout <= 0:
            raise ConfigError("ReadConfig: inactive_threshold and recover_timeout must be > 0")


def parse_ack(reply: str) -> tuple[str, int, int, int, int] | None:
    """(consumer, stream seq, consumer seq, stored time ns, pending) from a JetStream reply subject.

    v1: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`` (9 tokens);
    v2: ``$JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.<rand>]``.
    None for anything else.
    """
    t = reply.split(".")
    n = len(t)
    if n == 9:
        b = 2
    elif n in (11, 12):
        b = 4
    else:
        return None
    if t[0] != "$JS" or t[1] != "ACK":
        return None
    try:
        return t[b + 1], int(t[b + 3]), int(t[b + 4]), int(t[b + 5]), int(t[b + 6])
    except ValueError:
        return None


class StreamClient:
    """Delivers a stream's events in stream order; open it with :meth:`rjet.Stream.stream`.

    ``await client.recv()`` returns the next :class:`rjet.Event`; ``async for`` iterates (and ends
    cleanly at the head with ``to_head``); ``async with`` closes it. ``num_pending`` is the
    server's count of events not yet delivered (a free lag figure).
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        *,
        after: int,
        from_head: bool,
        to_head: bool,
        filter_subjects: tuple[str, ...],
        config: ReadConfig,
    ) -> None:
        self.stream = stream
        self._js = js
        self._nc = js._nc
        self._cfg = config
        self._after = after
        self._from_head = from_head
        self._to_head = to_head
        self._filters = filter_subjects
        self._low = max(1, config.batch // 2)
        self._loop = asyncio.get_running_loop()
        # (stream sequence, stored time in ns, message), in stream order.
        self._buf: deque[tuple[int, int, Msg]] = deque()
        self._last = after  # highest stream sequence taken into the buffer
        self._head = 0
        self._caught_up = False
        self._inbox = self._nc.new_inbox()
        self._gen = 0
        self._deliver = ""  # reply subject of the current consumer's pull requests
        self._consumer: str | None = None
        self._next_subject = ""
        self._cseq = 0
        self._pending = 0  # messages asked for and neither received nor expired
        self._activity = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._sub: Subscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._nuid = NUID()
        self.num_pending = 0
        self.recoveries = 0

    # ----------------------------------------------------------------- the hot path

    async def recv(self) -> Event:
        """The next event in stream order; waits for one.

        Raises :class:`rjet.HeadReached` (``to_head``), :class:`rjet.Stopped` after :meth:`close`,
        or the stream error that ended the client.
        """
        while True:
            buf = self._buf
            if buf:
                sseq, ts, msg = buf[0]
                if self._to_head and sseq > self._head:
                    raise HeadReached(self.stream, self._head)
                buf.popleft()
                if self._pending <= self._low:
                    await self._pull()
                return self._decode(sseq, ts, msg)
            if self._error is not None:
                raise self._error
            if self._closed:
                raise Stopped(f"stream {self.stream!r}: the stream client is closed")
            if self._to_head and (self._caught_up or self._last >= self._head):
                raise HeadReached(self.stream, self._head)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _on_msg(self, msg: Msg) -> None:
        reply = msg.reply
        if not reply:
            return await self._on_status(msg)
        ack = parse_ack(reply)
        if ack is None or ack[0] != self._consumer:
            return  # not a JetStream delivery, or left over from an earlier consumer of this client
        _, sseq, cseq, ts, pending = ack
        self._activity = self._loop.time()
        self._pending -= 1
        if cseq != self._cseq + 1:
            return self._recover(f"consumer sequence jumped from {self._cseq} to {cseq}")
        self._cseq = cseq
        if sseq > self._last:
            self._last = sseq
            self.num_pending = pending
            if pending == 0:
                self._caught_up = True
            self._buf.append((sseq, ts, msg))
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        if self._pending <= self._low:
            await self._pull()

    def _decode(self, sseq: int, ts: int, msg: Msg) -> Event:
        hdr = msg.headers
        if hdr:
            typ = decode_type(hdr.get(TYPE_HEADER), self.stream, sseq)
            fid = hdr.get(FOREIGN_ID_HEADER)
            fid = msg.subject if fid is None else decode_foreign_id(fid, self.stream, sseq)
        else:
            typ, fid = 0, msg.subject
        return Event(str(sseq), typ, fid, timestamp_from_ns(ts), msg.data)

    async def _pull(self) -> None:
        room = self._cfg.max_buffered - len(self._buf) - self._pending
        if self._consumer is None or self._closed or room < self._low:
            return
        want = min(room, self._cfg.batch)
        self._pending += want
        req = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (
            want,
            int(self._cfg.expires * _NS),
            int(self._cfg.heartbeat * _NS),
        )
        await self._nc.publish(self._next_subject, req, reply=self._deliver)

    # ----------------------------------------------------------------- status and recovery

    async def _on_status(self, msg: Msg) -> None:
        if msg.subject != self._deliver:
            return
        self._activity = self._loop.time()
        hdr = msg.headers or {}
        code = hdr.get(_STATUS)
        if code == "100":  # idle heartbeat
            return
        left = hdr.get(_PENDING_MSGS)
        if code == "408" and left is not None:  # a pull request expired with `left` unfilled
            self._pending = max(0, self._pending - int(left))
            await self._pull()
            return
        self._recover(f"status {code} {hdr.get(_DESCRIPTION, '')!r} from the server".strip())

    def _recover(self, reason: str) -> None:
        if self._recovery is None and not self._closed and self._error is None:
            self._consumer = None
            self._deliver = ""
            self._recovery = asyncio.create_task(self._recover_loop(reason))

    async def _recover_loop(self, reason: str) -> None:
        self.recoveries += 1
        log.info("stream %r: recreating the consumer after sequence %d: %s", self.stream, self._last, reason)
        deadline = self._loop.time() + self._cfg.recover_timeout
        delay = 0.05
        try:
            while not self._closed:
                try:
                    info = await self._stream_info()
                    self._check_cursor(info.state, self._last)
                    await self._create_consumer()
                    await self._pull()
                    return
                except _FINAL_ERRORS as e:
                    return self._fail(e)
                except (nats.errors.Error, TimeoutError, OSError, nats.js.errors.Error) as e:
                    if self._nc.is_closed:
                        return self._fail(Stopped(f"stream {self.stream!r}: the NATS connection is closed"))
                    if self._loop.time() > deadline:
                        return self._fail(
                            ConsumerLost(
                                f"stream {self.stream!r}: could not recreate the consumer after sequence"
                                f" {self._last} within {self._cfg.recover_timeout}s ({reason}; last error:"
                                f" {e!r})",
                                stream=self.stream,
                            )
                        )
                    log.warning("stream %r: recreating the consumer failed (%r); retrying", self.stream, e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
        finally:
            self._recovery = None

    async def _watch(self) -> None:
        hb = self._cfg.heartbeat
        while not self._closed:
            await asyncio.sleep(hb)
            if self._nc.is_closed:
                return self._fail(Stopped(f"stream {self.stream!r}: the NATS connection is closed"))
            if self._recovery is not None or self._consumer is None:
                continue
            if self._pending > 0 and self._loop.time() - self._activity > 3 * hb:
                self._recover(f"no message or heartbeat for {3 * hb:g}s")
            elif self._pending == 0:
                await self._pull()

    def _fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ----------------------------------------------------------------- set-up

    async def _stream_info(self) -> api.StreamInfo:
        try:
            return await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            raise StreamNotFound(self.stream) from None
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            raise StreamNotFound(self.stream, "JetStream is not enabled on the server") from None

    def _check_cursor(self, state: api.StreamState, after: int) -> None:
        if after > state.last_seq:
            raise CursorAhead(self.stream, after, state.last_seq)
        if after and after + 1 < state.first_seq:
            raise CursorExpired(self.stream, after, state.first_seq)

    async def _create_consumer(self) -> None:
        self._gen += 1
        self._deliver = f"{self._inbox}.{self._gen}"
        self._consumer = None
        self._cseq = 0
        self._pending = 0
        config = api.ConsumerConfig(
            name=self._nuid.next().decode(),
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self._last + 1,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=self._cfg.inactive_threshold,
            mem_storage=True,
            num_replicas=1,
            max_waiting=16,
        )
        if len(self._filters) == 1:
            config.filter_subject = self._filters[0]
        elif self._filters:
            config.filter_subjects = list(self._filters)
        info = await self._js.add_consumer(self.stream, config)
        if info.num_pending == 0:
            self._caught_up = True
        self.num_pending = info.num_pending or 0
        self._activity = self._loop.time()
        self._consumer = info.name
        self._next_subject = f"{self._js._prefix}.CONSUMER.MSG.NEXT.{self.stream}.{info.name}"

    async def _open(self) -> None:
        info = await self._stream_info()
        state = info.state
        if self._from_head:
            self._last = state.last_seq
        else:
            self._check_cursor(state, self._after)
        self._head = state.last_seq
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_msg)
        try:
            await self._create_consumer()
            await self._pull()
        except nats.js.errors.APIError as e:
            await self.close()
            raise RjetError(f"stream {self.stream!r}: cannot create a consumer: {e.description}") from e
        except BaseException:
            await self.close()
            raise
        self._watchdog = asyncio.create_task(self._watch())

    # ----------------------------------------------------------------- lifecycle

    @property
    def last_sequence(self) -> int:
        """The highest stream sequence this client has taken from the server (delivered or buffered)."""
        return self._last

    @property
    def head(self) -> int:
        """The stream's last sequence when the client opened."""
        return self._head

    async def close(self) -> None:
        """Stop reading and delete the server-side consumer. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in (self._watchdog, self._recovery):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        consumer, self._consumer = self._consumer, None
        if self._nc.is_closed:
            return
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        if consumer is not None:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await self._nc.request(f"{self._js._prefix}.CONSUMER.DELETE.{self.stream}.{consumer}", b"", timeout=1.0)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.recv()
        except HeadReached:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
