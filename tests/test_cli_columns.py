"""The operator views show only what they say (#28 part 1): ``rjet status STREAM`` lists each cursor
under the stream its record names and those naming none once, apart; elastic members follow STREAM
and --name, expired leases are said apart (and ``rjet group prune`` removes them); status, group
list and group describe give the same answer, in text and JSON; every view and help text fits 80
columns, in a pipe and in a pseudo-terminal, with no name broken and no trailing space."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import pytest
from nats.js import JetStreamContext
from test_cli import _env, rjet_cmd

import rjet
from rjet.parallel import admin
from rjet.parallel._keys import Heartbeat, Lease, generation_key, heartbeat_key, lease_key
from rjet.server import EmbeddedServer

LONG = "billing_consumer_with_a_rather_long_name"  # + _m_of_4: 47 characters
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


async def _scene(js: JetStreamContext, ns: str, ours: str, other: str) -> None:
    """Stream ``ours`` (5 events) read by shards of LONG (n=4) and of elastic group billing (n=2:
    member a runs shard 1, member b was killed 30 s ago and left its lease and its heartbeat on
    shard 2, member c stopped gracefully with a stable id); stream ``other`` (9 events) read by
    elastic group mailer (member m, live) and consumer ``reader``; and ``legacy``, a cursor written by
    a tool: its record names no stream."""
    await (await rjet.Stream.create(js, ours)).insert_many([("k", 1, b"")] * 5)
    await (await rjet.Stream.create(js, other)).insert_many([("k", 1, b"")] * 9)
    async with await rjet.JetStreamCursorStore.create(js, ns) as tool:
        await tool.set_cursor("legacy", "7")
    store = await admin.open_namespace(js, ns)
    for name in [f"{LONG}_{m}_of_4" for m in (1, 2, 3, 4)] + ["billing_1_of_2", "billing_2_of_2"]:
        await admin.set_cursor(store, name, "3", stream=ours)
    for name in ("mailer_1_of_1", "reader"):
        await admin.set_cursor(store, name, "8", stream=other)
    kv = store.kv
    # TTLs: 5 s for b, 300 s for the others, live for the whole test however slow the machine is.
    now, then = time.time(), time.time() - 30
    await kv.put(generation_key("billing"), json.dumps({"n": 2, "seed": "", "fresh_from": 0}).encode())
    await kv.put(lease_key("billing", "a"), Lease("a", "host-a", 11, None, now - 60, now, 300.0, 2).encode())
    await kv.put(lease_key("billing", "b"), Lease("b", "host-b", 22, None, then - 60, then, 5.0, 2).encode())
    await kv.put(lease_key("billing", "c"), Lease("c", "host-c", 33, None, now - 60, now, 300.0, 2, True).encode())
    await kv.put(heartbeat_key("billing", 0, 2, "run-a"), Heartbeat("run-a", "host-a", 11, 2, now, 300, "a").encode())
    await kv.put(heartbeat_key("billing", 1, 2, "run-b"), Heartbeat("run-b", "host-b", 22, 2, then, 5.0, "b").encode())
    await kv.put(lease_key("mailer", "m"), Lease("m", "host-m", 44, None, now - 60, now, 300.0, 1).encode())
    await kv.put(heartbeat_key("mailer", 0, 1, "run-m"), Heartbeat("run-m", "host-m", 44, 1, now, 300, "m").encode())


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _json(*args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _ok(rjet_cmd(*args)).splitlines()]


async def test_status_lists_each_cursor_under_its_stream_and_those_naming_none_apart(
    server: EmbeddedServer, js: JetStreamContext, name: str
) -> None:
    ns, other = f"ns_{name}"[:60], f"{name}_other"
    await _scene(js, ns, name, other)
    url = server.url
    ours = [f"{LONG}_{m}_of_4" for m in (1, 2, 3, 4)] + ["billing_1_of_2", "billing_2_of_2"]
    for stream, mine, theirs in ((name, ours, ["reader", "mailer_1_of_1"]), (other, ["reader", "mailer_1_of_1"], ours)):
        out = _ok(rjet_cmd("status", stream, "--namespace", ns, "-s", url))
        assert "another stream" not in out  # was: legacy (7) "ahead of the stream: another stream's cursor?"
        main, _, apart = out.partition("name no stream")
        assert all(re.search(rf"^{c}\s+\d", main, re.MULTILINE) for c in mine), out
        assert not any(c in out for c in theirs), out
        assert "legacy" not in main, out  # was: under every stream, with a lag made up from its number
        assert len(re.findall(r"^legacy\s+7\s", apart, re.MULTILINE)) == 1, out
        assert "rjet cursor NAME --namespace NS --set SEQ --stream STREAM" in " ".join(apart.split()), out

        rows = {r["name"]: r for r in _json("status", stream, "--namespace", ns, "--json", "-s", url) if "cursor" in r}
        assert set(rows) == {*mine, "legacy"}
        assert (rows["legacy"]["stream"], rows["legacy"]["lag_events"], rows["legacy"]["recorded_in"]) == (
            None, None, None,
        )  # fmt: skip
        assert rows[mine[0]]["stream"] == stream
        assert str(rows[mine[0]]["recorded_in"]).startswith(f"{stream}@")

    # Named, it moves under its stream.
    _ok(rjet_cmd("cursor", "legacy", "--namespace", ns, "--set", "7", "--stream", other, "-s", url))
    assert "legacy" not in _ok(rjet_cmd("status", name, "--namespace", ns, "-s", url))
    out = _ok(rjet_cmd("status", other, "--namespace", ns, "-s", url))
    assert re.search(r"^legacy\s+7\s+2\s", out, re.MULTILINE), out
    assert "name no stream" not in out


async def test_members_follow_the_stream_and_name_and_every_view_says_the_same(
    server: EmbeddedServer, js: JetStreamContext, name: str
) -> None:
    ns, other = f"ns_{name}"[:60], f"{name}_other"
    await _scene(js, ns, name, other)
    url = server.url

    status = _json("status", name, "--namespace", ns, "--json", "-s", url)
    members = {r["member"]: r for r in status if "member" in r}
    assert {m: r["state"] for m, r in members.items()} == {"a": "live", "b": "expired", "c": "stopped"}
    assert "m" not in members  # was: every member of every group of the namespace, whatever STREAM
    out = _ok(rjet_cmd("status", name, "--namespace", ns, "-s", url))
    assert "elastic group billing (namespace" in out
    assert "mailer" not in out
    assert re.search(r"^  member a on host-a pid 11, lease renewed \S+ ago; runs billing_1_of_2$", out, re.MULTILINE)
    assert re.search(r"^  member c on host-c pid 33, stopped \S+ ago: its shards are kept for it", out, re.MULTILINE)
    assert "member b on" not in out  # was: listed as a member "(expired)" until `rjet group delete`
    assert re.search(r"^  expired: b \(host-b pid 22, \d+s ago\): gone", out, re.MULTILINE), out
    out = _ok(rjet_cmd("status", name, "--namespace", ns, "--name", f"{LONG}*", "-s", url))
    assert "billing_1_of_2" not in out
    assert "elastic group" not in out  # was: the members of billing, not asked for
    out = _ok(rjet_cmd("status", other, "--namespace", ns, "-s", url))
    assert "member m on host-m pid 44" in out
    assert "elastic group billing" not in out

    # One answer: status, group list and group describe, in text and in JSON.
    [listed] = [g for g in _json("group", "list", "--namespace", ns, "--json", "-s", url) if g["group"] == "billing"]
    described = json.loads(
        _ok(rjet_cmd("group", "describe", "billing", "--namespace", ns, "--stream", name, "--json", "-s", url))
    )
    for g in (listed, described):
        assert {m["member"]: (m["state"], m["shards"]) for m in g["members"]} == {
            m: (r["state"], r["shards"]) for m, r in members.items()
        }
        shard2 = g["shards"][1]
        assert shard2["running_on"] == []
        assert [(r["member"], r["stale"]) for r in shard2["runners"]] == [("b", True)]
    rows = {r["name"]: r for r in status if "cursor" in r}
    assert [(r["member"], r["stale"]) for r in rows["billing_2_of_2"]["runners"]] == [("b", True)]
    table = _ok(rjet_cmd("group", "list", "--namespace", ns, "-s", url))
    assert "a, c (stopped) (+1 expired)" in table  # was: "a, c", with b in the JSON only
    text = _ok(rjet_cmd("group", "describe", "billing", "--namespace", ns, "--stream", name, "-s", url))
    said = "member b (host-b pid 22) (stale: heartbeat"
    status_text = _ok(rjet_cmd("status", name, "--namespace", ns, "-s", url))
    for view in (text, status_text):  # was: "-" in describe, the stale heartbeat in status
        assert re.search(rf"^billing_2_of_2\s.*{re.escape(said)}", view, re.MULTILINE), view

    # Prune: the expired lease and the stale heartbeat go, nothing else; the views agree again.
    dry = _ok(rjet_cmd("group", "prune", "billing", "--namespace", ns, "-s", url)).splitlines()
    assert dry == [heartbeat_key("billing", 1, 2, "run-b"), lease_key("billing", "b"), "2 key(s) would be deleted"
                   " (a dry run: add --execute)"]  # fmt: skip
    _ok(rjet_cmd("group", "prune", "billing", "--namespace", ns, "--execute", "-s", url))
    store = await admin.open_namespace(js, ns)
    [g] = [g for g in await admin.list_groups(store) if g.name == "billing"]
    assert [m.member for m in g.members] == ["a", "c"]
    assert [[r.run_id for r in s.runners] for s in g.shards] == [["run-a"], []]
    assert await store.peek("billing_2_of_2") == "3"
    assert "expired" not in _ok(rjet_cmd("status", name, "--namespace", ns, "-s", url))


async def test_prune_keeps_a_lease_written_again_and_never_touches_a_live_one(
    js: JetStreamContext, stream: rjet.Stream, name: str
) -> None:
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns):
        pass
    store = await admin.open_namespace(js, ns)
    then = time.time() - 30
    await store.kv.put(lease_key("g", "x"), Lease("x", "h", 1, None, then, then, 5.0, 1).encode())
    await store.kv.put(lease_key("g", "y"), Lease("y", "h", 2, None, then, then, 60.0, 1).encode())  # its TTL: live
    assert await admin.prune_group(store, "g") == (lease_key("g", "x"),)
    now = time.time()
    await store.kv.put(lease_key("g", "x"), Lease("x", "h", 1, None, then, now, 60.0, 1).encode())  # x came back
    assert await admin.prune_group(store, "g", execute=True) == ()
    assert [m.member for m in await admin.members(store, "g")] == ["x", "y"]
    with pytest.raises(admin.GroupNotFound):
        await admin.prune_group(store, "nothing")


# ----------------------------------------------------------------- 80 columns


def _in_a_pipe(args: list[str], columns: int = 80) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "rjet", *args], capture_output=True, text=True, timeout=60,
        env={**_env(), "COLUMNS": str(columns)},
    )  # fmt: skip
    return _ok(proc)


def _in_a_terminal(args: list[str], columns: int = 80) -> str:
    """What ``rjet ARGS`` shows on a terminal ``columns`` wide (a pseudo-terminal; no $COLUMNS)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in _env().items() if k not in ("COLUMNS", "LINES")} | {"TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rjet", *args], stdin=follower, stdout=follower, stderr=subprocess.PIPE, env=env
    )
    os.close(follower)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the terminal's other end has closed
        while chunk := os.read(leader, 65536):
            chunks.append(chunk)
    os.close(leader)
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    return _ANSI.sub("", b"".join(chunks).decode()).replace("\r\n", "\n")


