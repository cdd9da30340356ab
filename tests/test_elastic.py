"""Elastic groups: the assignment on its own, then members joining, leaving, dying and pausing
against a real server, with real worker processes (members in this process, or `rjet worker
--elastic` processes where a member must be killed or stopped as a whole)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from test_parallel import check_handling, insert, logger, read_logs, remember_shard, stored_cursors

import rjet
from rjet.parallel import Parallel, shard_of
from rjet.parallel._elastic import Membership, assign
from rjet.server import EmbeddedServer
from rjet.testing import wait_until

FAST: dict[str, Any] = {
    "elastic": True,
    "heartbeat_interval": 0.2,
    "heartbeat_ttl": 1.0,
    "flush_interval": 0.2,
    "restart_delay": 0.1,
    "on_start": remember_shard,
}


# ----------------------------------------------------------------- the assignment, without a server


def _owner(assignment: dict[str, tuple[int, ...]]) -> dict[int, str]:
    return {m: member for member, shards in assignment.items() for m in shards}


def _moved(before: dict[str, tuple[int, ...]], after: dict[str, tuple[int, ...]]) -> int:
    a, b = _owner(before), _owner(after)
    return sum(1 for m in a if a[m] != b.get(m))


def test_the_assignment_is_deterministic_balanced_and_complete() -> None:
    rng = random.Random(1)
    for _ in range(200):
        n, k = rng.randint(1, 64), rng.randint(1, 9)
        members = [f"host{rng.randrange(10**6)}-{i}" for i in range(k)]
        got = assign(members, n)
        assert got == assign(list(reversed(members)) + members[:1], n)  # order and repeats do not matter
        assert sorted(m for shards in got.values() for m in shards) == list(range(n))
        loads = [len(shards) for shards in got.values()]
        assert max(loads) - min(loads) <= 1


def test_a_join_or_a_leave_moves_about_n_over_k_shards() -> None:
    rng = random.Random(2)
    for n, k in [(8, 3), (16, 4), (64, 5), (360, 8)]:
        joins, leaves = [], []
        for t in range(40):
            members = [f"m{rng.random()}" for _ in range(k)]
            before = assign(members, n)
            joins.append(_moved(before, assign([*members, f"new{t}"], n)))
            leaves.append(_moved(before, assign(members[1:], n)))
        # The least that must move: n/(k+1) onto a joining member, the leaving member's n/k.
        assert sum(joins) / len(joins) <= 1.4 * n / (k + 1) + 1, (n, k, joins)
        assert sum(leaves) / len(leaves) <= 1.4 * n / k + 1, (n, k, leaves)
        assert max(joins) <= 2 * n / (k + 1) + 2


def test_max_shards_caps_a_member_and_the_others_take_the_rest() -> None:
    got = assign(["small", "big1", "big2"], 12, {"small": 1})
    assert len(got["small"]) == 1
    assert sorted(len(v) for k, v in got.items() if k != "small") == [5, 6]
    short = assign(["a", "b"], 5, {"a": 1, "b": 2})
    assert sum(len(v) for v in short.values()) == 3  # too little room: two shards wait for a member
    assert assign([], 4) == {}


def test_elastic_options_are_checked(server: EmbeddedServer) -> None:
    def fn(fate: rjet.Fate, event: rjet.Event) -> None: ...

    url = server.url
    with pytest.raises(rjet.ConfigError, match="elastic=True or shards, not both"):
        Parallel("g", 4, fn, servers=url, stream="s", namespace="ns", elastic=True, shards=[0])
    with pytest.raises(rjet.ConfigError, match="are for elastic groups"):
        Parallel("g", 4, fn, servers=url, stream="s", namespace="ns", member_id="a")
    with pytest.raises(rjet.ConfigError, match="max_shards must be an int >= 1"):
        Parallel("g", 4, fn, servers=url, stream="s", namespace="ns", elastic=True, max_shards=0)
    group = Parallel("g", 4, fn, servers=url, stream="s", namespace="ns", elastic=True, member_id="host-a")
    assert group.member == "host-a"
    with pytest.raises(rjet.ConfigError, match="runs until stopped"):
        group.run(to_head=True)


# ----------------------------------------------------------------- members in this process


def _member(server: EmbeddedServer, name: str, n: int, directory: Path, **options: Any) -> Parallel:
    opts = {**FAST, **options}
    return Parallel(name, n, logger(directory, delay=0.0002), servers=server.url, stream=name, namespace=name, **opts)


def _running(group: Parallel) -> list[int]:
    return [s.shard for s in group.statistics().shards if s.state == "running"]


def _runs(group: Parallel, shards: list[int]) -> Callable[[], bool]:
    return lambda: sorted(_running(group)) == shards


def _handled(directory: Path) -> set[int]:
    return {seq for rows in read_logs(directory).values() for seq, _, _ in rows}


@pytest.mark.timeout(120)
async def test_three_members_started_at_different_times_spread_the_shards(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, js: JetStreamContext
) -> None:
    n = 6
    events = await insert(stream, 30_000, keys=300)
    members = [_member(server, name, n, tmp_path, member_id=f"member-{i}") for i in range(3)]
    tasks = []
    for group in members:
        tasks.append(asyncio.create_task(group.run_async()))
        await asyncio.sleep(1.0)
    await wait_until(lambda: len(_handled(tmp_path)) == len(events), 60, "every event handled")
    await wait_until(lambda: [len(_running(g)) for g in members] == [2, 2, 2], 20, "two shards on each member")
    assert sorted(m for g in members for m in _running(g)) == list(range(n))
    for group in members:
        group.stop()
    await asyncio.gather(*tasks)
    replays = check_handling(read_logs(tmp_path), n, events)  # per-key order on first handling, none lost
    cursors = await stored_cursors(js, name)
    assert {k: v for k, v in cursors.items() if k.startswith(name)} == {
        f"{name}_{m + 1}_of_{n}": str(max(events)) for m in range(n)
    }
    print(f"three members: events={len(events)} replays={replays}")


@pytest.mark.timeout(120)
async def test_a_member_joining_takes_its_shards_over_with_nothing_lost_and_nothing_replayed(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    n = 4
    first = _member(server, name, n, tmp_path, member_id="first")
    first_task = asyncio.create_task(first.run_async())
    events: dict[int, str] = {}

    async def produce() -> None:
        for _ in range(40):
            events.update(await insert(stream, 500, keys=100))
            await asyncio.sleep(0.05)

    producer = asyncio.create_task(produce())
    await wait_until(lambda: len(_running(first)) == n, 20, "the first member running every shard")
    await asyncio.sleep(0.5)
    second = _member(server, name, n, tmp_path, member_id="second")
    second_task = asyncio.create_task(second.run_async())
    await wait_until(lambda: len(_running(second)) == 2 and len(_running(first)) == 2, 20, "two shards each")
    await producer
    await wait_until(lambda: _handled(tmp_path) >= set(events), 60, "every event handled")
    first.stop()
    second.stop()
    await asyncio.gather(first_task, second_task)
    replays = check_handling(read_logs(tmp_path), n, events)
    assert replays == 0  # a graceful handover: the old owner flushed before the new one claimed
    moved = [m for m in range(n) if m in _ran(second)]
    assert len(moved) == 2
    print(f"join: events={len(events)} moved={len(moved)} replays={replays} lost=0")


def _ran(group: Parallel) -> set[int]:
    return {s.shard for s in group.statistics().shards if s.handled}


@pytest.mark.timeout(180)
async def test_a_rolling_restart_of_stable_members_moves_no_shard(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    # Each member stops and comes back with its member_id within its TTL, one after the other, as a
    # rolling deploy does: every member keeps its shards, and no other member ever runs them.
    n = 6
    await insert(stream, 3000, keys=100)
    opts = {"heartbeat_ttl": 5.0}
    ids = ("a", "b", "c")
    groups = {i: _member(server, name, n, tmp_path, member_id=i, **opts) for i in ids}
    tasks = {i: asyncio.create_task(g.run_async()) for i, g in groups.items()}
    held: dict[str, set[int]] = {i: set() for i in ids}  # shards each member took, at any moment

    async def watch() -> None:
        while True:
            for i, g in groups.items():
                held[i] |= {
                    s.shard for s in g.statistics().shards if s.state in ("taking", "waiting", "starting", "running")
                }
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        await wait_until(lambda: all(len(_running(g)) == 2 for g in groups.values()), 30, "two shards each")
        owned = {i: sorted(_running(g)) for i, g in groups.items()}
        for i in ids:
            groups[i].stop()
            await tasks[i]
            await asyncio.sleep(1.5)  # a process restarting: long enough for the others to rebalance
            groups[i] = _member(server, name, n, tmp_path, member_id=i, **opts)  # back within the TTL
            tasks[i] = asyncio.create_task(groups[i].run_async())
            await wait_until(_runs(groups[i], owned[i]), 30, f"{i} running its shards again")
        await wait_until(lambda: all(sorted(_running(groups[i])) == owned[i] for i in ids), 30, "all back")
    finally:
        for g in groups.values():
            g.stop()
        await asyncio.gather(*tasks.values())
        watcher.cancel()
    assert held == {i: set(owned[i]) for i in ids}  # nothing moved, at any point


@pytest.mark.timeout(60)
async def test_a_gone_member_s_shards_are_taken_at_the_first_view_that_sees_it_gone(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, js: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    # A member that died leaves a lease that stops changing: the takeover must not wait for a second
    # view to agree (that costs a heartbeat more than the TTL). Heartbeats of 1 s tell the two apart.
    caplog.set_level(logging.INFO, "rjet.parallel")
    n = 4
    await insert(stream, 100, keys=10)
    store = await rjet.JetStreamCursorStore.create(js, name)
    ghost = Membership(store.kv, name, "ghost", ttl=2.0, max_shards=None, static=True)
    await ghost.beat()  # written once, never again: a member that died just now
    ghosts = set(assign(["b", "ghost"], n)["ghost"])
    b = _member(server, name, n, tmp_path, member_id="b", heartbeat_interval=1.0, heartbeat_ttl=2.0)
    task = asyncio.create_task(b.run_async())
    try:
        await wait_until(lambda: sorted(_running(b)) == list(range(n)), 30, "b running every shard")
    finally:
        b.stop()
        await task
    times: dict[int | str, float] = {}
    for r in caplog.records:
        if "assignment [1, 2, 3, 4]" in r.getMessage():
            times.setdefault("gone", r.created)
        for m in ghosts:
            if r.getMessage().endswith(f"takes {name}_{m + 1}_of_{n}"):
                times.setdefault(m, r.created)
    assert "gone" in times, [r.getMessage() for r in caplog.records]
    assert all(times[m] - times["gone"] < 0.5 for m in ghosts), times  # not a heartbeat (1 s) later


# ----------------------------------------------------------------- members as processes

# Each line: sequence, foreign id, pid, and the time the handler call started (a call in flight when
# its process is frozen finishes after it wakes, but it started before).
_HANDLER = """
import os, time
def handle(fate, event):
    started = time.time()
    with open(os.path.join({dir!r}, "handled.log"), "a") as f:
        f.write(f"{{event.id}} {{event.foreign_id}} {{os.getpid()}} {{started:.4f}}\\n")
    time.sleep(0.0005)
