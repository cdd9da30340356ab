"""A flush of many cursors as one atomic JetStream batch (nats-server 2.12+, on buckets that allow
it): one request and one ack, each message a compare-and-swap on its key."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from nats.nuid import NUID

from rjet._nats.client import api_timeout, hpub, send_raw
from rjet._nats.publish import ack_seq
from rjet.cursors._jetstream_records import GONE_ERRORS, STORE_ERRORS, Records
from rjet.cursors._record import CursorRecord, encode_key
from rjet.errors import PermissionDenied

if TYPE_CHECKING:
    from rjet.cursors._jetstream_claim import JetStreamClaim

__all__ = ["MAX_BATCH", "write_batch"]

log = logging.getLogger("rjet.cursors")

MAX_BATCH: Final = 1000  # the server's default limit on the messages of one atomic batch
_NUID: Final = NUID()


async def write_batch(
    records: Records,
    batch: dict[str, tuple[JetStreamClaim | None, tuple[str, str | None]]],
    *,
    owner: str,
    wrote: Callable[[str, JetStreamClaim | None, int, str, float], None],
) -> bool:
    """Write every cursor of ``batch`` (name -> its claim, when any, and (cursor, done)) as one atomic
    batch; ``owner`` goes into the records written without a claim. False (nothing known to be
    written) when the server refused it or its answer was lost; the caller then writes them one by
    one, which settles each by reading it back. Each write of an acknowledged batch is handed to
    ``wrote`` (name, claim, revision, cursor, when the request was sent), also when the caller was
    cancelled meanwhile.
    """
    nc, pre = records.nc, records.names.prefix
    batch_id = _NUID.next().decode()
    items = []
    for name, (claim, (cursor, done)) in batch.items():
        who = claim.owner if claim is not None else owner
        stream = claim.stream if claim is not None else None
        items.append((name, claim, encode_key(name), cursor, CursorRecord(cursor, stream, who, done).encode()))
    last = len(items)

    def headers(i: int, claim: JetStreamClaim | None) -> dict[str, str]:
        h = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i)}
        if claim is not None:
            h["Nats-Expected-Last-Subject-Sequence"] = str(claim.rev)
        return h

    async def send() -> bytes:
        # All but the last go out as raw frames in one piece (no per-message publish call); the
        # last commits the batch and carries the only reply.
        frames = []
        for i, (_, claim, key, _, value) in enumerate(items[:-1], 1):
            hdr = "".join(f"{k}: {v}\r\n" for k, v in headers(i, claim).items())
            frames.append(hpub(f"{pre}{key}".encode(), b"", f"NATS/1.0\r\n{hdr}\r\n".encode(), value))
        await send_raw(nc, frames, sum(len(item[4]) for item in items[:-1]))
        _, claim, key, _, value = items[-1]
        commit = {**headers(last, claim), "Nats-Batch-Commit": "1"}
        timeout = api_timeout(records.names.js)
        reply = await nc.request(f"{pre}{key}", value, timeout=timeout, headers=commit)
        return reply.data

    since = time.monotonic()
    task = asyncio.ensure_future(send())

    def record(t: asyncio.Future[bytes]) -> None:
        if t.cancelled() or t.exception() is not None:
            return
        seq = ack_seq(t.result())
        if seq is None:
            return
        # An atomic batch is stored contiguously, in order: revisions seq-n+1 .. seq.
        for rev, (name, claim, _, cursor, _) in enumerate(items, seq - last + 1):
            wrote(name, claim, rev, cursor, since)

    task.add_done_callback(record)
    try:
        ack = await records.guarded(asyncio.shield(task))
    except PermissionDenied:
        return False  # written one by one, each refusal then ends its own claim
    except GONE_ERRORS as e:
        raise await records.gone(items[0][0], e) from None
    except STORE_ERRORS as e:
        log.debug("cursor bucket %r: atomic batch of %d failed (%r); writing one by one", records.bucket, last, e)
        return False
    return ack_seq(ack) is not None
