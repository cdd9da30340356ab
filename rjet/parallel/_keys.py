"""The cursor bucket's rjet records: every ``_rjet.`` key, what it holds, and when it counts as live.

A namespace's bucket (``rjet_cursors_<namespace>``) holds the cursors under their names (shard ``m``
of ``n`` of group ``name`` under ``shard_name(name, m, n)``: ``<name>_<m+1>_of_<n>``) and, beside
them, under keys that start with ``_rjet.`` (:data:`rjet.cursors.RESERVED_PREFIX`), what
:mod:`rjet.parallel` keeps:

========================================================  ==========================================
key                                                       value (JSON)
========================================================  ==========================================
``_rjet.hb.<m+1>_of_<n>.<group id>.<encoded name>``        :class:`Heartbeat`: a group (one
                                                          ``Parallel.run``) runs shard ``m`` of ``n``
``_rjet.gen.<encoded name>``                              the group record: the ``n`` that runs, the
                                                          reshard seed (:func:`decode_record`)
``_rjet.member.<token name>.<token member>``              :class:`Lease`: a member of an elastic group
========================================================  ==========================================

``<encoded name>`` is the name as a cursor key (:func:`rjet.cursors.encode_key`); a ``<token>`` is
URL-safe base64 without padding (no dots: names may have them). Every module of rjet reads and
writes these keys through this one: the group's own loops (``_reshard``, ``_elastic``,
``_heartbeats``) and :mod:`rjet.parallel.admin`.

Liveness, one rule (:func:`fresh`): a heartbeat or lease counts as live while it is younger, by
the wall clocks of writer and reader, than the TTL its writer stored in it (:data:`DEFAULT_TTL`
for one that stored none). A group that decides whether it may take a shard or the group record
is more careful: it also waits out its own TTL, when that is longer.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import nats.errors
import nats.js.errors

from rjet._nats.client import connection, kv_names
from rjet._nats.denials import denials, exactly, guard_kv
from rjet.cursors import RESERVED_PREFIX, decode_key, encode_key
from rjet.errors import CursorStoreError

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

__all__ = [
    "DEFAULT_TTL", "GENERATION", "HEARTBEAT", "KV_ERRORS", "MEMBER", "PREFIX", "Heartbeat", "Lease", "decode_record",
    "encode_record", "fresh", "generation_key", "get", "guarded_put", "heartbeat_key", "is_group_record", "kv_error",
    "lease_group", "lease_key", "lease_prefix", "parse_heartbeat_key", "parse_shard_cursor", "token", "untoken",
]  # fmt: skip

PREFIX: Final = RESERVED_PREFIX
"""Keys in a cursor bucket that start with this belong to rjet itself, never a cursor."""
HEARTBEAT: Final = PREFIX + "hb."
GENERATION: Final = PREFIX + "gen."
MEMBER: Final = PREFIX + "member."
DEFAULT_TTL: Final = 10.0
"""``heartbeat_ttl``'s default: how a heartbeat or lease that stored no TTL of its own is judged."""
KV_ERRORS: Final = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)
"""What a read or write of the bucket may raise besides rjet's own errors."""

_SHARD: Final = re.compile(r"^(\d+)_of_(\d+)$")
_SHARD_CURSOR: Final = re.compile(r"^(.+)_(\d+)_of_(\d+)$")


def fresh(age: float, own_ttl: float | None, ttl: float = DEFAULT_TTL, *, cautious: bool = False) -> bool:
    """Whether a heartbeat or lease written ``age`` seconds ago is live: younger than the TTL its
    writer stored (``own_ttl``), or ``ttl`` when it stored none. ``cautious`` (a group about to
    take a shard or the group record over) also waits out ``ttl`` when that is longer.

    >>> fresh(4.0, 5.0), fresh(6.0, 5.0), fresh(6.0, 5.0, 10.0, cautious=True), fresh(9.0, None)
    (True, False, True, True)
    """
    limit = own_ttl or ttl
    return age < (max(limit, ttl) if cautious else limit)


# ----------------------------------------------------------------- keys


def token(text: str) -> str:
    """``text`` as one KV key token (no dots: a group's or member's name may have them)."""
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def untoken(value: str) -> str:
    """Inverse of :func:`token`; ``ValueError`` when ``value`` is not one."""
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("utf-8", "surrogatepass")


def heartbeat_key(name: str, m: int, n: int, group: str) -> str:
    """The key of group ``group``'s heartbeat for shard ``m`` (0-based) of ``n`` of ``name``."""
    return f"{HEARTBEAT}{m + 1}_of_{n}.{group}.{encode_key(name)}"


def parse_heartbeat_key(key: str) -> tuple[str, int, int] | None:
    """(group name, m, n) of a heartbeat key; None for any other key (or one rjet did not write)."""
    if not key.startswith(HEARTBEAT):
        return None
    shard, _, rest = key[len(HEARTBEAT) :].partition(".")
    _, _, encoded = rest.partition(".")
    match = _SHARD.match(shard)
    if match is None or not encoded:
        return None
    m, n = int(match.group(1)) - 1, int(match.group(2))
    if not 0 <= m < n:
        return None
    try:
        return decode_key(encoded), m, n
    except ValueError:
        return None


def generation_key(name: str) -> str:
    """The key of ``name``'s group record."""
    return GENERATION + encode_key(name)