def _fits(out: str, where: str, names: tuple[str, ...] = ()) -> None:
    lines = out.splitlines()
    assert lines, where
    for line in lines:
        assert len(line) <= 80, f"{where}: {len(line)} columns: {line!r}\n{out}"
        assert line == line.rstrip(), f"{where}: trailing spaces: {line!r}"
    for name in names:  # each whole on a line: never broken
        assert any(re.search(rf"(^|\s){re.escape(name)}(\s|,|;|$)", line) for line in lines), f"{where}: {name}\n{out}"


async def test_the_views_fit_80_columns_in_a_pipe_and_a_terminal(
    server: EmbeddedServer, js: JetStreamContext, name: str
) -> None:
    ns, other = f"ns_{name}"[:60], f"{name}_other"
    await _scene(js, ns, name, other)
    url = server.url
    shards = (*(f"{LONG}_{m}_of_4" for m in (1, 2, 3, 4)), "billing_1_of_2", "billing_2_of_2", "legacy")
    views = [
        (["status", name, "--namespace", ns, "-s", url], shards),
        (["group", "list", "--namespace", ns, "-s", url], (LONG, "billing", "mailer")),
        (["group", "describe", LONG, "--namespace", ns, "--stream", name, "-s", url], shards[:4]),
        (["group", "describe", "billing", "--namespace", ns, "--stream", name, "-s", url], shards[4:6]),
    ]
    for args, names in views:
        piped = await asyncio.to_thread(_in_a_pipe, args)  # was: status 131 columns, trailing spaces
        _fits(piped, f"{args[0]} in a pipe", names)
        shown = await asyncio.to_thread(_in_a_terminal, args)  # was: billing_1_ / of_4, member lines of 106
        _fits(shown, f"{args[0]} on a terminal", names)
    wide = await asyncio.to_thread(_in_a_pipe, views[0][0], 200)  # wider: one line a consumer
    assert re.search(rf"^{LONG}_4_of_4\s+3\s+2\s+\S+\s+\S+ ago\s+-$", wide, re.MULTILINE), wide


