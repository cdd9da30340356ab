"""Errors of :mod:`rjet.parallel`, part of rjet's one error tree.

::

    RjetError
    ├── ParallelError          something about a sharded group of workers
    │   ├── ReshardRefused     n changed while shards of another n still run
    │   ├── ShardsFailed       shards stopped for good (fenced by another runner, or a permanent error)
    │   ├── GroupNotFound      admin: nothing of the group in the namespace
    │   └── GroupRunning       admin: a change refused while a shard of the group runs
    └── CursorError
        └── CursorStoreError
            └── NamespaceNotFound  admin: a cursor namespace without a bucket
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from rjet.errors import CursorStoreError, RjetError

if TYPE_CHECKING:
    from rjet.parallel._results import Summary

__all__ = ["GroupNotFound", "GroupRunning", "NamespaceNotFound", "ParallelError", "ReshardRefused", "ShardsFailed"]


class ParallelError(RjetError):
    """Something went wrong with a :class:`rjet.parallel.Parallel` group."""


class ReshardRefused(ParallelError):
    """The shard count changed while shards of another count still run (their heartbeats are fresh).

    ``running`` names the live shards (``name_m_of_n``) with who runs them. Stop them and start again.
    """

    def __init__(self, message: str, running: Mapping[str, str]) -> None:
        super().__init__(message)
        self.running = dict(running)


class ShardsFailed(ParallelError):
    """One or more shards stopped for good; the others ran on until they were done or stopped.

    ``failures`` maps each such shard index (0-based, as in ``Parallel(shards=...)``; the message
    names the shards, ``name_M_of_N``) to why, in words; ``errors`` maps them to the error itself, as
    the shard's worker process raised it, with its fields (a :class:`rjet.CursorBucketGone`,
    :class:`rjet.CursorExpired`, :class:`rjet.CursorConflict`...): every shard of ``failures`` whose
    error could cross from its process (an error that cannot be pickled is in ``failures`` only).
    ``fenced`` holds the shards that another runner of the same shard fenced out through the cursor
    store (that runner, the newest, goes on); ``summary`` is what the group did.
    """

    def __init__(
        self,
        failures: Mapping[int, str],
        fenced: frozenset[int],
        summary: Summary,
        *,
        errors: Mapping[int, BaseException] | None = None,
    ) -> None:
        # Numbered 1..n, as in the shards' names and in `rjet worker --shard`.
        name, n = summary.name, summary.n
        lines = "; ".join(f"{name}_{m + 1}_of_{n}: {why}" for m, why in sorted(failures.items()))
        super().__init__(f"parallel {summary.name!r}: {len(failures)} shard(s) stopped for good: {lines}")
        self.failures = dict(failures)
        self.errors = dict(errors or {})
        self.fenced = fenced
        self.summary = summary


class GroupNotFound(ParallelError):
    """No shard cursor, group record or member lease of the group in the namespace."""


class GroupRunning(ParallelError):
    """A change to a group refused because one of its shards runs (a live heartbeat)."""


class NamespaceNotFound(CursorStoreError):
    """A cursor namespace that has no bucket on the server."""
