"""OpenTelemetry tracing: one trace from ``insert`` to the handler (``pip install 'rjet[otel]'``).

Built on ``opentelemetry-api`` alone (the SDK and its exporters are the application's choice), after
OpenTelemetry's messaging semantic conventions:

- ``Stream.insert`` / ``insert_many`` record a producer span ``send <stream>`` and write its context
  into the message headers (W3C ``traceparent``, and ``tracestate`` when there is one). Without a
  tracer, a current valid span context (one a propagator extracted, say) is still written.
- ``run`` runs each handler call inside a consumer span ``process <stream>``, a CHILD of the
  producer's context: a single event has exactly one creation context, so the consumer's work joins
  the inserting request's trace (what a user looks for first). A batch has several, so its one span
  is a new trace with a LINK per event that carried one (the conventions' rule for batches).
- Attributes: ``messaging.system`` = ``nats``, ``messaging.destination.name`` (the stream),
  ``messaging.consumer.group.name`` (the consumer), ``messaging.message.id`` (the sequence),
  ``rjet.event.type``, ``rjet.event.foreign_id``, ``rjet.attempt`` (1, 2... for retries in this run),
  ``rjet.shard`` (``"m/n"`` in a ``Parallel`` worker), ``messaging.batch.message_count`` for a batch.
  A handler error is recorded on the span (an exception event, status ERROR, ``error.type``).

Tracing is on when ``opentelemetry`` is importable and a real tracer provider is configured (the
API's default proxy and its no-op provider mean off), or one is given with :func:`use_tracer_provider`.
Off, the read path does nothing it did not do before for an event without a trace context; one with
it (``insert`` writes it before rjet's headers) stays in the reader's bulk scan, which keeps its
header block for :attr:`rjet.Event.trace`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from rjet.event import Event

if TYPE_CHECKING:
    from rjet.consumer import Consumer

try:
    from opentelemetry import trace as _api
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: Any = TraceContextTextMapPropagator()
except ImportError:  # the extra is not installed: tracing is off
    _api = None  # type: ignore[assignment]
    _PROPAGATOR = None

__all__ = ["TRACEPARENT_HEADER", "TRACESTATE_HEADER", "enabled", "use_tracer_provider"]

TRACEPARENT_HEADER: Final = "traceparent"
"""The W3C trace context header ``insert`` writes (and the reader reads into :attr:`rjet.Event.trace`)."""
TRACESTATE_HEADER: Final = "tracestate"
"""The W3C trace state header, written with ``traceparent`` when the context has one."""

_explicit: Any = None  # a provider given to use_tracer_provider
_cache: tuple[Any, Any] = (None, None)  # (provider, its tracer)


def use_tracer_provider(provider: Any = None) -> None:
    """Trace with ``provider`` (an ``opentelemetry.trace.TracerProvider``) instead of the global one;
    ``None`` goes back to the global provider. ``opentelemetry.trace.NoOpTracerProvider()`` turns
    rjet's tracing off whatever the global provider is."""
    global _explicit
    _explicit = provider


def _tracer() -> Any:
    """rjet's tracer, or None when tracing is off."""
    global _cache
    if _api is None:
        return None
    provider = _explicit if _explicit is not None else _api.get_tracer_provider()
    if isinstance(provider, _api.ProxyTracerProvider | _api.NoOpTracerProvider):
        return None
    if _cache[0] is provider:
        return _cache[1]
    tracer = provider.get_tracer("rjet")
    _cache = (provider, tracer)
    return tracer


def enabled() -> bool:
    """Whether rjet records spans now (the extra is installed and a real tracer provider is configured)."""
    return _tracer() is not None


# ----------------------------------------------------------------------------------------- insert
def sending(stream: str, count: int) -> contextlib.AbstractContextManager[dict[str, str]] | None:
    """For an insert of ``count`` events: None when there is nothing to trace or propagate (off, and
    no valid current span context), else a context manager (the ``send`` span, when a tracer is
    configured) giving the trace headers to write."""
    if _api is None:
        return None
    tracer = _tracer()
    if tracer is None:
        if not _api.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return contextlib.nullcontext(carrier)
    return _send(tracer, stream, count)


@contextlib.contextmanager
def _send(tracer: Any, stream: str, count: int) -> Iterator[dict[str, str]]:
    attributes: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": stream,
    }
    if count != 1:
        attributes["messaging.batch.message_count"] = count
    with tracer.start_as_current_span(f"send {stream}", kind=_api.SpanKind.PRODUCER, attributes=attributes):
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        yield carrier


def header_lines(carrier: Mapping[str, str]) -> bytes:
    """The trace headers as raw NATS header lines (each ``name: value\\r\\n``)."""
    return b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in carrier.items() if "\n" not in v)


# ---------------------------------------------------------------------------------------- handler
def _parent(event: Event) -> Any:
    trace = event.trace
    return _PROPAGATOR.extract(trace) if trace else None


def _contexts(events: list[Event]) -> Iterator[Any]:
    """The valid span contexts the events carried."""
    for e in events:
        if e.trace and (sc := _api.get_current_span(_parent(e)).get_span_context()).is_valid:
            yield sc


def traced(consumer: Consumer, stream: str, shard: str | None) -> Callable[..., Any] | None:
    """``consumer.fn`` wrapped so that each call runs in a ``process`` span; None when tracing is off."""
    tracer = _tracer()
    if tracer is None:
        return None
    api = _api
    base: dict[str, Any] = {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": stream,
        "messaging.consumer.group.name": consumer.name,
    }
    if shard is not None:
        base["rjet.shard"] = shard
    span_name = f"process {stream}"
    kind = api.SpanKind.CONSUMER
    attempts: dict[str, int] = {}  # failed calls so far, by event (or a batch's first event)
    fn: Any = consumer.fn

    def start(item: Any) -> tuple[Any, str, int]:
        if type(item) is list:
            key = item[0].id if item else ""
            n = attempts.get(key, 0) + 1
            links = [api.Link(sc) for sc in _contexts(item)]
            attributes = {**base, "messaging.batch.message_count": len(item), "rjet.attempt": n}
            if item:
                attributes["messaging.message.id"] = item[0].id  # the first; the links name them all
            cm = tracer.start_as_current_span(span_name, kind=kind, links=links, attributes=attributes)
            return cm, key, n
        key = item.id
        n = attempts.get(key, 0) + 1
        attributes = {
            **base,
            "messaging.message.id": key,
            "rjet.event.type": item.type,
            "rjet.event.foreign_id": item.foreign_id,
            "rjet.attempt": n,
        }
        cm = tracer.start_as_current_span(span_name, context=_parent(item), kind=kind, attributes=attributes)
        return cm, key, n

    def failed(span: Any, key: str, n: int, e: BaseException) -> None:
        attempts[key] = n
        span.set_attribute("error.type", type(e).__qualname__)

    if consumer.is_async:

        async def call_async(fate: Any, item: Any, *rest: Any) -> None:
            cm, key, n = start(item)
            with cm as span:
                try:
                    await fn(fate, item, *rest)
                except BaseException as e:
                    failed(span, key, n, e)
                    raise
            if n > 1:
                attempts.pop(key, None)

        return call_async

    def call(fate: Any, item: Any, *rest: Any) -> Any:
        # (A sync handler that returns an awaitable has it awaited after its span ends.)
        cm, key, n = start(item)
        with cm as span:
            try:
                result = fn(fate, item, *rest)
            except BaseException as e:
                failed(span, key, n, e)
                raise
        if n > 1:
            attempts.pop(key, None)
        return result

    return call
