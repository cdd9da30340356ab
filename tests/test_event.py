"""The event codec: foreign IDs and types survive the trip through NATS headers."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

import rjet
from rjet._nats.frames import decode_foreign_id, decode_type, encode_foreign_id, encode_headers, parse_ack
from rjet.event import FOREIGN_ID_HEADER, TYPE_HEADER, timestamp_from_ns

# Any text that is valid Unicode (no lone surrogates), at least one character.
foreign_ids = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=200)


@given(foreign_ids)
def test_foreign_id_round_trips_through_its_header_value(fid: str) -> None:
    value = encode_foreign_id(fid)
    assert value.isascii()
    assert value == value.strip()
    assert "\r" not in value
    assert "\n" not in value
    assert decode_foreign_id(value, "s", 1) == fid


def test_plain_foreign_ids_are_stored_as_they_are() -> None:
    assert encode_foreign_id("user-42/eu:7") == "user-42/eu:7"
    assert encode_foreign_id("a b") == "a%20b"
    assert encode_foreign_id("100%") == "100%25"


@pytest.mark.parametrize("bad", ["", b"bytes", 7, "\udc80"])
def test_unusable_foreign_ids_are_refused_with_a_clear_error(bad: object) -> None:
    with pytest.raises(rjet.InvalidEvent, match="foreign id"):
        encode_foreign_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["1", 1.5, True, None])
def test_event_type_must_be_an_int(bad: object) -> None:
    with pytest.raises(rjet.InvalidEvent, match="event type"):
        encode_headers("k", bad)  # type: ignore[arg-type]


def test_headers_carry_type_foreign_id_and_msg_id() -> None:
    assert encode_headers("k", 3, "m1") == {TYPE_HEADER: "3", FOREIGN_ID_HEADER: "k", "Nats-Msg-Id": "m1"}


def test_malformed_headers_raise_decode_error_naming_the_sequence() -> None:
    with pytest.raises(rjet.DecodeError, match=r"stream 'orders' sequence 9: header reflex_type 'x'"):
        decode_type("x", "orders", 9)
    with pytest.raises(rjet.DecodeError, match="sequence 4"):
        decode_foreign_id("%ff", "orders", 4)
    with pytest.raises(rjet.DecodeError, match="empty"):
        decode_foreign_id("", "orders", 4)
    assert decode_type(None, "orders", 1) == 0


def test_timestamps_are_utc_with_microsecond_precision() -> None:
    ts = timestamp_from_ns(1_700_000_000_123_456_789)
    assert ts == datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)


def test_event_helpers() -> None:
    e = rjet.Event("12", 2, "34", datetime.now(UTC), b"")
    assert (e.id_int, e.foreign_id_int) == (12, 34)
    assert e.is_type(1, 2)
    assert not e.is_type(3)
    with pytest.raises(AttributeError):
        e.id = "13"  # type: ignore[misc]


def test_both_reply_subject_forms_are_parsed() -> None:
    v1 = b"$JS.ACK.orders.C1.1.42.7.1700000000000000000.3"
    v2 = b"$JS.ACK.hub.ACCHASH.orders.C1.1.42.7.1700000000000000000.3.rand"
    v2_short = b"$JS.ACK._.ACCHASH.orders.C1.1.42.7.1700000000000000000.3"
    for reply in (v1, v2, v2_short):
        assert parse_ack(reply) == (b"C1", 42, 7, 1_700_000_000_000_000_000, 3)
    for bad in (b"_INBOX.x", b"$JS.ACK.a.b.c", b"$JS.ACK.orders.C1.1.x.7.1.3", b"$JS.NAK.orders.C1.1.42.7.1.3"):
        assert parse_ack(bad) is None


@given(st.integers(min_value=0, max_value=4_102_444_800 * 10**9))  # up to the year 2100
def test_the_lazy_timestamp_is_exact(ns: int) -> None:
    e = rjet.Event("1", 1, "k", timestamp_us=ns // 1000)
    assert e.timestamp == timestamp_from_ns(ns)
    assert e == rjet.Event("1", 1, "k", timestamp_from_ns(ns))
    assert rjet.Event("1", 1, "k", e.timestamp).timestamp_us == ns // 1000


def test_an_event_needs_an_aware_timestamp() -> None:
    with pytest.raises(rjet.InvalidEvent, match="no time zone"):
        rjet.Event("1", 1, "k", datetime(2026, 1, 1))
    with pytest.raises(rjet.InvalidEvent, match="needs a timestamp"):
        rjet.Event("1", 1, "k")


async def test_events_read_are_ordinary_frozen_events(stream: rjet.Stream) -> None:
    import dataclasses

    await stream.insert("k", 3, b"m")
    async with await stream.stream(to_head=True) as client:
        [event] = [e async for e in client]
    assert event._timestamp is None  # no datetime is built until someone asks
    assert type(event) is rjet.Event  # built as EventSlots, then made an Event
    assert type(event.metadata) is bytes  # sliced from the parser's buffer as bytes, not a bytearray
    copy = pickle.loads(pickle.dumps(event))
    assert event == rjet.Event("1", 3, "k", event.timestamp, b"m") == copy
    assert hash(event) == hash(rjet.Event("1", 3, "k", event.timestamp, b"m")) == hash(copy)
    assert copy.timestamp == event.timestamp
    assert repr(event) == repr(copy)
    assert "timestamp=datetime.datetime(" in repr(event)
    assert dataclasses.replace(event, type=5).timestamp == event.timestamp
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.type = 4  # type: ignore[misc]


@pytest.mark.parametrize("traced", [False, True])
async def test_dataclass_helpers_see_the_five_fields_of_an_event_read(stream: rjet.Stream, traced: bool) -> None:
    import dataclasses

    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    if traced:  # a current context: insert writes its traceparent, and the event keeps the raw block
        with trace.use_span(NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1)))):
            await stream.insert("k", 3, b"m")
    else:
        await stream.insert("k", 3, b"m")
    async with await stream.stream(to_head=True) as client:
        [event] = [e async for e in client]
    fields = {"id": "1", "type": 3, "foreign_id": "k", "timestamp_us": event.timestamp_us, "metadata": b"m"}
    assert dataclasses.asdict(event) == fields
    assert dataclasses.astuple(event) == tuple(fields.values())
    assert [f.name for f in dataclasses.fields(event)] == list(fields)
    assert pickle.loads(pickle.dumps(event)).trace == event.trace
    assert (event.trace is not None) is traced
    with pytest.raises(AttributeError):
        event.__dict__  # noqa: B018 (slots only)


async def test_events_a_run_takes_at_once_are_the_events_read_one_by_one(stream: rjet.Stream) -> None:
    """StreamClient.take (a concurrent consumer's reader) builds events in a loop of its own."""
    import dataclasses

    await stream.insert_many([("k", 3, b"m"), ("k%2F1", 4, b"n"), ("j", 0, b"")])
    async with await stream.stream(to_head=True) as client:
        one_by_one = [e async for e in client]
    async with await stream.stream(to_head=True) as client:
        await client.recv()  # the rest are buffered by now
        taken = [one_by_one[0], *client.take(10)]
    assert taken == one_by_one
    assert [type(e) for e in taken] == [rjet.Event] * 3
    assert [dataclasses.astuple(e) for e in taken] == [dataclasses.astuple(e) for e in one_by_one]
    with pytest.raises(dataclasses.FrozenInstanceError):
        taken[1].type = 4  # type: ignore[misc]


def test_event_slots_are_an_events_slots() -> None:
    """The reader builds events as EventSlots and assigns their class: Python allows that only
    between classes with the same slots (rjet.event checks it at import; so does this)."""
    from rjet.event import EventSlots

    assert EventSlots.__slots__ == rjet.Event.__slots__
    built = object.__new__(EventSlots)
    built.__class__ = rjet.Event  # type: ignore[assignment]
    made: object = built
    assert type(made) is rjet.Event
