"""Run: reflex's consume loop. Get the cursor, stream after it, handle, advance, flush on exit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Final, NoReturn, Protocol, cast

from rjet._keyed import Abort, KeyedRun
from rjet._progress import Progress, decode_done
from rjet.consumer import Consumer
from rjet.cursors import (
    Claim,
    CursorStore,
    TransactionalClaim,
    capabilities,
    claim_cursor,
    runner_id,
)
from rjet.deadletter import DeadLetter, DeadLetterRecord, record_for
from rjet.errors import (
    PERMANENT,
    ConfigError,
    CursorAhead,
    CursorError,
    CursorExpired,
    DecodeError,
    EventsRemoved,
    HeadReached,
    InvalidCursor,
    Stopped,
    StreamRecreated,
    Tempted,
    is_expected,
)
from rjet.event import Event
from rjet.stats import ConsumerStats, ReaderCounts
from rjet.stream import parse_cursor

__all__ = ["Spec", "StreamClientLike", "StreamFunc", "run", "run_forever"]

log = logging.getLogger("rjet.run")

_YIELD_EVERY: Final = 0.01  # seconds of back-to-back events before run yields to the event loop


class StreamClientLike(Protocol):
    """What ``run`` needs from a stream client: :class:`rjet.StreamClient` and
    :class:`rjet.testing.MemoryStreamClient` are ones. ``run`` uses every member, whatever the class;
    a client of your own with nothing more to say than ``recv`` and ``close`` gives the rest as
    the defaults below say.

    - ``stream``: the stream's name, for dead letters and log records (default ``""``).
    - ``stream_id``: which stream it reads (:attr:`rjet.StreamClient.stream_id`), recorded with every
      cursor written from then on (default ``None``: cursors keep the stream they recorded).
    - ``key_filter``: the foreign-ID filter the client applies itself; when it is the consumer's own,
      ``run`` does not filter by key again (default ``None``: ``run`` applies the consumer's).
    - ``next_or_skip()``: the next event, or a position the client passed over (an int: the cursor
      moves there), or a range removed under ``on_removed="skip"`` (default ``return await self.recv()``).
    - ``take(limit)``: up to ``limit`` events ready now, without waiting (default ``return []``).
    """

    @property
    def stream(self) -> str: ...

    @property
    def stream_id(self) -> str | None: ...

    @property
    def key_filter(self) -> Callable[[str], bool] | None: ...

    async def recv(self) -> Event: ...

    async def next_or_skip(self) -> Event | int | EventsRemoved: ...

    def take(self, limit: int) -> list[Event]: ...

    async def close(self) -> None: ...


class StreamFunc(Protocol):
    """``await stream_func(after, from_head=..., to_head=..., key_filter=..., stream_id=...)`` opens a
    stream client. :meth:`rjet.Stream.stream` is one.

    ``run`` always passes ``key_filter`` (the consumer's, or None) and ``stream_id`` (the stream the
    cursor was recorded in, or None), so a stream function must take both; one that has no use for
    them takes ``**kwargs`` (a client that does not apply the key filter says so with its own
    ``key_filter`` None, and ``run`` filters by key itself). One that does not take them is a
    :class:`rjet.ConfigError`.
    """

    async def __call__(
        self,
        after: str = "",
        *,
        from_head: bool = False,
        to_head: bool = False,
        key_filter: Callable[[str], bool] | None = None,
        stream_id: str | None = None,
    ) -> StreamClientLike: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Spec:
    """What ``run`` runs: a stream function, a cursor store and a consumer.

    ``from_head`` ignores the stored cursor and handles only new events; ``to_head`` makes ``run``
    raise :class:`rjet.HeadReached` once the events present at start are handled; ``lag`` (seconds or
    a timedelta) delivers only events older than that.
    """

    stream_func: StreamFunc
    cursor_store: CursorStore
    consumer: Consumer
    _: dataclasses.KW_ONLY
    from_head: bool = False
    to_head: bool = False
    lag: timedelta | float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.consumer, Consumer):
            raise ConfigError(f"Spec: consumer must be an rjet.Consumer, not {self.consumer!r}")
        lag = self.lag.total_seconds() if isinstance(self.lag, timedelta) else self.lag
        if lag is not None and lag < 0:
            raise ConfigError(f"Spec: lag must be >= 0, not {self.lag!r}")


async def run(spec: Spec, *, stats: ConsumerStats | None = None, stop: asyncio.Event | None = None) -> NoReturn:
    """Consume ``spec``'s stream after the consumer's cursor until something stops it.

    The cursor advances after each handled (or filtered) event and never past one whose handler
    failed. ``run`` never returns normally: it raises the handler's error, a stream error,
    :class:`rjet.HeadReached` (``to_head``), :class:`rjet.Stopped` once ``stop`` is set, or
    ``CancelledError``; it flushes the cursor store on the way out in every case. ``stats``
    (optional) is kept up to date as events go by.

    ``stop`` is the graceful way out: setting it stops reading, lets the handler call in flight
    finish and its cursor advance, flushes, and raises :class:`rjet.Stopped`. (Cancelling the task
    interrupts the handler wherever it awaits.)
    """
    stats = stats or ConsumerStats(spec.consumer.name)
    if not stats.name:  # ConsumerStats() without a name: it is this consumer's
        stats.name = spec.consumer.name
    await _run(spec, stats, stop)


@dataclasses.dataclass(slots=True)
class _Rerun:
    """What one run of ``run_forever`` leaves the next: the runner's identity (one for every run, so
    that a claim written by a request whose answer was lost is still known as its own), whether a
    claim was ever known held (from then on the cursor is claimed again only while the stored
    record is still this runner's), and the event whose handler error ended it (for the log record)."""

    owner: str = dataclasses.field(default_factory=runner_id)
    held: bool = False
    failed_on: Event | None = None


async def _run(  # noqa: C901 (the run loop)
    spec: Spec, stats: ConsumerStats, stop: asyncio.Event | None = None, rerun: _Rerun | None = None
) -> NoReturn:
    name = spec.consumer.name
    store = spec.cursor_store
    stats.runs += 1
    if spec.consumer.transactional and not capabilities(store).transactional:
        raise ConfigError(
            f"consumer {name!r} is transactional, and its cursor store ({type(store).__name__}) cannot commit a"
            " handler's writes with the event's progress: use rjet.sql.SqlCursorStore"
        )
    if spec.consumer.transactional and not spec.consumer.is_async and not capabilities(store).sync_transactional:
        raise ConfigError(
            f"consumer {name!r}: its transactional handler is sync, and its cursor store ({type(store).__name__})"
            " runs transactions on the event loop only (PostgreSQL: tx is a psycopg AsyncConnection): make it"
            " async def fn(fate, event, tx) and await tx"
        )
    claim = await _claim(store, name, rerun)
    opened = False  # a run that could not open its stream leaves no new record behind
    # A claim that is lost (another runner took it, its key vanished) or a stop request ends the
    # run now, not when the next event arrives: closing the client ends recv(); and no handler
    # call starts once either happened.
    halt = asyncio.Event()
    failed = asyncio.Event()  # a concurrent run's workers failed: stop reading now
    if spec.consumer.transactional:
        # The handler's own writes and the event's progress commit in one transaction of the claim's;
        # a sync handler's whole transaction in one call: on this thread at concurrency 1 (as any sync
        # handler of a one-at-a-time consumer runs), else on the store's (SQLite's connection's).
        tclaim = cast("TransactionalClaim", claim)
        if spec.consumer.is_async:
            transact: Callable[..., Awaitable[None]] = tclaim.transact
        else:
            transact = functools.partial(tclaim.transact_sync, inline=spec.consumer.concurrency == 1)

        def starting() -> None:
            # Looked at inside the transaction, right before the handler: a call that waited (for a
            # pooled connection, SQLite's turn or write lock) does not start once the run is ending.
            # Plain reads: a sync handler's transaction may run on a thread of the store's.
            if halt.is_set() or failed.is_set() or claim.lost is not None or (stop is not None and stop.is_set()):
                raise Abort

        spec = dataclasses.replace(
            spec,
            consumer=spec.consumer.in_transactions(
                lambda seqs, call, seq: transact(seqs, call, sequential=seq), starting=starting
            ),
        )
    try:
        cursor = claim.cursor
        parse_cursor(cursor, f"consumer {name!r}")
        lag = spec.lag.total_seconds() if isinstance(spec.lag, timedelta) else (spec.lag or 0.0)
        client = await _open(spec, claim, cursor, name, store)
        opened = True
        if client.stream_id is not None:
            claim.stream = client.stream_id  # every cursor written from now on names this stream
        if (traced := spec.consumer.traced(client.stream)) is not spec.consumer:  # OpenTelemetry spans
            spec = dataclasses.replace(spec, consumer=traced)
        stats.track(client if isinstance(client, ReaderCounts) else None)  # declared counts, or none
        waits: list[Callable[[], Awaitable[object]]] = [claim.wait_lost, failed.wait, *([stop.wait] if stop else [])]
        guard = asyncio.create_task(_close_when(waits, client, halt))
        try:
            if not spec.consumer.sequential:
                await _keyed(spec, client, claim, stats, halt, stop, failed)
            consumer = spec.consumer
            consume = consumer.consume
            set_cursor = claim.set_cursor
            recv = client.next_or_skip  # one coroutine less per event than recv()
            if consumer.key_filter is not None and client.key_filter is consumer.key_filter:
                # The reader passed over other keys before decoding them (and says how far).
                consume = consumer.consume_key_passed
            dead_letter = consumer.dead_letter
            stream_name = client.stream
            timing = stats.timing
            clock = time.monotonic
            halted = halt.is_set
            # The stop request itself, read before each handler call: the guard sets `halt` only once
            # it has run, and a sync handler's run loop yields only between events.
            stopping = stop.is_set if stop is not None else halted
            # Events an earlier concurrent run of this name handled above the cursor (exact progress):
            # passed over as done, not handled twice (a transactional store committed their effects),
            # and kept in the stored progress until the cursor passes them.
            restored = _Restored.of(claim, name)
            next_yield = clock() + _YIELD_EVERY
            while True:
                # With buffered events and a sync handler nothing below awaits for real, so give the
                # loop a turn now and then (cursor flushes, heartbeats, stop requests).
                if clock() >= next_yield:
                    await asyncio.sleep(0)
                    next_yield = clock() + _YIELD_EVERY
                try:
                    event = await recv()
                except DecodeError as e:
                    if dead_letter is None:
                        raise
                    await _bury(dead_letter, record_for(name, stream_name, str(e.seq), None, e, 1), e, stats)
                    stats.cursor = str(e.seq)
                    if restored is not None:
                        restored.progress.passed(e.seq)
                    await set_cursor(stats.cursor if restored is None else restored)
                    continue
                except Stopped:
                    if halted():  # the guard closed the client
                        claim.check()
                        raise Stopped(f"consumer {name!r}: stopped on request") from None
                    raise
                if type(event) is not Event:
                    if type(event) is int:  # the reader passed over other keys' events up to here
                        stats.cursor = str(event)
                        if restored is not None:
                            restored.progress.passed(event)
                        await set_cursor(stats.cursor if restored is None else restored)
                    elif dead_letter is not None:  # a range skipped under ReadConfig(on_removed="skip")
                        assert isinstance(event, EventsRemoved)
                        await _record_removed(dead_letter, name, stream_name, event, stats)
                    continue
                if lag:
                    wait = event.timestamp_us / 1e6 + lag - time.time()
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(halt.wait(), wait)
                if restored is not None:
                    if int(event.id) > restored.last:
                        restored = None  # every restored event is behind: nothing of it left to store
                    elif not restored.progress.read(int(event.id)):
                        stats.already_done += 1
                        stats.cursor = event.id
                        await set_cursor(restored)
                        continue
                if halted() or stopping():
                    claim.check()
                    raise Stopped(f"consumer {name!r}: stopped on request")
                if clock() >= claim.expires:  # not seen held for a lease: look before handling
                    await claim.confirm()
                t0 = time.perf_counter() if timing else 0.0
                try:
                    handled = await consume(event)
                except Abort:  # a transactional call that waited found the run ending: not started
                    claim.check()
                    raise Stopped(f"consumer {name!r}: stopped on request") from None
                except Exception as e:
                    stats.errors += 1
                    if dead_letter is None or isinstance(e, Tempted):
                        e.add_note(
                            f"rjet: consumer {name!r} failed on event {event.id} (type {event.type},"
                            f" foreign id {event.foreign_id!r}); its cursor stays before it"
                        )
                        if rerun is not None:
                            rerun.failed_on = event
                        raise
                    handled = await _retry_or_bury(
                        consume, event, e, dead_letter, name, stream_name, stats, halt, stopping
                    )
                if timing:
                    stats.observe(time.perf_counter() - t0)
                if restored is None:
                    await set_cursor(event.id)
                else:
                    restored.progress.done(int(event.id))
                    await set_cursor(restored)
                stats.cursor = event.id
                if handled:
                    stats.handled += 1
                    stats.last_event = event
                else:
                    stats.filtered += 1
        except (CursorExpired, StreamRecreated, CursorAhead) as e:
            raise _with_hint(e, name, store) from None
        finally:
            guard.cancel()
            await client.close()
    finally:
        try:
            await claim.release(forget_new=not opened)  # flushes
            if rerun is not None and claim.forgotten:
                rerun.held = False  # its record is gone on purpose: the next run claims afresh
        finally:
            claim.check()  # a lost claim is why the run ended, whatever else it saw on the way


class _Restored:
    """The exact progress an earlier concurrent run of a name left above its cursor, as a sequential
    run of the name goes through it (a :class:`rjet.cursors.ProgressSource` for the claim)."""

    __slots__ = ("last", "progress")

    def __init__(self, progress: Progress, last: int) -> None:
        self.progress = progress
        self.last = last

    @classmethod
    def of(cls, claim: Claim, name: str) -> _Restored | None:
        """The claim's restored progress, or None when nothing is done above its cursor."""
        if not claim.done:
            return None
        base = int(claim.cursor or 0)
        try:
            done = decode_done(base, claim.done)
        except ValueError as e:
            raise InvalidCursor(
                f"{claim.cursor} (done {claim.done!r}: {e})", f"consumer {name!r}: its stored exact progress"
            ) from None
        return cls(Progress(base, done), max(done, default=base)) if done else None

    def snapshot(self) -> tuple[str, str]:
        cursor, done = self.progress.snapshot()
        return ("" if cursor == "0" else cursor), done


async def _keyed(
    spec: Spec,
    client: StreamClientLike,
    claim: Claim,
    stats: ConsumerStats,
    halt: asyncio.Event,
    stop: asyncio.Event | None,
    failed: asyncio.Event,
) -> NoReturn:
    """The run of a concurrent consumer (``rjet/_keyed/``)."""
    consumer, name = spec.consumer, spec.consumer.name
    dead_letter = consumer.dead_letter
    stream_name = client.stream
    lag = spec.lag.total_seconds() if isinstance(spec.lag, timedelta) else (spec.lag or 0.0)

    async def bury(record: DeadLetterRecord, error: Exception) -> None:
        assert dead_letter is not None
        await _bury(dead_letter, record, error, stats)

    async def record_removed(gap: EventsRemoved) -> None:
        assert dead_letter is not None
        await _record_removed(dead_letter, name, stream_name, gap, stats)

    await KeyedRun(
        consumer,
        recv=client.next_or_skip,
        take=client.take,
        set_cursor=claim.set_cursor,
        lease=claim,
        exact=capabilities(spec.cursor_store).exact_progress,
        cursor=claim.cursor,
        done=claim.done,
        stats=stats,
        stream=stream_name,
        key_checked=consumer.key_filter is None or client.key_filter is consumer.key_filter,
        lag=lag,
        halt=halt,
        stopping=stop.is_set if stop is not None else halt.is_set,
        failed=failed,
        bury=bury,
        record_removed=record_removed,
    ).run()


async def _claim(store: CursorStore, name: str, rerun: _Rerun | None) -> Claim:
    if rerun is None:
        return await claim_cursor(store, name, owner=runner_id())
    # Running again (run_forever, after an error): only while the stored record is still this
    # runner's. Another runner that claimed meanwhile is newer; taking the cursor back would hand
    # this one events that runner already handled.
    claim = await claim_cursor(store, name, owner=rerun.owner, after=rerun.owner if rerun.held else None)
    rerun.held = True
    return claim


async def _open(spec: Spec, claim: Claim, cursor: str, name: str, store: CursorStore) -> StreamClientLike:
    """Open the stream after ``cursor``, telling the stream function the consumer's key filter and the
    stream the cursor was recorded in."""
    func = spec.stream_func
    stream_id = claim.stream if cursor else None
    try:
        opening = func(
            cursor,
            from_head=spec.from_head,
            to_head=spec.to_head,
            key_filter=spec.consumer.key_filter,
            stream_id=stream_id,
        )
    except TypeError as e:
        # An async function's arguments are bound when it is called, before its body runs.
        if "key_filter" not in str(e) and "stream_id" not in str(e):
            raise
        raise ConfigError(
            f"consumer {name!r}: the stream function {func!r} does not take key_filter and stream_id; run passes"
            " both (rjet.StreamFunc): take them, or **kwargs"
        ) from e
    try:
        return await opening
    except (CursorExpired, StreamRecreated, CursorAhead) as e:
        raise _with_hint(e, name, store) from None


def _with_hint(err: CursorExpired | StreamRecreated | CursorAhead, name: str, store: CursorStore) -> CursorError:
    """``err`` again, naming this consumer and, where its store names one (the optional ``namespace``
    or ``cursors_url`` of :class:`rjet.cursors.CursorStore`), its cursor namespace or the URL of
    its SQL store: the data a hint is made of."""
    namespace, url = getattr(store, "namespace", None), getattr(store, "cursors_url", None)
    return err.named(name, namespace if isinstance(namespace, str) else None, url if isinstance(url, str) else None)


async def _retry_or_bury(
    consume: Callable[[Event], Awaitable[bool]],
    event: Event,
    error: Exception,
    dead_letter: DeadLetter,
    name: str,
    stream: str,
    stats: ConsumerStats,
    halt: asyncio.Event,
    stopping: Callable[[], bool],
) -> bool:
    """Retry ``event`` on the consumer's :class:`rjet.RetryPolicy` (folded into its dead letter); True
    when a retry succeeded, False when it was recorded as a dead letter. A stop (or a lost claim)
    while it waits ends the wait, and no retry starts: :class:`rjet.Stopped`, the cursor before it."""
    policy = dead_letter.retry
    attempt = 1
    while not policy.gives_up(attempt):
        log.warning(
            "consumer %r: event %s (foreign id %r) failed (attempt %d of %d): %r",
            name, event.id, event.foreign_id, attempt, policy.attempts, error,
            extra={**_event_fields(name, stream, event), "attempt": attempt, "attempts": policy.attempts},
        )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(halt.wait(), policy.delay(attempt))
        if halt.is_set() or stopping():
            raise Stopped(f"consumer {name!r}: stopped on request while event {event.id} waited for its retry")
        attempt += 1
        try:
            return await consume(event)
        except Abort:  # a transactional call that waited found the run ending: not started
            raise Stopped(f"consumer {name!r}: stopped on request while event {event.id} was retried") from None
        except Tempted:
            raise
        except Exception as e:
            stats.errors += 1
            error = e
    await _bury(dead_letter, record_for(name, stream, event.id, event, error, attempt), error, stats)
    return False


async def _bury(dead_letter: DeadLetter, record: DeadLetterRecord, error: Exception, stats: ConsumerStats) -> None:
    log.error(
        "consumer %r: giving up on event %s of stream %r after %d attempt(s) (%s); recording a dead letter",
        record.consumer, record.event_id, record.stream, record.attempts, record.error,
        extra={
            **_event_fields(record.consumer, record.stream, record.event, record.event_id),
            "attempts": record.attempts,
            "dead_letter": True,
        },
    )  # fmt: skip
    try:
        await dead_letter.sink(record)
    except Exception as sink_error:
        error.add_note(
            f"rjet: consumer {record.consumer!r} could not record event {record.event_id} as a dead letter"
            f" ({sink_error!r}); its cursor stays before it"
        )
        raise error from sink_error
    stats.dead_lettered += 1


async def _record_removed(
    dead_letter: DeadLetter, name: str, stream: str, gap: EventsRemoved, stats: ConsumerStats
) -> None:
    """A dead letter for a range of events skipped as removed (its ``event_id`` is ``first..last``)."""
    record = record_for(name, stream, f"{gap.first}..{gap.last}", None, gap, 0)
    try:
        await dead_letter.sink(record)
    except Exception as sink_error:
        gap.add_note(f"rjet: consumer {name!r} could not record the removed range as a dead letter ({sink_error!r})")
        raise gap from sink_error
    stats.dead_lettered += 1


async def _close_when(
    waits: list[Callable[[], Awaitable[object]]], client: StreamClientLike, halt: asyncio.Event
) -> None:
    tasks = [asyncio.ensure_future(w()) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
    halt.set()
    await client.close()


async def run_forever(
    spec: Spec,
    *,
    retry_delay: float = 0.1,
    max_backoff: float | None = None,
    stats: ConsumerStats | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run ``spec`` again and again, as reflex's RunForever does; stop by cancelling the task.

    Expected errors (fate's, a stopped client) retry after ``retry_delay``; others are logged with
    their event and retry after the consumer's :class:`rjet.RetryPolicy` delays (0.5 s doubling to
    30 s by default), capped at ``max_backoff`` seconds when given. Errors that retrying cannot fix
    (:data:`rjet.errors.PERMANENT`: :class:`rjet.CursorConflict`, :class:`rjet.CursorExpired`,
    :class:`rjet.CursorAhead`, :class:`rjet.StreamRecreated`, :class:`rjet.CursorBucketGone`,
    :class:`rjet.InvalidCursor`, :class:`rjet.PermissionDenied`, :class:`rjet.ConfigError`) are raised.
    With ``spec.to_head`` it returns once the head is reached. ``stats`` accumulates over every run.
    Setting ``stop`` ends it gracefully (see :func:`run`): it returns once the cursor is flushed.
    """
    backoff = 0.0
    name = spec.consumer.name
    stats = stats or ConsumerStats(name)
    if not stats.name:
        stats.name = name
    rerun = _Rerun()
    while True:
        handled_before = stats.handled
        rerun.failed_on = None
        try:
            await _run(spec, stats, stop, rerun)
        except HeadReached:
            if spec.to_head:
                return
            delay = retry_delay
        except PERMANENT:
            raise
        except Exception as e:
            if stop is not None and stop.is_set():
                return
            fields = _event_fields(name, _stream_name(spec), rerun.failed_on)
            if is_expected(e):
                log.info("consumer %r: %s; running again", name, e, extra=fields)
                delay = retry_delay
            else:
                progressed = stats.handled > handled_before
                # The consumer's RetryPolicy: its first delay once a run made progress, doubling up
                # to its max_backoff (or max_backoff here, when lower).
                policy = spec.consumer.retry
                backoff = policy.backoff if progressed or not backoff else backoff * 2
                backoff = min(backoff, policy.max_backoff, math.inf if max_backoff is None else max_backoff)
                delay = backoff
                log.error("consumer %r failed; running again in %.1fs", name, delay, exc_info=e, extra=fields)
        if stop is None:
            await asyncio.sleep(delay)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return


def _event_fields(consumer: str, stream: str, event: Event | None, event_id: str = "") -> dict[str, object]:
    """The ``extra`` fields of a log record about ``consumer`` (and ``event``): what ``rjet --log-json``
    prints besides the message. ``seq`` is the event's stream sequence."""
    fields: dict[str, object] = {"consumer": consumer}
    if stream:
        fields["stream"] = stream
    seq = event.id if event is not None else event_id
    if seq:
        fields["seq"] = int(seq) if seq.isdigit() else seq  # a removed range is "first..last"
    if event is not None:
        fields["event_type"] = event.type
        fields["foreign_id"] = event.foreign_id
    return fields


def _stream_name(spec: Spec) -> str:
    """The name of the stream ``spec`` reads, when its stream function is a bound :meth:`rjet.Stream.stream`."""
    owner = getattr(spec.stream_func, "__self__", None)
    name = getattr(owner, "name", "")
    return name if isinstance(name, str) else ""
