"""Exact progress: the done-set codec (rjet/_progress.py's stored format) and the Progress tracker."""

from __future__ import annotations

import base64
import itertools
import random
import re
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rjet import _progress
from rjet._progress import MAX_DONE_CHARS, MAX_DONE_COUNT, Progress, decode_done, done_size_bound, encode_done

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")
_MAX_SEQ = 2**64 - 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _varints(*values: int) -> bytes:
    out = bytearray()
    for v in values:
        while True:
            low, v = v & 0x7F, v >> 7
            out.append(low | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


# Reference encoders, written differently from the module's on purpose: groupby runs, and a bitmap
# that is the little-endian bytes of an integer with one bit per done offset.


def _ref_runs(cursor: int, seqs: set[int]) -> str:
    offsets = sorted(s - cursor - 1 for s in seqs)
    values: list[int] = []
    end = 0
    for _, group in itertools.groupby(enumerate(offsets), key=lambda t: t[1] - t[0]):
        run = [o for _, o in group]
        values += [run[0] - end, len(run)]
        end = run[-1] + 1
    return "r" + _b64(_varints(*values))


def _ref_bitmap_len(cursor: int, seqs: set[int]) -> int:
    nbytes = (max(seqs) - cursor - 1) // 8 + 1
    return 1 + -(-nbytes * 4 // 3)  # base64 without padding: 4 characters for 3 bytes, rounded up


def _ref_bitmap(cursor: int, seqs: set[int]) -> str:
    bits = sum(1 << (s - cursor - 1) for s in seqs)
    return "b" + _b64(bits.to_bytes((bits.bit_length() + 7) // 8, "little"))


# Offsets above the cursor: dense, medium and sparse sets, so that both forms get chosen.
_offsets = st.one_of(
    st.sets(st.integers(1, 64), max_size=64),
    st.sets(st.integers(1, 3000), max_size=400),
    st.sets(st.integers(1, 2**40), max_size=60),
    st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 300)), max_size=8).map(
        lambda blocks: {start + i for start, n in blocks for i in range(n)}
    ),
)


@settings(max_examples=300, deadline=None)
@given(cursor=st.integers(0, _MAX_SEQ - 2**41), offsets=_offsets, extra_span=st.integers(0, 1000))
def test_done_sets_round_trip_in_the_shorter_form(cursor: int, offsets: set[int], extra_span: int) -> None:
    seqs = {cursor + o for o in offsets}
    # Any order, with duplicates.
    shuffled = sorted(seqs, key=lambda s: (s * 2654435761) % 1009) + sorted(seqs)[:3]
    text = encode_done(cursor, shuffled)
    assert decode_done(cursor, text) == seqs
    if not seqs:
        assert text == ""
        return
    assert _ALPHABET.fullmatch(text[1:])
    runs = _ref_runs(cursor, seqs)
    if len(runs) <= _ref_bitmap_len(cursor, seqs):
        assert text == runs
    else:
        # Only built here: a bitmap shorter than the run-length text is small.
        assert text == _ref_bitmap(cursor, seqs)
    span = max(seqs) - cursor + extra_span
    assert len(text) <= done_size_bound(span, len(seqs))


@settings(max_examples=300, deadline=None)
@given(span=st.integers(1, 4000), data=st.data())
def test_done_size_bound_bounds_any_set_in_the_span(span: int, data: st.DataObject) -> None:
    step = data.draw(st.integers(1, 300))
    phase = data.draw(st.integers(0, step - 1))
    picked = data.draw(st.sets(st.integers(1, span), max_size=200))
    # Regular patterns reach the bound's worst cases (many runs, gaps at a varint's size limit) that
    # random sets seldom do.
    seqs = {o for o in range(1, span + 1) if o % step == phase} ^ picked
    assert len(encode_done(0, seqs)) <= done_size_bound(span, len(seqs))


@pytest.mark.parametrize("step", [1, 2, 3, 8, 9, 127, 128, 129, 130, 16384, 16385])
@pytest.mark.parametrize("span", [1, 7, 8, 9, 1000, 100_000])
def test_done_size_bound_on_regular_patterns(step: int, span: int) -> None:
    for phase in range(min(step, 3)):
        seqs = range(1 + phase, span + 1, step)
        assert len(encode_done(0, seqs)) <= done_size_bound(span, len(seqs))
        # The complement: runs of step - 1 with gaps of 1.
        rest = set(range(1, span + 1)) - set(seqs)
        assert len(encode_done(0, rest)) <= done_size_bound(span, len(rest))


def test_done_size_bound_bounds_every_set_of_small_spans() -> None:
    for span in range(1, 12):
        for mask in range(1 << span):
            seqs = [o + 1 for o in range(span) if mask >> o & 1]
            assert len(encode_done(0, seqs)) <= done_size_bound(span, len(seqs))


@settings(max_examples=500, deadline=None)
@given(kind=st.sampled_from("rb"), payload=st.binary(min_size=1, max_size=24), cursor=st.integers(0, 2**40))
def test_what_decodes_is_what_the_encoder_writes_in_that_form(kind: str, payload: bytes, cursor: int) -> None:
    text = kind + _b64(payload)
    # A small limit, so that random varints cannot make a run of millions.
    with mock.patch.object(_progress, "MAX_DONE_COUNT", 5000):
        try:
            seqs = set(decode_done(cursor, text))
        except ValueError:
            return
    assert seqs
    assert text == (_ref_runs(cursor, seqs) if kind == "r" else _ref_bitmap(cursor, seqs))


def test_done_size_bound_arguments() -> None:
    assert done_size_bound(0, 0) == 0
    assert done_size_bound(10**9, 0) == 0
    assert done_size_bound(10**6, 10**6) == len(encode_done(0, range(1, 10**6 + 1))) == 7
    for span, count in [(-1, 0), (5, 6), (5, -1)]:
        with pytest.raises(ValueError, match="no set of"):
            done_size_bound(span, count)


def test_forms_chosen() -> None:
    # Dense: a bitmap.
    assert encode_done(100, [101, 103, 104, 106, 108, 109]) == "b" + _b64(bytes([0b10101101, 0b1]))
    assert encode_done(0, random.Random(1).sample(range(1, 2001), 1000))[0] == "b"
    # Contiguous: a single run, however long.
    assert encode_done(7, range(10, 10**6)) == "r" + _b64(_varints(2, 10**6 - 10))
    # Sparse: runs.
    assert encode_done(0, [1, 10**6, 10**12])[0] == "r"
    # A tie (4 characters each) is run-length: bitmap 00 ff, runs 8, 8.
    assert encode_done(0, range(9, 17)) == "r" + _b64(_varints(8, 8))
    assert _ref_bitmap_len(0, set(range(9, 17))) == 4 == len(_b64(bytes([0, 0xFF]))) + 1
    assert encode_done(5, []) == ""
    assert decode_done(5, "") == frozenset()


def test_encode_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"done seq 5 is not above the cursor 5"):
        encode_done(5, [7, 5, 9])
    with pytest.raises(ValueError, match=r"above 2\*\*64-1"):
        encode_done(0, [2**64])
    with pytest.raises(ValueError, match=r"cursor -1 is not a stream sequence"):
        encode_done(-1, [1])
    monkeypatch.setattr(_progress, "MAX_DONE_COUNT", 10)
    with pytest.raises(ValueError, match=r"11 seqs is over MAX_DONE_COUNT \(10\)"):
        encode_done(0, range(1, 12))
    monkeypatch.setattr(_progress, "MAX_DONE_CHARS", 4)
    assert encode_done(0, range(1, 11)) == "rAAo"
    with pytest.raises(ValueError, match=r"5 chars is over MAX_DONE_CHARS \(4\)"):
        encode_done(0, [1, 3, 5, 7, 9, 11, 13, 15, 17])


