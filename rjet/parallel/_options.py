"""The options of a :class:`rjet.parallel.Parallel` group: a few small frozen objects, each checked
where it is made, bundled in :class:`ParallelOptions`, which travels to every worker process as it is.

- :class:`ConsumerOptions`: what each shard's :class:`rjet.Consumer` is made with (checked by making
  one: :meth:`ConsumerOptions.consumer` is the one place a shard's consumer is made);
- :class:`WorkerOptions`: how each worker process runs it (reader, lag, cursor flushes, retries,
  event loop, ``on_start``);
- :class:`SupervisionOptions`: how the parent restarts and stops workers;
- :class:`HeartbeatOptions`: how often the group's liveness is written and how long it lasts;
- :class:`ElasticOptions`: an elastic member's id and cap (None for a group of fixed shards);
- :class:`TargetOptions`: which shards, and where (cursor bucket replicas, JetStream domain or prefix,
  or the shard cursors in an SQL database).

``Parallel(...)`` takes every field as a keyword of its own (``Parallel(..., concurrency=8,
heartbeat_ttl=30)``) and builds these; ``group.options`` is what it built.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Literal, TypeAlias

from rjet.consumer import Batch, BatchHandler, Consumer, Handler, TransactionalBatchHandler, TransactionalHandler
from rjet.deadletter import DeadLetter, DeadLetterSink
from rjet.errors import ConfigError
from rjet.event import Event
from rjet.fate import NEVER, Fate
from rjet.reader import ReadConfig
from rjet.retry import MAX_BACKOFF, RetryPolicy

__all__ = [
    "ConsumerOptions", "ElasticOptions", "GroupHandler", "HeartbeatOptions", "ParallelOptions", "SupervisionOptions",
    "TargetOptions", "WorkerOptions",
]  # fmt: skip

GroupHandler: TypeAlias = Handler | BatchHandler | TransactionalHandler | TransactionalBatchHandler
"""A group's handler: whatever :class:`rjet.Consumer` takes (its options say which shape)."""

_WAITING_BYTES: Final = 32 * 1024 * 1024  # rjet.Consumer's default max_waiting_bytes


def _seconds(owner: object, *fields: str) -> None:
    for field in fields:
        value = getattr(owner, field)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ConfigError(f"Parallel: {field} must be a number >= 0, not {value!r}")


def _placeholder(fate: Fate, event: Any) -> None:
    """The handler of the consumer made to check the options (the real one is checked apart)."""


async def _tx_placeholder(fate: Fate, event: Any, tx: Any) -> None:
    """:func:`_placeholder` of a transactional consumer."""


