"""The messages between a :class:`rjet.parallel.Parallel` parent and its worker processes (over a pipe).

Worker -> parent: :class:`Started` once it consumes, :class:`Progress` now and then, :class:`Log` for
every log record, and one last :class:`Finished`. Parent -> worker: :class:`Stop`. A closed pipe (the
parent died) stops the worker too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, TypeAlias

from rjet.stats import StatsSnapshot

__all__ = ["Finished", "Log", "Outcome", "Progress", "Started", "Stop", "ToParent"]

Outcome: TypeAlias = Literal["done", "stopped", "fenced", "fatal", "crashed"]
"""``done``: head reached; ``stopped``: on request; ``fenced``: another runner took the shard;
``fatal``: an error retrying cannot fix; ``crashed``: the worker itself failed."""


@dataclasses.dataclass(frozen=True, slots=True)
class Started:
    """The worker is set up and consumes."""

    pid: int


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """What the worker did so far; ``cursor`` is the one it last wrote ("" for none yet)."""

    handled: int
    skipped: int
    cursor: str
    live: StatsSnapshot
    flushes: int


@dataclasses.dataclass(frozen=True, slots=True)
class Log:
    """A log record of the worker, as ``logging.makeLogRecord`` takes it."""

    record: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Finished:
    """The worker's last word before it exits."""

    outcome: Outcome
    detail: str
    handled: int
    skipped: int
    cursor: str


@dataclasses.dataclass(frozen=True, slots=True)
class Stop:
    """Stop gracefully: no new handler call, the one in flight finishes, the cursor is flushed."""


ToParent: TypeAlias = Started | Progress | Log | Finished
