"""What every row of ``rjet bench`` shares: the row (a :class:`Figure`), the run's setup
(:class:`Bench`), the timing (the fastest of a few rounds, the paths compared taken in turns), and
the error for a measurement that did not measure what it says."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

import rjet

__all__ = ["Bench", "BenchError", "EventTuple", "Figure", "best", "best_both"]

EventTuple = tuple[str, int, bytes]


class BenchError(rjet.RjetError):
    """A measurement did not measure what it says: a read short of its events, events without the
    header they were written with. Its figure would be wrong, so there is none."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"rjet bench, {path}: {problem}")
        self.path = path
        self.problem = problem


@dataclasses.dataclass(frozen=True, slots=True)
class Bench:
    """One run's setup: rjet's connection and the baselines' own (rjet's reader installs its parser
    fast lane on the connection it reads from, and nats-py's paths must not read through it), the
    servers and options they were opened with (a worker process opens its own), the events every
    path moves, and the streams made, deleted at the end."""

    servers: list[str]
    options: dict[str, Any]
    nc: Client
    js: JetStreamContext
    base_nc: Client
    base_js: JetStreamContext
    events: int
    rounds: int
    items: list[EventTuple]
    tag: str
    made: list[str] = dataclasses.field(default_factory=list)

    def name(self, what: str) -> str:
        """A stream name of this run's, to be deleted at its end."""
        name = f"rjet_bench_{what}_{self.tag}_{len(self.made)}"
        self.made.append(name)
        return name


@dataclasses.dataclass(frozen=True, slots=True)
class Figure:
    """One comparison: rjet's figure, the baseline's, their ratio, and the target from the issue.

    ``target`` says the target in words; the bounds below are what :attr:`meets` checks, and
    ``condition`` is a check the measurement made itself (the replies a flush waited for, a peak
    against its budget). A figure with none of them has no target: ``meets`` is None. ``detail``
    is shown after rjet's figure (the sizes it was measured at, what else it was seen to do).
    """

    path: str
    unit: str
    rjet: float
    baseline_name: str
    baseline: float | None
    target: str
    min_ratio: float | None = None
    max_ratio: float | None = None
    min_value: float | None = None
    max_value: float | None = None
    detail: str = ""
    condition: bool | None = None

    @property
    def ratio(self) -> float | None:
        """rjet / baseline, for rates and costs alike (a cost below 1x is cheaper than its baseline)."""
        return self.rjet / self.baseline if self.baseline else None

    @property
    def meets(self) -> bool | None:
        """Whether the figure meets its target; None when it has none (or its ratio is unknown)."""
        bounds = (self.min_ratio, self.max_ratio, self.min_value, self.max_value, self.condition)
        if all(b is None for b in bounds):
            return None
        ratio = self.ratio
        if ratio is None and (self.min_ratio is not None or self.max_ratio is not None):
            return None
        checks = [
            self.min_ratio is None or (ratio is not None and ratio >= self.min_ratio),
            self.max_ratio is None or (ratio is not None and ratio <= self.max_ratio),
            self.min_value is None or self.rjet >= self.min_value,
            self.max_value is None or self.rjet <= self.max_value,
            self.condition is not False,
        ]
        return all(checks)


async def best(rounds: int, fn: Callable[[], Awaitable[Any]]) -> float:
    """Best wall seconds of ``fn`` over ``rounds`` runs."""
    [(wall, _)] = await best_both(rounds, fn)
    return wall


async def best_both(rounds: int, *fns: Callable[[], Awaitable[Any]]) -> list[tuple[float, float]]:
    """(best wall seconds, best CPU seconds of this process) of each of ``fns`` over ``rounds`` runs,
    taken in turns so that all see the same neighbours on a shared machine (on such a machine the
    slow rounds measure the neighbours)."""
    fastest = [(float("inf"), float("inf")) for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            await fn()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            fastest[i] = (min(fastest[i][0], wall), min(fastest[i][1], cpu))
    return fastest
