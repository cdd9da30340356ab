"""The cursor-store protocol: what ``run``, the keyed scheduler and ``Parallel`` need from a store.

Two levels, declared, never guessed from a concrete class:

- :class:`CursorStore` is reflex's interface (get, set, flush). Any store that has it runs
  consumers: sequential ones exactly, concurrent ones with watermark-only progress (after a restart
  the events above the cursor are handled again), and without fencing.
- :class:`ClaimingCursorStore` adds :meth:`~ClaimingCursorStore.claim` and declares its
  :class:`Capabilities`. ``run`` then holds a :class:`Claim` for the consumer's lifetime and writes
  only through it: fencing (a second runner stops the first), exact progress above the cursor,
  the stream identity, leases.

``rjet.testing.check_cursor_store`` checks a store against the whole contract.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from nats.nuid import NUID

from rjet.errors import RjetError

__all__ = [
    "Capabilities",
    "Claim",
    "ClaimingCursorStore",
    "CursorStore",
    "FailingCursorStore",
    "ProgressSource",
    "TransactionalClaim",
    "claim_cursor",
    "runner_id",
]

_NUID = NUID()


@runtime_checkable
class CursorStore(Protocol):
    """Keeps a cursor (an event ID, "" for none) per consumer name.

    ``set_cursor`` may buffer; ``flush`` writes what is buffered. ``run`` calls ``get_cursor`` once
    at start, ``set_cursor`` after each handled event, and ``flush`` on the way out (a store that is
    also a :class:`ClaimingCursorStore` is used through its claims instead).

    Optional: stores that the ``rjet`` command line can address name their namespace, a ``str``
    attribute ``namespace`` (:class:`rjet.JetStreamCursorStore`'s, ``rjet cursor --namespace``), or
    their URL, a ``str`` attribute ``cursors_url`` (:class:`rjet.sql.SqlCursorStore`'s, without its
    password: ``rjet cursor --cursors``). ``run`` puts it, with the consumer's name, in the cursor
    errors it raises (:class:`rjet.CursorExpired` and the others' ``namespace`` and ``cursors``),
    from which the command line renders its ``rjet cursor`` hint; a store without one leaves it None.
    """

    async def get_cursor(self, name: str) -> str:
        """The cursor for ``name``, or "" when there is none."""
        ...

    async def set_cursor(self, name: str, cursor: str) -> None:
        """Record ``cursor`` for ``name`` (may be buffered until :meth:`flush`)."""
        ...

    async def flush(self) -> None:
        """Write every buffered cursor."""
        ...


@runtime_checkable
class FailingCursorStore(CursorStore, Protocol):
    """A :class:`CursorStore` that can fail in the background (a buffered write refused, the bucket
    gone): ``run`` stops as soon as :meth:`wait_failed` returns, not at the next event."""

    async def wait_failed(self) -> None:
        """Return once the store has failed; what failed is raised by the next call."""
        ...


class ProgressSource(Protocol):
    """What a claim's ``set_cursor`` also takes: the cursor and its exact progress, read when written."""

    def snapshot(self) -> tuple[str, str]:
        """``(cursor, done)``: the cursor and the encoded events done above it ("" for none)."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a :class:`ClaimingCursorStore` guarantees beyond keeping cursors.

    - ``fencing``: a claim fences every earlier claim of the name; the older runner's next write
      (or :meth:`Claim.confirm`) raises :class:`rjet.CursorConflict`, naming the owner it saw.
    - ``exact_progress``: a claim's ``set_cursor`` takes a :class:`ProgressSource` and keeps the
      events done above the cursor (``Claim.done``), so a concurrent consumer resumes exactly.
    - ``transactional``: a handler's own writes and the event's progress commit in one transaction
      (a transactional consumer's ``tx``).
    - ``sync_transactional``: transactional, and a sync handler too: its claims'
      :meth:`TransactionalClaim.transact_sync` runs the whole transaction, the handler inside it, in
      one call, ``tx`` a blocking connection: on the calling thread at concurrency 1 (``inline``), else
      on a thread of the store's (SQLite's connection thread).
    """

    fencing: bool = False
    exact_progress: bool = False
    transactional: bool = False
    sync_transactional: bool = False


class Claim(Protocol):
    """One runner's hold on one cursor, from :meth:`ClaimingCursorStore.claim` until :meth:`release`.

    ``cursor`` and ``done`` are what was stored when it was claimed; ``stream`` is the identity of
    the stream the cursor counts in (None when unknown; ``run`` sets it once the stream is open, and
    every later write records it); ``owner`` the runner's identity written with it; ``expires`` the
    monotonic time until which the claim is known held (``math.inf``: no lease).
    """

    cursor: str
    done: str | None
    stream: str | None
    owner: str
    expires: float
    lost: RjetError | None
    """Why the claim was lost (another runner took it, its record vanished, a write failed); None while held."""
    forgotten: bool
    """Whether :meth:`release` removed the record this claim had created (``forget_new``)."""

    async def set_cursor(self, cursor: str | ProgressSource) -> None:
        """Record ``cursor`` (or a progress source, read when written); may be buffered."""
        ...

    async def flush(self) -> None:
        """Write what is buffered now; raises this claim's failure."""
        ...

    async def wait_lost(self) -> None:
        """Return once the claim is lost (another runner took it, its record vanished, a write failed)."""
        ...

    async def confirm(self) -> None:
        """Look whether the claim is still held (read it back): raise its loss, or renew its lease."""
        ...

    async def release(self, *, forget_new: bool = False) -> None:
        """Flush and stop holding it (safe after a loss: then nothing is written).

        ``forget_new``: the run ended before it read anything (its stream could not be opened): a
        record this claim created, where none was, is removed rather than left behind as an empty
        cursor that tools would list."""
        ...

    def check(self) -> None:
        """Raise the claim's loss, when it was lost."""
        ...


class TransactionalClaim(Claim, Protocol):
    """The claim of a store whose capabilities say ``transactional``."""

    async def transact(
        self, seqs: Sequence[int], call: Callable[[Any], Awaitable[object]], *, sequential: bool
    ) -> None:
        """Run ``call(tx)`` in a transaction that records ``seqs`` as done (``sequential``: the last
        one as the cursor) and commits only while the claim is held; raises what ``call`` raises
        (rolled back), or the claim's loss (nothing committed).

        A ``sequential`` transaction (one in flight at a time) may return once its commit is queued,
        before it is known to have committed; its outcome is then read by the next ``transact``
        before that one commits (a failure rolls that one back too), by :meth:`flush`, which writes
        no cursor past it, and by :meth:`release`: a failure raised there loses the claim."""
        ...

    async def transact_sync(
        self, seqs: Sequence[int], call: Callable[[Any], object], *, sequential: bool, inline: bool = False
    ) -> None:
        """:meth:`transact` for a sync ``call(tx)``, run with the whole transaction in one call (only
        where the store's capabilities say ``sync_transactional``). ``inline``: the caller has this
        one transaction in flight (concurrency 1), so the call may run on the calling thread, the
        event loop's, as rjet runs any sync handler of a one-at-a-time consumer; else on a thread of
        the store's, never the event loop's."""
        ...


@runtime_checkable
class ClaimingCursorStore(CursorStore, Protocol):
    """A :class:`CursorStore` whose cursors are held through claims (see :class:`Capabilities`)."""

    @property
    def capabilities(self) -> Capabilities:
        """What this store guarantees."""
        ...

    async def claim(self, name: str, *, owner: str | None = None, after: str | None = None) -> Claim:
        """Read and claim the cursor for ``name`` as runner ``owner`` (:func:`runner_id`; a new one
        when None). ``after``: claim only while the stored record is still that runner's (else
        :class:`rjet.CursorConflict`, or :class:`rjet.CursorBucketGone` when it vanished)."""
        ...


def runner_id() -> str:
    """A new runner identity for :meth:`ClaimingCursorStore.claim`: host, pid and a random part.

    A runner keeps one for its lifetime (every run of one ``run_forever``), so a record carrying it
    is known to be its own, even one written by a request whose answer was lost.
    """
    return f"{socket.gethostname()}:{os.getpid()}:{_NUID.next().decode()[-10:]}"


class _PlainClaim:
    """A :class:`CursorStore` without claims, seen through the :class:`Claim` interface: no fencing,
    watermark-only progress, no stream identity."""

    __slots__ = ("_store", "cursor", "done", "expires", "forgotten", "lost", "owner", "set_cursor", "stream")

    def __init__(self, store: CursorStore, name: str, cursor: str, owner: str) -> None:
        self._store = store
        self.cursor = cursor
        self.stream: str | None = None
        self.done: str | None = None
        self.owner = owner
        self.expires = math.inf
        self.lost: RjetError | None = None  # a failing store's error is raised by its next call
        self.forgotten = False
        self.set_cursor = functools.partial(store.set_cursor, name)

    async def flush(self) -> None:
        await self._store.flush()

    async def wait_lost(self) -> None:
        # A store that can fail in the background says so; others never do.
        if isinstance(self._store, FailingCursorStore):
            await self._store.wait_failed()
        else:
            await asyncio.get_running_loop().create_future()

    async def confirm(self) -> None:
        pass

    async def release(self, *, forget_new: bool = False) -> None:
        await self._store.flush()

    def check(self) -> None:
        pass


def capabilities(store: CursorStore) -> Capabilities:
    """What ``store`` declares (a plain :class:`CursorStore` declares nothing)."""
    return store.capabilities if isinstance(store, ClaimingCursorStore) else Capabilities()


async def claim_cursor(store: CursorStore, name: str, *, owner: str, after: str | None = None) -> Claim:
    """``store``'s claim on ``name`` (see :meth:`ClaimingCursorStore.claim`); for a plain
    :class:`CursorStore`, its cursor seen through the claim interface."""
    if isinstance(store, ClaimingCursorStore):
        return await store.claim(name, owner=owner, after=after)
    return _PlainClaim(store, name, await store.get_cursor(name), owner)
