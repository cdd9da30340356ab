"""Pipelined JetStream publishes with acks matched back, for ``Stream.insert_many``.

Each event goes out as one ``HPUB`` frame with its own reply subject (``<inbox>.<index>``); frames of a
window are handed to nats-py's outgoing buffer in one piece (not one ``publish`` call, header
dict and flush kick per event), and acks come back through the parser's fast lane as raw bytes.
At most two windows are in flight, so memory stays bounded on any batch size. JetStream stores
the frames of one connection in the order they were sent, so sequences follow the input order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from nats.aio.msg import Msg

from rjet._nats.client import fast_paths, header_dict, send_raw, subscription_id
from rjet._nats.denials import denials, starts
from rjet._nats.parser import fast_lanes
from rjet.errors import InsertError, PermissionDenied, StreamNotFound

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["Outgoing", "publish_many"]

_WINDOW: Final = 2048

# An event ready to send: subject, raw NATS header block, body.
Outgoing = tuple[str, bytes, bytes]


def ack_seq(data: bytes) -> int | None:
    """The stream sequence in a successful PubAck body, or None when it is anything else."""
    i = data.find(b'"seq":')
    if i < 0 or b'"error"' in data:
        return None
    i += 6
    end = data.find(b",", i)
    if end < 0:
        end = data.find(b"}", i)
    try:
        return int(data[i:end])
    except ValueError:
        return None


async def publish_many(
    nc: Client, stream: str, events: Sequence[Outgoing], foreign_ids: Sequence[str], timeout: float
) -> list[int]:
    """Publish ``events`` in order and return their stream sequences; :class:`InsertError` names a failure."""
    n = len(events)
    acks: list[bytes | None] = [None] * n
    received = 0
    wanted = 0
    arrived = asyncio.Event()
    refused: list[PermissionDenied] = []  # the server refused the subscription to the acks' inbox
    inbox = nc.new_inbox()
    reply_to = inbox.encode()
    cut = len(inbox) + 1

    def on_frame(subject: bytes, reply: bytes, hdr: bytes | None, data: bytes) -> None:
        nonlocal received
        i = int(subject[cut:])
        if acks[i] is None:
            acks[i] = data  # empty for a 503 no-responders status
            received += 1
            if received >= wanted:
                arrived.set()

    async def on_msg(msg: Msg) -> None:
        on_frame(msg.subject.encode(), b"", None, msg.data)

    def on_refused(err: PermissionDenied) -> None:
        refused.append(err)
        arrived.set()

    unwatch = denials(nc).watch(starts(inbox), on_refused)
    try:
        sub = await nc.subscribe(inbox + ".*", cb=on_msg)
    except BaseException:
        unwatch()
        raise
    sid = subscription_id(sub)
    lanes = fast_lanes(nc)
    if lanes is not None:
        lanes[sid] = on_frame
    raw = fast_paths(nc)
    try:
        for start in range(0, n, _WINDOW):
            # Two windows in flight: wait for the one before the previous.
            wanted = max(0, start - _WINDOW)
            if received < wanted:
                arrived.clear()
                await _wait(arrived, timeout, acks, stream, foreign_ids, refused)
            end = min(start + _WINDOW, n)
            if not raw:  # the plain path: one nats-py publish per event
                for i in range(start, end):
                    subject, hdr, data = events[i]
                    await nc.publish(subject, data, reply=f"{inbox}.{i}", headers=header_dict(hdr))
                await nc.flush(max(1, round(timeout)))
                continue
            frames = []
            for i in range(start, end):
                subject, hdr, data = events[i]
                frames.append(b"HPUB %s %s.%d %d %d\r\n%s%s\r\n" % (
                    subject.encode(), reply_to, i, len(hdr), len(hdr) + len(data), hdr, data
                ))  # fmt: skip
            await send_raw(nc, frames, sum(len(events[i][2]) for i in range(start, end)), flush=True)
        wanted = n
        if received < n:
            arrived.clear()
            await _wait(arrived, timeout, acks, stream, foreign_ids, refused)
        return _sequences(acks, n, stream, foreign_ids)
    finally:
        unwatch()
        if lanes is not None:
            lanes.pop(sid, None)
        await sub.unsubscribe()


async def _wait(
    arrived: asyncio.Event,
    timeout: float,
    acks: list[bytes | None],
    stream: str,
    foreign_ids: Sequence[str],
    refused: list[PermissionDenied],
) -> None:
    try:
        if not refused:
            await asyncio.wait_for(arrived.wait(), timeout)
    except TimeoutError:
        missing = next(i for i, a in enumerate(acks) if a is None)
        _sequences(acks, missing, stream, foreign_ids)  # an earlier error explains more than a timeout
        raise InsertError(
            stream,
            missing,
            foreign_ids[missing],
            f"no acknowledgement within {timeout:g}s: it may or may not be stored, and so may later ones",
            stored=missing,
        ) from None
    if refused:  # no ack will come: the server refused to deliver them
        raise refused[0]


def _sequences(acks: list[bytes | None], upto: int, stream: str, foreign_ids: Sequence[str]) -> list[int]:
    seqs = []
    for i in range(upto):
        data = acks[i]
        assert data is not None
        seq = ack_seq(data)
        if seq is None:
            raise ack_error(data, stream, i, foreign_ids[i], stored=i)
        seqs.append(seq)
    return seqs


def ack_error(data: bytes, stream: str, index: int, foreign_id: str, *, stored: int) -> Exception:
    """The error a failed PubAck body stands for."""
    if not data:
        return StreamNotFound(stream, "no stream answered the publish (does it exist and take the subject?)")
    try:
        err = json.loads(data).get("error") or {}
    except ValueError:
        return InsertError(stream, index, foreign_id, f"unreadable acknowledgement {data!r}", stored=stored)
    detail = f"{err.get('description', 'error')} (code {err.get('err_code', err.get('code'))})"
    return InsertError(stream, index, foreign_id, detail, stored=stored)
