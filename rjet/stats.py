"""Live statistics of a consumer's run: cheap counters on the hot path, snapshots for readers.

``run`` updates a :class:`ConsumerStats` with plain integer increments; nothing is computed per
event that a reader does not ask for. :meth:`ConsumerStats.snapshot` returns a frozen
:class:`StatsSnapshot` (lag in events and seconds included), which the Prometheus exporter
(:mod:`rjet.metrics`), ``Parallel``'s summary and ``rjet status`` read.

::

    stats = ConsumerStats("mailer", timing=True)  # the name is optional
    task = asyncio.create_task(rjet.run_forever(spec, stats=stats))
    ...
    print(stats.snapshot())
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from datetime import datetime
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

if TYPE_CHECKING:
    from rjet.event import Event

__all__ = ["LATENCY_BUCKETS", "ConsumerStats", "ReaderCounts", "StatsSnapshot"]

LATENCY_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds (seconds) of the handler latency histogram; one more bucket holds the rest."""


@runtime_checkable
class ReaderCounts(Protocol):
    """What :meth:`ConsumerStats.track` reads from a run's stream client (:class:`rjet.StreamClient`
    and :class:`rjet.testing.MemoryStreamClient` declare it; a stream client of your own that has
    these three is read too).

    ``num_pending``: events not yet handed over (the lag); ``skipped_passed``: events of other keys
    the key filter passed over and the caller moved past; ``removed``: sequences skipped as removed
    under ``ReadConfig(on_removed="skip")``.
    """

    @property
    def num_pending(self) -> int: ...

    @property
    def skipped_passed(self) -> int: ...

    @property
    def removed(self) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A consumer's statistics at one moment.

    ``handled``: events the handler succeeded on; ``filtered``: events skipped by the consumer's
    type or event filter; ``skipped``: events of other keys passed over (sharding) that the
    consumer moved past: up to its cursor, not those only read ahead of it when it stopped (a
    concurrent consumer: up to the last event it read);
    ``errors``: handler failures; ``dead_lettered``: events given up on and recorded;
    ``lag_events``: events in the stream not yet delivered; ``lag_seconds``: age of the last
    handled event while there is lag, else 0; ``cursor``: the last event ID handled or passed;
    ``last_event_time``: the stored time of the last handled event; ``removed``: stream sequences
    removed ahead of the reader and skipped under ``ReadConfig(on_removed="skip")``.

    Concurrent consumers (``Consumer(concurrency=K)``, batches) also report ``in_flight`` (handler
    calls running now), ``key_queue_max`` (the most events of one foreign ID ever waiting at once:
    the hot-key figure), ``already_done`` (events stored as done above the cursor by an earlier run,
    not handed to the handler again) and ``progress_stalls`` (times reading paused because the
    done set above the cursor reached its size limit).
    """

    name: str
    handled: int
    filtered: int
    skipped: int
    errors: int
    dead_lettered: int
    runs: int
    cursor: str
    lag_events: int
    lag_seconds: float
    last_event_time: datetime | None
    handler_seconds_sum: float
    handler_seconds_count: int
    handler_buckets: tuple[int, ...]
    removed: int = 0
    in_flight: int = 0
    key_queue_max: int = 0
    already_done: int = 0
    progress_stalls: int = 0


class ConsumerStats:
    """Mutable counters that ``run`` keeps for one consumer; see :class:`StatsSnapshot`.

    ``name`` (optional) is what the snapshots and the Prometheus labels call the consumer.
    ``timing=True`` also measures every handler call (two clock reads per event) for the latency
    histogram.
    """

    __slots__ = (
        "_client",
        "already_done",
        "buckets",
        "cursor",
        "dead_lettered",
        "errors",
        "filtered",
        "handled",
        "handler_count",
        "handler_sum",
        "in_flight",
        "key_queue_max",
        "last_event",
        "name",
        "progress_stalls",
        "removed",
        "runs",
        "skipped",
        "timing",
    )

    def __init__(self, name: str = "", *, timing: bool = False) -> None:
        self.name = name
        self.timing = timing
        self.handled = 0
        self.filtered = 0
        self.skipped = 0
        self.removed = 0
        self.errors = 0
        self.dead_lettered = 0
        self.runs = 0
        self.cursor = ""
        self.last_event: Event | None = None
        self.handler_sum = 0.0
        self.handler_count = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._client: ReaderCounts | None = None
        self.in_flight = 0
        self.key_queue_max = 0
        self.already_done = 0
        self.progress_stalls = 0

    def observe(self, seconds: float) -> None:
        """Record one handler call of ``seconds``."""
        self.handler_sum += seconds
        self.handler_count += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def snapshot(self) -> StatsSnapshot:
        """The statistics now."""
        client = self._client
        lag = client.num_pending if client is not None else 0
        last = self.last_event.timestamp if self.last_event is not None else None
        lag_s = max(0.0, time.time() - last.timestamp()) if lag and last is not None else 0.0
        return StatsSnapshot(
            name=self.name,
            handled=self.handled,
            filtered=self.filtered,
            skipped=self.skipped + (client.skipped_passed if client is not None else 0),
            errors=self.errors,
            dead_lettered=self.dead_lettered,
            runs=self.runs,
            cursor=self.cursor,
            lag_events=lag,
            lag_seconds=lag_s,
            last_event_time=last,
            handler_seconds_sum=self.handler_sum,
            handler_seconds_count=self.handler_count,
            handler_buckets=tuple(self.buckets),
            removed=self.removed + (client.removed if client is not None else 0),
            in_flight=self.in_flight,
            key_queue_max=self.key_queue_max,
            already_done=self.already_done,
            progress_stalls=self.progress_stalls,
        )

    def track(self, client: ReaderCounts | None) -> None:
        """Read the lag and the reader's own counts from ``client`` from now on (None: a reader that
        keeps none); what an earlier client counted stays counted."""
        old = self._client
        if old is not None:
            self.skipped += old.skipped_passed
            self.removed += old.removed
        self._client = client
