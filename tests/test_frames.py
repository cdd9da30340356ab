"""The stream client's wire codec, without a server: headers in raw frames and the frame pattern."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rjet._nats.frames import PENDING_KEY, encode_foreign_id, encode_header_block, frame_pattern, header, rjet_headers


def test_a_header_is_found_by_its_name_and_stripped() -> None:
    hdr = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 17\r\nNats-Pending-Bytes: 0\r\n\r\n"
    assert header(hdr, PENDING_KEY) == b"17"
    assert header(hdr, b"\r\nNope:") is None


@given(fid=st.text(min_size=1, max_size=30), typ=st.integers(-(2**40), 2**40))
def test_rjets_own_headers_are_read_back_as_insert_wrote_them(fid: str, typ: int) -> None:
    try:
        block = encode_header_block(fid, typ, "m-1")
    except ValueError:
        return  # a foreign ID insert refuses (lone surrogates): never stored
    raw_type, raw_fid = rjet_headers(block)
    assert raw_type == str(typ).encode()
    assert raw_fid == encode_foreign_id(fid).encode()


def test_headers_in_another_order_are_found_too() -> None:
    block = b"NATS/1.0\r\nNats-Msg-Id: x\r\nrjet_foreign_id: a%20b\r\nreflex_type: 3\r\n\r\n"
    assert rjet_headers(block) == (b"3", b"a%20b")
    assert rjet_headers(b"NATS/1.0\r\nother: 1\r\n\r\n") == (None, None)


def _frame(sid: int, prefix: bytes, tail: bytes, fid: str, typ: int, body: bytes, trace: bytes = b"") -> bytes:
    block = encode_header_block(fid, typ)
    block = block[:10] + trace + block[10:]  # after NATS/1.0, as insert writes a trace context
    return b"HMSG s.x %d %s%s %d %d\r\n%s%s\r\n" % (sid, prefix, tail, len(block), len(block) + len(body), block, body)


def test_the_frame_pattern_takes_its_consumers_frames_and_their_fields() -> None:
    prefix = b"$JS.ACK.orders.C1."
    wire = _frame(7, prefix, b"1.42.7.1700000000000000000.3", "user-9", 2, b"{}")
    m = frame_pattern(7, prefix).match(wire)
    assert m is not None
    assert m[1] == b"1.42.7.1700000000000000000.3"  # delivered.sseq.cseq.ts.pending
    assert (m[2], m[3]) == (b"1700000000000000", b"3")  # stored time (microseconds), pending
    assert (m[6], m[7]) == (b"2", b"user-9")
    assert int(m[5]) - int(m[4]) == 2  # the body's size
    assert frame_pattern(8, prefix).match(wire) is None  # another subscription's
    assert frame_pattern(7, b"$JS.ACK.orders.C2.").match(wire) is None  # an earlier consumer's


@pytest.mark.parametrize(
    "trace",
    [b"traceparent: 00-1-2-01\r\n", b"traceparent: 00-1-2-01\r\ntracestate: v=1, w=2\r\n", b"traceparent:\r\n"],
    ids=["traceparent", "and tracestate", "empty"],
)
def test_the_traced_pattern_takes_a_trace_context_before_rjets_headers(trace: bytes) -> None:
    prefix = b"$JS.ACK.orders.C1."
    wire = _frame(7, prefix, b"1.42.7.1700000000000000000.3", "user-9", 2, b"{}", trace)
    for plain in (False, True):
        assert frame_pattern(7, prefix, plain=plain).match(wire) is None  # the other layout
        m = frame_pattern(7, prefix, plain=plain, traced=True).match(wire)
        assert m is not None
        assert (m[1], m[6], m[7]) == (b"1.42.7.1700000000000000000.3", b"2", b"user-9")  # the same groups
        assert int(m[5]) - int(m[4]) == 2
    untraced = _frame(7, prefix, b"1.42.7.1700000000000000000.3", "user-9", 2, b"{}")
    assert frame_pattern(7, prefix, traced=True).match(untraced) is None


@pytest.mark.parametrize(
    ("tail", "fits"),
    [
        (b"1.42.7.1700000000000000000.3.rand0m", True),  # the 12-token v2 form's last token
        (b"1.42.7.1700000000000000000", False),  # a token short
        (b"1.42.x.1700000000000000000.3", False),  # not a number: left to the frame handler
        # A stored time of other than 19 digits (before 2001, after 2286): the frame handler divides it
        (b"1.42.7.170000000000000000.3", False),
        (b"1.42.7.17000000000000000000.3", False),
    ],
)
def test_the_frame_pattern_takes_only_reply_tails_of_numbers(tail: bytes, fits: bool) -> None:
    prefix = b"$JS.ACK.orders.C1."
    m = frame_pattern(7, prefix).match(_frame(7, prefix, tail, "user-9", 2, b"{}"))
    assert (m is not None) == fits
    if m is not None:
        assert (m[1], m[2], m[3]) == (tail, b"1700000000000000", b"3")


def test_the_plain_pattern_leaves_percent_encoded_foreign_ids_to_the_full_one() -> None:
    prefix = b"$JS.ACK.s.C."
    wire = _frame(1, prefix, b"1.5.5.1700000000000000000.0", "a b", 1, b"")  # stored percent-encoded: a%20b
    assert frame_pattern(1, prefix, plain=True).match(wire) is None
    m = frame_pattern(1, prefix).match(wire)
    assert m is not None
    assert m[7] == b"a%20b"
