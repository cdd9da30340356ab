"""The messages between a :class:`rjet.parallel.Parallel` parent and its worker processes (over a pipe).

Worker -> parent: :class:`Started` once it consumes, :class:`Progress` now and then, :class:`Log` for
every log record, and one last :class:`Finished`. Parent -> worker: :class:`Stop`. A closed pipe (the
parent died) stops the worker too.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from typing import Any, Literal, TypeAlias

from rjet.stats import StatsSnapshot

__all__ = ["Finished", "Log", "Outcome", "Progress", "Started", "Stop", "ToParent", "pack_error", "unpack_error"]

log = logging.getLogger("rjet.parallel")

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
    """The worker's last word before it exits. ``detail`` is the error that ended it as text;
    ``error`` the same error pickled (``b""`` for none, or for one that cannot be pickled), so that
    the parent can hand it on with its fields (:attr:`rjet.parallel.ShardsFailed.errors`)."""

    outcome: Outcome
    detail: str
    handled: int
    skipped: int
    cursor: str
    error: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class Stop:
    """Stop gracefully: no new handler call, the one in flight finishes, the cursor is flushed."""


ToParent: TypeAlias = Started | Progress | Log | Finished


def pack_error(err: BaseException | None) -> bytes:
    """``err`` pickled for :attr:`Finished.error`; ``b""`` for None or an error that cannot be pickled
    (a handler's, holding a lock, say): the parent then has its text only."""
    if err is None:
        return b""
    try:
        return pickle.dumps(err)
    except Exception as e:
        log.debug("the error %r cannot travel to the parent, only its text: %s", type(err).__name__, e)
        return b""


def unpack_error(data: bytes) -> BaseException | None:
    """The error :func:`pack_error` pickled; None for none, and for one that cannot be rebuilt here (its
    class not importable in this process, a constructor that pickling does not replay)."""
    if not data:
        return None
    try:
        err = pickle.loads(data)
    except Exception as e:
        log.debug("a worker's error cannot be rebuilt here, only its text: %s", e)
        return None
    return err if isinstance(err, BaseException) else None
