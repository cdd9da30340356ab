"""A runner's claim on one cursor of a :class:`rjet.JetStreamCursorStore` (the store's other half:
the claim buffers writes and keeps the lease; the store writes, settles and fences)."""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from rjet.cursors._protocol import ProgressSource
from rjet.cursors._record import CursorRecord, encode_key
from rjet.errors import CursorStoreError, RjetError

if TYPE_CHECKING:
    from rjet.cursors._jetstream import JetStreamCursorStore

__all__ = ["JetStreamClaim", "pair"]


def pair(value: str | ProgressSource) -> tuple[str, str | None]:
    """(cursor, done) of a buffered cursor write."""
    if isinstance(value, str):
        return value, None
    cursor, done = value.snapshot()
    return cursor, done or None


class JetStreamClaim:
    """One runner's hold on one cursor through a :class:`JetStreamCursorStore` (see its ``claim``).

    ``owner`` is written into every record, so a read-back tells this claim's writes from anyone
    else's; ``rev`` is the revision of the last record this claim wrote (the next compare-and-swap).
    """

    __slots__ = (
        "_store", "created", "cursor", "done", "expires", "forgotten", "key", "lost", "lost_event", "name", "owner",
        "plain",
        "released", "rev", "stream",
    )  # fmt: skip

    def __init__(
        self, store: JetStreamCursorStore, name: str, owner: str, rev: int, record: CursorRecord, since: float
    ) -> None:
        self._store = store
        self.name = name
        self.key = encode_key(name)
        self.owner = owner
        self.rev = rev
        self.cursor = record.cursor  # as read at claim time
        self.done = record.done  # the exact progress stored with it (see CursorRecord), when any
        self.stream = record.stream  # the identity of the stream the cursor counts in, when known
        self.lost: RjetError | None = None
        self.lost_event = asyncio.Event()
        self.released = False
        self.created = 0  # the revision of the record this claim created (0: one was there already)
        self.forgotten = False
        self.plain = False  # taken by get_cursor (the plain CursorStore protocol), not by a runner's claim()
        # Until when this claim is known to be held (monotonic clock): see JetStreamCursorStore's claim_lease.
        self.expires = math.inf if store.claim_lease is None else 0.0
        store._renew(self, since)  # noqa: SLF001

    def lose(self, err: RjetError) -> None:
        if self.lost is None:
            self.lost = err
            self.lost_event.set()
            self._store._lost.set()  # noqa: SLF001

    def check(self) -> None:
        if self.lost is not None:
            raise self.lost

    async def set_cursor(self, cursor: str | ProgressSource) -> None:
        """Buffer ``cursor``; written by the store's next flush as a compare-and-swap of this claim.

        ``cursor`` may be a :class:`ProgressSource` instead: the flush then writes what its
        ``snapshot()`` says at that time, ``(cursor, done)`` (a concurrent runner marks its progress
        changed at no cost per event, and each flush encodes it once).
        """
        store = self._store
        if self.lost is not None or self.released or store._closed:  # noqa: SLF001
            store._check_open()  # noqa: SLF001
            self.check()
            raise CursorStoreError(f"cursor {self.name!r}: this claim was released; claim the cursor again")
        store._dirty[self.name] = cursor  # noqa: SLF001
        if store._flusher is None:  # noqa: SLF001
            store._start_flusher()  # noqa: SLF001

    async def flush(self) -> None:
        """Write this claim's buffered cursor now; raises this claim's failure (not another cursor's)."""
        await self._store._flush_names([self.name], raise_for={self.name})  # noqa: SLF001

    async def wait_lost(self) -> None:
        """Return once the claim is lost (another runner took it, its key vanished, a write failed)."""
        await self.lost_event.wait()

    async def confirm(self) -> None:
        """Read the record back: raises the claim's loss (:class:`rjet.CursorConflict`, say) when another
        runner holds it now; otherwise the claim is known held for another ``claim_lease`` seconds."""
        if not await self._store.check_claim(self.name):
            self.check()

    async def release(self, *, forget_new: bool = False) -> None:
        """Flush and stop holding: the store forgets this claim (the next :meth:`claim` starts afresh).
        ``forget_new``: remove the record this claim created, when it wrote nothing since."""
        try:
            if self.lost is None:
                await self.flush()
                if forget_new and self.created and self.rev == self.created:
                    self.forgotten = await self._store._forget(self)  # noqa: SLF001
        finally:
            self.released = True
            if self._store._claims.get(self.name) is self:  # noqa: SLF001
                del self._store._claims[self.name]  # noqa: SLF001
                # What this claim could not write is dropped, never written without the claim (a
                # plain put, under the store's own owner, would overwrite whoever holds the cursor
                # now, and fence this runner's next run): those events are handled again.
                self._store._dirty.pop(self.name, None)  # noqa: SLF001
