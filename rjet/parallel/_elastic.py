"""Elastic groups: members with leases in the cursor bucket, and a pure assignment of shards to them.

Every member of an elastic :class:`rjet.parallel.Parallel` group writes its lease,
``_rjet.member.<name>.<member id>``, every ``heartbeat_interval`` seconds. A member counts as live
while its lease keeps changing: each member notes, by its own monotonic clock, when it last saw
another's lease revision move, and counts it gone once that is ``heartbeat_ttl`` seconds ago (no
comparison of clocks across hosts). A member that stops gracefully deletes its lease, so the others
rebalance at once; one with a stable ``member_id`` keeps it (static membership, as Kafka's
``group.instance.id``): a restart within the TTL finds its shards still its own, and nothing moves.

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

import base64
import contextlib
import dataclasses
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Final

import xxhash

from rjet._nats.denials import guard_kv
from rjet.cursors import kv_keys
from rjet.errors import CursorStoreError, PermissionDenied
from rjet.parallel._reshard import (
    _KV_ERRORS,
    META_PREFIX,
    _get,
    _kv_error,
    _live,
    _token,
    guarded_put,
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
    "group_names",
    "member_prefix",
    "members",
]

_MEMBER: Final = META_PREFIX + "member."


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


def _untoken(token: str) -> str:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8", "surrogatepass")


def _member_key(name: str, member: str) -> str:
    return f"{_MEMBER}{_token(name)}.{_token(member)}"


def member_prefix(name: str) -> str:
    """The start of every lease key of ``name``'s members."""
    return lease_prefix(name)


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
        self._key = _member_key(name, member)
        self._since = time.time()
        self._seen: dict[str, tuple[int, float]] = {}  # key -> (revision, monotonic time it was first seen)

    async def beat(self) -> None:
        """Write this member's lease now."""
        body = {
            "member": self.member,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "max_shards": self.max_shards,
            "since": self._since,
            "time": time.time(),
            "ttl": self.ttl,
            "n": self.n,
            **({"stopped": True} if self._stopped else {}),
        }
        try:
            await guarded_put(self.kv, self._key, json.dumps(body).encode())
        except _KV_ERRORS as e:  # a PermissionDenied goes as it is: retrying cannot fix it
            raise _kv_error(f"cannot write the lease of member {self.member!r}", e) from e

    async def members(self) -> list[Member]:
        """Every member whose lease is stored, live or not, by this process's view."""
        prefix = member_prefix(self.name)
        try:
            keys = [k for k in await kv_keys(self.kv) if k.startswith(prefix)]
            entries = {k: await _get(self.kv, k) for k in keys}
        except _KV_ERRORS as e:
            raise _kv_error(f"cannot read the members of {self.name!r}", e) from e
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
            try:
                body = json.loads(value)
                member = str(body["member"])
                cap = body.get("max_shards")
                info = (str(body.get("host", "?")), int(body.get("pid", 0)), cap if isinstance(cap, int) else None)
                since = float(body.get("since", 0.0))
                n = body.get("n")
            except (ValueError, KeyError, TypeError):
                continue  # not a lease rjet wrote
            ago = now - last[1]
            live = key == self._key or ago < self.ttl
            out.append(Member(member, info[0], info[1], info[2], since, ago, live, n if isinstance(n, int) else None))
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
        with contextlib.suppress(*_KV_ERRORS, PermissionDenied):  # refused: given up at once, the lease expires
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


async def members(kv: KeyValue, name: str, ttl: float) -> list[Member]:
    """The leases of ``name``'s elastic group as stored (for ``rjet status``: ``seen_ago`` is then the
    lease's age by its own wall-clock time, since one read cannot see it change; ``live`` judges it by
    the TTL the member wrote, else ``ttl``)."""
    prefix = member_prefix(name)
    out = []
    now = time.time()
    for key in await kv_keys(kv):
        if not key.startswith(prefix) or (got := await _get(kv, key)) is None:
            continue
        try:
            body = json.loads(got[0])
            ago = max(0.0, now - float(body["time"]))
            cap = body.get("max_shards")
            limit = float(body.get("ttl") or ttl)
            out.append(
                Member(str(body["member"]), str(body.get("host", "?")), int(body.get("pid", 0)),
                       cap if isinstance(cap, int) else None, float(body.get("since", 0.0)), ago, ago < limit)
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda m: m.member)


def group_names(keys: Iterable[str]) -> set[str]:
    """The names of the elastic groups with a lease among a bucket's ``keys``."""
    names = set()
    for key in keys:
        if key.startswith(_MEMBER):
            token, _, _ = key[len(_MEMBER) :].partition(".")
            with contextlib.suppress(ValueError):
                names.add(_untoken(token))
    return names


async def busy_shards(kv: KeyValue, name: str, n: int, group: str, ttl: float) -> set[int]:
    """The shards of ``name``/``n`` with a fresh heartbeat of another group: not free to start."""
    try:
        beats = await _live(kv, await kv_keys(kv), name, ttl)
    except _KV_ERRORS as e:
        raise _kv_error(f"cannot read the heartbeats of {name!r}", e) from e
    return {b.m for b in beats if b.n == n and b.group != group}
