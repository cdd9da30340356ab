"""The demo's record of what its handlers did, and the parent's check of it.

Each worker's handler appends ``<sequence> <foreign id>`` to a file of its own (named after its shard
and process) in a temporary directory. The parent reads those files as they grow: it counts what each
shard handled, spots duplicates (at-least-once redeliveries) and order violations (an event handled
for the first time after a later event of the same foreign ID), and checks that each event was
handled by the shard its foreign ID belongs to.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Final

import rjet
from rjet.fate import Fate
from rjet.parallel import shard_name, shard_of
from rjet.testing import KeyOrder

__all__ = ["GROUP", "Checker", "DemoHandler", "Tally", "on_start"]

GROUP: Final = "demo"

_shard_here: int | None = None  # the shard this worker process runs (set by on_start, in the worker)


def on_start(m: int) -> None:
    """Runs in each worker process before it consumes: remember which shard this process runs."""
    global _shard_here
    _shard_here = m


class DemoHandler:
    """The demo's handler: spins for ``cost_us`` microseconds, records the event, then tempts fate.

    Recording before ``fate.tempt()`` makes an injected failure look like a crash right after the side
    effect: the event is delivered again and shows up as a duplicate, never as a loss.
    """

    def __init__(self, outdir: str, cost_us: float) -> None:
        self.outdir = outdir
        self.cost_ns = int(cost_us * 1000)
        self._fd: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"outdir": self.outdir, "cost_ns": self.cost_ns}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.outdir = state["outdir"]
        self.cost_ns = state["cost_ns"]
        self._fd = None

    def __call__(self, fate: Fate, event: rjet.Event) -> None:
        if self.cost_ns:
            end = time.perf_counter_ns() + self.cost_ns
            while time.perf_counter_ns() < end:
                pass
        if self._fd is None:
            shard = "x" if _shard_here is None else str(_shard_here)
            path = os.path.join(self.outdir, f"{shard}-{os.getpid()}.log")
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(self._fd, f"{event.id} {event.foreign_id}\n".encode())
        fate.tempt()


@dataclasses.dataclass
class Tally:
    """The parent's count of one shard."""

    name: str
    expected: int = 0
    handled: int = 0  # distinct events handled
    duplicates: int = 0
    violations: int = 0
    misrouted: int = 0  # events of other shards handled by this one
    top: int = 0  # highest sequence handled
    last: int = 0  # highest sequence inserted for this shard
    done_at: float | None = None
    pending: collections.deque[tuple[int, float]] = dataclasses.field(default_factory=collections.deque)
    rate: collections.deque[tuple[float, int]] = dataclasses.field(default_factory=collections.deque)


class Checker:
    """Reads the handlers' record files as they grow and checks per-key order."""

    def __init__(self, outdir: Path, n: int) -> None:
        self.outdir = outdir
        self.n = n
        self.shards = [Tally(shard_name(GROUP, m, n)) for m in range(n)]
        self.unique = 0
        self.inserted = 0
        self._files: dict[str, tuple[int, bytes]] = {}  # file name -> (offset, partial last line)
        self._order: list[str] = []
        self._keys = KeyOrder()
        self._shard_of: dict[str, int] = {}

    def shard(self, foreign_id: str) -> int:
        m = self._shard_of.get(foreign_id)
        if m is None:
            m = self._shard_of[foreign_id] = shard_of(foreign_id, self.n)
        return m

    def expect(self, seqs: list[int], foreign_ids: list[str], at: float) -> None:
        """Note inserted events (sequence, foreign ID), stored at ``at``."""
        self.inserted += len(seqs)
        for seq, fid in zip(seqs, foreign_ids, strict=True):
            t = self.shards[self.shard(fid)]
            t.expected += 1
            t.last = max(t.last, seq)
            if seq > t.top:
                t.pending.append((seq, at))

    def poll(self) -> None:
        """Read what the handlers wrote since the last poll."""
        with os.scandir(self.outdir) as it:
            new = [(e.stat().st_mtime_ns, e.name) for e in it if e.name not in self._files]
        for _, name in sorted(new):
            self._files[name] = (0, b"")
            self._order.append(name)
        for name in self._order:
            offset, partial = self._files[name]
            with open(self.outdir / name, "rb") as f:
                f.seek(offset)
                data = f.read()
            if not data:
                continue
            lines = (partial + data).split(b"\n")
            self._files[name] = (offset + len(data), lines.pop())
            writer = name.partition("-")[0]
            for line in lines:
                seq_text, _, fid = line.decode().partition(" ")
                self._record(int(seq_text), fid, writer)

    def _record(self, seq: int, fid: str, writer: str) -> None:
        m = self.shard(fid)
        t = self.shards[m]
        if writer != str(m) and writer.isdigit() and int(writer) < self.n:
            self.shards[int(writer)].misrouted += 1
        violations = len(self._keys.violations)
        if not self._keys.record(seq, fid):
            t.duplicates += 1
            return
        self.unique += 1
        t.handled += 1
        t.violations += len(self._keys.violations) - violations
        if seq > t.top:
            t.top = seq
        while t.pending and t.pending[0][0] <= t.top:
            t.pending.popleft()

    @property
    def duplicates(self) -> int:
        return sum(t.duplicates for t in self.shards)

    @property
    def violations(self) -> int:
        return sum(t.violations for t in self.shards)

    @property
    def misrouted(self) -> int:
        return sum(t.misrouted for t in self.shards)
