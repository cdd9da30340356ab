"""Shard heartbeats: which group (one ``Parallel.run``) runs which shard, kept in the cursor bucket.

A group writes a heartbeat per shard it holds (``_rjet.hb.<m+1>_of_<n>.<group id>.<name>``,
``rjet/parallel/_keys.py``) every ``heartbeat_interval`` seconds, and deletes them on a clean stop. A
shard counts as held while a heartbeat of it is fresh (:func:`rjet.parallel._keys.fresh`: the wall
clocks of the hosts are compared, so keep them in sync); heartbeats left by groups that died are
deleted once they are long dead. Resharding (``_reshard``) and elastic members (``_elastic``) read them
through :func:`live_heartbeats`; the views read them through :mod:`rjet.parallel.admin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rjet._nats.denials import guard_kv
from rjet.errors import CursorStoreError, PermissionDenied, is_permanent
from rjet.parallel._keys import (
    KV_ERRORS,
    Heartbeat,
    fresh,
    get,
    guarded_put,
    heartbeat_key,
    kv_error,
    parse_heartbeat_key,
)
from rjet.parallel._shard import shard_name

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

__all__ = ["Beat", "Heartbeats", "live_heartbeats"]

log = logging.getLogger("rjet.parallel")


@dataclasses.dataclass(frozen=True, slots=True)
class Beat:
    """A heartbeat as a group reads it: shard ``m`` of ``n``, held by ``group`` (its run id) on
    ``host``/``pid``, written ``age`` seconds ago."""

    m: int
    n: int
    group: str
    host: str
    pid: int
    age: float
    ttl: float | None  # the group's heartbeat_ttl; None in heartbeats written before it was stored
    member: str | None = None  # the elastic member running it

    def describe(self, name: str) -> str:
        return f"{shard_name(name, self.m, self.n)} (host {self.host}, pid {self.pid}, heartbeat {self.age:.1f}s ago)"


async def _read_beat(kv: KeyValue, key: str, m: int, n: int, now: float) -> tuple[Beat, int] | None:
    """The heartbeat stored at ``key`` and its revision; None when gone or not one rjet wrote."""
    got = await get(kv, key)
    if got is None or (hb := Heartbeat.decode(got[0])) is None:
        return None
    return Beat(m, n, hb.group, hb.host, hb.pid, now - hb.time, hb.ttl, hb.member), got[1]


async def live_heartbeats(kv: KeyValue, keys: Iterable[str], name: str, ttl: float) -> list[Beat]:
    """Every fresh heartbeat of ``name``'s shards (:func:`fresh`, cautious: within ``ttl`` too), of
    any group and any n; deletes long-dead ones."""
    now = time.time()
    beats = []
    dead = max(60.0, 10 * ttl)
    for key in keys:
        parsed = parse_heartbeat_key(key)
        if parsed is None or parsed[0] != name or (got := await _read_beat(kv, key, *parsed[1:], now)) is None:
            continue
        beat, revision = got
        if fresh(beat.age, beat.ttl, ttl, cautious=True):
            beats.append(beat)
        elif beat.age > dead:
            with contextlib.suppress(*KV_ERRORS, PermissionDenied):
                await guard_kv(kv, kv.delete(key, last=revision), key)
    return beats


class Heartbeats:
    """The heartbeats of one group's shards: :meth:`beat` writes them, :meth:`run` keeps them fresh.

    A group writes them for as long as it holds its shards (a crashed worker being restarted still
    counts as running); :meth:`drop` stops one (a fenced shard), :meth:`clear` deletes them all.
    """

    def __init__(
        self,
        kv: KeyValue,
        name: str,
        n: int,
        shards: Iterable[int],
        group: str,
        *,
        interval: float,
        ttl: float | None = None,
        member: str | None = None,
    ) -> None:
        self.kv = kv
        self.member = member
        self.name = name
        self.n = n
        self.group = group
        self.interval = interval
        self.ttl = ttl  # stored in each heartbeat, so that readers (rjet status) judge it by the group's own
        self._shards = set(shards)
        self._revs: dict[int, int] = {}
        self._host = socket.gethostname()

    async def beat(self) -> None:
        """Write every heartbeat of the group now."""
        value = Heartbeat(self.group, self._host, os.getpid(), self.n, time.time(), self.ttl, self.member).encode()
        shards = sorted(self._shards)
        revs = await asyncio.gather(
            *(guarded_put(self.kv, heartbeat_key(self.name, m, self.n, self.group), value) for m in shards),
            return_exceptions=True,
        )
        for m, rev in zip(shards, revs, strict=True):
            if isinstance(rev, PermissionDenied):
                raise rev
            if isinstance(rev, BaseException):
                raise kv_error("cannot write a heartbeat", rev) from rev
            if m in self._shards:
                self._revs[m] = rev

    async def run(self) -> None:
        """Beat every ``interval`` seconds until cancelled; failures are logged and retried, except
        those retrying cannot fix (:func:`rjet.is_permanent`: a :class:`rjet.PermissionDenied`
        taken away mid-run), which end it: the group then stops with that error."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except CursorStoreError as e:
                if is_permanent(e):
                    raise
                log.warning("parallel %r: %s (retrying)", self.name, e)

    def drop(self, m: int) -> None:
        """Stop writing shard ``m``'s heartbeat (another runner owns the shard now)."""
        self._shards.discard(m)

    async def add(self, m: int) -> None:
        """Write shard ``m``'s heartbeat now and from now on (an elastic group took the shard)."""
        self._shards.add(m)
        await self.beat()

    async def remove(self, m: int) -> None:
        """Stop writing shard ``m``'s heartbeat and delete it, so that the member the shard goes to
        sees at once that this group let it go. Never raises (a heartbeat left behind goes stale)."""
        self._shards.discard(m)
        if self._revs.pop(m, None) is not None:
            key = heartbeat_key(self.name, m, self.n, self.group)
            with contextlib.suppress(*KV_ERRORS, PermissionDenied):
                await guard_kv(self.kv, self.kv.delete(key), key)

    @property
    def shards(self) -> frozenset[int]:
        """The shards whose heartbeats this group writes."""
        return frozenset(self._shards)

    async def clear(self) -> None:
        """Delete this group's heartbeats. Never raises (a heartbeat left behind goes stale)."""
        written, self._revs = list(self._revs), {}
        self._shards.clear()
        keys = [heartbeat_key(self.name, m, self.n, self.group) for m in written]
        # Guarded: a refused delete is given up at once, not after the API timeout.
        await asyncio.gather(*(guard_kv(self.kv, self.kv.delete(key), key) for key in keys), return_exceptions=True)
