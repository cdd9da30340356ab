"""Elastic groups: members with leases in the cursor bucket, and a pure assignment of shards to them.

Every member of an elastic :class:`rjet.parallel.Parallel` group writes its lease,
``_rjet.member.<name>.<member id>`` (``rjet/parallel/_keys.py``), every ``heartbeat_interval``
seconds. A member counts as live while its lease keeps changing: each member notes, by its own
monotonic clock, when it last saw another's lease revision move, and counts it gone once that is
``heartbeat_ttl`` seconds ago (no comparison of clocks across hosts). A member that stops gracefully
deletes its lease, so the others rebalance at once; one with a stable ``member_id`` keeps it (static
membership, as Kafka's ``group.instance.id``): a restart within the TTL finds its shards still its
own, and nothing moves.

:func:`assign` is a pure function of the live member ids and ``n``: every member computes the same
answer without a leader. A shard changes hands only through its cursor's claim and the shard
heartbeats (``rjet/parallel/_reshard.py``): the member a shard leaves stops its worker (the event in
flight finishes, the cursor is flushed and released) and deletes the shard's heartbeat; the member it
goes to starts a worker only once no other group's heartbeat on the shard is fresh. A member that
died stops refreshing both, so the others take its shards at their first view after the TTL (within
one heartbeat of it) and the start of a worker; a shard that moves between live members is taken
once two views in a row agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import xxhash

from rjet._nats.denials import guard_kv
from rjet.cursors import kv_keys
from rjet.errors import CursorStoreError, PermissionDenied
from rjet.parallel._heartbeats import live_heartbeats
from rjet.parallel._keys import (
    KV_ERRORS,
    Lease,
    get,
    guarded_put,
    kv_error,
    lease_key,
    lease_prefix,
)

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

__all__ = [
    "Member",
    "Membership",
    "assign",
    "busy_shards",
    "default_member_id",
]


def default_member_id() -> str:
    """host + pid + a random suffix: a new member each time the process starts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _score(member: str, m: int) -> int:
    return xxhash.xxh3_64_intdigest(f"{member}\x00{m}".encode())


