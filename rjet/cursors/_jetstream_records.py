"""A cursor bucket's records as a :class:`rjet.JetStreamCursorStore` reads and writes them: every
request guarded (a refused one raises :class:`rjet.PermissionDenied` at once, not after a timeout),
and what a missing record or a failed request means (the bucket gone, unusable, or emptied; the
store's own error)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final, TypeVar

import nats.errors
import nats.js.errors

from rjet._nats.client import connection, kv_names
from rjet._nats.denials import denials
from rjet.cursors._bucket import bucket_match, check_bucket_config
from rjet.cursors._record import CursorRecord
from rjet.errors import CursorBucketGone, CursorBucketUnusable, CursorStoreError

if TYPE_CHECKING:
    from nats.js.kv import KeyValue

__all__ = ["GONE_ERRORS", "STORE_ERRORS", "Records"]

STORE_ERRORS: Final = (nats.errors.Error, TimeoutError, OSError)
# What a write or read gets when the bucket's stream does not exist.
GONE_ERRORS: Final = (
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.NotFoundError,
)

_T = TypeVar("_T")


class Records:
    """The records of bucket ``bucket`` (the store of ``namespace``), and what the store last knew of
    each cursor: ``written`` (the cursor it last read or wrote) and ``counts_in`` (the identity of
    the stream that cursor counts in), which say where a runner was when its record vanished."""

    __slots__ = ("_guard", "_match", "bucket", "counts_in", "kv", "names", "namespace", "nc", "written")

    def __init__(self, kv: KeyValue, namespace: str, bucket: str) -> None:
        self.kv = kv
        self.namespace = namespace
        self.bucket = bucket
        self.names = kv_names(kv)
        self.nc = connection(self.names.js)
        self._guard = denials(self.nc).guard
        self._match = bucket_match(bucket)
        self.written: dict[str, str] = {}
        self.counts_in: dict[str, str] = {}

    async def guarded(self, request: Awaitable[_T]) -> _T:
        """``request``, a request on this bucket: refused, it raises :class:`rjet.PermissionDenied`."""
        return await self._guard(self._match, request)

    async def shielded(self, write: Awaitable[int]) -> int:
        """The revision ``write`` wrote. If the caller is cancelled mid-write, the write still
        completes; the revision it returns is not recorded, but the next write settles that by reading
        its own record back. A refused write (PermissionDenied) is known not to be applied."""
        return await self._guard(self._match, asyncio.shield(asyncio.ensure_future(write)))

    async def read(self, name: str, key: str) -> tuple[bytes, int] | None:
        """(value, revision) of ``key``; None when it is missing or deleted."""
        entry = await self.read_entry(name, key)
        return entry if entry is not None and entry[0] is not None else None  # type: ignore[return-value]

    async def read_entry(self, name: str, key: str) -> tuple[bytes | None, int] | None:
        """(value, revision) of ``key``: value None for a delete marker (whose revision a create must
        name); None when there is nothing."""
        try:
            entry = await self._guard(self._match, self.kv.get(key))
        except nats.js.errors.KeyNotFoundError as e:
            marker = getattr(getattr(e, "entry", None), "revision", None)
            return (None, marker) if marker else None
        except STORE_ERRORS as e:
            raise self.error(f"cannot read cursor {name!r}", e) from e
        assert entry.revision is not None
        return entry.value or b"", entry.revision

    async def gone(
        self, name: str, cause: BaseException | None = None, last: CursorRecord | None = None
    ) -> CursorStoreError:
        """The error for a cursor whose key is missing: the bucket is gone, unusable, or was emptied.
        ``last``: the record this runner last knew, when not its claim's."""
        try:
            info = await self._guard(self._match, self.names.js.stream_info(self.names.stream))
        except nats.js.errors.NotFoundError:
            return self.vanished(name, "the bucket is gone (deleted while in use)", last)
        except STORE_ERRORS as e:
            return self.error(f"cannot read cursor {name!r}", cause or e)
        try:
            check_bucket_config(self.bucket, info.config)
        except CursorBucketUnusable as e:
            return e
        if cause is not None:
            return self.error(f"cannot write cursor {name!r}", cause)
        return self.vanished(name, "the bucket was deleted and created again, or the key deleted", last)

    def vanished(self, name: str, how: str, last: CursorRecord | None) -> CursorBucketGone:
        """A claimed cursor's record is gone: no other runner was seen, and starting over from the
        beginning would hand the handler every event again without a word, so the runner stops and
        says where it was."""
        cursor = self.written.get(name) or (last.cursor if last is not None else "")
        stream = self.counts_in.get(name) or (last.stream if last is not None else None)
        where = f" (its last cursor here: {cursor})" if cursor else ""
        return CursorBucketGone(
            f"cursor bucket {self.bucket!r}: cursor {name!r}{where} vanished while this runner held it: {how};"
            " no other runner was seen; this runner stops rather than start over from the stream's beginning",
            name=name,
            bucket=self.bucket,
            namespace=self.namespace,
            cursor=cursor,
            stream=stream,
        )

    def error(self, what: str, err: BaseException) -> CursorStoreError:
        """The store's error for request ``what`` that failed with ``err``."""
        if isinstance(err, nats.errors.NoRespondersError | nats.js.errors.ServiceUnavailableError):
            return CursorStoreError(f"cursor bucket {self.bucket!r}: {what}: JetStream does not answer ({err!r})")
        return CursorStoreError(f"cursor bucket {self.bucket!r}: {what}: {err!r}")
