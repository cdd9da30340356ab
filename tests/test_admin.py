"""rjet.parallel.admin: groups, shards, heartbeats and members read from one read of the bucket by one
liveness rule, so that ``rjet status``, ``rjet group list`` and ``rjet group describe`` agree (#28);
reset, delete and set_cursor. Real servers, real buckets."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from test_cli import rjet_cmd

import rjet
from rjet.parallel import admin
from rjet.parallel._elastic import Membership
from rjet.parallel._keys import Heartbeat, Lease, generation_key, heartbeat_key, lease_key
from rjet.server import EmbeddedServer
from rjet.testing import wait_until


async def _group_with_a_killed_member(js: JetStreamContext, ns: str, stream: str) -> None:
    """Group billing, n=2, elastic: member a runs shard 1 (live lease and heartbeat); member b was
    SIGKILLed 30 s ago (TTL 5 s): its lease and its heartbeat on shard 2 stayed behind, stale.

    a's TTL is 300 s: a stays live while the tests run the command line (a few processes, each a
    second or more on a loaded machine), which a 5 s TTL did not always outlast."""
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        await store.set_cursor("billing_1_of_2", "3")
        await store.set_cursor("billing_2_of_2", "2")
    kv = await js.key_value(f"rjet_cursors_{ns}")
    now, then = time.time(), time.time() - 30
    await kv.put(generation_key("billing"), json.dumps({"n": 2, "seed": "", "fresh_from": 0}).encode())
    await kv.put(lease_key("billing", "a"), Lease("a", "host-a", 11, None, now - 60, now, 300.0, 2).encode())
    await kv.put(lease_key("billing", "b"), Lease("b", "host-b", 22, None, then - 60, then, 5.0, 2).encode())
    await kv.put(heartbeat_key("billing", 0, 2, "run-a"), Heartbeat("run-a", "host-a", 11, 2, now, 300.0, "a").encode())
    await kv.put(heartbeat_key("billing", 1, 2, "run-b"), Heartbeat("run-b", "host-b", 22, 2, then, 5.0, "b").encode())
    _ = stream


async def test_every_view_judges_a_killed_member_and_its_heartbeat_alike(
    server: EmbeddedServer, js: JetStreamContext, stream: rjet.Stream, name: str
) -> None:
    await stream.insert_many([("k", 1, b"")] * 4)
    ns = f"ns_{name}"[:60]
    await _group_with_a_killed_member(js, ns, name)
    store = await admin.open_namespace(js, ns)

    [listed] = await admin.list_groups(store)
    described = await admin.describe_group(store, "billing", stream=await admin.stream_state(js, name))
    for g in (listed, described):
        assert (g.name, g.n, g.running) == ("billing", 2, True)
        assert [m.member for m in g.members] == ["a", "b"]
        assert [m.member for m in g.live_members] == ["a"]
        assert [(m.member, m.live, m.shards) for m in g.members] == [
            ("a", True, ("billing_1_of_2",)),
            ("b", False, ()),
        ]
        assert [[r.member for r in s.running_on] for s in g.shards] == [["a"], []]
        assert [[(r.member, r.live) for r in s.runners] for s in g.shards] == [[("a", True)], [("b", False)]]
    assert [(s.cursor, s.lag_events) for s in described.shards] == [(3, 1), (2, 2)]
    assert described.lag_events == 3
    same = [(m.member, m.live, m.shards) for m in listed.members]
    assert [(m.member, m.live, m.shards) for m in await admin.members(store, "billing")] == same
    beats = await admin.heartbeats(store)
    assert {shard: [r.live for r in rs] for shard, rs in beats.items()} == {
        "billing_1_of_2": [True],
        "billing_2_of_2": [False],
    }
    assert 29 <= beats["billing_2_of_2"][0].age < 60
    rows = {c.name: c for c in await admin.consumers(store, await admin.stream_state(js, name))}
    assert [r.live for r in rows["billing_2_of_2"].runners] == [False]

    # The command line says the same: member b expired, shard 2's heartbeat stale, one live member.
    status = [json.loads(line) for line in rjet_cmd("status", name, "--namespace", ns, "--json", "-s", server.url)
              .stdout.splitlines()]  # fmt: skip
    shards = {r["name"]: r for r in status if "cursor" in r}
    members = {r["member"]: r for r in status if "member" in r and "cursor" not in r}
    assert [r["stale"] for r in shards["billing_2_of_2"]["runners"]] == [True]
    assert [r["stale"] for r in shards["billing_1_of_2"]["runners"]] == [False]
    assert {m: (r["live"], r["shards"]) for m, r in members.items()} == {
        "a": (True, ["billing_1_of_2"]),
        "b": (False, []),
    }
    [group_list] = map(json.loads, rjet_cmd("group", "list", "--namespace", ns, "--json", "-s", server.url)
                       .stdout.splitlines())  # fmt: skip
    group_describe = json.loads(
        rjet_cmd("group", "describe", "billing", "--namespace", ns, "--stream", name, "--json", "-s", server.url).stdout
    )
    for g in (group_list, group_describe):
        assert {m["member"]: m["live"] for m in g["members"]} == {"a": True, "b": False}
        assert [s["running_on"] for s in g["shards"]] == [["member a (host-a pid 11)"], []]
        assert g["running"] is True


async def test_reset_is_a_dry_run_unless_executed_and_refused_while_a_shard_runs(
    js: JetStreamContext, stream: rjet.Stream, name: str
) -> None:
    await stream.insert_many([("k", 1, b"")] * 10)
    ns = f"ns_{name}"[:60]
    await _group_with_a_killed_member(js, ns, name)
    store = await admin.open_namespace(js, ns)

    plan = await admin.reset_group(store, "billing", name, admin.ResetTarget(seq=6))
    assert [(m.name, m.old, m.new) for m in plan.moves] == [("billing_1_of_2", 3, 5), ("billing_2_of_2", 2, 5)]
    assert not plan.executed
    assert await store.peek("billing_1_of_2") == "3"
    with pytest.raises(admin.GroupRunning, match=r"group 'billing' is running \(billing_1_of_2 on member a "):
        await admin.reset_group(store, "billing", name, admin.ResetTarget(latest=True), execute=True)

    kv = store.kv
    await kv.delete(heartbeat_key("billing", 0, 2, "run-a"))  # member a stopped
    plan = await admin.reset_group(store, "billing", name, admin.ResetTarget(shift=-1), execute=True)
    assert [(m.old, m.new) for m in plan.moves] == [(3, 2), (2, 1)]
    assert [await store.peek(s) for s in ("billing_1_of_2", "billing_2_of_2")] == ["2", "1"]
    record = await store.peek_record("billing_1_of_2")
    assert record is not None
    assert record.owner is not None
    assert record.owner.startswith("rjet group reset (")
    with pytest.raises(admin.Refused, match="past the last sequence"):
        await admin.reset_group(store, "billing", name, admin.ResetTarget(seq=20))
    with pytest.raises(rjet.StreamNotFound, match="group 'billing' not reset"):
        await admin.reset_group(store, "billing", f"{name}_gone", admin.ResetTarget(latest=True))
    when = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await stream.insert("k", 1)
    plan = await admin.reset_group(store, "billing", name, admin.ResetTarget(when=when))
    assert {m.new for m in plan.moves} == {10}
    with pytest.raises(rjet.ConfigError, match="exactly one"):
        admin.ResetTarget(latest=True, seq=3)


async def test_delete_lists_every_key_of_the_group_and_purges_them_when_executed(
    js: JetStreamContext, stream: rjet.Stream, name: str
) -> None:
    ns = f"ns_{name}"[:60]
    await _group_with_a_killed_member(js, ns, name)
    store = await admin.open_namespace(js, ns)
    async with await rjet.JetStreamCursorStore.create(js, ns) as other:
        await other.set_cursor("billing_1_of_3", "1")  # an old n: deleted too
        await other.set_cursor("other_1_of_2", "1")  # another group: left alone
    plan = await admin.delete_group(store, "billing")
    assert set(plan.keys) == {
        "billing_1_of_2", "billing_2_of_2", "billing_1_of_3", generation_key("billing"), lease_key("billing", "a"),
        lease_key("billing", "b"), heartbeat_key("billing", 0, 2, "run-a"), heartbeat_key("billing", 1, 2, "run-b"),
    }  # fmt: skip
    assert (plan.rows, plan.executed) == ((), False)
    with pytest.raises(admin.GroupRunning):
        await admin.delete_group(store, "billing", execute=True)
    await store.kv.delete(heartbeat_key("billing", 0, 2, "run-a"))
    assert len((await admin.delete_group(store, "billing", execute=True)).keys) == len(plan.keys) - 1
    with pytest.raises(admin.GroupNotFound, match="no Parallel group 'billing'"):
        await admin.describe_group(store, "billing")
    assert [g.name for g in await admin.list_groups(store)] == ["other"]


async def test_set_cursor_checks_the_stream_and_writes_by_compare_and_swap(
    js: JetStreamContext, stream: rjet.Stream, name: str
) -> None:
    await stream.insert_many([("k", 1, b"")] * 5)
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        with pytest.raises(admin.NeedsStream):
            await admin.set_cursor(store, "c", "3")
        change = await admin.set_cursor(store, "c", "3", stream=name)
        assert (change.old, change.new.cursor) == (None, "3")
        assert change.new.stream is not None
        assert change.new.stream.startswith(f"{name}@")
        change = await admin.set_cursor(store, "c", "last")  # the record names the stream now
        assert (change.old and change.old.cursor, change.new.cursor) == ("3", "5")
        with pytest.raises(admin.Refused, match="past the last sequence"):
            await admin.set_cursor(store, "c", "9")
        with pytest.raises(rjet.ConfigError, match="give a stream sequence"):
            await admin.set_cursor(store, "c", "x1")
        assert (await admin.set_cursor(store, "c", "beginning")).new.cursor == ""
        assert await store.peek("c") == ""
    with pytest.raises(admin.NamespaceNotFound, match=r"cursor namespace 'nope_x' not found \(no KV bucket"):
        await admin.open_namespace(js, "nope_x")
    assert ns in await admin.namespaces(js)


# ----------------------------------------------------------------- expired leases go by themselves (#28)


async def test_a_live_member_deletes_leases_long_expired_and_never_one_written_again(
    js: JetStreamContext, name: str
) -> None:
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns):
        pass
    kv = await js.key_value(f"rjet_cursors_{ns}")
    then = time.time() - 120
    await kv.put(lease_key("g", "dead"), Lease("dead", "h", 1, None, then, then, 1.0, 1).encode())  # gone 119 s
    await kv.put(lease_key("g", "recent"), Lease("recent", "h", 2, None, then, then, 30.0, 1).encode())  # 300 s
    await kv.put(lease_key("g", "back"), Lease("back", "h", 3, None, then, then, 1.0, 1).encode())
    member = Membership(kv, "g", "live", ttl=0.3, max_shards=None, static=False, n=1)
    await member.beat()
    await member.members()
    assert await member.prune() == ()  # just seen: unchanged for less than a TTL by this member's clock
    await asyncio.sleep(0.4)
    await member.members()
    now = time.time()  # "back" comes back between the view and the deletion: its lease stays
    await kv.put(lease_key("g", "back"), Lease("back", "h", 3, None, now, now, 1.0, 1).encode())
    assert await member.prune() == ("dead",)
    store = await admin.open_namespace(js, ns)
    assert [m.member for m in await admin.members(store, "g")] == ["back", "live", "recent"]
    assert await member.prune() == ()  # each view's finds are deleted once


async def test_the_views_say_when_the_live_members_delete_an_expired_lease(
    server: EmbeddedServer, js: JetStreamContext, stream: rjet.Stream, name: str
) -> None:
    await stream.insert_many([("k", 1, b"")] * 4)
    ns = f"ns_{name}"[:60]
    await _group_with_a_killed_member(js, ns, name)  # b: TTL 5 s, written 30 s ago; a live
    store = await admin.open_namespace(js, ns)
    [b] = [m for m in await admin.members(store, "billing") if m.member == "b"]
    assert b.state == "expired"
    assert b.removed_in is not None
    assert 15 < b.removed_in <= 30  # deleted once 60 s old (lease_removal_age(5.0))
    assert admin.lease_removal_age(5.0) == 60.0
    assert admin.lease_removal_age(30.0) == 300.0
    [listed] = await admin.list_groups(store)
    assert [m.removed_in is not None for m in listed.members] == [False, True]

    status = rjet_cmd("status", name, "--namespace", ns, "-s", server.url).stdout
    said = " ".join(status.split())
    deleted = r"its live members delete the leases \(b's in \d+(\.\d)?s; rjet group prune billing --namespace \S+"
    assert re.search(rf"expired: b \(host-b pid 22, \d+s ago\): gone .*; {deleted} --execute: at once\)", said), status
    rows = [json.loads(line) for line in rjet_cmd("status", name, "--namespace", ns, "--json", "-s", server.url)
            .stdout.splitlines()]  # fmt: skip
    [row] = [r for r in rows if r.get("member") == "b"]
    assert 0 < row["removed_in"] <= 30
    described = json.loads(
        rjet_cmd("group", "describe", "billing", "--namespace", ns, "--stream", name, "--json", "-s", server.url).stdout
    )
    assert {m["member"]: m["removed_in"] is not None for m in described["members"]} == {"a": False, "b": True}

    # With no live member left, nobody deletes it: the views say so (prune).
    await store.kv.delete(lease_key("billing", "a"))
    [b] = [m for m in await admin.members(store, "billing") if m.member == "b"]
    assert b.removed_in is None
    text = " ".join(
        rjet_cmd("group", "describe", "billing", "--namespace", ns, "--stream", name, "-s", server.url).stdout.split()
    )
    assert "rjet group prune billing --namespace" in text
    assert "--execute removes their leases" in text
    assert "its live members" not in text


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_running_elastic_member_deletes_the_lease_a_killed_member_left(
    server: EmbeddedServer, stream: rjet.Stream, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    from test_elastic import _member, _running

    await stream.insert_many([("k", 1, b"")] * 10)
    async with await rjet.JetStreamCursorStore.create(js, name):
        pass
    kv = await js.key_value(f"rjet_cursors_{name}")
    then = time.time() - 120
    await kv.put(lease_key(name, "killed"), Lease("killed", "h", 1, None, then, then, 1.0, 1).encode())
    live = _member(server, name, 1, tmp_path, member_id="alive")
    task = asyncio.create_task(live.run_async())
    try:
        await wait_until(lambda: _running(live) == [0], 30, "the live member running its shard")
        store = await admin.open_namespace(js, name)

        async def gone() -> bool:
            return [m.member for m in await admin.members(store, name)] == ["alive"]

        await wait_until(gone, 20, "the killed member's lease deleted")  # was: kept until rjet group prune
    finally:
        live.stop()
        await task


def _stable(c: admin.ConsumerInfo) -> tuple[object, ...]:
    """What a second read at a later moment gives again: all but idle times and ages."""
    return (c.name, c.cursor, c.lag_events, c.note, c.recorded_in, [(r.member, r.live) for r in c.runners])


def _group(g: admin.GroupInfo) -> tuple[object, ...]:
    return (g.name, g.n, g.running, g.cursors, [(m.member, m.live, m.shards) for m in g.members])


async def test_overview_gives_consumers_and_list_groups_from_one_read_of_the_bucket(
    nc: Client, js: JetStreamContext, stream: rjet.Stream, name: str
) -> None:
    await stream.insert_many([("k", 1, b"")] * 4)
    ns = f"ns_{name}"[:60]
    await _group_with_a_killed_member(js, ns, name)
    store = await admin.open_namespace(js, ns)
    state = await admin.stream_state(js, name)

    sent = nc.stats["out_msgs"]
    seen = await admin.overview(store, state)
    one_read = nc.stats["out_msgs"] - sent
    sent = nc.stats["out_msgs"]
    consumers, groups = await admin.consumers(store, state), await admin.list_groups(store)
    two_reads = nc.stats["out_msgs"] - sent

    assert [_stable(c) for c in seen.consumers] == [_stable(c) for c in consumers]
    assert [_group(g) for g in seen.groups] == [_group(g) for g in groups] != []
    assert [c.name for c in seen.consumers] == ["billing_1_of_2", "billing_2_of_2"]
    # The bucket holds 7 keys: a read is one listing and 7 gets; the consumers' idle and lag
    # lookups are the same in both. overview reads the bucket once less.
    assert two_reads - one_read == 8, (one_read, two_reads)
