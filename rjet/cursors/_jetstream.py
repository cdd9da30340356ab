"""JetStreamCursorStore: cursors in a JetStream KV bucket, buffered, fenced by claims.

Its parts: ``_jetstream_claim.py`` (a runner's claim on one cursor), ``_jetstream_records.py`` (the
bucket's records: guarded requests, and what a missing record or a failed request means),
``_jetstream_batch.py`` (a flush of many cursors as one atomic batch).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import nats.js.errors

from rjet._nats.client import fast_paths
from rjet.cursors._bucket import _BUCKET_PREFIX, allow_atomic, kv_keys, open_bucket
from rjet.cursors._jetstream_batch import MAX_BATCH, write_batch
from rjet.cursors._jetstream_claim import JetStreamClaim, pair
from rjet.cursors._jetstream_records import GONE_ERRORS, STORE_ERRORS, Records
from rjet.cursors._protocol import Capabilities, ProgressSource, runner_id
from rjet.cursors._record import RESERVED_PREFIX, CursorRecord, decode_key, encode_key
from rjet.errors import ConfigError, CursorBucketGone, CursorConflict, CursorStoreError, PermissionDenied, RjetError

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = ["JetStreamCursorStore", "kv_keys"]

log = logging.getLogger("rjet.cursors")

_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_CLAIM_TRIES: Final = 50  # compare-and-swap rounds a claim tries against a running writer


class JetStreamCursorStore:
    """A :class:`CursorStore` in a JetStream KV bucket (``rjet_cursors_<namespace>``), buffered.

    ``set_cursor`` only records; a flush writes the changed cursors at most every ``flush_interval``
    seconds, and on :meth:`flush` / :meth:`close`: several of them as one atomic JetStream batch (one
    request, one ack, when the bucket allows atomic batches: nats-server 2.12+, set on buckets this
    store creates), one of them (or each of them, pipelined) as a single compare-and-swap.

    **Claims fence runners.** :meth:`claim` (which ``run`` calls; :meth:`get_cursor` too) writes
    the cursor's record again with a new owner token; every later write is a compare-and-swap on
    the revision that claim last wrote. A write that fails, or whose answer is lost, is settled by
    reading the record back: the owner token says whether the write was this claim's own (then it
    goes on) or another runner's (then :class:`rjet.CursorConflict`, naming that owner). The newest
    claim wins; an older runner stops at its next write, or when :meth:`check_claim` looks. Each
    cursor is fenced on its own: losing one does not stop the others. Use :meth:`peek` to read a
    cursor without claiming it.

    ``namespace`` names the store for the ``rjet`` command line (``rjet cursor --namespace``; the
    optional ``namespace`` of :class:`CursorStore`); ``bucket`` is ``rjet_cursors_<namespace>``.

    ::

        async with await JetStreamCursorStore.create(js, "billing") as cursors:
            await rjet.run(rjet.Spec(stream.stream, cursors, consumer))
    """

    capabilities: Final = Capabilities(fencing=True, exact_progress=True)
    """Claims fence other runners; a claim keeps exact progress above the cursor."""

    def __init__(
        self, kv: KeyValue, namespace: str, *, flush_interval: float = 1.0, claim_lease: float | None = None
    ) -> None:
        self.namespace = namespace
        self.flush_interval = flush_interval
        self.claim_lease = claim_lease
        self._kv = kv
        # The bucket's records, and the cursor this store last read or wrote of each (with the
        # identity of the stream it counts in).
        self._records = Records(kv, namespace, _BUCKET_PREFIX + namespace)
        self._claims: dict[str, JetStreamClaim] = {}  # name -> the claim this store holds on it now
        # name -> cursor to write, under this store's claim on the name (or, with none, a plain put).
        # A new claim drops what an older one left, so a cursor is never written under a claim it
        # was not set under.
        self._dirty: dict[str, str | ProgressSource] = {}
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()  # some claim of this store was lost
        self._closed = False
        self._atomic = False  # the bucket takes atomic batches: a flush of many cursors is one request
        self._owner = runner_id()  # for writes without a claim (rjet cursor --set)
        self.flushes = 0
        self.settled = 0  # writes whose failure or lost answer a read-back showed to be this store's own

    @classmethod
    async def create(
        cls,
        js: JetStreamContext,
        namespace: str,
        *,
        flush_interval: float = 1.0,
        replicas: int = 1,
        claim_lease: float | None = None,
    ) -> Self:
        """Bind the namespace's bucket, creating it (file storage, history 1, ``replicas``) when missing.

        An existing bucket is used as it is (its configuration is never changed); one with a TTL is
        refused (:class:`rjet.CursorBucketUnusable`), since expired cursors would start consumers over.

        ``claim_lease`` (seconds): a claim not confirmed for that long (by one of its writes or a
        read-back) is confirmed before ``run`` hands the next event to the handler. A runner that
        was paused or cut off longer than another runner's takeover time (an elastic group's member
        lease, say) then stops before it handles an event the other may have handled meanwhile.
        """
        store = await cls._open(js, namespace, flush_interval=flush_interval, replicas=replicas, create=True)
        store.claim_lease = claim_lease
        return store

    @classmethod
    async def bind(cls, js: JetStreamContext, namespace: str, *, flush_interval: float = 1.0) -> Self:
        """Bind the namespace's existing bucket; never creates one (what reading tools use, so that a
        mistyped namespace is an error, not a new empty bucket read "from the beginning").

        Raises :class:`rjet.CursorStoreError` naming the namespace when it has no bucket.
        """
        return await cls._open(js, namespace, flush_interval=flush_interval, replicas=1, create=False)

    @classmethod
    async def _open(
        cls, js: JetStreamContext, namespace: str, *, flush_interval: float, replicas: int, create: bool
    ) -> Self:
        if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
            raise ConfigError(f"cursor namespace {namespace!r} is invalid: use letters, digits, '_' and '-' only")
        if flush_interval < 0:
            raise ConfigError(f"flush_interval must be >= 0, not {flush_interval}")
        kv, info, created = await open_bucket(js, _BUCKET_PREFIX + namespace, namespace, replicas, create=create)
        store = cls(kv, namespace, flush_interval=flush_interval)
        # Atomic batches are sent as raw frames: a fast path (rjet/_nats/client.py).
        atomic = bool(info.config.allow_atomic) or (created and await allow_atomic(js, info.config))
        store._atomic = atomic and fast_paths(store._records.nc)
        return store

    @property
    def bucket(self) -> str:
        """The KV bucket's name."""
        return _BUCKET_PREFIX + self.namespace

    @property
    def kv(self) -> KeyValue:
        """The bucket itself. rjet keeps its own records beside the cursors (keys under ``_rjet.``:
        :mod:`rjet.parallel`'s heartbeats and reshard records); write no cursor key through it."""
        return self._kv

    # ----------------------------------------------------------------- claims

    async def claim(self, name: str, *, owner: str | None = None, after: str | None = None) -> JetStreamClaim:
        """Read and claim the cursor for ``name``; fences every earlier claim of it, this store's too.

        The claim's ``cursor`` is what was stored ("" for none) and ``stream`` the identity of the
        stream it was recorded in (None when unknown). ``run`` writes through the claim and
        releases it on the way out.

        ``owner``: the identity of the runner that claims (:func:`runner_id`; a new one when None),
        written into every record of the claim. A runner keeps one identity for its lifetime (every
        run of one ``run_forever``), so a record carrying it is known to be its own, even one
        written by a request whose answer was lost.

        ``after``: the identity the stored record must carry (``run_forever`` running again after
        an error passes its own). The cursor is claimed only while the stored record is still this
        runner's: when another runner claimed it meanwhile, :class:`rjet.CursorConflict` naming
        that runner instead of taking it back (newest wins, and this runner is not the newest);
        when the record is gone (the bucket or the key deleted), :class:`rjet.CursorBucketGone`.

        ::

            me = rjet.cursors.runner_id()
            claim = await store.claim("billing", owner=me)
            ...  # this run ends on an error; the next run of the same runner:
            claim = await store.claim("billing", owner=me, after=me)
        """
        return await self._claim(name, plain=False, owner=owner, after=after)

    async def _claim(
        self, name: str, *, plain: bool, owner: str | None = None, after: str | None = None
    ) -> JetStreamClaim:
        self._check_open()
        key, records = encode_key(name), self._records
        async with self._lock:
            if name in self._dirty:
                await self._flush_locked([name], raise_for=set())  # what an earlier claim left unwritten
            owner = owner or runner_id()
            for attempt in range(_CLAIM_TRIES):
                if attempt:  # a runner that writes every few ms wins every race without a pause
                    await asyncio.sleep(random.uniform(0, 0.002 * min(attempt, 10)))
                since = time.monotonic()
                entry = await records.read_entry(name, key)
                record = CursorRecord.decode(entry[0]) if entry is not None else CursorRecord()
                base = entry[1] if entry is not None else 0
                if after is not None:
                    self._check_still_mine(name, after, record if entry is not None and entry[0] is not None else None)
                mine = CursorRecord(record.cursor, record.stream, owner, record.done)
                try:
                    rev = await records.shielded(self._kv.update(key, mine.encode(), last=base))
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another runner wrote it between our read and write: read again
                except GONE_ERRORS as e:
                    raise await records.gone(name, e, last=record) from None
                except STORE_ERRORS as e:
                    # Applied or not? A newer revision carrying our identity says it was.
                    back = await records.read(name, key)
                    if back is None or back[1] == base:
                        if back is None and after is None:
                            raise records.error(f"cannot claim cursor {name!r}", e) from e
                        continue  # not applied (or the record vanished): read again
                    if CursorRecord.decode(back[0]).owner != owner:
                        continue  # another writer's: read again
                    rev = back[1]
                claim = JetStreamClaim(self, name, owner, rev, record, since)
                if entry is None or entry[0] is None:
                    claim.created = rev
                old = self._claims.get(name)
                # A claim of get_cursor's is the caller's own, taken again; one of claim()'s is a
                # runner that another runner now fences.
                if old is not None and not (plain and old.plain):
                    old.lose(
                        CursorConflict(
                            name,
                            f"another runner claimed it through the same store (bucket {self.bucket!r}, owner"
                            f" {owner}): two runners share this consumer name; this one stops",
                        )
                    )
                claim.plain = plain
                self._claims[name] = claim
                self._dirty.pop(name, None)  # set under the older claim meanwhile: not ours to write
                records.written[name] = record.cursor
                if record.stream:
                    records.counts_in[name] = record.stream
                return claim
        raise CursorConflict(
            name,
            f"another writer changed it {_CLAIM_TRIES} times in a row while this runner claimed it (bucket"
            f" {self.bucket!r});"
            " two runners share the name, or a tool keeps writing it",
        )

    def _check_still_mine(self, name: str, me: str, stored: CursorRecord | None) -> None:
        """Raise unless ``stored`` (None: no record) is the record of runner ``me``, who held the claim."""
        if stored is None:
            raise self._records.vanished(name, "the bucket was deleted and created again, or the key deleted", None)
        if stored.owner != me:
            raise CursorConflict(
                name,
                f"another runner claimed it in bucket {self.bucket!r} while this one was between runs"
                f" (owner {stored.owner or 'unknown: a tool or an older rjet'}): two runners share this"
                " consumer name; this one stops",
            )

    async def _forget(self, claim: JetStreamClaim) -> bool:
        """Delete the record ``claim`` created, unless anyone wrote it since (then it stays)."""
        try:
            await self._records.guarded(self._kv.delete(encode_key(claim.name), last=claim.rev))
        except (*STORE_ERRORS, PermissionDenied) as e:
            log.debug("cursor bucket %r: left the new record of %r (%r)", self.bucket, claim.name, e)
            return False
        return True

    async def get_cursor(self, name: str) -> str:
        """Read and claim the cursor for ``name`` ("" when none); fences earlier runners of it."""
        return (await self._claim(name, plain=True)).cursor

    async def check_claim(self, name: str) -> bool:
        """Whether this store still holds ``name``'s claim (the stored record carries its owner).

        When it was lost, the claim fails as a conflicting write would (a running ``run`` stops at
        once). Lets an idle runner find out that it was fenced. True when nothing is claimed.
        """
        key = encode_key(name)
        async with self._lock:
            claim = self._claims.get(name)
            if claim is None:
                return True
            if claim.lost is not None:
                return False
            since = time.monotonic()
            entry = await self._records.read(name, key)
            if entry is None:
                claim.lose(await self._records.gone(name))
                return False
            owner = CursorRecord.decode(entry[0]).owner
            if owner != claim.owner:
                claim.lose(
                    CursorConflict(
                        name,
                        f"another runner claimed it in bucket {self.bucket!r} after revision {claim.rev}"
                        f" (owner {owner or 'unknown: a tool or an older rjet'}): two runners share this"
                        " consumer name; this one stops",
                    )
                )
                return False
            self._renew(claim, since)
            return True

    # ----------------------------------------------------------------- reads

    async def peek(self, name: str) -> str:
        """Read the stored cursor for ``name`` without claiming it ("" when none)."""
        record = await self.peek_record(name)
        return record.cursor if record is not None else ""

    async def peek_record(self, name: str) -> CursorRecord | None:
        """The stored record for ``name`` without claiming it (None when none)."""
        entry = await self._records.read(name, encode_key(name))
        return CursorRecord.decode(entry[0]) if entry is not None else None

    async def cursors(self) -> dict[str, str]:
        """Every stored cursor, by name, without claiming any."""
        try:
            keys = await kv_keys(self._kv)
        except STORE_ERRORS as e:
            raise self._records.error("cannot list cursors", e) from e
        names = [decode_key(k) for k in keys if not k.startswith(RESERVED_PREFIX)]
        records = await asyncio.gather(*(self.peek_record(n) for n in names))
        return {n: r.cursor for n, r in zip(names, records, strict=True) if r is not None}  # None: deleted

    def last_written(self, name: str) -> str | None:
        """The cursor this store last read from or wrote to the bucket for ``name`` (None: neither)."""
        return self._records.written.get(name)

    # ----------------------------------------------------------------- writes

    async def set_cursor(self, name: str, cursor: str) -> None:
        """Buffer ``cursor`` for ``name`` (under this store's claim on it, if any); written by the next flush."""
        if self._closed:
            self._check_open()
        claim = self._claims.get(name)
        if claim is not None and claim.lost is not None:
            claim.check()
        self._dirty[name] = cursor
        if self._flusher is None:
            self._start_flusher()

    def _start_flusher(self) -> None:
        self._flusher = asyncio.create_task(self._flush_later())

    async def flush(self) -> None:
        """Write every buffered cursor now; raises the first failure (the other cursors are written)."""
        self._check_open()
        await self._flush_names(None, raise_for=None)

    async def _flush_names(self, names: list[str] | None, raise_for: set[str] | None) -> None:
        async with self._lock:
            await self._flush_locked(names, raise_for)

    async def _flush_locked(self, names: list[str] | None, raise_for: set[str] | None) -> None:
        """Write the buffered cursors of ``names`` (all when None). A claim whose write failed is lost
        (its run stops); raises the first failure among ``raise_for`` (any when None)."""
        if names is None:
            dirty, self._dirty = self._dirty, {}
        else:
            dirty = {n: self._dirty.pop(n) for n in names if n in self._dirty}
        claims = self._claims
        # A lost claim writes nothing more.
        batch = {n: (c, pair(v)) for n, v in dirty.items() if (c := claims.get(n)) is None or c.lost is None}
        if not batch:
            return
        try:
            if (
                self._atomic
                and 1 < len(batch) <= MAX_BATCH
                and await write_batch(self._records, batch, owner=self._owner, wrote=self._wrote)
            ):
                self.flushes += 1
                return
            # One compare-and-swap per cursor, pipelined (also what finds the cursor that made an
            # atomic batch fail, and writes the others).
            results = await asyncio.gather(
                *(self._write(name, claim, pair) for name, (claim, pair) in batch.items()), return_exceptions=True
            )
        except BaseException:  # cancelled mid-write: keep every cursor for the next flush
            for name in batch:
                self._dirty.setdefault(name, dirty[name])
            raise
        self.flushes += 1
        first: BaseException | None = None
        for (name, (claim, _)), err in zip(batch.items(), results, strict=True):
            if err is None:
                continue
            if not isinstance(err, CursorConflict | CursorBucketGone):
                self._dirty.setdefault(name, dirty[name])  # a failed write is tried again
            if claim is not None and isinstance(err, RjetError):
                claim.lose(err)
            if first is None and (raise_for is None or name in raise_for):
                first = err
        if first is not None:
            raise first if isinstance(first, RjetError) else self._records.error("cannot write cursors", first)

    async def _write(self, name: str, claim: JetStreamClaim | None, pair: tuple[str, str | None]) -> None:
        """One cursor's write: a compare-and-swap under ``claim`` (a plain put without one), settled by
        reading the record back when it failed or its answer was lost."""
        key, records = encode_key(name), self._records
        owner = claim.owner if claim is not None else self._owner
        cursor, done = pair
        record = CursorRecord(cursor, claim.stream if claim is not None else None, owner, done)
        value = record.encode()
        for _ in range(3):
            since = time.monotonic()
            try:
                if claim is None:
                    rev = await records.shielded(self._kv.put(key, value))
                else:
                    rev = await records.shielded(self._kv.update(key, value, last=claim.rev))
            except GONE_ERRORS as e:
                raise await records.gone(name, e) from None
            except nats.js.errors.KeyWrongLastSequenceError as e:
                error: BaseException = e
            except STORE_ERRORS as e:
                error = e  # the write may or may not have been applied
            else:
                self._wrote(name, claim, rev, cursor, since)
                return
            if claim is None:
                raise records.error(f"cannot write cursor {name!r}", error)
            back = await records.read(name, key)
            if back is None:
                raise await records.gone(name)
            stored = CursorRecord.decode(back[0])
            if stored.owner != claim.owner:
                raise CursorConflict(
                    name,
                    f"another runner wrote it after revision {claim.rev} in bucket {self.bucket!r} (owner"
                    f" {stored.owner or 'unknown: a tool or an older rjet'}): two runners share this consumer"
                    " name; this one stops",
                )
            # Our own record: an earlier write of this claim was applied although its answer was lost.
            self.settled += 1
            claim.rev = max(claim.rev, back[1])
            if stored == record:
                self._wrote(name, claim, back[1], cursor, since)
                return
        raise records.error(f"cannot write cursor {name!r}", error)

    def _wrote(self, name: str, claim: JetStreamClaim | None, rev: int, cursor: str, since: float) -> None:
        self._records.written[name] = cursor
        if claim is not None and claim.stream:
            self._records.counts_in[name] = claim.stream
        if claim is None:
            # A write without a claim becomes this store's claim: its later writes compare-and-swap.
            record = CursorRecord(cursor, None, self._owner)
            claim = self._claims[name] = JetStreamClaim(self, name, self._owner, rev, record, since)
            claim.plain = True
        claim.rev = max(claim.rev, rev)
        self._renew(claim, since)

    def _renew(self, claim: JetStreamClaim, since: float) -> None:
        """``claim`` was seen held by a request sent at ``since`` (monotonic): a write it made, or a
        read-back with its owner token. The lease counts from the request, not from its answer: an
        answer that waited out a pause of this process proves nothing about the pause."""
        if self.claim_lease is not None:
            claim.expires = max(claim.expires, since + self.claim_lease)

    async def _flush_later(self) -> None:
        try:
            while self._dirty and not self._closed:
                await asyncio.sleep(self.flush_interval)
                try:
                    await self.flush()
                except RjetError as e:
                    # The failed claims are lost (their runs stop); the other cursors were written.
                    log.error("cursor bucket %r: background flush failed: %s", self.bucket, e)
        finally:
            self._flusher = None

    async def wait_failed(self) -> None:
        """Return once any claim of this store is lost (``run`` waits on its own claim instead)."""
        await self._lost.wait()

    # ----------------------------------------------------------------- closing

    def _check_open(self) -> None:
        if self._closed:
            raise CursorStoreError(f"cursor bucket {self.bucket!r}: the store is closed")

    async def close(self) -> None:
        """Flush and stop the background flusher. Safe to call twice."""
        if self._closed:
            return
        try:
            await self.flush()  # waits for a background flush in flight, then writes the rest
        finally:
            self._closed = True
            flusher, self._flusher = self._flusher, None
            if flusher is not None:
                flusher.cancel()  # it is asleep, or finds nothing dirty
                await asyncio.wait([flusher])

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
