"""One shard count per group at a time: the group record (``_rjet.gen.<name>``) that every group,
fixed or elastic, takes with compare-and-swap before any worker handles an event; real servers and
real worker processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from test_parallel import check_handling, group, insert, logger, read_logs, remember_shard

import rjet
from rjet.parallel import Parallel, ReshardRefused, Summary
from rjet.parallel._elastic import Membership
from rjet.parallel._keys import generation_key
from rjet.parallel._reshard import prepare
from rjet.server import EmbeddedServer
from rjet.testing import wait_until

ELASTIC: dict[str, Any] = {
    "elastic": True,
    "heartbeat_interval": 0.2,
    "heartbeat_ttl": 1.0,
    "flush_interval": 0.2,
    "restart_delay": 0.1,
    "on_start": remember_shard,
}


def member(server: EmbeddedServer, name: str, n: int, directory: Path, **options: Any) -> Parallel:
    directory.mkdir(exist_ok=True)
    return Parallel(
        name, n, logger(directory), servers=server.url, stream=name, namespace=name, **{**ELASTIC, **options}
    )


def handled(directory: Path) -> set[int]:
    return {seq for rows in read_logs(directory).values() for seq, _, _ in rows}


@pytest.mark.timeout(90)
async def test_elastic_members_of_two_n_started_together_exactly_one_n_handles(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, js: JetStreamContext
) -> None:
    events = await insert(stream, 400, keys=100)
    await rjet.JetStreamCursorStore.create(js, name)  # the bucket exists: two groups creating it at once can clash
    groups = {n: member(server, name, n, tmp_path / str(n), member_id=f"m{n}") for n in (4, 6)}
    tasks = {n: asyncio.create_task(g.run_async()) for n, g in groups.items()}
    done, _ = await asyncio.wait(tasks.values(), timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1, "neither member was refused"
    lost = next(n for n, t in tasks.items() if t in done)
    won = 10 - lost
    with pytest.raises(
        ReshardRefused, match=rf"cannot start with n={lost}: the group runs with n={won} \(member m{won}"
    ):
        await tasks[lost]
    await wait_until(lambda: handled(tmp_path / str(won)) == set(events), 60, f"n={won} handling every event")
    groups[won].stop()
    await tasks[won]
    assert handled(tmp_path / str(lost)) == set()  # not one event handled by the refused n
    check_handling(read_logs(tmp_path / str(won)), won, events)  # every key, by its shard of the running n


@pytest.mark.timeout(90)
@pytest.mark.parametrize("elastic_n", [2, 3])
async def test_a_fixed_group_and_an_elastic_member_of_another_n_started_together_exactly_one_handles(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, js: JetStreamContext, elastic_n: int
) -> None:
    events = await insert(stream, 300, keys=60)
    await rjet.JetStreamCursorStore.create(js, name)
    fixed_n = 5 - elastic_n
    (tmp_path / str(fixed_n)).mkdir()
    groups = {
        elastic_n: member(server, name, elastic_n, tmp_path / str(elastic_n), member_id="e"),
        fixed_n: group(server, name, fixed_n, logger(tmp_path / str(fixed_n)), heartbeat_interval=0.2),
    }
    tasks = {n: asyncio.create_task(g.run_async()) for n, g in groups.items()}
    done, _ = await asyncio.wait(tasks.values(), timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1, "neither was refused"
    lost = next(n for n, t in tasks.items() if t in done)
    won = 5 - lost
    with pytest.raises(ReshardRefused, match=rf"cannot start with n={lost}: the group runs with n={won} "):
        await tasks[lost]
    await wait_until(lambda: handled(tmp_path / str(won)) == set(events), 60, f"n={won} handling every event")
    groups[won].stop()
    await tasks[won]
    assert handled(tmp_path / str(lost)) == set()
    check_handling(read_logs(tmp_path / str(won)), won, events)


@pytest.mark.timeout(90)
async def test_a_running_fixed_group_refuses_an_elastic_member_of_another_n(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    events = await insert(stream, 300, keys=60)
    (tmp_path / "fixed").mkdir()
    fixed = group(server, name, 2, logger(tmp_path / "fixed"))
    task = asyncio.create_task(fixed.run_async())
    await wait_until(lambda: handled(tmp_path / "fixed") == set(events), 30, "the fixed group handling every event")
    with pytest.raises(ReshardRefused, match=rf"cannot start with n=3: the group runs with n=2 \({name}_1_of_2"):
        await member(server, name, 3, tmp_path / "elastic").run_async()
    assert handled(tmp_path / "elastic") == set()
    more = await insert(stream, 100, keys=60)
    await wait_until(lambda: handled(tmp_path / "fixed") == set(events) | set(more), 30, "n=2 going on")
    fixed.stop()
    await task


@pytest.mark.timeout(90)
async def test_a_running_elastic_member_refuses_a_fixed_group_of_another_n(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    events = await insert(stream, 300, keys=60)
    elastic = member(server, name, 2, tmp_path / "elastic", member_id="e1")
    task = asyncio.create_task(elastic.run_async())
    await wait_until(lambda: handled(tmp_path / "elastic") == set(events), 30, "the member handling every event")
    (tmp_path / "fixed").mkdir()
    with pytest.raises(ReshardRefused, match=r"cannot start with n=3: the group runs with n=2 \(.*member e1 \("):
        await group(server, name, 3, logger(tmp_path / "fixed")).run_async(to_head=True)
    assert handled(tmp_path / "fixed") == set()
    elastic.stop()
    await task


@pytest.mark.timeout(90)
async def test_after_a_graceful_stop_of_stable_members_a_new_n_reshards_at_once(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    # A stable member keeps its lease over a graceful stop (its shards wait for it), but marked
    # stopped: it does not hold the group record, so the reshard need not wait for its TTL (20 s:
    # far from what starting the new member's processes takes on a loaded machine, a few seconds).
    events = await insert(stream, 300, keys=60)
    old = member(server, name, 2, tmp_path / "2", member_id="a", heartbeat_ttl=20.0)
    task = asyncio.create_task(old.run_async())
    await wait_until(lambda: handled(tmp_path / "2") == set(events), 30, "n=2 handling every event")
    old.stop()
    await task
    more = await insert(stream, 200, keys=60)
    new = member(server, name, 3, tmp_path / "3", member_id="b", heartbeat_ttl=5.0)
    started = time.monotonic()
    task = asyncio.create_task(new.run_async())
    await wait_until(lambda: handled(tmp_path / "3") >= set(more), 30, "n=3 handling the new events")
    assert time.monotonic() - started < 20.0  # not after the old member's TTL
    new.stop()
    summary: Summary = await task
    assert summary.reshard is not None
    assert (summary.reshard.old_n, summary.reshard.n) == ((2,), 3)


async def test_a_dead_member_holds_the_record_until_its_ttl_then_another_n_takes_it(
    js: JetStreamContext, name: str
) -> None:
    store = await rjet.JetStreamCursorStore.create(js, name)
    kv = store.kv
    ghost = Membership(kv, name, "ghost", ttl=1.0, max_shards=None, static=True, n=4)
    await ghost.beat()  # written once, never again: a member that died just now
    assert await prepare(kv, name, 4, group="g4", ttl=1.0, member="ghost") is None
    other = Membership(kv, name, "six", ttl=1.0, max_shards=None, static=True, n=6)
    await other.beat()
    with pytest.raises(ReshardRefused, match=r"cannot start with n=6: the group runs with n=4 \(member ghost") as e:
        await prepare(kv, name, 6, group="g6", ttl=1.0, member="six")
    assert set(e.value.running) == {"member ghost"}
    _, whole = await ghost.view(4)
    assert set(whole) == {"ghost"}  # a lease of another n is no member of this n
    await asyncio.sleep(1.1)  # the ghost's TTL
    await other.beat()
    report = await prepare(kv, name, 6, group="g6", ttl=1.0, member="six")
    assert report is not None
    assert (report.old_n, report.n) == ((4,), 6)


@pytest.mark.timeout(60)
async def test_a_group_whose_record_another_n_took_over_stops(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, js: JetStreamContext
) -> None:
    # What a group paused past its TTL finds when it wakes: a group of another n took the record over.
    events = await insert(stream, 200, keys=40)
    fixed = group(server, name, 2, logger(tmp_path), heartbeat_interval=0.2)
    task = asyncio.create_task(fixed.run_async())
    await wait_until(lambda: handled(tmp_path) == set(events), 30, "n=2 handling every event")
    store = await rjet.JetStreamCursorStore.create(js, name)
    await store.kv.put(generation_key(name), b'{"n": 3, "seed": "", "fresh_from": 0}')
    with pytest.raises(ReshardRefused, match="n=3 took the group over while this group of n=2 looked gone"):
        await asyncio.wait_for(task, 10)
