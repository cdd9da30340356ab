"""The cursor bucket itself: opening (or creating) it, what makes one unusable, listing its keys,
and which refused subjects are its own."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import nats.errors
import nats.js.errors
from nats.js import api

from rjet._nats.client import connection, kv_names
from rjet._nats.denials import Match, denials
from rjet.errors import CursorBucketUnusable, CursorStoreError, PermissionDenied

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = ["allow_atomic", "bucket_match", "check_bucket_config", "kv_keys", "open_bucket"]

log = logging.getLogger("rjet.cursors")

_BUCKET_PREFIX: Final = "rjet_cursors_"
_STORE_ERRORS: Final = (nats.errors.Error, TimeoutError, OSError)
_STREAM_NAME_IN_USE: Final = 10058  # JetStream's error code: a stream of that name exists, configured otherwise


async def open_bucket(
    js: JetStreamContext, bucket: str, namespace: str, replicas: int, *, create: bool
) -> tuple[KeyValue, api.StreamInfo, bool]:
    """(the bucket, its stream's info, whether this call created it); an unusable bucket refused."""
    created = False
    guard, match = denials(connection(js)).guard, bucket_match(bucket)
    try:
        try:
            kv = await guard(match, js.key_value(bucket))
        except nats.js.errors.BucketNotFoundError:
            if not create:
                raise CursorStoreError(
                    f"cursor namespace {namespace!r} does not exist (no bucket {bucket!r} on the server);"
                    " check the name (`rjet status` lists the consumers of a namespace)"
                ) from None
            try:
                kv = await guard(
                    match,
                    js.create_key_value(bucket=bucket, history=1, storage=api.StorageType.FILE, replicas=replicas),
                )
                created = True
            except nats.js.errors.BadRequestError as e:
                if e.err_code != _STREAM_NAME_IN_USE:
                    raise
                # Another store created it a moment ago (and turned on atomic batches, so its
                # config differs from ours): use that one, as if it had been there first.
                kv = await guard(match, js.key_value(bucket))
        info = await guard(match, js.stream_info(f"KV_{bucket}"))
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
        raise CursorStoreError(
            f"cursor bucket {bucket!r}: JetStream is not enabled on the server (nats-server -js)"
        ) from None
    except nats.js.errors.APIError as e:
        raise CursorStoreError(f"cursor bucket {bucket!r}: cannot open: {e.description} ({e.err_code})") from e
    except _STORE_ERRORS as e:
        raise CursorStoreError(f"cursor bucket {bucket!r}: cannot open: {e!r}") from e
    check_bucket_config(bucket, info.config)
    return kv, info, created


async def allow_atomic(js: JetStreamContext, config: api.StreamConfig) -> bool:
    """Turn on atomic batch publishing for a bucket this store just created (nats-server 2.12+);
    False when not possible. Never applied to a bucket that existed before."""
    try:
        config.allow_atomic = True
        # A user who may not update streams is refused at once (not after the API timeout).
        await denials(connection(js)).guard(bucket_match((config.name or "KV_")[3:]), js.update_stream(config))
        return True
    except (nats.errors.Error, TimeoutError, OSError, PermissionDenied) as e:
        log.info("stream %r: no atomic batches (%r); cursor flushes send one request per cursor", config.name, e)
        return False


async def kv_keys(kv: KeyValue) -> list[str]:
    """Every key in a KV bucket, from one stream-info request.

    (nats-py's ``KeyValue.keys()`` reads them through a watcher that can stop early and return
    none; the stream's per-subject state is exact.) Deleted keys keep a marker and are listed.
    """
    names = kv_names(kv)
    prefix = names.prefix
    guard = denials(connection(names.js)).guard
    info = await guard(bucket_match(names.stream[3:]), names.js.stream_info(names.stream, subjects_filter=prefix + ">"))
    return [subject[len(prefix) :] for subject in info.state.subjects or {}]


def bucket_match(bucket: str) -> Match:
    """Subjects of a bucket's reads and writes (``$KV.<bucket>.<key>``, and the API subjects of
    stream ``KV_<bucket>``: info, direct and message gets)."""
    stream, writes = f"KV_{bucket}", f"$KV.{bucket}."
    low_stream, low_writes = stream.lower(), writes.lower()

    def match(reported: str) -> str | None:
        if reported.startswith(low_writes):
            return writes + reported[len(writes) :]
        head, dot, tail = reported.partition(f".{low_stream}")
        if dot and (not tail or tail.startswith(".")):
            return head.upper() + f".{stream}" + tail  # $JS.API.<OP...>.KV_<bucket>[.<subject>]
        return None

    return match


def check_bucket_config(bucket: str, config: api.StreamConfig) -> None:
    if config.max_age:
        raise CursorBucketUnusable(
            f"cursor bucket {bucket!r} has a TTL of {config.max_age:g}s: cursors would expire and their"
            " consumers start over; use a bucket without a TTL (delete this one, or pick another namespace)"
        )
