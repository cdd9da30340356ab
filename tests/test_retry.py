"""The retry policy: one schedule and one set of defaults for the keyed scheduler, the sequential
loop's dead letters and ``run_forever``."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.parallel import ConsumerOptions, Parallel, WorkerOptions
from rjet.server import EmbeddedServer
from rjet.testing import wait_until


def test_one_set_of_defaults() -> None:
    policy = rjet.RetryPolicy()
    assert (policy.backoff, policy.max_backoff, policy.attempts) == (0.5, 30.0, 5)
    assert [policy.delay(n) for n in (1, 2, 3, 7, 100, 10**6)] == [0.5, 1.0, 2.0, 30.0, 30.0, 30.0]

    async def sink(record: rjet.DeadLetterRecord) -> None: ...

    assert rjet.DeadLetter(sink).retry == policy
    assert WorkerOptions().max_backoff == policy.max_backoff

    def fn(fate: rjet.Fate, event: rjet.Event) -> None: ...

    assert rjet.Consumer("c", fn).retry == policy
    assert rjet.Consumer("c", fn, concurrency=8).retry == policy
    # A dead letter's own schedule is the consumer's; a policy given beside it replaces it.
    custom = rjet.DeadLetter(sink, attempts=2, backoff=0.1)
    assert rjet.Consumer("c", fn, dead_letter=custom).retry == rjet.RetryPolicy(0.1, 30.0, 2)
    given = rjet.RetryPolicy(backoff=0.2, max_backoff=1.0, attempts=3)
    consumer = rjet.Consumer("c", fn, dead_letter=custom, retry=given)
    assert consumer.retry == given
    assert consumer.dead_letter is not None
    assert consumer.dead_letter.retry == given
    assert consumer.dead_letter.sink is sink


def test_the_policy_is_checked() -> None:
    for bad in ({"backoff": -1}, {"max_backoff": float("nan")}, {"attempts": 0}, {"attempts": 1.5}):
        with pytest.raises(rjet.ConfigError, match="RetryPolicy"):
            rjet.RetryPolicy(**bad)

    def fn(fate: rjet.Fate, event: rjet.Event) -> None: ...

    with pytest.raises(rjet.ConfigError, match=r"retry must be an rjet\.RetryPolicy"):
        rjet.Consumer("c", fn, retry=0.5)  # type: ignore[arg-type]


async def test_the_keyed_scheduler_waits_the_policys_delays(stream: rjet.Stream) -> None:
    await stream.insert_many([("bad", 1, b""), ("ok", 1, b"")])
    times: list[float] = []

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        if event.foreign_id == "bad":
            times.append(time.monotonic())
            if len(times) < 5:
                raise RuntimeError("not yet")

    policy = rjet.RetryPolicy(backoff=0.05, max_backoff=0.2)
    consumer = rjet.Consumer("c", fn, concurrency=4, retry=policy)
    store = rjet.MemCursorStore()
    with pytest.raises(rjet.HeadReached):
        await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True)), 10)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, want in zip(gaps, [0.05, 0.1, 0.2, 0.2], strict=True):
        assert want - 0.005 <= gap < want + 0.15
    assert store.cursors == {"c": "2"}


async def test_dead_letters_follow_the_consumers_policy(stream: rjet.Stream) -> None:
    await stream.insert_many([("bad", 1, b""), ("ok", 1, b"")])
    buried: list[rjet.DeadLetterRecord] = []
    calls: list[str] = []

    async def sink(record: rjet.DeadLetterRecord) -> None:
        buried.append(record)

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        calls.append(event.id)
        if event.foreign_id == "bad":
            raise RuntimeError("poison")

    policy = rjet.RetryPolicy(backoff=0.01, attempts=3)
    for concurrency in (1, 4):
        buried.clear()
        calls.clear()
        consumer = rjet.Consumer(
            f"c{concurrency}", fn, concurrency=concurrency, dead_letter=rjet.DeadLetter(sink), retry=policy
        )
        store = rjet.MemCursorStore()
        with pytest.raises(rjet.HeadReached):
            await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True)), 10)
        assert calls.count("1") == 3, concurrency
        assert [(r.event_id, r.attempts) for r in buried] == [("1", 3)]
        assert store.cursors == {f"c{concurrency}": "2"}


async def test_run_forever_backs_off_on_the_consumers_policy(stream: rjet.Stream) -> None:
    await stream.insert_many([("k", 1, b"")])
    times: list[float] = []

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        times.append(time.monotonic())
        raise RuntimeError("always")

    stop = asyncio.Event()
    consumer = rjet.Consumer("c", fn, retry=rjet.RetryPolicy(backoff=0.05, max_backoff=0.1))
    task = asyncio.create_task(rjet.run_forever(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer), stop=stop))
    await wait_until(lambda: len(times) >= 4, what="three runs again")
    stop.set()
    await asyncio.wait_for(task, 5)
    gaps = [b - a for a, b in itertools.pairwise(times)][:3]
    for gap, want in zip(gaps, [0.05, 0.1, 0.1], strict=True):
        assert want - 0.005 <= gap < want + 0.15


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_stop_ends_the_wait_for_a_retry_and_no_retry_starts(stream: rjet.Stream, concurrency: int) -> None:
    await stream.insert_many([("bad", 1, b"")])
    calls: list[str] = []
    stop = asyncio.Event()

    async def sink(record: rjet.DeadLetterRecord) -> None:
        raise AssertionError("nothing is buried: the run was stopped before its attempts ran out")

    async def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        calls.append(event.id)
        asyncio.get_running_loop().call_later(0.2, stop.set)
        raise RuntimeError("poison")

    policy = rjet.RetryPolicy(backoff=30, attempts=3)
    consumer = rjet.Consumer("c", fn, concurrency=concurrency, dead_letter=rjet.DeadLetter(sink), retry=policy)
    store = rjet.MemCursorStore()
    started = time.monotonic()
    with pytest.raises(rjet.Stopped):  # was (concurrency 1): the 30 s wait, then a retry call
        await asyncio.wait_for(rjet.run(rjet.Spec(stream.stream, store, consumer), stop=stop), 10)
    assert time.monotonic() - started < 5
    assert calls == ["1"]
    assert store.cursors.get("c", "") in ("", "0")


def _always_fails(fate: rjet.Fate, event: rjet.Event) -> None:
    raise RuntimeError("poison")


@pytest.mark.slow
async def test_a_parallel_group_takes_a_retry_policy(server: EmbeddedServer, js: JetStreamContext, name: str) -> None:
    with pytest.raises(rjet.ConfigError, match=r"retry must be an rjet\.RetryPolicy"):
        ConsumerOptions(retry=3)  # type: ignore[arg-type]
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 2)
    group = Parallel(
        name, 1, _always_fails, servers=server.url, stream=name, namespace=name, dead_letters=f"{name}_dl",
        retry=rjet.RetryPolicy(backoff=0.01, attempts=2),
    )  # fmt: skip
    summary = await asyncio.wait_for(group.run_async(to_head=True), 30)
    assert summary.shards[0].cursor == "2"
    records = [r.record async for r in (await rjet.DeadLetterStream.create(js, f"{name}_dl")).records()]
    assert [(r.event_id, r.attempts) for r in records] == [("1", 2), ("2", 2)]  # the group's policy, not 5
