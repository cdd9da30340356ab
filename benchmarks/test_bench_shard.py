"""Shard scan: what it costs a Parallel worker to pass over events that belong to another shard.

Each round is ``rjet.run`` to the head of the pre-filled stream with a :class:`rjet.MemCursorStore`:

- ``accept_all``: no filter, a no-op handler: every event fully decoded and handled (the reference);
- ``reject_hashed``: ``key_filter`` hashes the foreign ID as a shard would (xxh3_64 of the UTF-8
  bytes, modulo 4) and compares it with a shard index that never matches: every event is another
  shard's, and the filter's realistic cost is in;
- ``reject_constant``: ``key_filter`` returns False without hashing (the floor of a filter).

Per-event figures are whole-run costs (network, nats-py, rjet) divided by the events read.
Target (issue, 2): passing over an event costs <= 4 us and <= 1/4 of a fully decoded event.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import xxhash

import rjet

from ._support import ROUNDS, Arun, ratio, record, target

pytestmark = pytest.mark.benchmark(group="shard")

SHARDS = 4


def _noop(fate: rjet.Fate, event: rjet.Event) -> None:
    return None


def _other_shard(foreign_id: str) -> bool:
    return xxhash.xxh3_64_intdigest(foreign_id.encode()) % SHARDS == SHARDS  # never: every event is another's


def _run_to_head(
    benchmark: Any, filled: rjet.Stream, arun: Arun[Any], key_filter: Callable[[str], bool] | None
) -> tuple[int, int]:
    handled = 0

    def count(fate: rjet.Fate, event: rjet.Event) -> None:
        nonlocal handled
        handled += 1

    stores: list[rjet.MemCursorStore] = []

    def setup() -> None:
        stores.append(rjet.MemCursorStore())

    async def scan() -> None:
        consumer = rjet.Consumer("shard_bench", count, key_filter=key_filter)
        spec = rjet.Spec(filled.stream, stores[-1], consumer, to_head=True)
        with contextlib.suppress(rjet.HeadReached):
            await rjet.run(spec)

    benchmark.pedantic(lambda: arun(scan()), setup=setup, rounds=ROUNDS, warmup_rounds=1)
    n = int(arun(filled.info()).state.messages)
    assert stores[-1].cursors["shard_bench"] == str(n)  # the cursor passed every event
    return n, handled


def test_accept_all(benchmark: Any, filled: rjet.Stream, arun: Arun[Any], figures: dict[str, float]) -> None:
    n, handled = _run_to_head(benchmark, filled, arun, None)
    assert handled > 0
    assert handled % n == 0  # each round handled every event
    record(benchmark, events=n, figures=figures, key="shard_accept_all")


def test_reject_hashed(benchmark: Any, filled: rjet.Stream, arun: Arun[Any], figures: dict[str, float]) -> None:
    n, handled = _run_to_head(benchmark, filled, arun, _other_shard)
    assert handled == 0
    rate = record(benchmark, events=n, figures=figures, key="shard_reject_hashed", shards=SHARDS)
    _pass_over_target(benchmark, figures, rate)


def test_reject_constant(benchmark: Any, filled: rjet.Stream, arun: Arun[Any], figures: dict[str, float]) -> None:
    n, handled = _run_to_head(benchmark, filled, arun, lambda fid: False)
    assert handled == 0
    rate = record(benchmark, events=n, figures=figures, key="shard_reject_constant")
    ratio(benchmark, figures, rate, "shard_accept_all", "accept_all")


def _pass_over_target(benchmark: Any, figures: dict[str, float], rate: float) -> None:
    r = ratio(benchmark, figures, rate, "shard_accept_all", "accept_all")
    if not rate:
        return
    us = 1e6 / rate
    # cost ratio = (1/rate) / (1/accept_rate) = 1 / r
    cost_share = None if r is None else 1 / r
    if cost_share is not None:
        benchmark.extra_info["cost_vs_accept_all"] = round(cost_share, 3)
    met = None if cost_share is None else us <= 4.0 and cost_share <= 0.25
    target(benchmark, "pass-over <= 4 us/event and <= 1/4 of a decoded event", met)
