"""Property: whatever an event is, inserting it and reading it back gives the same event."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rjet

Ctx = tuple[asyncio.AbstractEventLoop, rjet.Stream]


foreign_ids = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=300)
types = st.integers(min_value=0, max_value=2**63 - 1)  # what insert takes (rjet._nats.frames.check_type)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fid=foreign_ids, typ=types, data=st.binary(max_size=4000), many=st.booleans())
def test_insert_then_read_returns_the_same_event(loop_stream: Ctx, fid: str, typ: int, data: bytes, many: bool) -> None:
    loop, stream = loop_stream

    async def round_trip() -> rjet.Event:
        if many:
            [seq] = await stream.insert_many([(fid, typ, data)])
        else:
            seq = await stream.insert(fid, typ, data)
        async with await stream.stream(str(seq - 1), to_head=True) as client:
            return await client.recv()

    event = loop.run_until_complete(round_trip())
    assert (event.foreign_id, event.type, event.metadata) == (fid, typ, data)
