"""Prometheus metrics for rjet consumers (optional extra: ``pip install 'rjet[metrics]'``).

The collector reads :class:`rjet.ConsumerStats` at scrape time, so the hot path pays nothing for
metrics beyond the integer counters ``run`` keeps anyway. :func:`serve_metrics` exposes them over
HTTP from the running event loop (no thread).

::

    stats = rjet.ConsumerStats("mailer", timing=True)
    registry = CollectorRegistry()
    registry.register(RjetCollector([stats], cursor_stores=[store]))
    async with serve_metrics(registry, port=9464):
        await rjet.run_forever(spec, stats=stats)

Metrics (label ``consumer``; flushes by ``namespace``):
``rjet_events_handled_total``, ``rjet_events_filtered_total``, ``rjet_events_skipped_total``,
``rjet_events_removed_total``,
``rjet_handler_errors_total``, ``rjet_dead_letters_total``, ``rjet_runs_total``,
``rjet_consumer_lag_events``, ``rjet_consumer_lag_seconds``, ``rjet_handler_duration_seconds``
(histogram), ``rjet_cursor_flushes_total``; for concurrent consumers ``rjet_events_already_done_total``,
``rjet_progress_stalls_total``, ``rjet_handlers_in_flight`` and ``rjet_key_queue_max`` (the hot-key
figure: the most events of one foreign ID waiting at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypeAlias

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("rjet.metrics needs prometheus-client: pip install 'rjet[metrics]'") from e

from rjet.stats import LATENCY_BUCKETS, ConsumerStats, StatsSnapshot

if TYPE_CHECKING:
    from rjet.parallel import Summary

__all__ = ["Check", "ParallelCollector", "RjetCollector", "serve_metrics"]

Check: TypeAlias = Callable[[], tuple[bool, str]]
"""A health check that :func:`serve_metrics` serves at a path of its own: ``(ok, reason)``."""


class _Flushes(Protocol):
    namespace: str
    flushes: int


class RjetCollector(Collector):
    """Collects the statistics of ``stats`` (and flush counts of ``cursor_stores``) at scrape time.

    ``stats`` may be any iterable, read anew at each scrape (a list the caller appends to works).
    """

    def __init__(self, stats: Iterable[ConsumerStats], cursor_stores: Sequence[_Flushes] = ()) -> None:
        self._stats = stats
        self._stores = cursor_stores

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        """Yield every metric family."""
        yield from _families([s.snapshot() for s in self._stats])
        flushes = CounterMetricFamily("rjet_cursor_flushes", "Cursor store flushes written.", labels=["namespace"])
        for store in self._stores:
            flushes.add_metric([store.namespace], store.flushes)
        yield flushes


def _families(snaps: list[StatsSnapshot]) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
    counters = [
        ("rjet_events_handled", "Events the handler succeeded on.", "handled"),
        ("rjet_events_filtered", "Events skipped by the consumer's type or event filter.", "filtered"),
        ("rjet_events_skipped", "Events of other shards' keys passed over, up to the consumer's position.", "skipped"),
        (
            "rjet_events_removed",
            "Stream sequences removed ahead of the reader and skipped.",
            "removed",
        ),
        ("rjet_handler_errors", "Handler failures (each try counts).", "errors"),
        ("rjet_dead_letters", "Events given up on and recorded as dead letters.", "dead_lettered"),
        ("rjet_runs", "Times run started for the consumer.", "runs"),
        (
            "rjet_events_already_done",
            "Events stored as done above the cursor by an earlier run and not handled again.",
            "already_done",
        ),
        ("rjet_progress_stalls", "Times reading paused: the done set above the cursor was full.", "progress_stalls"),
    ]
    for metric, doc, field in counters:
        family = CounterMetricFamily(metric, doc, labels=["consumer"])
        for snap in snaps:
            family.add_metric([snap.name], getattr(snap, field))
        yield family
    lag = GaugeMetricFamily("rjet_consumer_lag_events", "Events in the stream not yet delivered.", labels=["consumer"])
    age = GaugeMetricFamily(
        "rjet_consumer_lag_seconds", "Age of the last handled event while there is lag.", labels=["consumer"]
    )
    hist = HistogramMetricFamily(
        "rjet_handler_duration_seconds", "Handler latency (with timing enabled).", labels=["consumer"]
    )
    for snap in snaps:
        lag.add_metric([snap.name], snap.lag_events)
        age.add_metric([snap.name], snap.lag_seconds)
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], snap.handler_buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        hist.add_metric([snap.name], buckets, snap.handler_seconds_sum)
    in_flight = GaugeMetricFamily("rjet_handlers_in_flight", "Handler calls running now.", labels=["consumer"])
    hot = GaugeMetricFamily(
        "rjet_key_queue_max", "The most events of one foreign ID waiting at once (hot keys).", labels=["consumer"]
    )
    for snap in snaps:
        in_flight.add_metric([snap.name], snap.in_flight)
        hot.add_metric([snap.name], snap.key_queue_max)
    yield from (lag, age, hist, in_flight, hot)


class _Group(Protocol):
    def statistics(self) -> Summary: ...


class ParallelCollector(Collector):
    """Collects a :class:`rjet.parallel.Parallel` group's per-shard figures (label ``consumer``: the
    shard's name) in the parent process, which hears from every worker four times a second.

    The families of :class:`RjetCollector` (from each worker's own statistics; they start over when a
    worker is restarted, which Prometheus counters allow), plus ``rjet_worker_restarts_total``,
    ``rjet_shard_running`` (1 while the shard's worker runs) and ``rjet_cursor_sequence`` (the last
    cursor the shard wrote). Handler latency needs ``Parallel(..., handler_timing=True)``.
    """

    def __init__(self, group: _Group) -> None:
        self._group = group

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        """Yield every metric family."""
        shards = self._group.statistics().shards
        label = ["consumer"]
        yield from _families([s.live for s in shards if s.live is not None])
        restarts = CounterMetricFamily("rjet_worker_restarts", "Times the shard's worker was restarted.", labels=label)
        running = GaugeMetricFamily("rjet_shard_running", "1 while the shard's worker runs.", labels=label)
        cursor = GaugeMetricFamily("rjet_cursor_sequence", "The last cursor the shard wrote.", labels=label)
        flushes = CounterMetricFamily("rjet_cursor_flushes", "Cursor store flushes written.", labels=label)
        for s in shards:
            restarts.add_metric([s.name], s.restarts)
            running.add_metric([s.name], 1.0 if s.state == "running" else 0.0)
            cursor.add_metric([s.name], float(s.cursor) if s.cursor.isdigit() else 0.0)
            flushes.add_metric([s.name], s.flushes)
        yield from (restarts, running, cursor, flushes)


@contextlib.asynccontextmanager
async def serve_metrics(
    registry: CollectorRegistry,
    *,
    host: str = "127.0.0.1",
    port: int = 9464,
    checks: Mapping[str, Check] | None = None,
) -> AsyncIterator[asyncio.Server]:
    """Serve ``registry`` at ``http://host:port/metrics`` on this event loop while the block runs.

    ``checks`` maps more paths (``"/healthz"``, ``"/readyz"``) to a :data:`Check`, called at each
    request: status 200 when it says ok, else 503, with a one-line JSON body
    ``{"status": "ok" | "unavailable", "reason": ...}``.
    """
    routes = dict(checks or {})

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = (request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"").split(b"?")[0]
            check = routes.get(path.decode("ascii", "replace"))
            if path == b"/metrics":
                body, status, ctype = generate_latest(registry), b"200 OK", CONTENT_TYPE_LATEST.encode()
            elif check is not None:
                try:
                    ok, reason = check()
                except Exception as e:  # a broken check is a failing one, not a dropped connection
                    ok, reason = False, f"the check failed: {e!r}"
                body = json.dumps({"status": "ok" if ok else "unavailable", "reason": reason}).encode() + b"\n"
                status, ctype = (b"200 OK" if ok else b"503 Service Unavailable"), b"application/json"
            else:
                paths = ", ".join(["/metrics", *routes])
                body, status, ctype = f"not found; try {paths}\n".encode(), b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status, ctype, len(body), body)
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