def assign(
    members: Iterable[str], n: int, max_shards: Mapping[str, int | None] | None = None
) -> dict[str, tuple[int, ...]]:
    """Which shards each member runs: a pure, deterministic function of the member ids and ``n``.

    Rendezvous hashing with bounded load: every (shard, member) pair gets a hash score, and the pairs
    are taken best first, each shard by the first member that still has room. With ``k`` members each
    takes ``n // k`` shards, and the first ``n % k`` to want one more take one more, so loads differ by
    one at most; a member's ``max_shards`` caps its room (what capped members leave goes to the
    others, and with too little room in all, shards stay unassigned). A member joining or leaving
    moves about ``n / k`` shards: the other pairs keep their order.

    >>> assign(["a", "b"], 4)
    {'a': (1, 2), 'b': (0, 3)}
    """
    ids = sorted(set(members))
    if not ids:
        return {}
    caps = max_shards or {}
    out: dict[str, list[int]] = {member: [] for member in ids}
    pairs = sorted(((_score(member, m), m, member) for m in range(n) for member in ids), reverse=True)
    base, extra = divmod(n, len(ids))
    taken: set[int] = set()

    def fill(room: Callable[[str], bool]) -> None:
        for _, m, member in pairs:
            if m not in taken and room(member):
                taken.add(m)
                out[member].append(m)

    def balanced(member: str) -> bool:
        nonlocal extra
        have, cap = len(out[member]), caps.get(member)
        if cap is not None and have >= cap:
            return False
        if have < base:
            return True
        if have == base and extra > 0:
            extra -= 1
            return True
        return False

    fill(balanced)
    if len(taken) < n:  # capped members left shards over: whoever has room under its cap takes them
        fill(lambda member: (cap := caps.get(member)) is None or len(out[member]) < cap)
    return {member: tuple(sorted(shards)) for member, shards in out.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    """A member's lease as stored: who, where, and how long ago it changed (by the reader's clock)."""

    member: str
    host: str
    pid: int
    max_shards: int | None
    since: float  # wall time the member started
    seen_ago: float  # seconds since the lease last changed, by this reader's monotonic clock
    live: bool
    n: int | None = None  # the shard count it runs (None in leases written before leases named it)


class Membership:
    """This process's membership of ``name``'s elastic group: its lease, and its view of the others."""

    def __init__(
        self,
        kv: KeyValue,
        name: str,
        member: str,
        *,
        ttl: float,
        max_shards: int | None,
        static: bool,
        n: int | None = None,
    ) -> None:
        self.kv = kv
        self.name = name
        self.member = member
        self.n = n  # the shard count this member runs: its lease holds the group record for it
        self._stopped = False
        self.ttl = ttl
        self.max_shards = max_shards
        self.static = static  # a stable member_id: the lease outlives a graceful stop
        self._key = lease_key(name, member)
        self._since = time.time()
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (revision, monotonic time it was first seen)

    async def beat(self) -> None:
        """Write this member's lease now."""
        lease = Lease(
            self.member, socket.gethostname(), os.getpid(), self.max_shards, self._since, time.time(), self.ttl,
            self.n, self._stopped,
        )  # fmt: skip
        try:
            await guarded_put(self.kv, self._key, lease.encode())
        except KV_ERRORS as e:  # a PermissionDenied goes as it is: retrying cannot fix it
            raise kv_error(f"cannot write the lease of member {self.member!r}", e) from e

    async def members(self) -> list[Member]:
        """Every member whose lease is stored, live or not, by this process's view."""
        prefix = lease_prefix(self.name)
        try:
            keys = [k for k in await kv_keys(self.kv) if k.startswith(prefix)]
            entries = {k: await get(self.kv, k) for k in keys}
        except KV_ERRORS as e:
            raise kv_error(f"cannot read the members of {self.name!r}", e) from e
        now = time.monotonic()
        out = []
        for key, got in entries.items():
            if got is None:
                self._seen.pop(key, None)
                continue
            value, rev = got
            last = self._seen.get(key)
            if last is None or last[0] != rev:
                self._seen[key] = last = (rev, now)
            lease = Lease.decode(value)
            if lease is None:
                continue  # not a lease rjet wrote
            ago = now - last[1]
            live = key == self._key or ago < self.ttl
            out.append(Member(lease.member, lease.host, lease.pid, lease.max_shards, lease.since, ago, live, lease.n))
        for key in set(self._seen) - set(entries):
            del self._seen[key]
        return sorted(out, key=lambda m: m.member)

    async def view(self, n: int) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
        """(this member's shards, the whole assignment), by this process's view of the live members
        (those of another ``n``, refused or about to be, are no members of this ``n``)."""
        live = [m for m in await self.members() if m.live and m.n in (None, n)]
        caps = {m.member: m.max_shards for m in live}
        caps[self.member] = self.max_shards
        whole = assign(caps, n, caps)
        return whole[self.member], whole

    async def leave(self) -> None:
        """Delete this member's lease (a graceful stop of a member without a stable id). Never raises."""
        with contextlib.suppress(*KV_ERRORS, PermissionDenied):  # refused: given up at once, the lease expires
            await guard_kv(self.kv, self.kv.delete(self._key), self._key)

    async def release(self) -> None:
        """A graceful stop: delete the lease, so that the others rebalance now, not after the TTL; or,
        with a stable id, mark it stopped: the others keep its shards for it until the TTL, but it no
        longer holds the group record for its ``n``, so a reshard need not wait. Never raises."""
        if not self.static:
            await self.leave()
            return
        self._stopped = True
        with contextlib.suppress(CursorStoreError, PermissionDenied):
            await self.beat()


async def busy_shards(kv: KeyValue, name: str, n: int, group: str, ttl: float) -> set[int]:
    """The shards of ``name``/``n`` with a fresh heartbeat of another group: not free to start."""
    try:
        beats = await live_heartbeats(kv, await kv_keys(kv), name, ttl)
    except KV_ERRORS as e:
        raise kv_error(f"cannot read the heartbeats of {name!r}", e) from e
    return {b.m for b in beats if b.n == n and b.group != group}
