"""OpenTelemetry (rjet.otel): one trace from insert to handler, with the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import json
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import rjet
from rjet import otel
from rjet.server import EmbeddedServer


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otel.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        otel.use_tracer_provider(None)


async def run_to_head(spec: rjet.Spec, stats: rjet.ConsumerStats | None = None) -> None:
    with pytest.raises(rjet.HeadReached):
        await rjet.run(spec, stats=stats)


def named(spans: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.kind == kind]


async def test_off_by_default_writes_no_trace_header(stream: rjet.Stream) -> None:
    assert not otel.enabled()  # the API's proxy provider: no SDK configured
    await stream.insert("k", 1, b"x")
    seen: list[rjet.Event] = []
    await run_to_head(
        rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", lambda f, e: seen.append(e)), to_head=True)
    )
    assert seen[0].trace is None


async def test_a_sequential_handler_span_is_the_child_of_the_insert_span(
    stream: rjet.Stream, spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("app", tracer_provider=otel._explicit)
    with tracer.start_as_current_span("request") as request:
        seq = await stream.insert("user-1", 7, b"{}")
    await stream.insert("user-2", 3)
    seen: list[rjet.Event] = []

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event)
        assert (
            trace.get_current_span().get_span_context().trace_id == trace.get_current_span().get_span_context().trace_id
        )
        if event.id == "2" and not any(e.id == "2" for e in seen[:-1]):
            raise RuntimeError("first attempt fails")

    stats = rjet.ConsumerStats()
    consumer = rjet.Consumer("c", fn, dead_letter=None, on_error="retry")
    await run_to_head(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True), stats)
    (send, _) = named(spans, SpanKind.PRODUCER)
    assert send.name == f"send {stream.name}"
    assert send.parent is not None
    assert send.parent.span_id == request.get_span_context().span_id
    assert send.attributes is not None
    assert send.attributes["messaging.system"] == "nats"
    process = named(spans, SpanKind.CONSUMER)
    first = process[0]
    assert first.name == f"process {stream.name}"
    assert first.context.trace_id == request.get_span_context().trace_id  # one trace, insert to handler
    assert first.parent is not None
    assert first.parent.span_id == send.context.span_id
    assert dict(first.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": stream.name,
        "messaging.consumer.group.name": "c",
        "messaging.message.id": str(seq),
        "rjet.event.type": 7,
        "rjet.event.foreign_id": "user-1",
        "rjet.attempt": 1,
    }
    assert seen[0].trace is not None
    assert seen[0].trace["traceparent"].split("-")[1] == format(request.get_span_context().trace_id, "032x")
    # Retries: each attempt its own span; the failure recorded on it.
    failed, retried = process[1], process[2]
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["rjet.attempt"] == 1
    assert failed.attributes["error.type"] == "RuntimeError"
    assert any(ev.name == "exception" for ev in failed.events)
    assert retried.attributes is not None
    assert retried.attributes["rjet.attempt"] == 2
    assert retried.status.status_code != StatusCode.ERROR
    # Metrics are what they are without tracing.
    assert (stats.handled, stats.errors) == (2, 1)


async def test_the_event_keeps_its_trace_through_pickle_and_on_the_plain_read_path(
    stream: rjet.Stream, spans: InMemorySpanExporter
) -> None:
    await stream.insert("k", 1)
    client = await stream.stream(to_head=True)
    event = await client.recv()
    await client.close()
    assert event.trace is not None
    assert set(event.trace) == {"traceparent"}
    back = pickle.loads(pickle.dumps(event))
    assert back == event
    assert back.trace == event.trace
    assert rjet.Event("1", 1, "k", timestamp_us=0).trace is None


async def test_tracestate_travels_too(stream: rjet.Stream, spans: InMemorySpanExporter) -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    parent = SpanContext(
        0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("v", "1")])
    )
    with trace.use_span(NonRecordingSpan(parent)):
        await stream.insert_many([("a", 1, b""), ("b", 1, b"")])
    client = await stream.stream(to_head=True)
    events = [await client.recv(), await client.recv()]
    await client.close()
    for e in events:
        assert e.trace is not None
        assert e.trace["tracestate"] == "v=1"
        assert e.trace["traceparent"].split("-")[1] == format(0x1234, "032x")
    (send,) = named(spans, SpanKind.PRODUCER)
    assert send.attributes is not None
    assert send.attributes["messaging.batch.message_count"] == 2


async def test_without_a_tracer_a_current_context_is_still_propagated(stream: rjet.Stream) -> None:
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    parent = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(parent)):
        await stream.insert("k", 1)
    client = await stream.stream(to_head=True)
    event = await client.recv()
    await client.close()
    assert event.trace == {"traceparent": f"00-{0xABC:032x}-{0xDEF:016x}-01"}


async def test_a_batch_gets_one_span_with_a_link_per_event(stream: rjet.Stream, spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("app", tracer_provider=otel._explicit)
    for i in range(3):
        with tracer.start_as_current_span(f"request-{i}"):
            await stream.insert(f"k{i}", 1)
    await stream.insert("untraced", 1)  # inserted with the tracer on: traced too
    producers = {s.context.span_id for s in named(spans, SpanKind.PRODUCER)}
    batches: list[list[rjet.Event]] = []

    async def fn(fate: rjet.Fate, events: list[rjet.Event]) -> None:
        batches.append(events)

    consumer = rjet.Consumer("c", fn, batch=rjet.Batch(max_len=10, max_wait=0.2))
    await run_to_head(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True))
    process = named(spans, SpanKind.CONSUMER)
    assert len(process) == len(batches)
    assert sum(len(b) for b in batches) == 4
    links = {link.context.span_id for s in process for link in s.links}
    assert links == producers
    for s, b in zip(process, batches, strict=True):
        assert s.parent is None
        assert s.attributes is not None
        assert s.attributes["messaging.batch.message_count"] == len(b)


async def test_a_concurrent_consumer_s_spans_each_follow_their_insert(
    stream: rjet.Stream, spans: InMemorySpanExporter
) -> None:
    await stream.insert_many([(f"k{i % 5}", 1, b"") for i in range(20)])  # one send span for all
    (send,) = named(spans, SpanKind.PRODUCER)
    stats = rjet.ConsumerStats()

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:  # sync: runs in the pool's threads
        assert trace.get_current_span().get_span_context().trace_id == send.context.trace_id

    consumer = rjet.Consumer("c", fn, concurrency=4)
    await run_to_head(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True), stats)
    process = named(spans, SpanKind.CONSUMER)
    assert len(process) == 20 == stats.handled
    assert {s.parent.span_id for s in process if s.parent} == {send.context.span_id}
    assert {s.attributes["messaging.message.id"] for s in process if s.attributes} == {str(i) for i in range(1, 21)}


# ------------------------------------------------------------- Parallel: a worker in another process
class _FileExporter(SpanExporter):
    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a") as f:
            for s in spans:
                f.write(json.dumps({
                    "trace": s.context.trace_id, "span": s.context.span_id,
                    "parent": s.parent.span_id if s.parent else None, "name": s.name,
                    "attributes": dict(s.attributes or {}),
                }) + "\n")  # fmt: skip
        return SpanExportResult.SUCCESS


def _exporting(path: Path) -> Any:
    def on_start(m: int) -> None:  # in the worker process
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_FileExporter(path / f"spans-{m}.jsonl")))
        otel.use_tracer_provider(provider)

    return on_start


def _handle(fate: rjet.Fate, event: rjet.Event) -> None:
    pass


@pytest.mark.timeout(120)
async def test_one_trace_from_an_insert_here_to_a_parallel_worker_there(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    from rjet.parallel import Parallel

    tracer = trace.get_tracer("app", tracer_provider=otel._explicit)
    with tracer.start_as_current_span("request") as request:
        await stream.insert_many([(f"k{i}", 1, b"") for i in range(6)])
    (send,) = named(spans, SpanKind.PRODUCER)
    group = Parallel(name, 2, _handle, servers=server.url, stream=name, namespace=name, on_start=_exporting(tmp_path))
    await group.run_async(to_head=True)
    rows = [json.loads(line) for p in sorted(tmp_path.glob("spans-*.jsonl")) for line in p.read_text().splitlines()]  # noqa: ASYNC240
    assert len(rows) == 6
    for row in rows:
        assert row["trace"] == request.get_span_context().trace_id
        assert row["parent"] == send.context.span_id
        assert row["attributes"]["rjet.shard"] in ("0/2", "1/2")
    assert {row["attributes"]["rjet.shard"] for row in rows} == {"0/2", "1/2"}
    await asyncio.sleep(0)
