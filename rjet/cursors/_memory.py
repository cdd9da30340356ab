"""MemCursorStore: cursors in a dict, with the same claims as the JetStream store (fencing, exact
progress, the stream identity), for tests and throwaway consumers."""

from __future__ import annotations

import asyncio
import math

from rjet.cursors._protocol import Capabilities, ProgressSource, runner_id
from rjet.cursors._record import CursorRecord
from rjet.errors import CursorBucketGone, CursorConflict, RjetError

__all__ = ["MemCursorStore"]


class MemCursorStore:
    """An in-memory :class:`rjet.cursors.ClaimingCursorStore` (lost when the process ends).

    ``cursors`` is the plain dict of cursors by consumer name: read it, or change it to simulate a
    lost write. A claim fences older claims of the same name, exact progress and the stream
    identity are kept beside it (``record(name)``), as :class:`rjet.JetStreamCursorStore` does; a
    cursor deleted from ``cursors`` under a runner that held it is :class:`rjet.CursorBucketGone`.

    >>> store = MemCursorStore({"audit": "41"})
    """

    capabilities = Capabilities(fencing=True, exact_progress=True)

    def __init__(self, cursors: dict[str, str] | None = None) -> None:
        self.cursors: dict[str, str] = dict(cursors or {})
        self._meta: dict[str, tuple[str | None, str | None, str | None]] = {}  # name -> (owner, stream, done)
        self._claims: dict[str, _MemClaim] = {}
        self._written: set[str] = set()  # names a cursor was written for (one missing now vanished)

    async def get_cursor(self, name: str) -> str:
        """The cursor for ``name``, or ""."""
        return self.cursors.get(name, "")

    async def set_cursor(self, name: str, cursor: str) -> None:
        """Record ``cursor`` for ``name`` (a write without a claim: the stored owner is unknown)."""
        self.cursors[name] = cursor
        self._meta[name] = (None, None, None)
        self._written.add(name)

    async def flush(self) -> None:
        """Write what every claim holds back (exact progress is read when flushed)."""
        for claim in list(self._claims.values()):
            claim.write_pending()

    def record(self, name: str) -> CursorRecord | None:
        """What is stored for ``name``: the cursor, the stream it counts in, its owner, exact progress."""
        claim = self._claims.get(name)
        if claim is not None:
            claim.write_pending()
        if name not in self.cursors:
            return None
        owner, stream, done = self._meta.get(name, (None, None, None))
        return CursorRecord(self.cursors[name], stream, owner, done)

    async def claim(self, name: str, *, owner: str | None = None, after: str | None = None) -> _MemClaim:
        """Claim ``name`` (see :meth:`rjet.cursors.ClaimingCursorStore.claim`)."""
        owner = owner or runner_id()
        stored = self.record(name)
        if stored is None and name not in self._written and name in self._meta:
            stored = CursorRecord("", None, self._meta[name][0])  # claimed, never written: nothing vanished
        if after is not None:
            if stored is None:
                raise CursorBucketGone(
                    f"memory cursor store: cursor {name!r} vanished while this runner held it; no other runner"
                    " was seen; this runner stops rather than start over from the stream's beginning",
                    name=name,
                )
            if stored.owner != after:
                raise CursorConflict(
                    name,
                    f"another runner claimed it while this one was between runs (owner"
                    f" {stored.owner or 'unknown: a write without a claim'}): two runners share this consumer"
                    " name; this one stops",
                )
        old = self._claims.get(name)
        if old is not None:
            old.lose(CursorConflict(name, f"another runner claimed it (owner {owner}); this one stops"))
        record = stored or CursorRecord()
        if name in self.cursors:  # a claim of a cursor never written writes none (no empty record)
            self.cursors[name] = record.cursor
        self._meta[name] = (owner, record.stream, record.done)
        claim = self._claims[name] = _MemClaim(self, name, owner, record)
        claim.present = name in self.cursors
        return claim

    def _holds(self, claim: _MemClaim) -> None:
        """Raise (and lose ``claim``) unless the stored record is still ``claim``'s."""
        name = claim.name
        if claim.present and name not in self.cursors:
            claim.lose(
                CursorBucketGone(
                    f"memory cursor store: cursor {name!r} vanished while this runner held it; no other runner was"
                    " seen; this runner stops rather than start over from the stream's beginning",
                    name=name,
                    cursor=claim.written,
                    stream=claim.stream,
                )
            )
        elif self._meta.get(name, (None, None, None))[0] != claim.owner:
            owner = self._meta.get(name, (None, None, None))[0]
            claim.lose(
                CursorConflict(
                    name,
                    f"another writer changed it (owner {owner or 'unknown: a write without a claim'}): two"
                    " runners share this consumer name; this one stops",
                )
            )
        claim.check()


class _MemClaim:
    """A runner's hold on one cursor of a :class:`MemCursorStore`."""

    __slots__ = (
        "_pending",
        "_store",
        "cursor",
        "done",
        "expires",
        "forgotten",
        "lost",
        "lost_event",
        "name",
        "owner",
        "present",
        "stream",
        "written",
    )  # fmt: skip

    def __init__(self, store: MemCursorStore, name: str, owner: str, record: CursorRecord) -> None:
        self._store = store
        self.name = name
        self.owner = owner
        self.cursor = record.cursor
        self.done = record.done
        self.stream = record.stream
        self.written = record.cursor
        self.expires = math.inf
        self.lost: RjetError | None = None
        self.lost_event = asyncio.Event()
        self._pending: ProgressSource | None = None
        self.present = False  # a cursor is stored: one missing now vanished under this claim
        self.forgotten = False

    def lose(self, err: RjetError) -> None:
        if self.lost is None:
            self.lost = err
            self.lost_event.set()

    def check(self) -> None:
        if self.lost is not None:
            raise self.lost

    async def set_cursor(self, cursor: str | ProgressSource) -> None:
        self._store._holds(self)  # noqa: SLF001
        if isinstance(cursor, str):
            self._pending = None
            self._write(cursor, None)
        else:
            self._pending = cursor  # read when written: a concurrent run's progress costs nothing per event

    def write_pending(self) -> None:
        if self._pending is not None and self.lost is None:
            cursor, done = self._pending.snapshot()
            self._pending = None
            self._write(cursor, done or None)

    def _write(self, cursor: str, done: str | None) -> None:
        store = self._store
        store.cursors[self.name] = cursor
        store._meta[self.name] = (self.owner, self.stream, done)  # noqa: SLF001
        self.written = cursor
        self.present = True
        store._written.add(self.name)  # noqa: SLF001

    async def flush(self) -> None:
        self._store._holds(self)  # noqa: SLF001
        self.write_pending()

    async def wait_lost(self) -> None:
        await self.lost_event.wait()

    async def confirm(self) -> None:
        self._store._holds(self)  # noqa: SLF001

    async def release(self, *, forget_new: bool = False) -> None:
        try:
            if self.lost is None:
                await self.flush()
                if forget_new and not self.present and self.name not in self._store._written:  # noqa: SLF001
                    self.forgotten = self._store._meta.pop(self.name, None) is not None  # noqa: SLF001
        finally:
            if self._store._claims.get(self.name) is self:  # noqa: SLF001
                del self._store._claims[self.name]  # noqa: SLF001
            self._pending = None

    def __repr__(self) -> str:
        return f"<claim of {self.name!r} in a MemCursorStore by {self.owner}>"
