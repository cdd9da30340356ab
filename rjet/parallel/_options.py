"""The options of a :class:`rjet.parallel.Parallel` group: one frozen object, validated once, that
travels to every worker process as it is."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from rjet._reader import ReadConfig
from rjet.consumer import Batch
from rjet.errors import ConfigError
from rjet.event import Event
from rjet.fate import NEVER, Fate
from rjet.retry import MAX_BACKOFF, RetryPolicy

__all__ = ["ParallelOptions"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParallelOptions:
    """The options of :class:`Parallel` (its ``**options``); every one has a default.

    What runs:

    - ``shards``: the shard indexes (0-based) this group runs; default all ``n``. Spread a name's
      shards over hosts by giving each host a part (``shards=[0, 1]`` here, ``[2, 3]`` there), or
      let an elastic group assign them.
    - ``elastic``: join the group as a member and run the shards the assignment gives this member
      (docs/sharding.md "Elastic groups"): shards spread over the live members, move when a member
      joins or leaves (handed over through the cursor claim, nothing lost), and are taken over
      within ``heartbeat_ttl`` plus one heartbeat (and a worker's start) when a member dies. Runs
      until stopped.
    - ``member_id``: a stable id for this member (Kafka's ``group.instance.id``): a restart within
      ``heartbeat_ttl`` keeps its shards. Default: host, pid and a random suffix (a new member).
    - ``max_shards``: at most this many shards on this member (elastic groups).
    - ``types``, ``filter``, ``fate``, ``lag``: as for :class:`rjet.Consumer` and :class:`rjet.Spec`.
    - ``read``: the :class:`rjet.ReadConfig` of each worker's stream client.
    - ``on_start``: ``on_start(m)`` (sync or async) runs in each worker process before it consumes
      (open per-process resources there); an error in it counts as a crash of the worker.
    - ``dead_letters``: the name of a stream for dead letters (created when missing); with it, an
      event whose handler fails ``dead_letter_attempts`` times is recorded there and skipped
      (:class:`rjet.DeadLetter`). Default: none, retry forever.
    - ``handler_timing``: measure every handler call for the latency histogram (``ShardStats.live``).
    - ``retry``: the :class:`rjet.RetryPolicy` of each worker's consumer (its per-key retries, its
      dead letters' attempts and backoff, and its runs' backoff), as for :class:`rjet.Consumer`.
    - ``concurrency``, ``batch``, ``on_error``: as for :class:`rjet.Consumer`, in each worker: up to
      ``concurrency`` handler calls in flight per shard, one at a time per foreign ID, with exact
      progress stored in the shard's cursor.

    How it runs:

    - ``flush_interval``: seconds between cursor writes of each shard.
    - ``retry_delay``, ``max_backoff``: a handler error stops the shard's run, which retries the same
      event after a backoff (:class:`rjet.RetryPolicy`'s: 0.5 s doubling to ``max_backoff``, 30 s by
      default); expected errors after ``retry_delay``.
    - ``restart_delay``, ``max_restart_delay``, ``restart_reset``: a worker that dies is restarted
      after ``restart_delay`` seconds, doubling on each crash up to ``max_restart_delay``; the delay
      starts over once a worker lived ``restart_reset`` seconds.
    - ``stop_timeout``: how long a graceful stop waits for handlers in flight before killing workers.
    - ``heartbeat_interval``, ``heartbeat_ttl``: how often each shard's liveness is written to the
      cursor bucket, and how old it may be before the shard counts as not running (resharding).
    - ``loop``: each worker process's event loop: ``"asyncio"`` (the standard library's) or
      ``"uvloop"`` (the uvloop package, installed beside rjet), whose own work for each timer and
      wake-up is C. It pays with ``concurrency`` and handlers that wait: a 1 ms async handler at
      concurrency=256 ran 72,000-95,000 events/s a process on it, 60,000-74,000 on asyncio's, on the
      machine of the README's figures.

    Where it runs:

    - ``cursor_replicas``: replicas of the cursor bucket when this group creates it; default the
      stream's replica count (a cluster that keeps the events keeps their cursors too). An existing
      bucket is used as it is (a warning says so when it has fewer replicas than the stream).
    - ``js_domain``, ``js_api_prefix``: the JetStream domain (leaf nodes) or API prefix (an account's
      JetStream imported under another prefix) that the group and its workers talk to.
    """

    shards: Sequence[int] | None = None
    elastic: bool = False
    member_id: str | None = None
    max_shards: int | None = None
    types: Iterable[int] | None = None
    filter: Callable[[Event], bool] | None = None
    fate: Fate = NEVER
    lag: float | None = None
    read: ReadConfig | None = None
    on_start: Callable[[int], Any] | None = None
    dead_letters: str | None = None
    dead_letter_attempts: int = 5
    handler_timing: bool = False
    concurrency: int = 1
    batch: Batch | None = None
    on_error: Literal["stop", "retry"] | None = None
    retry: RetryPolicy | None = None
    flush_interval: float = 1.0
    retry_delay: float = 0.1
    max_backoff: float = MAX_BACKOFF
    restart_delay: float = 0.5
    max_restart_delay: float = 30.0
    restart_reset: float = 30.0
    stop_timeout: float = 30.0
    heartbeat_interval: float = 2.0
    heartbeat_ttl: float = 10.0
    cursor_replicas: int | None = None
    js_domain: str | None = None
    js_api_prefix: str | None = None
    loop: Literal["asyncio", "uvloop"] = "asyncio"

    def __post_init__(self) -> None:
        if self.types is not None:
            object.__setattr__(self, "types", frozenset(self.types))
        if self.shards is not None:
            if isinstance(self.shards, int | str):
                raise ConfigError(f"Parallel: shards is a list of shard indexes, not {self.shards!r}")
            object.__setattr__(self, "shards", tuple(self.shards))
        for field in (
            "flush_interval",
            "retry_delay",
            "max_backoff",
            "restart_delay",
            "max_restart_delay",
            "restart_reset",
            "stop_timeout",
            "heartbeat_interval",
            "heartbeat_ttl",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"Parallel: {field} must be a number >= 0, not {value!r}")
        if self.heartbeat_interval <= 0 or self.heartbeat_ttl < 2 * self.heartbeat_interval:
            raise ConfigError(
                "Parallel: need 0 < heartbeat_interval and heartbeat_ttl >= 2 * heartbeat_interval, got"
                f" {self.heartbeat_interval} and {self.heartbeat_ttl}"
            )
        if self.lag is not None and (isinstance(self.lag, bool) or self.lag < 0):
            raise ConfigError(f"Parallel: lag must be a number of seconds >= 0, not {self.lag!r}")
        if self.filter is not None and not callable(self.filter):
            raise ConfigError(f"Parallel: filter {self.filter!r} is not callable")
        if self.on_start is not None and not callable(self.on_start):
            raise ConfigError(f"Parallel: on_start {self.on_start!r} is not callable")
        if self.cursor_replicas is not None and (
            isinstance(self.cursor_replicas, bool)
            or not isinstance(self.cursor_replicas, int)
            or self.cursor_replicas < 1
        ):
            raise ConfigError(f"Parallel: cursor_replicas must be an int >= 1, not {self.cursor_replicas!r}")
        self._check_consumer()
        self._check_elastic()
        self._check_loop()
        if self.js_domain is not None and self.js_api_prefix is not None:
            raise ConfigError("Parallel: give js_domain or js_api_prefix, not both")

    def _check_consumer(self) -> None:
        if type(self.concurrency) is not int or self.concurrency < 1:
            raise ConfigError(f"Parallel: concurrency must be an int >= 1, not {self.concurrency!r}")
        if self.batch is not None and not isinstance(self.batch, Batch):
            raise ConfigError(f"Parallel: batch must be an rjet.Batch, not {self.batch!r}")
        if self.retry is not None and not isinstance(self.retry, RetryPolicy):
            raise ConfigError(f"Parallel: retry must be an rjet.RetryPolicy, not {self.retry!r}")
        if self.on_error not in (None, "stop", "retry"):
            raise ConfigError(f"Parallel: on_error is 'stop' or 'retry', not {self.on_error!r}")

    def _check_loop(self) -> None:
        if self.loop not in ("asyncio", "uvloop"):
            raise ConfigError(f"Parallel: loop is 'asyncio' or 'uvloop', not {self.loop!r}")
        if self.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ConfigError("Parallel: loop='uvloop' needs the uvloop package here: pip install uvloop")

    def _check_elastic(self) -> None:
        if self.elastic and self.shards is not None:
            raise ConfigError(
                "Parallel: an elastic group assigns its shards itself: give elastic=True or shards, not both"
            )
        if not self.elastic and (self.member_id is not None or self.max_shards is not None):
            raise ConfigError("Parallel: member_id and max_shards are for elastic groups (elastic=True)")
        if self.member_id is not None and (not isinstance(self.member_id, str) or not self.member_id.strip()):
            raise ConfigError(f"Parallel: member_id must be a non-empty str, not {self.member_id!r}")
        if self.max_shards is not None and (type(self.max_shards) is not int or self.max_shards < 1):
            raise ConfigError(f"Parallel: max_shards must be an int >= 1, not {self.max_shards!r}")

    def jetstream_options(self) -> dict[str, str]:
        """``nc.jetstream(...)``'s keyword arguments for ``js_domain`` / ``js_api_prefix``."""
        if self.js_domain is not None:
            return {"domain": self.js_domain}
        return {"prefix": self.js_api_prefix} if self.js_api_prefix is not None else {}