@pytest.mark.parametrize(
    "command",
    [["insert"], ["tail"], ["status"], ["cursor"], ["group"], ["group", "reset"], ["group", "prune"], ["worker"],
     ["deadletters"], ["deadletters", "list"], ["deadletters", "replay"], ["demo"], ["server"], ["bench"]],
    ids=" ".join,
)  # fmt: skip
def test_help_texts_fit_80_columns(command: list[str]) -> None:
    _fits(_in_a_pipe([*command, "--help"]), f"{' '.join(command)} --help in a pipe")  # was: lines of 81-101
    _fits(_in_a_terminal([*command, "--help"]), f"{' '.join(command)} --help on a terminal")


# ----------------------------------------------------------------- small ones


def test_cursor_set_of_anything_but_a_position_is_a_usage_error() -> None:
    proc = rjet_cmd("cursor", "c", "--namespace", "ns", "--set", "abc", "-s", "nats://127.0.0.1:1")
    assert proc.returncode == 2, proc.stderr  # was: 1, as for a failure at run time
    assert "Invalid value for '--set': 'abc': give a stream sequence, 'first', 'last' or 'beginning'" in proc.stderr


def test_consumer_stats_need_no_name() -> None:
    stats = rjet.ConsumerStats(timing=True)  # was: TypeError, a name the README never shows
    assert stats.snapshot().name == ""
    assert rjet.ConsumerStats("mailer").snapshot().name == "mailer"
