"""A consumer: a name (the key of its cursor) and the handler that consumes events."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, TypeAlias, cast

from rjet.deadletter import DeadLetter
from rjet.errors import ConfigError
from rjet.event import Event
from rjet.fate import NEVER, Fate
from rjet.retry import RetryPolicy

__all__ = ["Batch", "BatchHandler", "Consumer", "Handler", "check_handler"]

Handler: TypeAlias = Callable[[Fate, Event], Awaitable[None] | None]
"""``fn(fate, event)``, a plain function or a coroutine function; raising stops the run."""

BatchHandler: TypeAlias = Callable[[Fate, list[Event]], Awaitable[None] | None]
"""``fn(fate, events)``: the handler of a consumer with a :class:`Batch`."""

TransactionalHandler: TypeAlias = Callable[[Fate, Event, Any], Awaitable[None] | None]
"""``[async] fn(fate, event, tx)``: the handler of a ``Consumer(..., transactional=True)`` (sync only
where the store's capabilities say ``sync_transactional``: SQLite)."""

TransactionalBatchHandler: TypeAlias = Callable[[Fate, list[Event], Any], Awaitable[None] | None]
"""``[async] fn(fate, events, tx)``: the handler of a transactional consumer with a :class:`Batch`."""


@dataclasses.dataclass(frozen=True, slots=True)
class Batch:
    """Hand the handler events in batches: ``fn(fate, events)`` with up to ``max_len`` events, once
    that many are waiting or ``max_wait`` seconds after the first of them was read, whichever comes
    first.

    A batch lists its events in stream order; one foreign ID's events are never in two batches in
    flight at once, so per-key order holds across batches. The cursor (and exact progress) advance
    when the batch succeeds; a failed batch is retried whole.

    >>> Batch(max_len=100, max_wait=0.05)
    Batch(max_len=100, max_wait=0.05)
    """

    max_len: int = 100
    max_wait: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise ConfigError(f"Batch: max_len must be an int >= 1, not {self.max_len!r}")
        if not self.max_wait >= 0:
            raise ConfigError(f"Batch: max_wait must be >= 0 seconds, not {self.max_wait!r}")


def check_handler(
    fn: Callable[..., object], *, batch: bool = False, owner: str = "consumer", transactional: bool = False
) -> None:
    """:class:`ConfigError` unless ``fn`` can be called as ``fn(fate, event)`` (``fn(fate, events)``
    for a batch consumer), sync or async. Defaults, ``*args``, ``functools.partial``, bound methods
    and callable objects are read from their signature; a callable whose signature cannot be read
    (some builtins and C callables) is taken on trust."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*[None] * (3 if transactional else 2))
    except TypeError as e:
        shape = "fn(fate, events" if batch else "fn(fate, event"
        shape += ", tx)" if transactional else ")"
        what = getattr(fn, "__qualname__", None) or repr(fn)
        params = sig.replace(return_annotation=inspect.Signature.empty)
        raise ConfigError(
            f"{owner}: handler {what}{params} cannot be called as {shape} ({e}); define [async] def {shape}"
        ) from None


class Consumer:
    """A named handler of events. The name keys the consumer's cursor.

    - ``types``: only events of these types reach ``fn``; others are skipped, the cursor advances.
    - ``filter``: ``filter(event) -> bool``; events it rejects are skipped, the cursor advances.
    - ``key_filter``: ``key_filter(foreign_id) -> bool``; like ``filter`` on the foreign ID alone, so
      a reader may apply it before decoding the rest of the event (sharding uses it).
    - ``fate``: what ``fn`` receives to inject errors on purpose (default :data:`rjet.fate.NEVER`).
    - ``dead_letter``: a :class:`rjet.DeadLetter` policy: after that many failed attempts an event
      is recorded and skipped instead of blocking the consumer (off by default: retry forever).
    - ``transactional``: ``fn(fate, event, tx)`` (``fn(fate, events, tx)`` with a batch): ``tx`` is the
      database connection of a store whose claims are transactional (:class:`rjet.sql.SqlCursorStore`)
      inside an open transaction; rjet records the event as done in it and commits, so the handler's
      writes and the consumer's progress commit together (exactly-once effects). Any other store is a
      :class:`rjet.ConfigError` when ``run`` starts. An async ``fn`` awaits ``tx`` (aiosqlite,
      psycopg); a sync one (SQLite only: a store whose capabilities say ``sync_transactional``, else
      a ``ConfigError`` at start) gets the ``sqlite3.Connection`` and runs with the whole transaction
      on the connection's own thread, not the event loop's: it must not touch the loop.
    - ``concurrency``: up to this many handler calls in flight at once, with every event of one
      foreign ID handled one at a time, in stream order (default 1: one event at a time). The cursor
      stays the low watermark and the events done above it are stored with it (exact progress), so
      a restart does not hand them to the handler again. Sync handlers run in a pool of
      ``concurrency`` threads. See the README's "Concurrency" section.
    - ``batch``: a :class:`Batch`: ``fn`` takes ``(fate, events)``, a list.
    - ``on_error``: ``"stop"`` (reflex's strictness: the first handler error ends the run once the
      calls in flight are done; ``run`` raises it) or ``"retry"`` (only the failing foreign ID waits:
      its event gets a due time and is tried again then, no worker waits for it, other keys go on;
      with ``dead_letter``, after its attempts the event is recorded and its key moves on). Default:
      ``"stop"`` with ``concurrency=1``, ``"retry"`` above.
    - ``retry``: a :class:`rjet.RetryPolicy`: the backoff between attempts and the attempts before
      the dead-letter hand-off. Default: the ``dead_letter``'s, else ``RetryPolicy()`` (0.5 s
      doubling to 30 s, 5 attempts). Given with a ``dead_letter``, it replaces the dead letter's.
    - ``max_waiting`` / ``max_waiting_bytes``: events read but not yet handed to the handler, at most
      (a hot key whose events pile up slows reading down; default ``max(1024, 8 * concurrency)``
      events and 32 MiB).

    ::

        async def fn(fate, event):
            fate.tempt()
            await db.apply(event)

        consumer = Consumer("billing", fn, types=[1, 2])
    """

    __slots__ = (
        "_async", "batch", "concurrency", "dead_letter", "fate", "filter", "fn", "key_filter", "max_waiting",
        "max_waiting_bytes", "name", "on_error", "retry", "transactional", "types",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        fn: Handler | BatchHandler | TransactionalHandler | TransactionalBatchHandler,
        *,
        types: Iterable[int] | None = None,
        filter: Callable[[Event], bool] | None = None,
        key_filter: Callable[[str], bool] | None = None,
        fate: Fate = NEVER,
        dead_letter: DeadLetter | None = None,
        concurrency: int = 1,
        batch: Batch | None = None,
        on_error: Literal["stop", "retry"] | None = None,
        max_waiting: int | None = None,
        max_waiting_bytes: int = 32 * 1024 * 1024,
        retry: RetryPolicy | None = None,
        transactional: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"consumer name must be a non-empty str, not {name!r}")
        if not callable(fn):
            raise ConfigError(f"consumer {name!r}: handler {fn!r} is not callable")
        check_handler(fn, batch=batch is not None, owner=f"consumer {name!r}", transactional=transactional)
        self.transactional = transactional
        self.name = name
        # A transactional fn takes tx too: run binds it (in_transactions) before anything calls it.
        self.fn: Handler | BatchHandler = cast("Handler | BatchHandler", fn)
        self.types = frozenset(types) if types is not None else None
        self.filter = filter
        self.key_filter = key_filter
        self.fate = fate
        if dead_letter is not None and not isinstance(dead_letter, DeadLetter):
            raise ConfigError(f"consumer {name!r}: dead_letter must be an rjet.DeadLetter, not {dead_letter!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"consumer {name!r}: retry must be an rjet.RetryPolicy, not {retry!r}")
        if retry is None:
            retry = dead_letter.retry if dead_letter is not None else RetryPolicy()
        elif dead_letter is not None:  # one schedule: the dead letter's attempts and backoff are the policy's
            dead_letter = dataclasses.replace(
                dead_letter, attempts=retry.attempts, backoff=retry.backoff, max_backoff=retry.max_backoff
            )
        self.dead_letter = dead_letter
        self.retry = retry
        if type(concurrency) is not int or concurrency < 1:
            raise ConfigError(f"consumer {name!r}: concurrency must be an int >= 1, not {concurrency!r}")
        self.concurrency = concurrency
        if batch is not None and not isinstance(batch, Batch):
            raise ConfigError(f"consumer {name!r}: batch must be an rjet.Batch, not {batch!r}")
        self.batch = batch
        if on_error not in (None, "stop", "retry"):
            raise ConfigError(f"consumer {name!r}: on_error is 'stop' or 'retry', not {on_error!r}")
        self.on_error: Literal["stop", "retry"] = on_error or ("stop" if concurrency == 1 else "retry")
        if max_waiting is None:
            max_waiting = max(1024, 8 * concurrency, batch.max_len if batch else 0)
        if type(max_waiting) is not int or max_waiting < 1 or max_waiting_bytes < 1:
            raise ConfigError(f"consumer {name!r}: max_waiting and max_waiting_bytes must be >= 1")
        self.max_waiting = max_waiting
        self.max_waiting_bytes = max_waiting_bytes
        self._async = inspect.iscoroutinefunction(fn)

    def in_transactions(
        self,
        transact: Callable[[list[int], Callable[[Any], object], bool], Awaitable[None]],
        *,
        starting: Callable[[], None],
    ) -> Consumer:
        """This consumer with its transactional handler bound: each call runs ``fn(fate, event, tx)``
        (or ``fn(fate, events, tx)``) inside ``transact(seqs, call, sequential)``, which begins the
        transaction, records the events as done in it and commits (what ``run`` does with a store
        whose claims are transactional: the claim's ``transact``, or ``transact_sync`` for a sync
        ``fn``). ``starting()`` runs inside the transaction right before ``fn``, on whichever thread
        runs it: it raises to keep ``fn`` from starting (the run is ending), which rolls the
        transaction back. The bound handler is async either way."""
        fn: Any = self.fn
        sequential = self.sequential
        if self.batch is not None:

            def enter_batch(tx: Any, fate: Fate, events: list[Event]) -> object:
                starting()
                return fn(fate, events, tx)

            async def call_batch(fate: Fate, events: list[Event]) -> None:
                await transact([e.id_int for e in events], lambda tx: enter_batch(tx, fate, events), sequential)

            bound: Any = call_batch
        else:

            def enter(tx: Any, fate: Fate, event: Event) -> object:
                starting()
                return fn(fate, event, tx)

            async def call_one(fate: Fate, event: Event) -> None:
                await transact([event.id_int], lambda tx: enter(tx, fate, event), sequential)

            bound = call_one
        clone = copy.copy(self)
        clone.fn = bound
        clone._async = True  # noqa: SLF001 (a copy of this very class)
        return clone

    def traced(self, stream: str) -> Consumer:
        """This consumer with each handler call inside an OpenTelemetry ``process`` span (``rjet.otel``),
        or itself when tracing is off (what ``run`` does once per run)."""
        from rjet import otel
        from rjet.reader import ShardFilter

        kf = self.key_filter
        shard = f"{kf.m}/{kf.n}" if isinstance(kf, ShardFilter) else None
        fn = otel.traced(self, stream, shard)
        if fn is None:
            return self
        clone = copy.copy(self)
        clone.fn = fn
        return clone

    @property
    def sequential(self) -> bool:
        """Whether ``run`` handles one event at a time, stopping at the first error (the defaults)."""
        return self.concurrency == 1 and self.batch is None and self.on_error == "stop"

    @property
    def is_async(self) -> bool:
        """Whether ``fn`` is a coroutine function."""
        return self._async

    def wants(self, event: Event) -> bool:
        """Whether ``event`` passes the key filter, the type filter and the event filter."""
        if self.key_filter is not None and not self.key_filter(event.foreign_id):
            return False
        if self.types is not None and event.type not in self.types:
            return False
        return self.filter is None or self.filter(event)

    async def consume(self, event: Event) -> bool:
        """Handle ``event`` unless it is filtered out; returns whether the handler ran."""
        if self.key_filter is not None and not self.key_filter(event.foreign_id):
            return False
        return await self.consume_key_passed(event)

    async def consume_key_passed(self, event: Event) -> bool:
        """:meth:`consume` for an event whose foreign ID passed ``key_filter`` already (a reader
        opened with the consumer's key filter checked it before decoding the event)."""
        if (self.types is not None and event.type not in self.types) or (
            self.filter is not None and not self.filter(event)
        ):
            return False
        if self._async:
            await self.fn(self.fate, event)  # type: ignore[arg-type, misc]  # sequential: never a BatchHandler
        else:
            result = self.fn(self.fate, event)  # type: ignore[arg-type]
            if result is not None and inspect.isawaitable(result):
                await result
        return True

    def __repr__(self) -> str:
        return f"Consumer({self.name!r}, {getattr(self.fn, '__qualname__', self.fn)!r})"
