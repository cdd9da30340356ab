"""Cursor stores: where a consumer's progress (the ID of the last event it handled) is kept.

:class:`CursorStore` is the interface ``run`` needs; :class:`MemCursorStore` keeps cursors in memory
(tests, throwaway consumers); :class:`JetStreamCursorStore` keeps them in a JetStream KV bucket,
buffered, and fences out a second runner of the same consumer name.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol, Self, runtime_checkable

import nats.errors
import nats.js.errors
from nats.js import api
from nats.nuid import NUID

from rjet._publish import ack_seq
from rjet.errors import ConfigError, CursorConflict, CursorStoreError, RjetError

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = ["CursorStore", "JetStreamCursorStore", "MemCursorStore"]

log = logging.getLogger("rjet.cursors")

_NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_KEY_RE: Final = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")
_ENCODED: Final = "_b64."  # prefix of encoded keys; names that start with it are encoded too
RESERVED_PREFIX: Final = "_rjet."
"""KV keys rjet keeps beside cursors (sharding's heartbeats and records); never a cursor's key."""
_BUCKET_PREFIX: Final = "rjet_cursors_"
_STORE_ERRORS: Final = (nats.errors.Error, TimeoutError, OSError)
_MAX_BATCH: Final = 1000  # the server's default limit on the messages of one atomic batch
_NUID: Final = NUID()


@runtime_checkable
class CursorStore(Protocol):
    """Keeps a cursor (an event ID, "" for none) per consumer name.

    ``set_cursor`` may buffer; ``flush`` writes what is buffered. ``run`` calls ``get_cursor`` once
    at start, ``set_cursor`` after each handled event, and ``flush`` on the way out.
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


class MemCursorStore:
    """An in-memory :class:`CursorStore` (lost when the process ends).

    >>> store = MemCursorStore({"audit": "41"})
    """

    def __init__(self, cursors: dict[str, str] | None = None) -> None:
        self.cursors: dict[str, str] = dict(cursors or {})

    async def get_cursor(self, name: str) -> str:
        """The cursor for ``name``, or ""."""
        return self.cursors.get(name, "")

    async def set_cursor(self, name: str, cursor: str) -> None:
        """Record ``cursor`` for ``name``."""
        self.cursors[name] = cursor

    async def flush(self) -> None:
        """Nothing to write."""


def encode_key(name: str) -> str:
    """The KV key for cursor ``name``: itself when it is a valid key, else a reversible encoding."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"cursor name must be a non-empty str, not {name!r}")
    if _KEY_RE.match(name) and not name.startswith((_ENCODED, RESERVED_PREFIX)):
        return name
    return _ENCODED + base64.urlsafe_b64encode(name.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def decode_key(key: str) -> str:
    """Inverse of :func:`encode_key`."""
    if not key.startswith(_ENCODED):
        return key
    raw = key[len(_ENCODED) :]
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-8", "surrogatepass")


async def _allow_atomic(js: JetStreamContext, stream: str) -> bool:
    """Turn on atomic batch publishing for a KV bucket's stream (nats-server 2.12+); False when not possible."""
    try:
        info = await js.stream_info(stream)
        if info.config.allow_atomic:
            return True
        config = info.config
        config.allow_atomic = True
        await js.update_stream(config)
        return True
    except (nats.errors.Error, TimeoutError, OSError) as e:
        log.info("stream %r: no atomic batches (%r); cursor flushes send one request per cursor", stream, e)
        return False


async def kv_keys(kv: KeyValue) -> list[str]:
    """Every key in a KV bucket, from one stream-info request.

    (nats-py's ``KeyValue.keys()`` reads them through a watcher that can stop early and return
    none; the stream's per-subject state is exact.) Deleted keys keep a marker and are listed.
    """
    prefix = f"$KV.{kv._name}."
    info = await kv._js.stream_info(kv._stream, subjects_filter=prefix + ">")
    return [subject[len(prefix) :] for subject in info.state.subjects or {}]


class JetStreamCursorStore:
    """A :class:`CursorStore` in a JetStream KV bucket (``rjet_cursors_<namespace>``), buffered.

    ``set_cursor`` only records; a flush writes the changed cursors at most every ``flush_interval``
    seconds, and on :meth:`flush` / :meth:`close`: several of them as one atomic JetStream batch (one
    request, one ack; the bucket's stream is set to allow atomic batches, nats-server 2.12+), one of
    them (or on older servers, each of them, pipelined) as a single compare-and-swap.

    Two runners of one consumer name are fenced with the KV revision: ``get_cursor`` claims the
    cursor (a compare-and-swap write of its current value), and every later write is a
    compare-and-swap against the revision this store last wrote. A runner whose cursor was claimed
    by another gets :class:`rjet.CursorConflict` at its next write: the newest runner wins, the
    older one stops. Use :meth:`peek` to read a cursor without claiming it.

    ::

        async with await JetStreamCursorStore.create(js, "billing") as cursors:
            await rjet.run(rjet.Spec(stream.stream, cursors, consumer))
    """

    def __init__(self, kv: KeyValue, namespace: str, *, flush_interval: float = 1.0) -> None:
        self.namespace = namespace
        self.flush_interval = flush_interval
        self._kv = kv
        self._revs: dict[str, int] = {}  # key -> revision this store last read or wrote
        self._dirty: dict[str, str] = {}
        self._written: dict[str, str] = {}  # name -> the cursor this store last read or wrote
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._error: RjetError | None = None
        self._failed = asyncio.Event()
        self._closed = False
        self._atomic = False  # the bucket takes atomic batches: a flush of many cursors is one request
        self.flushes = 0

    @classmethod
    async def create(
        cls, js: JetStreamContext, namespace: str, *, flush_interval: float = 1.0, replicas: int = 1
    ) -> Self:
        """Bind the namespace's bucket, creating it (file storage, history 1) when missing."""
        if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
            raise ConfigError(f"cursor namespace {namespace!r} is invalid: use letters, digits, '_' and '-' only")
        if flush_interval < 0:
            raise ConfigError(f"flush_interval must be >= 0, not {flush_interval}")
        bucket = _BUCKET_PREFIX + namespace
        try:
            try:
                kv = await js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                kv = await js.create_key_value(
                    bucket=bucket, history=1, storage=api.StorageType.FILE, replicas=replicas
                )
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            raise CursorStoreError(
                f"cursor bucket {bucket!r}: JetStream is not enabled on the server (nats-server -js)"
            ) from None
        except _STORE_ERRORS as e:
            raise CursorStoreError(f"cursor bucket {bucket!r}: cannot open: {e!r}") from e
        store = cls(kv, namespace, flush_interval=flush_interval)
        store._atomic = await _allow_atomic(js, f"KV_{bucket}")
        return store

    @property
    def bucket(self) -> str:
        """The KV bucket's name."""
        return _BUCKET_PREFIX + self.namespace

    async def get_cursor(self, name: str) -> str:
        """Read and claim the cursor for ``name`` ("" when none); fences earlier runners of it."""
        self._check()
        key = encode_key(name)
        if name in self._dirty:
            await self.flush()
        for _ in range(10):
            try:
                try:
                    entry = await self._kv.get(key)
                except nats.js.errors.KeyNotFoundError as e:
                    # Create (or re-create over a delete marker): fails if another runner did first.
                    deleted = getattr(getattr(e, "entry", None), "revision", None)
                    await self._cas(name, key, b"", deleted or 0)
                    return ""
                assert entry.revision is not None
                await self._cas(name, key, entry.value or b"", entry.revision)
                return (entry.value or b"").decode()
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another runner claimed it between our read and write: read again
            except _STORE_ERRORS as e:
                raise self._store_error(f"cannot read cursor {name!r}", e) from e
        raise CursorConflict(name, "another runner keeps claiming this cursor; two runners share the name")

    async def peek(self, name: str) -> str:
        """Read the stored cursor for ``name`` without claiming it ("" when none)."""
        return await self._peek_entry(name) or ""

    async def _peek_entry(self, name: str) -> str | None:
        try:
            entry = await self._kv.get(encode_key(name))
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError too
            return None
        except _STORE_ERRORS as e:
            raise self._store_error(f"cannot read cursor {name!r}", e) from e
        return (entry.value or b"").decode()

    async def cursors(self) -> dict[str, str]:
        """Every stored cursor, by name, without claiming any."""
        try:
            keys = await kv_keys(self._kv)
        except _STORE_ERRORS as e:
            raise self._store_error("cannot list cursors", e) from e
        names = [decode_key(k) for k in keys if not k.startswith(RESERVED_PREFIX)]
        values = await asyncio.gather(*(self._peek_entry(n) for n in names))
        return {n: v for n, v in zip(names, values, strict=True) if v is not None}  # None: deleted

    async def set_cursor(self, name: str, cursor: str) -> None:
        """Buffer ``cursor`` for ``name``; written by the next flush."""
        if self._error is not None or self._closed:
            self._check()
        self._dirty[name] = cursor
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_later())

    async def flush(self) -> None:
        """Write every buffered cursor now (pipelined); raises what a background flush hit."""
        self._check()
        async with self._lock:
            if not self._dirty:
                return
            batch, self._dirty = self._dirty, {}
            try:
                if self._atomic and 1 < len(batch) <= _MAX_BATCH and await self._write_batch(batch):
                    self.flushes += 1
                    return
                # One compare-and-swap per cursor, pipelined (also what finds the cursor that made an
                # atomic batch fail, and writes the others).
                results = await asyncio.gather(
                    *(self._write(name, cursor) for name, cursor in batch.items()), return_exceptions=True
                )
            except BaseException:  # cancelled mid-write: keep every cursor for the next flush
                for name, cursor in batch.items():
                    self._dirty.setdefault(name, cursor)
                raise
            self.flushes += 1
            failed = [(name, r) for (name, _), r in zip(batch.items(), results, strict=True) if r is not None]
            for name, _ in failed:
                self._dirty.setdefault(name, batch[name])
            for _, err in failed:
                if isinstance(err, CursorConflict):
                    self._error = err
            if failed:
                err = failed[0][1]
                raise err if isinstance(err, RjetError) else self._store_error("cannot write cursors", err)

    async def _write_batch(self, batch: dict[str, str]) -> bool:
        """Write every cursor of ``batch`` as one atomic JetStream batch: one request, one ack, each
        message a compare-and-swap on its key. False (nothing written) when the server refused it,
        a conflict among them say; the caller then writes them one by one.

        Shielded like :meth:`_cas`: a cancelled caller does not lose the revisions.
        """
        nc = self._kv._js._nc
        batch_id = _NUID.next().decode()
        items = [(name, encode_key(name), cursor.encode()) for name, cursor in batch.items()]
        last = len(items)

        def headers(i: int, key: str) -> dict[str, str]:
            h = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
            rev = self._revs.get(key)
            if rev is not None:
                h["Nats-Expected-Last-Subject-Sequence"] = str(rev)
            return h

        async def send() -> bytes:
            # All but the last go out as raw frames in one piece (no per-message publish call); the
            # last commits the batch and carries the only reply.
            frames = []
            for i, (_, key, value) in enumerate(items[:-1], 1):
                hdr = "".join(f"{k}: {v}\r\n" for k, v in headers(i, key).items())
                block = f"NATS/1.0\r\n{hdr}\r\n".encode()
                frames.append(b"HPUB %s%s %d %d\r\n%s%s\r\n" % (
                    self._kv._pre.encode(), key.encode(), len(block), len(block) + len(value), block, value
                ))  # fmt: skip
            nc.stats["out_msgs"] += len(frames)  # keep nats-py's counters true to the wire
            await nc._send_command(b"".join(frames))
            _, key, value = items[-1]
            commit = {**headers(last, key), "Nats-Batch-Commit": "1"}
            reply = await nc.request(f"{self._kv._pre}{key}", value, timeout=self._kv._js._timeout, headers=commit)
            return reply.data

        task = asyncio.ensure_future(send())

        def record(t: asyncio.Future[bytes]) -> None:
            if t.cancelled() or t.exception() is not None:
                return
            seq = ack_seq(t.result())
            if seq is None:
                return
            # An atomic batch is stored contiguously, in order: revisions seq-n+1 .. seq.
            for rev, (name, key, value) in enumerate(items, seq - last + 1):
                self._revs[key] = max(self._revs.get(key, 0), rev)
                self._written[name] = value.decode()

        task.add_done_callback(record)
        try:
            ack = await asyncio.shield(task)
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as e:
            raise self._store_error("cannot write cursors", e) from e
        except _STORE_ERRORS as e:
            log.debug("cursor bucket %r: atomic batch of %d failed (%r); writing one by one", self.bucket, last, e)
            return False
        return ack_seq(ack) is not None

    async def _cas(self, name: str, key: str, value: bytes, last: int | None) -> int:
        """Write ``value`` (compare-and-swap against ``last`` unless None) and record the revision.

        Shielded: if the caller is cancelled mid-write, the write still completes and its revision is
        recorded, so the next write does not mistake this store's own write for another runner's.
        """
        write = self._kv.put(key, value) if last is None else self._kv.update(key, value, last=last)
        task = asyncio.ensure_future(write)

        def record(t: asyncio.Future[int]) -> None:
            if not t.cancelled() and t.exception() is None and self._revs.get(key, 0) < t.result():
                self._revs[key] = t.result()
                self._written[name] = value.decode()

        task.add_done_callback(record)
        return await asyncio.shield(task)

    async def _write(self, name: str, cursor: str) -> None:
        key = encode_key(name)
        rev = self._revs.get(key)
        try:
            await self._cas(name, key, cursor.encode(), rev)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise CursorConflict(
                name,
                f"another runner wrote it after revision {rev} in bucket {self.bucket!r}: two runners"
                " share this consumer name; this one stops",
            ) from None
        except _STORE_ERRORS as e:
            raise self._store_error(f"cannot write cursor {name!r}", e) from e

    async def _flush_later(self) -> None:
        try:
            while self._dirty and not self._closed:
                await asyncio.sleep(self.flush_interval)
                try:
                    await self.flush()
                except RjetError as e:
                    log.error("cursor bucket %r: background flush failed: %s", self.bucket, e)
                    self._error = self._error or e
                    self._failed.set()
                    return
        finally:
            self._flusher = None

    async def check_claim(self, name: str) -> bool:
        """Whether this store still holds ``name``'s cursor: nobody wrote it since this store
        claimed or wrote it. When it was lost, the store fails as a conflicting write would (a
        running ``run`` stops at once). Lets an idle runner find out that it was fenced."""
        key = encode_key(name)
        async with self._lock:
            rev = self._revs.get(key)
            if rev is None or self._error is not None:
                return self._error is None
            try:
                entry = await self._kv.get(key)
                lost = entry.revision != self._revs.get(key, rev)
            except nats.js.errors.KeyNotFoundError:
                lost = True
            except _STORE_ERRORS as e:
                raise self._store_error(f"cannot read cursor {name!r}", e) from e
            if lost:
                self._error = CursorConflict(
                    name,
                    f"another runner claimed it in bucket {self.bucket!r} after revision {rev}: two runners"
                    " share this consumer name; this one stops",
                )
                self._failed.set()
            return not lost

    def last_written(self, name: str) -> str | None:
        """The cursor this store last read from or wrote to the bucket for ``name`` (None: neither)."""
        return self._written.get(name)

    async def wait_failed(self) -> None:
        """Return once a background flush has failed; ``run`` uses it to stop at once, not at the next event."""
        await self._failed.wait()

    def _check(self) -> None:
        if self._closed:
            raise CursorStoreError(f"cursor bucket {self.bucket!r}: the store is closed")
        err = self._error
        if err is not None:
            if not isinstance(err, CursorConflict):  # a conflict is final; other errors are reported once
                self._error = None
                self._failed.clear()
            raise err

    def _store_error(self, what: str, err: BaseException) -> CursorStoreError:
        if isinstance(
            err, nats.js.errors.NotFoundError | nats.errors.NoRespondersError | nats.js.errors.ServiceUnavailableError
        ):
            return CursorStoreError(
                f"cursor bucket {self.bucket!r}: {what}: the bucket is gone (deleted while in use?)"
            )
        return CursorStoreError(f"cursor bucket {self.bucket!r}: {what}: {err!r}")

    async def close(self) -> None:
        """Flush and stop the background flusher. Safe to call twice."""
        if self._closed:
            return
        try:
            if self._error is None:
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