"""


def _rows(directory: Path) -> list[tuple[int, str, int, float]]:
    rows = []
    path = directory / "handled.log"
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) == 4:
            rows.append((int(parts[0]), parts[1], int(parts[2]), float(parts[3])))
    return rows


def _start_member(
    server: EmbeddedServer, name: str, n: int, directory: Path, member: str, *, quiet: bool = True, concurrency: int = 1
) -> subprocess.Popen[str]:
    args = [
        sys.executable, "-m", "rjet", "worker", name, "elastic_handler:handle", "--group", name, "-n", str(n),
        "--namespace", name, "--elastic", "--member-id", member, "--heartbeat-interval", "0.2", "--heartbeat-ttl",
        "1.0", "--flush-interval", "0.2", "--concurrency", str(concurrency), *(["-q"] if quiet else []),
        "-s", server.url,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(directory) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Its own process group: the test kills or stops the member and its worker processes together,
    # as a host going down or freezing would.
    return subprocess.Popen(
        args, cwd=directory, env=env, start_new_session=True, text=True, stderr=None if quiet else subprocess.PIPE
    )


def _check(rows: list[tuple[int, str, int, float]], events: dict[int, str]) -> int:
    first: dict[int, int] = {}
    per_key: dict[str, list[int]] = {}
    for seq, fid, _, _ in rows:
        assert events[seq] == fid
        if seq not in first:
            first[seq] = 1
            per_key.setdefault(fid, []).append(seq)
    assert sorted(first) == sorted(events), f"lost: {sorted(set(events) - set(first))[:20]}"
    for fid, seqs in per_key.items():
        assert seqs == sorted(seqs), f"key {fid!r} out of order"
    return len(rows) - len(first)


def _group_pids(pgid: int, pids: set[int]) -> set[int]:
    """The processes of ``pids`` in process group ``pgid`` (a member's workers)."""
    out = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pgid:
                out.add(pid)
    return out


async def _stop_members(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGCONT)
            p.send_signal(signal.SIGTERM)
    for p in procs:
        await asyncio.to_thread(p.wait, 30)


@pytest.mark.timeout(60)
async def test_rjet_worker_logs_each_assignment_change_in_one_line(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    (tmp_path / "elastic_handler.py").write_text(textwrap.dedent(_HANDLER.format(dir=str(tmp_path))))
    await insert(stream, 10, keys=5)
    a = _start_member(server, name, 2, tmp_path, "a", quiet=False)
    try:
        await wait_until(lambda: len(_rows(tmp_path)) == 10, 30, "a handling every event")
        b = _start_member(server, name, 2, tmp_path, "b")
        try:
            await asyncio.sleep(2.0)  # b joins: a hands one shard over
        finally:
            b.send_signal(signal.SIGINT)
            await asyncio.to_thread(b.wait, 30)
    finally:
        a.send_signal(signal.SIGINT)
        _, err = await asyncio.to_thread(a.communicate, timeout=30)
    changes = [line for line in err.splitlines() if "member a: assignment" in line]
    assert len(changes) >= 2, err  # all shards alone, then one each with b, then all again
    assert re.search(
        r"member a: assignment \[1, 2\] \(\+\[1, 2\] -\[\]\) of n=2 over 1 live member\(s\): a \[1, 2\]", changes[0]
    )
    assert re.search(
        r"assignment \[\d\] \(\+\[\] -\[\d\]\) of n=2 over 2 live member\(s\): a \[\d\]; b \[\d\]", changes[1]
    )


async def _two_members_handling(
    server: EmbeddedServer, stream: rjet.Stream, name: str, directory: Path, n: int, count: int, concurrency: int = 1
) -> tuple[dict[int, str], subprocess.Popen[str], subprocess.Popen[str], set[int]]:
    """``count`` events, and members a and b (processes) handling them: (events, a, b, a's workers)."""
    (directory / "elastic_handler.py").write_text(textwrap.dedent(_HANDLER.format(dir=str(directory))))
    events = await insert(stream, count, keys=200)
    a, b = (_start_member(server, name, n, directory, m, concurrency=concurrency) for m in "ab")
    try:
        # Both handling: b may take every shard for a moment while a starts (at K=8 under load, b
        # handled an eighth of the events before a's workers handled one).
        def a_workers_seen() -> set[int]:
            return _group_pids(a.pid, {pid for _, _, pid, _ in _rows(directory)})

        await wait_until(
            lambda: len(_rows(directory)) > count // 8 and bool(a_workers_seen()), 60, "both members handling"
        )
        a_workers = a_workers_seen()
    except BaseException:
        await _stop_members(a, b)
        raise
    return events, a, b, a_workers


@pytest.mark.timeout(150)
async def test_a_killed_member_s_shards_resume_on_the_others_within_the_ttl(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    n = 4
    events, a, b, a_workers = await _two_members_handling(server, stream, name, tmp_path, n, 20_000)
    try:
        os.killpg(a.pid, signal.SIGKILL)  # member a and its workers, at once
        killed_at = time.time()
        a.wait(10)
        await wait_until(lambda: {s for s, *_ in _rows(tmp_path)} >= set(events), 90, "every event handled")
    finally:
        await _stop_members(b)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(a.pid, signal.SIGKILL)
    rows = _rows(tmp_path)
    replays = _check(rows, events)
    # The shards a ran, and when b handled each of them first after the kill.
    taken = {shard_of(fid, n) for _, fid, pid, _ in rows if pid in a_workers}
    b_rows = [(t, shard_of(fid, n)) for _, fid, pid, t in rows if t > killed_at and pid not in a_workers]
    resumed = {m: min(t for t, s in b_rows if s == m) for m in taken if any(s == m for _, s in b_rows)}
    gap = max(resumed.values()) - killed_at
    assert set(resumed) == taken
    assert gap < 1.0 + 0.2 + 3.0  # TTL + a heartbeat + the start of a worker process
    print(f"kill: shards taken over={sorted(m + 1 for m in taken)} gap={gap:.2f}s replays={replays} lost=0")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("concurrency", [1, 8])
async def test_a_member_paused_past_its_ttl_is_fenced_and_does_not_handle_again_what_was_taken_over(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, concurrency: int
) -> None:
    n = 4
    events, a, b, a_workers = await _two_members_handling(server, stream, name, tmp_path, n, 30_000, concurrency)
    try:
        os.killpg(a.pid, signal.SIGSTOP)  # a and its workers freeze, buffered events and all
        stopped_at = time.time()
        await asyncio.sleep(3.0)  # three TTLs: b takes a's shards over
        os.killpg(a.pid, signal.SIGCONT)
        woke_at = time.time()
        await wait_until(lambda: {s for s, *_ in _rows(tmp_path)} >= set(events), 90, "every event handled")
    finally:
        await _stop_members(a, b)
    rows = _rows(tmp_path)
    replays = _check(rows, events)
    taken_meanwhile = {seq for seq, _, pid, t in rows if stopped_at < t < woke_at and pid not in a_workers}
    assert taken_meanwhile, "b took nothing over while a was stopped"
    # No handler call of a's workers that started after it woke handled one of those events: they
    # looked at their claims first (the call each had in flight when frozen may finish).
    again = sorted(seq for seq, _, pid, t in rows if pid in a_workers and t > woke_at and seq in taken_meanwhile)
    assert again == []
    print(f"pause: taken over while stopped={len(taken_meanwhile)} handled again by a=0 replays={replays} lost=0")


@pytest.mark.timeout(90)
async def test_status_shows_the_members_their_leases_and_their_shards(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    from test_cli import rjet_cmd

    n = 4
    await insert(stream, 100, keys=10)
    a, b = _member(server, name, n, tmp_path, member_id="alpha"), _member(server, name, n, tmp_path, member_id="beta")
    tasks = [asyncio.create_task(a.run_async()), asyncio.create_task(b.run_async())]
    try:
        await wait_until(lambda: len(_running(a)) == 2 and len(_running(b)) == 2, 20, "two shards each")
        await asyncio.sleep(0.5)  # a heartbeat after the last start
        proc = await asyncio.to_thread(rjet_cmd, "status", name, "--namespace", name, "-s", server.url)
        assert proc.returncode == 0, proc.stderr
        for member, group in (("alpha", a), ("beta", b)):
            shards = ", ".join(f"{name}_{m + 1}_of_{n}" for m in sorted(_running(group)))
            said = " ".join(proc.stdout.split())  # a member's line wraps at spaces to fit the width
            line = rf"member {member} on \S+ pid \d+, lease renewed \S+ ago; runs {shards}"
            assert re.search(line, said), proc.stdout
            for m in _running(group):
                assert re.search(rf"{name}_{m + 1}_of_{n} .*member {member} \(", proc.stdout), proc.stdout
        proc = await asyncio.to_thread(rjet_cmd, "status", name, "--namespace", name, "--json", "-s", server.url)
        leases = [
            json.loads(line) for line in proc.stdout.splitlines() if '"member"' in line and '"cursor"' not in line
        ]
        assert {(r["member"], r["live"], len(r["shards"])) for r in leases} == {("alpha", True, 2), ("beta", True, 2)}
    finally:
        a.stop()
        b.stop()
        await asyncio.gather(*tasks)


@pytest.mark.timeout(90)
async def test_an_elastic_group_on_a_partitioned_stream_with_key_ordered_concurrency(
    server: EmbeddedServer, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    n = 4
    stream = await rjet.Stream.create(js, name, partitions=True)
    events = await insert(stream, 6000, keys=300)
    a = _member(server, name, n, tmp_path, member_id="a", concurrency=8)
    b = _member(server, name, n, tmp_path, member_id="b", concurrency=8)
    tasks = [asyncio.create_task(a.run_async()), asyncio.create_task(b.run_async())]
    await wait_until(lambda: len(_handled(tmp_path)) == len(events), 60, "every event handled")
    await wait_until(lambda: len(_running(a)) == 2 and len(_running(b)) == 2, 20, "two shards each")
    a.stop()
    b.stop()
    summaries = await asyncio.gather(*tasks)
    check_handling(read_logs(tmp_path), n, events)
    assert sum(s.skipped for summary in summaries for s in summary.shards) == 0  # the server filtered
    cursors = await stored_cursors(js, name)
    last = {m: max(seq for seq, fid in events.items() if shard_of(fid, n) == m) for m in range(n)}
    assert {k: v for k, v in cursors.items() if k.startswith(name)} == {
        f"{name}_{m + 1}_of_{n}": str(last[m]) for m in range(n)
    }  # a filtered reader's cursor stops at its own last event


@pytest.mark.timeout(90)
async def test_an_elastic_group_reshards_from_n_to_m_with_every_member_stopped(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path
) -> None:
    events = await insert(stream, 3000, keys=100)
    old = _member(server, name, 2, tmp_path, member_id="a")
    task = asyncio.create_task(old.run_async())
    await wait_until(lambda: len(_handled(tmp_path)) == len(events), 30, "every event handled with n=2")
    old.stop()
    await task
    more = await insert(stream, 3000, keys=100)
    new = [_member(server, name, 3, tmp_path, member_id=m) for m in ("a", "b")]
    tasks = [asyncio.create_task(g.run_async()) for g in new]
    await wait_until(lambda: len(_handled(tmp_path)) == len(events) + len(more), 30, "every event handled with n=3")
    for g in new:
        g.stop()
    await asyncio.gather(*tasks)
    assert any(g.reshard is not None for g in new)  # the first member to start seeded the new shards
    seqs = [seq for rows in read_logs(tmp_path).values() for seq, _, _ in rows]
    assert sorted(set(seqs)) == sorted({**events, **more})
    assert len(seqs) == len(set(seqs))  # every cursor of n=2 was at the end: nothing handled twice
