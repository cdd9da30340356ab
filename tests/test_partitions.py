"""Partitioned streams: one subject filter per shard selects exactly that shard's events."""

from __future__ import annotations

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st
from nats.js import JetStreamContext

import rjet
from rjet.partitions import DEFAULT_PARTITIONS, Partitions


def matches(subject: str, pattern: str) -> bool:
    """NATS subject matching with '*' (one token) and '>' (the rest)."""
    s, p = subject.split("."), pattern.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(s) == len(p)


fids = st.text(min_size=1, max_size=40)
layout_720 = Partitions(DEFAULT_PARTITIONS)


@given(fids, st.sampled_from(layout_720.shard_counts()[:24]))
def test_an_event_matches_exactly_its_shards_filter(fid: str, n: int) -> None:
    subject = layout_720.subject("s.p", fid)
    owner = xxhash.xxh3_64_intdigest(fid.encode()) % n
    hits = [m for m in range(n) if matches(subject, layout_720.filter_subject("s.p", m, n))]
    assert hits == [owner]


@given(st.sampled_from([1, 2, 7, 12, 64, 97, 240]), fids)
def test_other_partition_counts(count: int, fid: str) -> None:
    layout = Partitions(count)
    p = layout.partition(fid)
    assert 0 <= p < count
    for n in layout.shard_counts()[:6]:
        hits = [m for m in range(n) if matches(layout.subject("x", fid), layout.filter_subject("x", m, n))]
        assert hits == [p % n]


def test_the_layout_is_pinned() -> None:
    assert layout_720.tokens(0) == "0.0.0.0.0.0.0"
    assert layout_720.tokens(719) == "1.1.1.1.2.2.4"
    assert layout_720.subject("o.p", "user-1") == "o.p." + layout_720.tokens(xxhash.xxh3_64_intdigest(b"user-1") % 720)
    assert layout_720.filter_subject("o.p", 4, 6) == "o.p.0.*.*.*.1.*.*"
    assert layout_720.filter_subject("o.p", 0, 1) == "o.p.*.*.*.*.*.*.*"


def test_shard_counts_that_do_not_divide_are_refused_with_the_ones_that_do() -> None:
    with pytest.raises(rjet.ConfigError, match=r"7 shards cannot split .* 720 .*: 1, 2, 3, 4, 5, 6, 8"):
        layout_720.filter_subject("o", 0, 7)
    for bad in (0, -1, 1 << 17, True, 2.0):
        with pytest.raises(rjet.ConfigError, match="partitions"):
            Partitions(bad)  # type: ignore[arg-type]


async def test_partitioned_stream_end_to_end(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name, partitions=True)
    assert stream.partitions == Partitions(720)
    items = [(f"user-{i % 97}", i % 4, str(i).encode()) for i in range(2000)]
    await stream.insert_many(items[:1000])
    bound = rjet.Stream(js, name)  # learns the layout from the stream's metadata
    await bound.insert_many(items[1000:1999])
    await bound.insert(*items[1999])
    assert bound.partitions == Partitions(720)

    shards: list[list[rjet.Event]] = []
    for m in range(3):
        view = await bound.shard(m, 3)
        assert view is not None
        async with await view.stream(to_head=True) as client:
            shards.append([e async for e in client])
    for m, events in enumerate(shards):
        assert all(xxhash.xxh3_64_intdigest(e.foreign_id.encode()) % 3 == m for e in events)
        assert [e.id_int for e in events] == sorted(e.id_int for e in events)
    everything = sorted((e for events in shards for e in events), key=lambda e: e.id_int)
    assert [(e.foreign_id, e.type, e.metadata) for e in everything] == items
    assert await bound.shard(0, 7) is None
    whole = await bound.shard(0, 1)
    assert whole is not None
    async with await whole.stream(to_head=True) as client:
        assert len([e async for e in client]) == 2000


async def test_cursors_of_a_shard_view_resume_exactly(js: JetStreamContext, name: str) -> None:
    stream = await rjet.Stream.create(js, name, partitions=12)
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(300)])
    view = await stream.shard(1, 4)
    assert view is not None
    async with await view.stream(to_head=True) as client:
        mine = [e.id_int async for e in client]
    middle = mine[len(mine) // 2]
    async with await view.stream(str(middle), to_head=True) as client:
        assert [e.id_int async for e in client] == [s for s in mine if s > middle]


async def test_partitions_must_match_an_existing_stream(js: JetStreamContext, name: str) -> None:
    await rjet.Stream.create(js, name, partitions=720)
    with pytest.raises(rjet.StreamConfigMismatch, match="partitions are 720, not None"):
        await rjet.Stream.create(js, name)
    with pytest.raises(rjet.StreamConfigMismatch, match="partitions are 720, not 240"):
        await rjet.Stream.create(js, name, partitions=240)
    assert (await rjet.Stream.create(js, name, partitions=720)).partitions == Partitions(720)


async def test_an_unpartitioned_stream_has_no_shard_views(stream: rjet.Stream) -> None:
    assert await stream.shard(0, 2) is None
    assert stream.partitions is None
