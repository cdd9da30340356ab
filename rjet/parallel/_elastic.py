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

The lease a member that died (or a stopped member with a stable id that did not come back) left
behind is deleted by the live members (:meth:`Membership.prune`, at each view) once it is long
expired: older, by the wall time it holds, than :func:`lease_removal_age` of its TTL, and unchanged
for a TTL by the member's own clock; by a compare-and-swap on the revision seen, so a lease written
again meanwhile (its member came back) stays. Until then the views show it as expired, with when it
goes (``rjet group prune`` removes it at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
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
    DEFAULT_TTL,
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
    "lease_removal_age",
]

log = logging.getLogger("rjet.parallel")


def lease_removal_age(ttl: float | None) -> float:
    """How old (by the wall time it holds) an expired lease of TTL ``ttl`` is when the group's live
    members delete it: a minute, or ten TTLs when longer, as for long-dead heartbeats
    (``rjet/parallel/_heartbeats.py``); long enough for an operator to see in the views who died."""
    return max(60.0, 10 * (ttl or DEFAULT_TTL))


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
        self._long_expired: dict[str, tuple[int, Lease]] = {}  # key -> (revision, lease), by the last view

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
        now, wall = time.monotonic(), time.time()
        out = []
        self._long_expired = {}
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
            if not live and lease.time is not None and wall - lease.time > lease_removal_age(lease.ttl):
                self._long_expired[key] = (rev, lease)
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

    async def prune(self) -> tuple[str, ...]:
        """Delete the leases the last :meth:`members` found long expired, each by a compare-and-swap
        on the revision it read: one written again since stays. Returns the members whose leases
        went. Never raises: a delete that fails (refused, the server away) is tried at the next view."""
        gone = []
        for key, (rev, lease) in self._long_expired.items():
            try:
                await guard_kv(self.kv, self.kv.delete(key, last=rev), key)
            except (*KV_ERRORS, PermissionDenied) as e:  # written again meanwhile, refused, unreachable
                log.debug("parallel %r: member %s: the lease of %s stays: %r", self.name, self.member, lease.member, e)
                continue
            gone.append(lease.member)
            log.info(
                "parallel %r: member %s deleted the expired lease of member %s (%s pid %d, written %.0fs ago)",
                self.name, self.member, lease.member, lease.host, lease.pid, time.time() - (lease.time or 0.0),
            )  # fmt: skip
        self._long_expired = {}
        return tuple(gone)

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
