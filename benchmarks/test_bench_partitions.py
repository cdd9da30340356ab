"""Partitioned streams, server side: what a shard's filter costs, one wildcard versus P/n literal subjects.

rjet's partition subjects spell the partition in prime-radix digits so that shard m of n matches ONE
filter subject with wildcards. The alternative layout (one literal token per partition) needs P/n
filter subjects per consumer. This measures consumer creation and a shard's full read both ways on
the same partitioned stream (P = 720, n = 2: 360 literal subjects).
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from nats.js import JetStreamContext, api

import rjet
from rjet.partitions import Partitions

from ._support import Arun, make_events, unique_name

EVENTS = int(os.environ.get("RJET_BENCH_PARTITION_EVENTS", "50000"))
P, N, M = 720, 2, 0


@pytest.fixture(scope="module")
def partitioned(js: JetStreamContext, arun: Arun[Any]) -> rjet.Stream:
    stream: rjet.Stream = arun(rjet.Stream.create(js, unique_name("partitioned"), partitions=P))
    events = make_events(EVENTS)
    for i in range(0, EVENTS, 10_000):
        arun(stream.insert_many(events[i : i + 10_000]))
    return stream


def filters(stream: rjet.Stream, how: str) -> list[str]:
    layout = Partitions(P)
    if how == "one-wildcard":
        return [layout.filter_subject(stream.subject, M, N)]
    return [f"{stream.subject}.{layout.tokens(p)}" for p in range(P) if p % N == M]


@pytest.mark.parametrize("how", ["one-wildcard", "literal-per-partition"])
def test_consumer_creation(
    benchmark: Any, js: JetStreamContext, arun: Arun[Any], partitioned: rjet.Stream, how: str
) -> None:
    subjects = filters(partitioned, how)

    async def create_and_delete() -> None:
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE, mem_storage=True, inactive_threshold=30.0,
            **({"filter_subject": subjects[0]} if len(subjects) == 1 else {"filter_subjects": subjects}),
        )  # fmt: skip
        info = await js.add_consumer(partitioned.name, config)
        await js.delete_consumer(partitioned.name, info.name)

    benchmark.group = "partitions: consumer create+delete"
    benchmark.pedantic(lambda: arun(create_and_delete()), rounds=20, iterations=1)
    benchmark.extra_info.update(filter_subjects=len(subjects), events_in_stream=EVENTS)


@pytest.mark.parametrize("how", ["one-wildcard", "literal-per-partition"])
def test_shard_read(benchmark: Any, js: JetStreamContext, arun: Arun[Any], partitioned: rjet.Stream, how: str) -> None:
    view = rjet.Stream(js, partitioned.name, filter_subjects=filters(partitioned, how))
    counts: list[int] = []

    async def read() -> None:
        async with await view.stream(to_head=True) as client:
            counts.append(len([e async for e in client]))

    benchmark.group = "partitions: shard read to head"
    t = time.perf_counter()
    benchmark.pedantic(lambda: arun(read()), rounds=3, iterations=1)
    expected = sum(1 for fid, _, _ in make_events(EVENTS) if Partitions(P).partition(fid) % N == M)
    assert counts[-1] == expected
    best = benchmark.stats.stats.min if benchmark.stats else (time.perf_counter() - t) / 3
    benchmark.extra_info.update(
        filter_subjects=len(view.filter_subjects), events=expected, events_per_s=round(expected / best)
    )
