"""Insert: N events into a fresh stream (file storage), every publish acknowledged, sequences returned.

- rjet: ``stream.insert_many(events)`` (headers encoded and events checked inside the timed part).
- baseline ``publish_async``: nats-py ``js.publish_async`` per event, ``publish_async_completed()``,
  then the acks' sequences (headers prepared outside the timed part: the same bytes on the wire).
- baseline ``gather publish``: ``asyncio.gather`` of ``js.publish`` in windows of 1000 (a gather
  does not promise the events are stored in order).

Each round gets its own stream, created before and deleted after the timed part.
Target (issue, 3): rjet >= 2x the ``publish_async`` baseline.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.js import JetStreamContext

import rjet
from rjet._nats.frames import encode_headers

from ._support import ROUNDS, Arun, EventTuple, ratio, record, target, unique_name

pytestmark = pytest.mark.benchmark(group="insert")

GATHER_WINDOW = 1000


class _Rounds:
    """Per round: a fresh stream in ``setup``, deleted in ``teardown``."""

    def __init__(self, js: JetStreamContext, arun: Arun[Any], events: list[EventTuple]) -> None:
        self.js = js
        self.arun = arun
        self.events = events
        self.base_headers = [encode_headers(fid, typ) for fid, typ, _ in events]
        self.stream: rjet.Stream | None = None
        self.headers: list[dict[str, str]] = []

    def setup(self) -> None:
        self.stream = self.arun(rjet.Stream.create(self.js, unique_name("bench_insert")))
        self.headers = self.base_headers  # the same headers rjet stores

    def teardown(self) -> None:
        assert self.stream is not None
        info = self.arun(self.stream.info())
        assert info.state.messages == len(self.events), info.state
        self.arun(self.js.delete_stream(self.stream.name))
        self.stream = None


@pytest.fixture
def rounds(js: JetStreamContext, arun: Arun[Any], events: list[EventTuple]) -> _Rounds:
    return _Rounds(js, arun, events)


def test_baseline_natspy_publish_async(
    benchmark: Any, rounds: _Rounds, baseline_js: JetStreamContext, arun: Arun[Any], figures: dict[str, float]
) -> None:
    js = baseline_js

    async def insert() -> list[int]:
        assert rounds.stream is not None
        subject = rounds.stream.subject
        futures = [
            await js.publish_async(subject, data, headers=h)
            for (_, _, data), h in zip(rounds.events, rounds.headers, strict=True)
        ]
        await js.publish_async_completed()
        return [f.result().seq for f in futures]

    seqs = benchmark.pedantic(lambda: arun(insert()), setup=rounds.setup, teardown=rounds.teardown, rounds=ROUNDS)
    assert seqs[-1] == len(rounds.events)
    record(benchmark, events=len(rounds.events), figures=figures, key="insert_natspy_publish_async")


def test_baseline_natspy_gather_publish(
    benchmark: Any, rounds: _Rounds, baseline_js: JetStreamContext, arun: Arun[Any], figures: dict[str, float]
) -> None:
    js = baseline_js

    async def insert() -> list[int]:
        assert rounds.stream is not None
        subject = rounds.stream.subject
        events, headers = rounds.events, rounds.headers
        seqs: list[int] = []
        for start in range(0, len(events), GATHER_WINDOW):
            acks = await asyncio.gather(
                *(
                    js.publish(subject, events[i][2], headers=headers[i])
                    for i in range(start, min(start + GATHER_WINDOW, len(events)))
                )
            )
            seqs += [a.seq for a in acks]
        return seqs

    seqs = benchmark.pedantic(lambda: arun(insert()), setup=rounds.setup, teardown=rounds.teardown, rounds=ROUNDS)
    assert max(seqs) == len(rounds.events)
    record(benchmark, events=len(rounds.events), figures=figures, key="insert_natspy_gather", window=GATHER_WINDOW)


def test_rjet_insert_many(benchmark: Any, rounds: _Rounds, arun: Arun[Any], figures: dict[str, float]) -> None:
    async def insert() -> list[int]:
        assert rounds.stream is not None
        return await rounds.stream.insert_many(rounds.events)

    seqs = benchmark.pedantic(lambda: arun(insert()), setup=rounds.setup, teardown=rounds.teardown, rounds=ROUNDS)
    assert seqs == list(range(1, len(rounds.events) + 1))
    rate = record(benchmark, events=len(rounds.events), figures=figures, key="insert_rjet")
    ratio(benchmark, figures, rate, "insert_natspy_gather", "natspy_gather_publish")
    r = ratio(benchmark, figures, rate, "insert_natspy_publish_async", "natspy_publish_async")
    target(benchmark, ">= 2x nats-py publish_async", None if r is None else r >= 2)
