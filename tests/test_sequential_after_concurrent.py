"""A sequential run of a name after a concurrent one: the events the concurrent run left done above
the cursor (exact progress) are passed over, not handled again, and stay recorded until the cursor
passes them. With a transactional store a second handling would commit an effect twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

import rjet
from rjet._progress import decode_done, encode_done
from rjet.cursors import ClaimingCursorStore
from rjet.sql import SqlCursorStore


class _Progress:
    def __init__(self, cursor: int, done: list[int]) -> None:
        self.cursor, self.done = cursor, done

    def snapshot(self) -> tuple[str, str]:
        return (str(self.cursor) if self.cursor else ""), encode_done(self.cursor, self.done)


@asynccontextmanager
async def _store(kind: str, js: JetStreamContext, stream: rjet.Stream, tmp_path: Path) -> AsyncIterator[Any]:
    if kind == "memory":
        yield rjet.MemCursorStore()
    elif kind == "jetstream":
        async with await rjet.JetStreamCursorStore.create(js, stream.name) as store:
            yield store
    else:
        async with await SqlCursorStore.open(f"sqlite:///{tmp_path}/cursors.db") as store:
            yield store


async def _leave_progress(store: ClaimingCursorStore, name: str, cursor: int, done: list[int]) -> None:
    """What a concurrent run stopped with the event after ``cursor`` in flight leaves behind."""
    claim = await store.claim(name, owner="concurrent-run")
    await claim.set_cursor(_Progress(cursor, done))
    await claim.release()


@pytest.mark.parametrize("kind", ["memory", "jetstream", "sqlite"])
async def test_a_sequential_run_passes_over_what_a_concurrent_run_left_done(
    js: JetStreamContext, stream: rjet.Stream, tmp_path: Path, kind: str
) -> None:
    await stream.insert_many([(f"k{i % 3}", 1, b"") for i in range(8)])
    async with _store(kind, js, stream, tmp_path) as store:
        await _leave_progress(store, "c", 0, [2, 4, 5, 7])
        calls: list[int] = []
        stop = asyncio.Event()

        def fn(fate: rjet.Fate, event: rjet.Event) -> None:
            calls.append(event.id_int)
            if event.id_int == 3:
                stop.set()  # stops before 6 (4 and 5 are passed over on the way): 7 is ahead of the cursor

        consumer = rjet.Consumer("c", fn)
        stats = rjet.ConsumerStats("c")
        with pytest.raises(rjet.Stopped):
            await rjet.run(rjet.Spec(stream.stream, store, consumer), stats=stats, stop=stop)
        assert calls == [1, 3]
        assert stats.already_done == 3
        claim = await store.claim("c", owner="look")
        assert claim.cursor == "5"
        assert decode_done(5, claim.done or "") == {7}  # kept, not dropped by the sequential run
        await claim.release()

        calls.clear()
        again = rjet.ConsumerStats("c")
        with pytest.raises(rjet.HeadReached):
            await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True), stats=again)
        assert calls == [6, 8]
        assert again.already_done == 1
        assert await store.get_cursor("c") == "8"


async def test_a_transactional_sequential_run_commits_no_effect_twice(
    js: JetStreamContext, stream: rjet.Stream, tmp_path: Path
) -> None:
    await stream.insert_many([(f"k{i % 3}", 1, b"") for i in range(8)])
    async with await SqlCursorStore.open(f"sqlite:///{tmp_path}/app.db") as store:

        async def setup(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
            await tx.execute("CREATE TABLE IF NOT EXISTS effects (seq INTEGER NOT NULL)")
            if event.id_int in (2, 4, 5, 7):  # what a concurrent run committed before it was stopped
                await tx.execute("INSERT INTO effects (seq) VALUES (?)", (event.id_int,))

        await _leave_progress(store, "c", 0, [2, 4, 5, 7])
        # The concurrent run's effects, committed in their transactions (by a transactional consumer
        # of another name, so that this name's record is left as the concurrent run left it).
        with pytest.raises(rjet.HeadReached):
            await rjet.run(
                rjet.Spec(stream.stream, store, rjet.Consumer("setup", setup, transactional=True), to_head=True)
            )

        async def effect(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
            await tx.execute("INSERT INTO effects (seq) VALUES (?)", (event.id_int,))

        consumer = rjet.Consumer("c", effect, transactional=True)
        with pytest.raises(rjet.HeadReached):
            await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))

        rows: list[int] = []

        async def read(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
            if not rows:
                cursor = await tx.execute("SELECT seq FROM effects ORDER BY seq")
                rows.extend(seq for (seq,) in await cursor.fetchall())

        with pytest.raises(rjet.HeadReached):
            await rjet.run(
                rjet.Spec(stream.stream, store, rjet.Consumer("read", read, transactional=True), to_head=True)
            )
    assert rows == list(range(1, 9))  # each event's effect exactly once