def lease_prefix(name: str) -> str:
    """The start of every lease key of ``name``'s elastic members."""
    return f"{MEMBER}{token(name)}."


def lease_key(name: str, member: str) -> str:
    """The key of member ``member``'s lease in ``name``'s elastic group."""
    return lease_prefix(name) + token(member)


def lease_group(key: str) -> str | None:
    """The group name of a lease key; None for any other key."""
    if not key.startswith(MEMBER):
        return None
    value, dot, _ = key[len(MEMBER) :].partition(".")
    try:
        return untoken(value) if dot else None
    except ValueError:
        return None


def parse_shard_cursor(key: str) -> tuple[str, int, int] | None:
    """(group name, m, n) of a shard's cursor key (``<name>_<m+1>_of_<n>``); None for other keys."""
    if key.startswith(PREFIX):
        return None
    match = _SHARD_CURSOR.match(decode_key(key))
    if match is None:
        return None
    name, m, n = match.group(1), int(match.group(2)) - 1, int(match.group(3))
    return (name, m, n) if 0 <= m < n else None


def is_group_record(key: str, name: str) -> bool:
    """Whether ``key`` is one of ``name``'s rjet records: its group record, a heartbeat, a lease."""
    if key == generation_key(name) or key.startswith(lease_prefix(name)):
        return True
    parsed = parse_heartbeat_key(key)
    return parsed is not None and parsed[0] == name


# ----------------------------------------------------------------- values


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """A heartbeat's value: which group (``Parallel.run``) runs the shard, on which host and pid,
    with which ``n``, written when (wall time), with the group's TTL and elastic member."""

    group: str
    host: str
    pid: int
    n: int | None
    time: float
    ttl: float | None = None  # None in heartbeats written before it was stored
    member: str | None = None  # the elastic member running the shard

    def encode(self) -> bytes:
        body: dict[str, Any] = {"group": self.group, "host": self.host, "pid": self.pid, "n": self.n, "time": self.time}
        if self.ttl is not None:
            body["ttl"] = self.ttl
        if self.member is not None:
            body["member"] = self.member
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat | None:
        """The heartbeat in ``raw``; None when it is not one rjet wrote."""
        try:
            body = json.loads(raw)
            ttl = body.get("ttl")
            member = body.get("member")
            return cls(
                str(body["group"]), str(body.get("host", "?")), int(body.get("pid", 0)), _opt_int(body.get("n")),
                float(body["time"]), None if ttl is None else float(ttl), member if isinstance(member, str) else None,
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """An elastic member's lease: who, where, since when, its cap, its ``n``, written when (wall
    time, None in leases that did not store it) with which TTL, and whether it stopped (a member
    with a stable id that stopped gracefully keeps its lease, marked so)."""

    member: str
    host: str
    pid: int
    max_shards: int | None
    since: float
    time: float | None
    ttl: float | None
    n: int | None = None  # None in leases written before leases named their n
    stopped: bool = False

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "member": self.member, "host": self.host, "pid": self.pid, "max_shards": self.max_shards,
            "since": self.since, "time": self.time, "ttl": self.ttl, "n": self.n,
        }  # fmt: skip
        if self.stopped:
            body["stopped"] = True
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Lease | None:
        """The lease in ``raw``; None when it is not one rjet wrote."""
        try:
            body = json.loads(raw)
            time, ttl = body.get("time"), body.get("ttl")
            return cls(
                str(body["member"]), str(body.get("host", "?")), int(body.get("pid", 0)),
                _opt_int(body.get("max_shards")), float(body.get("since", 0.0)),
                None if time is None else float(time), None if not ttl else float(ttl), _opt_int(body.get("n")),
                bool(body.get("stopped")),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def decode_record(raw: bytes | None) -> dict[str, Any] | None:
    """The group record in ``raw`` (``n``, ``seed``, ``fresh_from``, ``from``, ``at``, ``done``,
    ``holder``, ``held_at``); None when empty; ``ValueError`` when it is not one (no int ``n``)."""
    if not raw:
        return None
    try:
        body = json.loads(raw)
        int(body["n"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"not a group record: {raw[:200]!r}") from e
    if not isinstance(body, dict):
        raise ValueError(f"not a group record: {raw[:200]!r}")
    return body


def encode_record(body: Mapping[str, Any]) -> bytes:
    """The group record's value."""
    return json.dumps(dict(body)).encode()


# ----------------------------------------------------------------- reads and writes


async def get(kv: KeyValue, key: str) -> tuple[bytes, int] | None:
    """(value, revision) of ``key``; None when it has none (never written, deleted, purged)."""
    try:
        entry = await guard_kv(kv, kv.get(key))
    except nats.js.errors.KeyNotFoundError:
        return None
    assert entry.revision is not None
    return entry.value or b"", entry.revision


async def guarded_put(kv: KeyValue, key: str, value: bytes) -> int:
    """``kv.put(key, value)``, or :class:`rjet.PermissionDenied` naming the key's subject as soon as
    the server refuses the write (a heartbeat or lease write the user may not make)."""
    names = kv_names(kv)
    subject = names.prefix + key
    return await denials(connection(names.js)).guard(exactly(subject), kv.put(key, value))


def kv_error(what: str, err: BaseException) -> CursorStoreError:
    """The error a group raises when the bucket cannot be read or written."""
    return CursorStoreError(f"parallel: {what}: {err!r}")
