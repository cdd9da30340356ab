"""Sharded processing across worker processes, with per-key order, own cursors and supervision.

``Parallel(name, n, fn, servers=..., stream=..., namespace=...)`` runs ``n`` worker processes; shard
``m`` handles the events whose ``shard_of(event.foreign_id, n) == m``, one at a time, in stream order,
with its own cursor ``shard_name(name, m, n)``. See ``docs/sharding.md``.

::

    from rjet.parallel import Parallel

    def handle(fate, event):
        ...

    if __name__ == "__main__":  # the worker processes import this module
        Parallel("indexer", 4, handle, servers="nats://127.0.0.1:4222", stream="orders", namespace="shop").run()
"""

from rjet.parallel._errors import ParallelError, ReshardRefused, ShardsFailed
from rjet.parallel._options import (
    ConsumerOptions,
    ElasticOptions,
    HeartbeatOptions,
    ParallelOptions,
    SupervisionOptions,
    TargetOptions,
    WorkerOptions,
)
from rjet.parallel._parallel import Parallel
from rjet.parallel._reshard import ReshardReport
from rjet.parallel._results import ShardStats, Summary
from rjet.parallel._shard import shard_name, shard_of

__all__ = [
    "ConsumerOptions",
    "ElasticOptions",
    "HeartbeatOptions",
    "Parallel",
    "ParallelError",
    "ParallelOptions",
    "ReshardRefused",
    "ReshardReport",
    "ShardStats",
    "ShardsFailed",
    "Summary",
    "SupervisionOptions",
    "TargetOptions",
    "WorkerOptions",
    "shard_name",
    "shard_of",
]
