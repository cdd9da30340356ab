"""A buffered frame into an :class:`rjet.Event`: the one decoding every read path shares.

A frame (``rjet/_nats/frames.py``'s ``Frame``) is either one the bulk scan took (its type and foreign
ID header values already cut out: digits and printable ASCII; its header block only where it carries
a trace context) or one handed over whole (its subject and raw header block). Both decode as Go rjet
does (docs/interop.md), and give the same :attr:`rjet.Event.trace`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeAlias

from rjet._nats.frames import decode_type, foreign_id_of, rjet_headers
from rjet.event import Event, EventSlots

__all__ = ["PERCENT", "TYPES", "Decode", "decoder", "fid_value", "foreign_id"]

PERCENT: Final = ord("%")  # `int in bytes` is a memchr; `b"%" in bytes` costs ~8 times as much

# An EventSlots (made by calling the class: object.__new__(EventSlots) goes through a wrapper that
# packs its arguments, 416 instructions more an event on 3.13, 291 on 3.11, callgrind) filled with
# plain attribute stores and turned into an Event (see rjet.event.EventSlots): a frozen Event's own
# __init__ costs twice as much as setting its slots through their descriptors, and those cost
# 0.15-0.18 us more an event than this. The trace slot is left unset (Event.trace reads it as None)
# but for a message that carried a trace header.
_TRACEPARENT: Final = b"traceparent:"
# The values of small event types (the usual ones): a lookup costs half of int() (24 against 47 ns).
TYPES: Final = {b"%d" % t: t for t in range(256)}

Decode: TypeAlias = Callable[
    [int, int, bytes, "bytes | None", bytes, "str | None", "bytes | None", "bytes | None", int], Event
]
"""``decode(*frame) -> Event``; raises :class:`rjet.DecodeError` for a malformed rjet header."""


def fid_value(value: bytes, stream: str, sseq: int) -> str:
    """A foreign ID header value as the foreign ID (percent-decoded where it is encoded)."""
    if PERCENT in value or not value or not value.isascii():
        return foreign_id_of(value, stream, sseq)  # exact UTF-8, or DecodeError
    return value.decode()


def foreign_id(subject: bytes, hdr: bytes | None, stream: str, sseq: int) -> str:
    """A message's foreign ID: its header's, else its subject (a message published without rjet's headers)."""
    value = rjet_headers(hdr)[1] if hdr is not None else None
    if value is None:
        return subject.decode("utf-8", "replace")
    return fid_value(value, stream, sseq)


def decoder(stream: str) -> Decode:
    """The decoding of ``stream``'s frames (its name goes into a :class:`rjet.DecodeError`)."""

    def decode(
        sseq: int,
        ts: int,
        subject: bytes,
        hdr: bytes | None,
        data: bytes,
        fid: str | None,
        typ_value: bytes | None,
        fid_value_: bytes | None,
        _held: int,
    ) -> Event:
        traced = hdr is not None  # the scan keeps a frame's header block only when it has a traceparent
        if typ_value is not None and fid_value_ is not None:  # taken by the scan: digits, printable ASCII
            typ = TYPES.get(typ_value)
            if typ is None:
                typ = int(typ_value)
            if fid is None:
                fid = fid_value_.decode() if PERCENT not in fid_value_ else fid_value(fid_value_, stream, sseq)
        else:
            typ = 0
            if hdr is not None:
                traced = _TRACEPARENT in hdr
                typ_raw, fid_raw = rjet_headers(hdr)
                if typ_raw is not None:
                    # Go's strconv.Atoi, within int64, empty as 0 (decode_type); bytes.isdigit is ASCII only.
                    if typ_raw.isdigit() and len(typ_raw) < 19:
                        typ = int(typ_raw)
                    else:
                        typ = decode_type(typ_raw, stream, sseq)
                if fid is None:
                    fid = subject.decode("utf-8", "replace") if fid_raw is None else fid_value(fid_raw, stream, sseq)
            elif fid is None:
                fid = subject.decode("utf-8", "replace")
        event = EventSlots()
        event.id = str(sseq)
        event.type = typ
        event.foreign_id = fid
        event.timestamp_us = ts
        event._timestamp = None  # noqa: SLF001 (the datetime is built when a handler asks for it)
        event.metadata = data
        if traced:
            event._trace = hdr  # noqa: SLF001 (read into Event.trace on first use)
        event.__class__ = Event  # type: ignore[assignment]
        return event  # type: ignore[return-value]

    return decode
