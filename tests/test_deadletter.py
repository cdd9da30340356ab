"""Dead letters: a poison event is retried, recorded and skipped; nothing is skipped without a record."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter

import pytest
from nats.js import JetStreamContext

import rjet


async def run_to_head(spec: rjet.Spec) -> None:
    with pytest.raises(rjet.HeadReached):
        await rjet.run(spec)


async def test_a_poison_event_is_recorded_and_skipped_after_k_attempts(
    js: JetStreamContext, stream: rjet.Stream
) -> None:
    await stream.insert_many([(f"k{i}", 1, str(i).encode()) for i in range(5)])
    tries: Counter[str] = Counter()
    handled: list[str] = []

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        tries[event.id] += 1
        if event.foreign_id == "k2":
            raise ValueError("cannot bill k2")
        handled.append(event.id)

    dlq = await rjet.DeadLetterStream.create(js, f"{stream.name}_dlq")
    store = rjet.MemCursorStore()
    consumer = rjet.Consumer("billing", fn, dead_letter=rjet.DeadLetter(dlq, attempts=3, backoff=0.01))
    await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True))
    assert tries == {"1": 1, "2": 1, "3": 3, "4": 1, "5": 1}
    assert handled == ["1", "2", "4", "5"]
    assert store.cursors == {"billing": "5"}
    assert dlq.recorded == 1
    async with await dlq.stream.stream(to_head=True) as client:
        [letter] = [e async for e in client]
    record = json.loads(letter.metadata)
    assert (letter.foreign_id, letter.type) == ("k2", 1)
    assert record["consumer"] == "billing"
    assert record["event_id"] == "3"
    assert record["attempts"] == 3
    assert record["error"] == "ValueError: cannot bill k2"
    assert record["metadata"] == "Mg=="  # base64 of b"2"


async def test_a_failing_sink_stops_the_run_before_the_event(stream: rjet.Stream) -> None:
    await stream.insert_many([("a", 1, b""), ("poison", 1, b""), ("c", 1, b"")])

    async def broken_sink(record: rjet.DeadLetterRecord) -> None:
        raise ConnectionError("dlq down")

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.foreign_id == "poison":
            raise KeyError("poison")

    store = rjet.MemCursorStore()
    consumer = rjet.Consumer("c", fn, dead_letter=rjet.DeadLetter(broken_sink, attempts=2, backoff=0))
    with pytest.raises(KeyError) as e:
        await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
    assert any("could not record event 2 as a dead letter" in n for n in e.value.__notes__)
    assert store.cursors == {"c": "1"}


async def test_fate_errors_are_never_dead_lettered(stream: rjet.Stream) -> None:
    await stream.insert("k", 1)
    records: list[rjet.DeadLetterRecord] = []

    async def sink(record: rjet.DeadLetterRecord) -> None:
        records.append(record)

    consumer = rjet.Consumer(
        "c", lambda f, e: f.tempt(), fate=rjet.ALWAYS, dead_letter=rjet.DeadLetter(sink, attempts=1)
    )
    with pytest.raises(rjet.Tempted):
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True))
    assert records == []


async def test_an_undecodable_event_is_dead_lettered_too(js: JetStreamContext, stream: rjet.Stream) -> None:
    await stream.insert("a", 1)
    await js.publish(f"{stream.name}.events", b"", headers={"reflex_type": "x", "rjet_foreign_id": "b"})
    await stream.insert("c", 1)
    records: list[rjet.DeadLetterRecord] = []

    async def sink(record: rjet.DeadLetterRecord) -> None:
        records.append(record)

    seen: list[str] = []
    for key_filter in (None, lambda fid: True):
        seen.clear()
        records.clear()
        consumer = rjet.Consumer(
            "c", lambda f, e: seen.append(e.id), key_filter=key_filter, dead_letter=rjet.DeadLetter(sink)
        )
        store = rjet.MemCursorStore()
        await run_to_head(rjet.Spec(stream.stream, store, consumer, to_head=True))
        assert seen == ["1", "3"]
        assert store.cursors == {"c": "3"}
        [record] = records
        assert (record.event_id, record.event, record.attempts) == ("2", None, 1)
        assert "header reflex_type 'x' is not an integer" in record.error


async def test_without_a_dead_letter_policy_an_undecodable_event_stops_the_run(
    js: JetStreamContext, stream: rjet.Stream
) -> None:
    await js.publish(f"{stream.name}.events", b"", headers={"reflex_type": "x"})
    store = rjet.MemCursorStore()
    with pytest.raises(rjet.DecodeError, match="sequence 1"):
        await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", lambda f, e: None), to_head=True))
    assert store.cursors == {}


async def test_at_concurrency_8_an_undecodable_event_stops_the_run_after_every_event_before_it(
    js: JetStreamContext, stream: rjet.Stream
) -> None:
    """As above with ``concurrency=8``, one key's call stuck while the reader meets the bad event:
    the run ends with the DecodeError once every event before it was handled, the stuck key's queue
    included, and the cursor stays right before it."""
    await stream.insert_many([(f"k{i % 8}", 1, b"") for i in range(60)])
    await js.publish(f"{stream.name}.events", b"", headers={"reflex_type": "x"})  # sequence 61
    await stream.insert_many([(f"k{i % 8}", 1, b"") for i in range(20)])
    seen: list[int] = []
    stuck, release = asyncio.Event(), asyncio.Event()

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        seen.append(event.id_int)
        if event.id_int == 10:
            stuck.set()
            await release.wait()

    store = rjet.MemCursorStore()
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", fn, concurrency=8))))
    await asyncio.wait_for(stuck.wait(), 10)
    await asyncio.sleep(0.3)  # the reader meets sequence 61 while event 10's call is stuck
    release.set()
    with pytest.raises(rjet.DecodeError, match="sequence 61"):
        await asyncio.wait_for(task, 10)
    assert sorted(seen) == list(range(1, 61))
    assert store.cursors == {"c": "60"}


async def test_backoff_between_attempts(stream: rjet.Stream) -> None:
    await stream.insert("k", 1)
    times: list[float] = []
    loop = asyncio.get_running_loop()

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        times.append(loop.time())
        raise RuntimeError("down")

    async def sink(record: rjet.DeadLetterRecord) -> None:
        pass

    policy = rjet.DeadLetter(sink, attempts=3, backoff=0.1, max_backoff=0.15)
    assert [policy.delay(a) for a in (1, 2, 3)] == [0.1, 0.15, 0.15]
    await run_to_head(
        rjet.Spec(stream.stream, rjet.MemCursorStore(), rjet.Consumer("c", fn, dead_letter=policy), to_head=True)
    )
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 3
    assert gaps[0] >= 0.09
    assert gaps[1] >= 0.14


def test_policy_validation() -> None:
    async def sink(record: rjet.DeadLetterRecord) -> None:
        pass

    with pytest.raises(rjet.ConfigError, match="attempts"):
        rjet.DeadLetter(sink, attempts=0)
    with pytest.raises(rjet.ConfigError, match="not callable"):
        rjet.DeadLetter("nope")  # type: ignore[arg-type]
    with pytest.raises(rjet.ConfigError, match="dead_letter"):
        rjet.Consumer("c", lambda f, e: None, dead_letter=sink)  # type: ignore[arg-type]


async def test_a_poison_event_too_large_to_embed_is_recorded_by_reference(
    js: JetStreamContext, stream: rjet.Stream
) -> None:
    big = b"x" * int(js._nc.max_payload * 0.8)  # base64 makes it larger than a message may be
    await stream.insert_many([("ok", 1, b""), ("poison", 1, big), ("after", 1, b"")])
    handled: list[str] = []

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.foreign_id == "poison":
            raise ValueError("never")
        handled.append(event.foreign_id)

    dlq = await rjet.DeadLetterStream.create(js, f"{stream.name}_dlq")
    consumer = rjet.Consumer("c", fn, dead_letter=rjet.DeadLetter(dlq, attempts=1))
    await run_to_head(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True))
    assert handled == ["ok", "after"]  # was: stuck for ever on the poison event
    async with await dlq.stream.stream(to_head=True) as client:
        [letter] = [e async for e in client]
    record = json.loads(letter.metadata)
    assert record["metadata"] is None
    assert record["metadata_omitted"] == len(big)
    assert (record["stream"], record["event_id"]) == (stream.name, "2")


def test_a_record_cut_to_size_keeps_its_reference_and_fits() -> None:
    from datetime import UTC, datetime

    record = rjet.DeadLetterRecord("c", "s", "7", None, "E" * 5000, 3, datetime.now(UTC))
    out = record.to_json(1000)
    assert len(out) <= 1000
    body = json.loads(out)
    assert body["event_id"] == "7"
    assert body["error"].endswith(" [cut]")
    assert json.loads(record.to_json())["error"] == "E" * 5000