async def _no_sink(record: Any) -> None:
    """The dead-letter sink of the consumer made to check the options (workers open the real one)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerOptions:
    """What each shard's :class:`rjet.Consumer` is made with: ``types``, ``filter``, ``fate``,
    ``concurrency``, ``batch``, ``on_error``, ``retry``, ``max_waiting`` and ``max_waiting_bytes``
    as for :class:`rjet.Consumer` (and checked by it); ``dead_letters`` names a stream for dead
    letters (created when missing; each worker opens its own sink), recorded after
    ``dead_letter_attempts`` tries, or after ``retry.attempts`` when ``retry`` is given, which also
    sets their backoff. ``transactional``: the handler is ``async fn(fate, event, tx)`` and commits
    with the shard's progress (the group's cursors in SQL: ``TargetOptions.cursors``). Its key filter
    is the shard's.
    """

    types: Iterable[int] | None = None
    filter: Callable[[Event], bool] | None = None
    fate: Fate = NEVER
    dead_letters: str | None = None
    dead_letter_attempts: int = 5
    concurrency: int = 1
    batch: Batch | None = None
    on_error: Literal["stop", "retry"] | None = None
    retry: RetryPolicy | None = None
    max_waiting: int | None = None
    max_waiting_bytes: int = _WAITING_BYTES
    transactional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.transactional, bool):
            raise ConfigError(f"Parallel: transactional must be True or False, not {self.transactional!r}")
        if self.types is not None:
            object.__setattr__(self, "types", frozenset(self.types))
        if self.filter is not None and not callable(self.filter):
            raise ConfigError(f"Parallel: filter {self.filter!r} is not callable")
        if self.dead_letters is not None and (not isinstance(self.dead_letters, str) or not self.dead_letters):
            raise ConfigError(f"Parallel: dead_letters must be a stream name, not {self.dead_letters!r}")
        attempts = self.dead_letter_attempts
        if type(attempts) is not int or attempts < 1:
            raise ConfigError(f"Parallel: dead_letter_attempts must be an int >= 1, not {attempts!r}")
        try:  # the consumer's own checks, once, here: not in every worker, which would retry forever
            placeholder = _tx_placeholder if self.transactional else _placeholder
            self.consumer("Parallel", placeholder, sink=_no_sink if self.dead_letters else None)
        except ConfigError as e:
            raise ConfigError("Parallel: " + str(e).removeprefix("consumer 'Parallel': ")) from None

    def consumer(
        self,
        name: str,
        fn: GroupHandler,
        *,
        key_filter: Callable[[str], bool] | None = None,
        sink: DeadLetterSink | None = None,
        handled: Callable[[Event], bool] | None = None,
    ) -> Consumer:
        """The consumer ``name`` with these options, ``fn`` and ``key_filter``, its dead letters
        going to ``sink`` (None: none); ``handled(event)``: an event an earlier shard count of the
        group handled already, skipped (a reshard's exactness, ``rjet/parallel/_sql.py``)."""
        dead_letter = None if sink is None else DeadLetter(sink, attempts=self.dead_letter_attempts)
        wanted = self.filter
        if handled is not None:
            own = self.filter

            def wanted(event: Event) -> bool:
                return not handled(event) and (own is None or own(event))

        return Consumer(
            name,
            fn,
            types=self.types,
            filter=wanted,
            key_filter=key_filter,
            fate=self.fate,
            dead_letter=dead_letter,
            concurrency=self.concurrency,
            batch=self.batch,
            on_error=self.on_error,
            max_waiting=self.max_waiting,
            max_waiting_bytes=self.max_waiting_bytes,
            retry=self.retry,
            transactional=self.transactional,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class WorkerOptions:
    """How each worker process runs its shard's consumer.

    - ``read``: the :class:`rjet.ReadConfig` of its stream client; ``lag``: as for :class:`rjet.Spec`.
    - ``flush_interval``: seconds between cursor writes.
    - ``retry_delay``, ``max_backoff``: a handler error stops the shard's run, which retries the same
      event after the consumer's backoff (0.5 s doubling, capped at ``max_backoff``); expected errors
      after ``retry_delay`` (as :func:`rjet.run_forever`).
    - ``handler_timing``: measure every handler call (the latency histogram of ``ShardStats.live``).
    - ``on_start``: ``on_start(m)`` (sync or async) runs before it consumes (open per-process
      resources there); an error in it counts as a crash of the worker.
    - ``loop``: ``"asyncio"`` (the standard library's) or ``"uvloop"`` (installed beside rjet), whose
      own work per timer and wake-up is C: it pays with ``concurrency`` and handlers that wait (a 1 ms
      async handler at concurrency=256 ran 72,000-95,000 events/s a process on it, 60,000-74,000 on
      asyncio's, on the machine of the README's figures).
    """

    read: ReadConfig | None = None
    lag: float | None = None
    flush_interval: float = 1.0
    retry_delay: float = 0.1
    max_backoff: float = MAX_BACKOFF
    handler_timing: bool = False
    on_start: Callable[[int], Any] | None = None
    loop: Literal["asyncio", "uvloop"] = "asyncio"

    def __post_init__(self) -> None:
        _seconds(self, "flush_interval", "retry_delay", "max_backoff")
        if self.lag is not None and (isinstance(self.lag, bool) or not self.lag >= 0):
            raise ConfigError(f"Parallel: lag must be a number of seconds >= 0, not {self.lag!r}")
        if self.on_start is not None and not callable(self.on_start):
            raise ConfigError(f"Parallel: on_start {self.on_start!r} is not callable")
        if self.read is not None and not isinstance(self.read, ReadConfig):
            raise ConfigError(f"Parallel: read must be an rjet.ReadConfig, not {self.read!r}")
        if self.loop not in ("asyncio", "uvloop"):
            raise ConfigError(f"Parallel: loop is 'asyncio' or 'uvloop', not {self.loop!r}")
        if self.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ConfigError("Parallel: loop='uvloop' needs the uvloop package here: pip install uvloop")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SupervisionOptions:
    """How the parent keeps its workers: one that dies is restarted after ``restart_delay`` seconds,
    doubling on each crash up to ``max_restart_delay``, starting over once a worker lived
    ``restart_reset`` seconds; a graceful stop waits ``stop_timeout`` seconds for handlers in flight
    before the workers are killed."""

    restart_delay: float = 0.5
    max_restart_delay: float = 30.0
    restart_reset: float = 30.0
    stop_timeout: float = 30.0

    def __post_init__(self) -> None:
        _seconds(self, "restart_delay", "max_restart_delay", "restart_reset", "stop_timeout")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatOptions:
    """How often the group's liveness (its shards' heartbeats, an elastic member's lease) is written to
    the cursor bucket (``interval``), and how old it may be before it counts as gone (``ttl``: a dead
    member's shards move, a reshard may go ahead). ``ttl`` is at least twice ``interval``."""

    interval: float = 2.0
    ttl: float = 10.0

    def __post_init__(self) -> None:
        for field, value in (("heartbeat_interval", self.interval), ("heartbeat_ttl", self.ttl)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"Parallel: {field} must be a number >= 0, not {value!r}")
        if self.interval <= 0 or self.ttl < 2 * self.interval:
            raise ConfigError(
                "Parallel: need 0 < heartbeat_interval and heartbeat_ttl >= 2 * heartbeat_interval, got"
                f" {self.interval} and {self.ttl}"
            )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ElasticOptions:
    """An elastic member (docs/sharding.md "Elastic groups"): ``member_id`` a stable id (Kafka's
    ``group.instance.id``: a restart within the TTL keeps its shards; default host, pid and a random
    suffix: a new member each start); ``max_shards`` at most this many shards on this member."""

    member_id: str | None = None
    max_shards: int | None = None

    def __post_init__(self) -> None:
        if self.member_id is not None and (not isinstance(self.member_id, str) or not self.member_id.strip()):
            raise ConfigError(f"Parallel: member_id must be a non-empty str, not {self.member_id!r}")
        if self.max_shards is not None and (type(self.max_shards) is not int or self.max_shards < 1):
            raise ConfigError(f"Parallel: max_shards must be an int >= 1, not {self.max_shards!r}")


def _check_url(url: object) -> None:
    """A ConfigError (naming no password) unless ``url`` is a database URL :class:`rjet.sql.SqlCursorStore`
    opens, with its driver installed here."""
    from rjet.sql._backends import backend_for  # rjet.sql imports no part of rjet.parallel

    try:
        backend = backend_for(url)  # type: ignore[arg-type]  # checked there
    except ConfigError as e:
        raise ConfigError("Parallel: cursors: " + str(e).removeprefix("rjet.sql: ")) from None
    if backend.kind == "postgresql" and importlib.util.find_spec("psycopg") is None:
        raise ConfigError("Parallel: cursors: postgresql:// needs psycopg 3: pip install 'rjet[postgres]'")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TargetOptions:
    """Which shards this group runs (``shards``: 0-based indexes; None: all, or for an elastic member
    those the assignment gives it) and where: ``cursor_replicas`` of the cursor bucket when the group
    creates it (default: the stream's); ``js_domain`` or ``js_api_prefix`` of the JetStream it uses;
    ``cursors``: the URL of an SQL database (``sqlite:///PATH``, ``postgresql://...``) that keeps the
    shard cursors instead of the bucket (each worker opens its own :class:`rjet.sql.SqlCursorStore`;
    heartbeats, leases and the group record stay in the bucket). The URL is checked here; the
    database when the group starts."""

    shards: Sequence[int] | None = None
    cursor_replicas: int | None = None
    js_domain: str | None = None
    js_api_prefix: str | None = None
    cursors: str | None = None

    def __post_init__(self) -> None:
        if self.cursors is not None:
            _check_url(self.cursors)
        if self.shards is not None:
            if isinstance(self.shards, int | str):
                raise ConfigError(f"Parallel: shards is a list of shard indexes, not {self.shards!r}")
            object.__setattr__(self, "shards", tuple(self.shards))
        replicas = self.cursor_replicas
        if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1):
            raise ConfigError(f"Parallel: cursor_replicas must be an int >= 1, not {replicas!r}")
        if self.js_domain is not None and self.js_api_prefix is not None:
            raise ConfigError("Parallel: give js_domain or js_api_prefix, not both")

    def jetstream_options(self) -> dict[str, str]:
        """``nc.jetstream(...)``'s keyword arguments for ``js_domain`` / ``js_api_prefix``."""
        if self.js_domain is not None:
            return {"domain": self.js_domain}
        return {"prefix": self.js_api_prefix} if self.js_api_prefix is not None else {}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParallelOptions:
    """Every option of a :class:`Parallel` group, by what it is about; ``elastic`` is None for a
    group of fixed shards."""

    consumer: ConsumerOptions = ConsumerOptions()
    worker: WorkerOptions = WorkerOptions()
    supervision: SupervisionOptions = SupervisionOptions()
    heartbeats: HeartbeatOptions = HeartbeatOptions()
    elastic: ElasticOptions | None = None
    target: TargetOptions = TargetOptions()

    def __post_init__(self) -> None:
        if self.elastic is not None and self.target.shards is not None:
            raise ConfigError(
                "Parallel: an elastic group assigns its shards itself: give elastic=True or shards, not both"
            )
        if self.consumer.transactional and self.target.cursors is None:
            raise ConfigError(
                "Parallel: transactional=True commits each event with its shard's cursor in one SQL transaction:"
                ' give the database too, cursors="sqlite:///PATH" or cursors="postgresql://..."'
            )
