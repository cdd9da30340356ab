"""The referee: one conformance suite (rjet.testing.check_stream) run over the real Stream on a
nats-server and over MemoryStream. The expected transcripts were written down from the real stream;
the first test checks that the real stream still gives them, the second that MemoryStream does."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.deadletter import DeadLetterSink
from rjet.testing import ConformingStream, FakeClock, MemoryStream, check_stream
from rjet.testing._conformance import transcripts

_names = itertools.count(1)


class RealStream:
    """A real rjet.Stream with the operations MemoryStream has as methods: a purge up to a sequence
    (``purge_stream(name, seq=...)`` keeps that sequence on), a delete and create, a DeadLetterStream."""

    def __init__(self, js: JetStreamContext, stream: rjet.Stream) -> None:
        self.js = js
        self.real = stream

    @property
    def name(self) -> str:
        return self.real.name

    async def insert(self, foreign_id: str, type: int, data: bytes = b"", *, msg_id: str | None = None) -> int:
        return await self.real.insert(foreign_id, type, data, msg_id=msg_id)

    async def insert_once(self, foreign_id: str, type: int, data: bytes = b"", *, msg_id: str) -> tuple[int, bool]:
        return await self.real.insert_once(foreign_id, type, data, msg_id=msg_id)

    async def insert_many(self, events: Iterable[tuple[str, int, bytes] | tuple[str, int, bytes, str]]) -> list[int]:
        return await self.real.insert_many(events)

    async def stream(
        self,
        after: str = "",
        *,
        from_head: bool = False,
        to_head: bool = False,
        stream_id: str | None = None,
        key_filter: Callable[[str], bool] | None = None,
    ) -> rjet.StreamClient:
        return await self.real.stream(
            after, from_head=from_head, to_head=to_head, stream_id=stream_id, key_filter=key_filter
        )

    async def remove_through(self, seq: int) -> None:
        await self.js.purge_stream(self.name, seq=seq + 1)

    async def recreate(self) -> None:
        await self.js.delete_stream(self.name)
        await rjet.Stream.create(self.js, self.name)

    def dead_letter_sink(self) -> DeadLetterSink:
        return rjet.DeadLetterStream(self.real)


async def test_the_real_stream_gives_the_expected_transcripts(js: JetStreamContext, name: str) -> None:
    async def factory(read: rjet.ReadConfig) -> ConformingStream:
        return RealStream(js, await rjet.Stream.create(js, f"{name}_{next(_names)}", read=read))

    await check_stream(factory)


async def test_memory_stream_behaves_as_the_real_one() -> None:
    async def factory(read: rjet.ReadConfig) -> ConformingStream:
        return MemoryStream(f"mem_{next(_names)}", read=read)

    async with FakeClock():  # the suite's waits, retries and timestamps in virtual time
        await check_stream(factory)


async def test_memory_stream_behaves_as_the_real_one_in_real_time() -> None:
    async def factory(read: rjet.ReadConfig) -> ConformingStream:
        return MemoryStream(f"mem_{next(_names)}", read=read)

    await check_stream(factory, only=["inserts", "runs", "failures"])


class _ForgetfulStream(MemoryStream):
    """A fake that drifted: a removal leaves the first sequence where it was."""

    async def remove_through(self, seq: int) -> None:
        for s in range(max(self.first_seq, 1), min(seq, self.last_seq) + 1):
            self._events.pop(s, None)


async def test_a_difference_fails_with_a_diff() -> None:
    async def factory(read: rjet.ReadConfig) -> ConformingStream:
        return _ForgetfulStream(f"drift_{next(_names)}", read=read)

    async with FakeClock():
        with pytest.raises(AssertionError) as caught:
            await check_stream(factory, only=["removal"])
    message = str(caught.value)
    assert "removal (a real stream)" in message
    assert "-open after 2 -> CursorExpired: stream '<stream>': cursor 2 has expired" in message


async def test_transcripts_name_no_stream() -> None:
    async def factory(read: rjet.ReadConfig) -> ConformingStream:
        return MemoryStream(f"mem_{next(_names)}", read=read)

    async with FakeClock():
        got = await transcripts(factory, ["recreate"])
    text = "\n".join(got["recreate"])
    assert "mem_" not in text
    assert "<id1>" in text
    assert "<id2>" in text
