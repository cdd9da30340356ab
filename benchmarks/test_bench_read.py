"""Ordered read: every event of the pre-filled stream, from the start to the head.

- rjet: ``await stream.stream("", to_head=True)`` then ``async for`` to the end: fully decoded
  :class:`rjet.Event` objects, gap checks, the consumer created and deleted inside the timed part.
- baseline ``fetch``: nats-py ``js.pull_subscribe`` (AckPolicy NONE) and a ``fetch(1000)`` loop.
- baseline ``ordered push``: nats-py ``js.subscribe(..., cb=..., ordered_consumer=True)``.

When ``ReadConfig`` has ``fast_lane`` (rjet's own frame parser on the connection), the read is also
measured with ``fast_lane=False`` on a connection of its own.

``traced``: the same events inserted under an OpenTelemetry span context, so that each message
carries a ``traceparent`` header before rjet's (as ``insert`` writes it), read with tracing off in the
reader (no tracer provider); its rate beside the untraced read's (#27).

The baselines only count messages (no metadata parse, no decoding), so the ratios are conservative.
Target (issue, 1): rjet >= 5x the ``fetch`` baseline (aim 8x).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

import rjet
from rjet.server import EmbeddedServer

from ._support import FILL_CHUNK, ROUNDS, Arun, EventTuple, ratio, record, target, unique_name

pytestmark = pytest.mark.benchmark(group="read")


def _count(filled: rjet.Stream, arun: Arun[Any]) -> int:
    info = arun(filled.info())
    return int(info.state.messages)


def test_baseline_natspy_fetch(
    benchmark: Any, filled: rjet.Stream, baseline_js: JetStreamContext, arun: Arun[Any], figures: dict[str, float]
) -> None:
    js = baseline_js
    n = _count(filled, arun)
    subs: list[Any] = []

    async def read() -> int:
        sub = await js.pull_subscribe(
            f"{filled.name}.>",
            stream=filled.name,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0),
        )
        subs.append(sub)
        got = 0
        while got < n:
            got += len(await sub.fetch(min(1000, n - got), timeout=10))
        return got

    def teardown() -> None:
        arun(subs.pop().unsubscribe())

    got = benchmark.pedantic(lambda: arun(read()), teardown=teardown, rounds=ROUNDS, warmup_rounds=1)
    assert got == n
    record(benchmark, events=n, figures=figures, key="read_natspy_fetch", batch=1000)


def test_baseline_natspy_ordered_push(
    benchmark: Any, filled: rjet.Stream, baseline_js: JetStreamContext, arun: Arun[Any], figures: dict[str, float]
) -> None:
    js = baseline_js
    n = _count(filled, arun)
    subs: list[Any] = []

    async def read() -> int:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        got = 0

        async def cb(msg: Msg) -> None:
            nonlocal got
            got += 1
            if got == n:
                done.set_result(None)

        subs.append(await js.subscribe(f"{filled.name}.>", stream=filled.name, cb=cb, ordered_consumer=True))
        await asyncio.wait_for(done, 60)
        return got

    def teardown() -> None:
        arun(subs.pop().unsubscribe())

    got = benchmark.pedantic(lambda: arun(read()), teardown=teardown, rounds=ROUNDS, warmup_rounds=1)
    assert got == n
    record(benchmark, events=n, figures=figures, key="read_natspy_ordered_push")


async def _read_all(stream: rjet.Stream) -> tuple[int, str]:
    got, last = 0, ""
    async with await stream.stream("", to_head=True) as client:
        async for event in client:
            got += 1
            last = event.id
    return got, last


@pytest.fixture(scope="module")
def filled_traced(js: JetStreamContext, arun: Arun[Any], events: list[EventTuple]) -> rjet.Stream:
    """The pre-filled stream's events again, each message with a W3C ``traceparent`` header.

    Inserted under a remote span context, which ``insert_many`` propagates without a tracer; the
    reader has no tracer provider either, so tracing is off where the read is timed."""
    trace = pytest.importorskip("opentelemetry.trace")
    parent = trace.SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=trace.TraceFlags(1))

    async def fill() -> rjet.Stream:
        stream = await rjet.Stream.create(js, unique_name("bench_traced"))
        with trace.use_span(trace.NonRecordingSpan(parent)):
            for start in range(0, len(events), FILL_CHUNK):
                await stream.insert_many(events[start : start + FILL_CHUNK])
        return stream

    stream: rjet.Stream = arun(fill())

    async def first() -> rjet.Event:
        async with await stream.stream("") as client:
            return await client.recv()

    assert arun(first()).trace is not None, "the traced events carry no trace context"
    return stream


@pytest.mark.parametrize("traced", [False, True], ids=["untraced", "traced"])
def test_rjet_ordered_read(
    benchmark: Any,
    filled: rjet.Stream,
    arun: Arun[Any],
    figures: dict[str, float],
    traced: bool,
    request: pytest.FixtureRequest,
) -> None:
    stream: rjet.Stream = request.getfixturevalue("filled_traced") if traced else filled
    n = _count(stream, arun)
    got, last = benchmark.pedantic(lambda: arun(_read_all(stream)), rounds=ROUNDS, warmup_rounds=1)
    assert (got, last) == (n, str(n))
    key = "read_rjet_traced" if traced else "read_rjet"
    rate = record(benchmark, events=n, figures=figures, key=key, batch=stream.read.batch, traced=traced)
    ratio(benchmark, figures, rate, "read_natspy_ordered_push", "natspy_ordered_push")
    r = ratio(benchmark, figures, rate, "read_natspy_fetch", "natspy_fetch")
    if traced:
        ratio(benchmark, figures, rate, "read_rjet", "untraced")
    else:
        target(benchmark, ">= 5x nats-py fetch(1000) (aim 8x)", None if r is None else r >= 5)


@pytest.fixture(scope="module")
def no_fast_lane(filled: rjet.Stream, bench_server: EmbeddedServer, arun: Arun[Any]) -> Iterator[rjet.Stream]:
    """The pre-filled stream read with ``ReadConfig(fast_lane=False)`` on a fresh connection."""
    if "fast_lane" not in {f.name for f in dataclasses.fields(rjet.ReadConfig)}:
        pytest.skip("this rjet has no ReadConfig.fast_lane")
    conn = arun(nats.connect(bench_server.url, max_reconnect_attempts=0))
    config = rjet.ReadConfig(fast_lane=False)  # type: ignore[call-arg,unused-ignore]
    yield rjet.Stream(conn.jetstream(timeout=30), filled.name, read=config)
    arun(conn.close())


def test_rjet_ordered_read_no_fast_lane(
    benchmark: Any, no_fast_lane: rjet.Stream, arun: Arun[Any], figures: dict[str, float]
) -> None:
    n = _count(no_fast_lane, arun)
    got, last = benchmark.pedantic(lambda: arun(_read_all(no_fast_lane)), rounds=ROUNDS, warmup_rounds=1)
    assert (got, last) == (n, str(n))
    rate = record(benchmark, events=n, figures=figures, key="read_rjet_no_fast_lane", fast_lane=False)
    ratio(benchmark, figures, rate, "read_rjet", "fast_lane")
    ratio(benchmark, figures, rate, "read_natspy_fetch", "natspy_fetch")