@pytest.mark.parametrize(
    ("cursor", "text", "message"),
    [
        (0, "x123", r"unknown prefix 'x'"),
        (0, "R" + _b64(_varints(0, 1)), r"unknown prefix 'R'"),
        (0, "r", r"nothing after the prefix 'r'"),
        (0, "b", r"nothing after the prefix 'b'"),
        (0, "rAAE=", r"base64 padding '=' at index 4 is not allowed"),
        (0, "rAA+", r"character '\+' at index 3 is not allowed"),
        (0, "rAA/", r"character '/' at index 3 is not allowed"),
        (0, "rAA E", r"character ' ' at index 3"),
        (0, "rAAEAA", r"base64 length 5 is 1 mod 4"),
        (0, "rAB", r"nonzero unused bits"),
        (0, "rAAF", r"nonzero unused bits"),
        (0, "r" + _b64(bytes([0x80])), r"truncated varint at byte 0"),
        (0, "r" + _b64(bytes([0, 1, 1, 0x85])), r"truncated varint at byte 3"),
        (0, "r" + _b64(_varints(0, 0)), r"run of length 0 at byte 1"),
        (0, "r" + _b64(_varints(3, 2, 0, 1)), r"gap of 0 between runs at byte 2"),
        (0, "r" + _b64(_varints(0)), r"end with a gap"),
        (0, "r" + _b64(_varints(0, 1, 1)), r"end with a gap"),
        (0, "r" + _b64(bytes([0x81, 0x00, 1])), r"overlong varint at byte 0"),
        (0, "r" + _b64(bytes([0] + [0x80] * 10 + [1])), r"varint at byte 1 is longer than 10 bytes"),
        (0, "r" + _b64(_varints(0, MAX_DONE_COUNT + 1)), r"more than MAX_DONE_COUNT"),
        (0, "r" + _b64(_varints(0, MAX_DONE_COUNT // 2, 1, MAX_DONE_COUNT // 2 + 1)), r"more than MAX_DONE_COUNT"),
        (2**64 - 3, "r" + _b64(_varints(1, 2)), r"run at byte 1 goes above 2\*\*64-1"),
        (0, "b" + _b64(bytes([1, 0])), r"bitmap ends with a zero byte"),
        (2**64 - 9, "b" + _b64(bytes([0, 1])), r"bitmap goes above 2\*\*64-1"),
        (-1, "rAAE", r"cursor -1 is not a stream sequence"),
        (0, "r" + "A" * MAX_DONE_CHARS, r"1000001 chars is over MAX_DONE_CHARS"),
    ],
)
def test_decode_errors(cursor: int, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_done(cursor, text)


def test_decode_edges() -> None:
    assert decode_done(2**64 - 3, "r" + _b64(_varints(1, 1))) == {2**64 - 1}
    assert decode_done(2**64 - 17, "b" + _b64(bytes([0, 0x80]))) == {2**64 - 1}
    assert decode_done(10, "r" + _b64(_varints(0, 1, 1, 2))) == {11, 13, 14}
    assert decode_done(10, "b" + _b64(bytes([0b101, 0b1]))) == {11, 13, 19}


# K, span, the largest encoded length over 20 seeded draws, done_size_bound: the module docstring's table.
_SIZES = [
    (100, 200, 35, 35),
    (100, 100_000, 392, 535),
    (1_000, 2_000, 335, 335),
    (1_000, 100_000, 3_033, 6_668),
    (10_000, 20_000, 3_335, 3_335),
    (10_000, 100_000, 16_668, 16_668),
]


@pytest.mark.parametrize(("k", "span", "measured", "bound"), _SIZES)
def test_size_table(k: int, span: int, measured: int, bound: int) -> None:
    rng = random.Random(k * 7 + span)
    lengths = []
    for _ in range(20):
        seqs = rng.sample(range(1, span + 1), k)
        lengths.append(len(encode_done(0, seqs)))
    assert max(lengths) <= measured
    assert done_size_bound(span, k) == bound
    assert max(lengths) <= bound
    assert bound < 64 * 1024
    assert decode_done(0, encode_done(0, seqs)) == set(seqs)


# The tracker against a model that keeps every position's state in plain dicts.

_ops = st.lists(
    st.tuples(st.sampled_from(["read", "read", "passed", "done", "done"]), st.integers(1, 3), st.integers(0, 2**16)),
    max_size=150,
)


@settings(max_examples=300, deadline=None)
@given(cursor=st.integers(5, 2**40), restored_offsets=st.sets(st.integers(-5, 90), max_size=40), ops=_ops)
def test_tracker_against_a_model(cursor: int, restored_offsets: set[int], ops: list[tuple[str, int, int]]) -> None:
    restored = {cursor + o for o in restored_offsets}
    progress = Progress(cursor, sorted(restored, reverse=True))
    last = cursor
    state: dict[int, str] = {}  # read seq -> "pending" | "done"
    watermark = cursor
    for op, delta, pick in ops:
        if op == "read":
            last += delta
            ours = last not in restored
            assert progress.read(last) is ours
            state[last] = "pending" if ours else "done"
        elif op == "passed":
            last += delta
            progress.passed(last)
        else:
            pending = sorted(s for s, v in state.items() if v == "pending")
            if not pending:
                continue
            seq = pending[pick % len(pending)]
            progress.done(seq)
            state[seq] = "done"
        pending = [s for s, v in state.items() if v == "pending"]
        model_watermark = min(pending) - 1 if pending else last
        assert progress.watermark == model_watermark >= watermark
        watermark = model_watermark
        assert progress.pending == len(pending)
        assert all(v == "done" for s, v in state.items() if s <= watermark)
        model_done = {s for s, v in state.items() if v == "done" and s > watermark} | {r for r in restored if r > last}
        done_set = progress.done_set()
        assert done_set == sorted(model_done)
        stored_watermark, text = progress.snapshot()
        assert stored_watermark == str(watermark)
        assert decode_done(int(stored_watermark), text) == model_done
        assert len(text) <= progress.size_bound()
        if not model_done:
            assert progress.size_bound() == 0
    with pytest.raises(ValueError, match="is not above the last position"):
        progress.read(last)
    with pytest.raises(ValueError, match="is not above the last position"):
        progress.passed(last)
    with pytest.raises(ValueError, match="is not pending"):
        progress.done(last + 1)


def test_tracker_in_order_and_out_of_order() -> None:
    p = Progress(10)
    assert (p.watermark, p.pending, p.done_set(), p.snapshot(), p.size_bound()) == (10, 0, [], ("10", ""), 0)
    assert p.read(11)
    assert p.read(12)
    assert p.read(13)
    assert (p.watermark, p.pending) == (10, 3)
    p.done(12)
    assert (p.watermark, p.done_set(), p.snapshot()) == (10, [12], ("10", encode_done(10, [12])))
    p.passed(20)
    assert p.watermark == 10
    p.done(11)
    assert (p.watermark, p.done_set(), p.pending) == (12, [], 1)
    p.done(13)
    assert (p.watermark, p.pending) == (20, 0)
    with pytest.raises(ValueError, match="seq 13 is not pending"):
        p.done(13)
    with pytest.raises(ValueError, match="seq 20 is not above the last position given, 20"):
        p.read(20)
    with pytest.raises(ValueError, match="seq 19 is not above"):
        p.passed(19)
    with pytest.raises(ValueError, match="cursor -1"):
        Progress(-1)


def test_tracker_restart_skips_what_was_done() -> None:
    before = Progress(0)
    for seq in range(1, 6):
        assert before.read(seq)
    before.done(2)
    before.done(4)
    watermark, text = before.snapshot()
    assert watermark == "0"
    assert decode_done(0, text) == {2, 4}

    after = Progress(int(watermark), decode_done(int(watermark), text))
    assert after.done_set() == [2, 4]
    assert [after.read(seq) for seq in range(1, 6)] == [True, False, True, False, True]
    assert (after.done_set(), after.pending) == ([2, 4], 3)
    after.done(1)
    assert (after.watermark, after.done_set()) == (2, [4])
    after.done(3)
    assert (after.watermark, after.done_set()) == (4, [])
    after.done(5)
    assert after.snapshot() == ("5", "")


def test_tracker_restored_entries() -> None:
    # Entries <= the cursor are ignored; those passed over are dropped; one read with nothing pending
    # moves the watermark at once.
    p = Progress(10, [3, 10, 12, 14, 16, 30])
    assert p.done_set() == [12, 14, 16, 30]
    assert not p.read(12)
    assert (p.watermark, p.done_set()) == (12, [14, 16, 30])
    assert p.read(13)
    p.passed(15)
    assert (p.watermark, p.done_set()) == (12, [16, 30])
    assert not p.read(16)
    assert (p.watermark, p.done_set(), p.pending) == (12, [16, 30], 1)
    assert len(p.snapshot()[1]) <= p.size_bound()
    p.done(13)
    assert (p.watermark, p.done_set()) == (16, [30])
    p.passed(40)
    assert (p.watermark, p.done_set(), p.size_bound()) == (40, [], 0)


def test_tracker_size_bound_spans_to_the_highest_done() -> None:
    # Far above the pending one, restored and read, then done: the bound's span reaches each.
    p = Progress(0, [100_000])
    assert p.read(1)
    p.passed(99_999)
    assert not p.read(100_000)
    assert p.size_bound() == done_size_bound(100_000, 1) >= len(p.snapshot()[1])
    p.passed(10**9)
    assert p.read(10**9 + 1)
    p.done(10**9 + 1)
    assert p.done_set() == [100_000, 10**9 + 1]
    assert p.size_bound() == done_size_bound(10**9 + 1, 2) >= len(p.snapshot()[1])
    p.done(1)
    assert (p.watermark, p.size_bound(), p.snapshot()) == (10**9 + 1, 0, (str(10**9 + 1), ""))


def test_tracker_contiguous_done_behind_one_slow_event_stays_small() -> None:
    p = Progress(0)
    for seq in range(1, 10_002):
        p.read(seq)
    for seq in range(2, 10_002):
        p.done(seq)
    watermark, text = p.snapshot()
    assert (watermark, p.pending) == ("0", 1)
    assert text == "r" + _b64(_varints(1, 10_000))
    assert len(text) <= p.size_bound() <= 10
    p.done(1)
    assert p.snapshot() == ("10001", "")
