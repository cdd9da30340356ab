"""Helpers shared by the benchmark modules: event data, names, and what goes into ``extra_info``.

Throughputs come from the fastest round (``stats.min``): on a shared machine the slow rounds
measure the neighbours; ratios compare fastest rounds on both sides.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeAlias, TypeVar

T = TypeVar("T")
Arun: TypeAlias = Callable[[Coroutine[Any, Any, T]], T]
EventTuple: TypeAlias = tuple[str, int, bytes]

EVENTS = int(os.environ.get("RJET_BENCH_EVENTS", "100000"))
FOREIGN_IDS = int(os.environ.get("RJET_BENCH_FOREIGN_IDS", "1000"))
ENFORCE = os.environ.get("RJET_BENCH_ENFORCE", "") not in ("", "0")
FILL_CHUNK = 10_000
ROUNDS = 3  # rounds for the paths that move all N events

_names = itertools.count(1)


def make_events(n: int, foreign_ids: int = FOREIGN_IDS) -> list[EventTuple]:
    """``n`` events, foreign IDs round-robin over ``foreign_ids`` entities, types 1-5, ~75-byte JSON bodies."""
    return [
        (
            f"user-{i % foreign_ids}",
            1 + i % 5,
            b'{"seq": %d, "amount": 1234, "currency": "EUR", "note": "benchmark event"}' % i,
        )
        for i in range(n)
    ]


def unique_name(prefix: str) -> str:
    """A stream, consumer or cursor name not used before in this session."""
    return f"{prefix}_{next(_names)}"


def best(benchmark: Any) -> float | None:
    """Seconds of the fastest round; None when timing is disabled (``--benchmark-disable``)."""
    if benchmark.stats is None:
        return None
    return float(benchmark.stats.stats.min)


def record(
    benchmark: Any,
    *,
    events: int,
    figures: dict[str, float] | None = None,
    key: str | None = None,
    unit: str = "events",
    **extra: Any,
) -> float:
    """Record sizes and throughput (``<unit>_per_s``, ``us_per_<event>``) in ``extra_info``.

    Returns the throughput (0.0 when nothing was timed). ``figures[key]`` keeps it for a later
    benchmark of the same session to compute its ratio.
    """
    benchmark.extra_info[unit] = events
    benchmark.extra_info.update(extra)
    seconds = best(benchmark)
    if seconds is None:
        return 0.0
    rate = events / seconds
    benchmark.extra_info[f"{unit}_per_s"] = round(rate)
    benchmark.extra_info[f"us_per_{unit.rstrip('s')}"] = round(seconds / events * 1e6, 3)
    if figures is not None and key is not None:
        figures[key] = rate
    return rate


def ratio(benchmark: Any, figures: dict[str, float], rate: float, baseline: str, label: str) -> float | None:
    """``rate / figures[baseline]`` into ``extra_info`` (None when the baseline was not measured)."""
    base = figures.get(baseline)
    if not base or not rate:
        return None
    value = rate / base
    benchmark.extra_info[f"ratio_vs_{label}"] = round(value, 2)
    return value


def target(benchmark: Any, description: str, met: bool | None) -> None:
    """Record the issue's target and whether it is met; fail only with ``RJET_BENCH_ENFORCE=1``."""
    benchmark.extra_info["target"] = description
    benchmark.extra_info["met"] = met
    if ENFORCE and met is not None:
        assert met, f"target not met: {description} ({benchmark.extra_info})"
