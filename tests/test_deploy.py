"""Deployments beyond one plain server: a JetStream domain, least-privilege users."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import rjet
from rjet.parallel import Parallel, ShardsFailed
from rjet.server import EmbeddedServer
from rjet.testing import wait_until


def noop(fate: rjet.Fate, event: rjet.Event) -> None:
    pass


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server whose JetStream answers in domain ``hub`` (as a leaf node's would)."""
    conf = tmp_path / "hub.conf"
    conf.write_text("jetstream { domain: hub }\n")
    with EmbeddedServer(extra_args=["-c", str(conf)]) as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_parallel_talks_to_a_jetstream_domain(hub: EmbeddedServer) -> None:
    nc = await rjet.connect(hub.url)
    try:
        js = nc.jetstream(domain="hub")
        stream = await rjet.Stream.create(js, "dom")
        await stream.insert_many([(f"k{i}", 1, b"") for i in range(40)])
        group = Parallel("g", 2, noop, servers=hub.url, stream="dom", namespace="dom", js_domain="hub")
        summary = await group.run_async(to_head=True)
        assert summary.handled == 40
        cursors = await (await rjet.JetStreamCursorStore.create(js, "dom")).cursors()
        assert sorted(v for k, v in cursors.items() if k.startswith("g_")) == ["40", "40"]
        with pytest.raises(rjet.ConfigError, match="js_domain or js_api_prefix"):
            Parallel("g", 2, noop, servers=hub.url, stream="dom", namespace="dom", js_domain="a", js_api_prefix="b")
    finally:
        await nc.close()


# ----------------------------------------------------------------- least privilege

STREAM, NS = "perm", "permns"
BUCKET = f"KV_rjet_cursors_{NS}"
# The minimal permission sets docs/reliability.md documents, as a server config grants them.
INSERTER = [f"{STREAM}.>", f"$JS.API.STREAM.INFO.{STREAM}"]
CONSUMER = [
    f"$JS.API.STREAM.INFO.{STREAM}",
    f"$JS.API.CONSUMER.CREATE.{STREAM}.>",
    f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.>",
    f"$JS.API.CONSUMER.DELETE.{STREAM}.>",
    f"$JS.API.STREAM.INFO.{BUCKET}",
    f"$JS.API.STREAM.MSG.GET.{BUCKET}",
    f"$KV.rjet_cursors_{NS}.>",
]


def _user(name: str, publish: list[str], *, deny: Sequence[str] = (), subscribe: str = "_INBOX.>") -> str:
    def quoted(subjects: Sequence[str]) -> str:
        return ", ".join(f'"{s}"' for s in subjects)

    denied = f", deny: [{quoted(deny)}]" if deny else ""
    grants = f'publish: {{allow: [{quoted(publish)}]{denied}}}, subscribe: {{allow: ["{subscribe}"]}}'
    return f"{{user: {name}, password: pw, permissions: {{{grants}}}}}"


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[EmbeddedServer]:
    users = [
        "{user: admin, password: pw}",
        _user("inserter", INSERTER),
        _user("consumer", CONSUMER),
        _user("no_kv_write", [s for s in CONSUMER if not s.startswith("$KV.")]),
        _user("no_info", [s for s in CONSUMER if s != f"$JS.API.STREAM.INFO.{STREAM}"]),
        _user("no_inbox", [*CONSUMER, *INSERTER], subscribe=f"{STREAM}.>"),  # no _INBOX.>: no request can be answered
        _user("no_heartbeat", CONSUMER, deny=[f"$KV.rjet_cursors_{NS}._rjet.hb.>"]),
        _user("no_group_record", CONSUMER, deny=[f"$KV.rjet_cursors_{NS}._rjet.gen.>"]),
        _user("no_lease", CONSUMER, deny=[f"$KV.rjet_cursors_{NS}._rjet.member.>"]),
        # May read the stream's messages and list streams (what `rjet status` adds), not the bucket's keys.
        _user("no_kv_read", [*(s for s in CONSUMER if "MSG.GET" not in s), *STATUS]),
        _user("no_list", [*CONSUMER, *STATUS[:1]]),
        _user("reader", [*CONSUMER, *STATUS]),  # the documented set of the command-line tools that read
    ]
    conf = tmp_path / "perm.conf"
    _write_accounts(conf, users)
    with EmbeddedServer(extra_args=["-c", str(conf)]) as srv:
        yield srv


STATUS = [f"$JS.API.STREAM.MSG.GET.{STREAM}", "$JS.API.STREAM.LIST"]  # what `rjet status` asks beyond a consumer


def _write_accounts(conf: Path, users: Sequence[str]) -> None:
    conf.write_text(
        "accounts {\n  APP {\n    jetstream: enabled\n    users: [\n      "
        + "\n      ".join(users)
        + "\n    ]\n  }\n}\n"
    )


async def _as(srv: EmbeddedServer, user: str) -> rjet.Stream:
    nc = await rjet.connect(srv.url, user=user, password="pw")
    return rjet.Stream(nc.jetstream(), STREAM)


@pytest.mark.timeout(60)
async def test_the_documented_permissions_are_enough(guarded: EmbeddedServer) -> None:
    admin = await rjet.connect(guarded.url, user="admin", password="pw")
    await rjet.Stream.create(admin.jetstream(), STREAM)
    await (await rjet.JetStreamCursorStore.create(admin.jetstream(), NS)).close()  # the operator makes the bucket
    inserter = await _as(guarded, "inserter")
    await inserter.insert_many([(f"k{i}", 1, b"") for i in range(20)])
    consumer = await _as(guarded, "consumer")
    seen: list[int] = []
    t0 = time.monotonic()
    async with await rjet.JetStreamCursorStore.create(consumer.js, NS) as store:  # no stall, no config change
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(rjet.HeadReached):
            await rjet.run(
                rjet.Spec(consumer.stream, store, rjet.Consumer("c", lambda f, e: seen.append(e.id_int)), to_head=True)
            )
    assert seen == list(range(1, 21))
    assert await (await rjet.JetStreamCursorStore.create(admin.jetstream(), NS)).peek("c") == "20"
    # A Parallel group needs the consumer's set and nothing more once the bucket exists.
    group = Parallel(
        "g", 2, noop, servers=guarded.url, stream=STREAM, namespace=NS,
        connect_options={"user": "consumer", "password": "pw"},
    )  # fmt: skip
    summary = await group.run_async(to_head=True)
    assert summary.handled == 20
    assert [s.state for s in summary.shards] == ["done", "done"]
    for s in (inserter, consumer):
        await s.js._nc.close()
    await admin.close()


@pytest.mark.timeout(60)
async def test_a_missing_permission_is_named_at_once(guarded: EmbeddedServer) -> None:
    admin = await rjet.connect(guarded.url, user="admin", password="pw")
    stream = await rjet.Stream.create(admin.jetstream(), STREAM)
    await stream.insert("k", 1)
    await (await rjet.JetStreamCursorStore.create(admin.jetstream(), NS)).close()
    no_kv = await _as(guarded, "no_kv_write")
    store = await rjet.JetStreamCursorStore.create(no_kv.js, NS)
    t0 = time.monotonic()
    with pytest.raises(rjet.PermissionDenied, match=r"publish to '\$KV\.rjet_cursors_permns\.c'"):
        await rjet.run_forever(rjet.Spec(no_kv.stream, store, rjet.Consumer("c", lambda f, e: None)))
    assert time.monotonic() - t0 < 2.0  # was: a bare 5 s timeout, "cannot read cursor"
    no_info = await _as(guarded, "no_info")
    t0 = time.monotonic()
    with pytest.raises(rjet.PermissionDenied, match=r"\$JS\.API\.STREAM\.INFO\.perm'"):
        await no_info.stream()
    assert time.monotonic() - t0 < 2.0  # was: nats.errors.TimeoutError after 5 s
    for s in (no_kv, no_info):
        await s.js._nc.close()
    await admin.close()


@pytest.mark.timeout(60)
async def test_a_user_who_may_not_subscribe_to_inboxes_is_told_at_once(guarded: EmbeddedServer) -> None:
    admin = await rjet.connect(guarded.url, user="admin", password="pw")
    await (await rjet.Stream.create(admin.jetstream(), STREAM)).insert("k", 1)
    store = await rjet.JetStreamCursorStore.create(admin.jetstream(), NS)
    no_inbox = await _as(guarded, "no_inbox")
    t0 = time.monotonic()
    with pytest.raises(rjet.PermissionDenied, match=r"subscription to '_INBOX\.") as denied:
        await rjet.run(rjet.Spec(no_inbox.stream, store, rjet.Consumer("c", lambda f, e: None)))
    assert time.monotonic() - t0 < 3.0  # was: nats.errors.TimeoutError after 5 s
    assert denied.value.operation == "subscription"
    assert denied.value.subject.startswith("_INBOX.")
    assert denied.value.subject.endswith(".*")  # the one subscription every request's answer comes to
    # Every later request is refused at once too (each subscribes to a new inbox, refused again).
    for call in (
        lambda: rjet.JetStreamCursorStore.create(no_inbox.js, NS),
        lambda: no_inbox.insert("k", 1),
        lambda: rjet.Stream.create(no_inbox.js, STREAM),
        lambda: rjet.run_forever(rjet.Spec(no_inbox.stream, store, rjet.Consumer("c", lambda f, e: None))),
    ):
        t0 = time.monotonic()
        with pytest.raises(rjet.PermissionDenied, match=r"subscription to '_INBOX\."):
            await call()
        assert time.monotonic() - t0 < 3.0
    # insert_many's acks come to an inbox of its own: refused as well, and said at once.
    no_inbox._bind(await rjet.Stream(admin.jetstream(), STREAM).info())  # bound: no request before it
    t0 = time.monotonic()
    with pytest.raises(rjet.PermissionDenied, match=r"subscription to '_INBOX\."):
        await no_inbox.insert_many([("k", 1, b"")] * 3)
    assert time.monotonic() - t0 < 3.0
    await store.close()
    await no_inbox.js._nc.close()
    await admin.close()


@pytest.mark.timeout(60)
async def test_a_parallel_group_whose_heartbeats_are_refused_names_the_subject(guarded: EmbeddedServer) -> None:
    admin = await rjet.connect(guarded.url, user="admin", password="pw")
    await (await rjet.Stream.create(admin.jetstream(), STREAM)).insert("k", 1)
    await (await rjet.JetStreamCursorStore.create(admin.jetstream(), NS)).close()
    group = Parallel(
        "g", 2, noop, servers=guarded.url, stream=STREAM, namespace=NS,
        connect_options={"user": "no_heartbeat", "password": "pw"},
    )  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(rjet.PermissionDenied, match=r"publish to '\$KV\.rjet_cursors_permns\._rjet\.hb\.") as denied:
        await group.run_async(to_head=True)
    assert time.monotonic() - t0 < 3.0  # was: CursorStoreError "cannot write a heartbeat: TimeoutError()" after 5 s
    assert denied.value.operation == "publish"
    await admin.close()


@pytest.mark.timeout(60)
async def test_a_shard_refused_a_permission_in_its_set_up_fails_for_good(guarded: EmbeddedServer) -> None:
    admin = await rjet.connect(guarded.url, user="admin", password="pw")
    await (await rjet.Stream.create(admin.jetstream(), STREAM)).insert("k", 1)
    await (await rjet.JetStreamCursorStore.create(admin.jetstream(), NS)).close()
    # The workers create the dead-letter stream in their set-up; this user may not even look it up.
    group = Parallel(
        "g", 2, noop, servers=guarded.url, stream=STREAM, namespace=NS, dead_letters="permdlq",
        connect_options={"user": "consumer", "password": "pw"}, restart_delay=0.2,
    )  # fmt: skip
    with pytest.raises(ShardsFailed) as failed:
        await asyncio.wait_for(group.run_async(to_head=True), 20)  # was: crashed, restarted with backoff for ever
    assert [(s.state, s.restarts) for s in failed.value.summary.shards] == [("failed", 0), ("failed", 0)]
    assert all(
        "PermissionDenied" in why and "$JS.API.STREAM.INFO.permdlq" in why for why in failed.value.failures.values()
    )
    await admin.close()


async def _operator_made(srv: EmbeddedServer) -> None:
    """The stream with one event, and the cursor bucket with cursor ``c`` = 1, made by the admin."""
    admin = await rjet.connect(srv.url, user="admin", password="pw")
    await (await rjet.Stream.create(admin.jetstream(), STREAM)).insert("k", 1)
    async with await rjet.JetStreamCursorStore.create(admin.jetstream(), NS) as store:
        await store.set_cursor("c", "1")
    await admin.close()


@pytest.mark.timeout(60)
async def test_a_parallel_group_refused_its_records_names_the_subject_at_once(guarded: EmbeddedServer) -> None:
    await _operator_made(guarded)
    for user, subject, elastic in (
        ("no_group_record", r"publish to '\$KV\.rjet_cursors_permns\._rjet\.gen\.g'", False),
        ("no_kv_read", r"publish to '\$JS\.API\.STREAM\.MSG\.GET\.KV_rjet_cursors_permns'", False),
        ("no_lease", r"publish to '\$KV\.rjet_cursors_permns\._rjet\.member\.", True),
    ):
        group = Parallel(
            "g", 2, noop, servers=guarded.url, stream=STREAM, namespace=NS, elastic=elastic,
            connect_options={"user": user, "password": "pw"},
        )  # fmt: skip
        t0 = time.monotonic()
        with pytest.raises(rjet.PermissionDenied, match=subject):
            # was: CursorStoreError "cannot write the generation record" / "cannot read the cursors":
            # TimeoutError() after 5 s; a refused lease: CursorStoreError after 5 s (the lease's delete)
            await group.run_async(to_head=not elastic)
        assert time.monotonic() - t0 < 3.0, user


@pytest.fixture
def reloadable(tmp_path: Path) -> Iterator[tuple[EmbeddedServer, Path]]:
    """A server whose user ``app`` holds the consumer's set until the test rewrites its config
    (``_deny_app``), and the config's path."""
    conf = tmp_path / "reload.conf"
    _write_accounts(conf, ["{user: admin, password: pw}", _user("app", CONSUMER)])
    with EmbeddedServer(extra_args=["-c", str(conf)]) as srv:
        yield srv, conf


def _deny_app(srv: EmbeddedServer, conf: Path, subjects: Sequence[str]) -> None:
    """Take ``subjects`` away from ``app``, now: the server reloads its config (SIGHUP), and applies it
    to the connections it has."""
    _write_accounts(conf, ["{user: admin, password: pw}", _user("app", CONSUMER, deny=subjects)])
    assert srv.pid is not None
    os.kill(srv.pid, signal.SIGHUP)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("elastic", [True, False], ids=["elastic lease", "fixed heartbeats"])
async def test_a_group_whose_lease_or_heartbeat_is_refused_mid_run_stops_with_the_error(
    reloadable: tuple[EmbeddedServer, Path], elastic: bool
) -> None:
    srv, conf = reloadable
    await _operator_made(srv)
    group = Parallel(
        "g", 2, noop, servers=srv.url, stream=STREAM, namespace=NS, elastic=elastic,
        connect_options={"user": "app", "password": "pw"}, heartbeat_interval=0.2, heartbeat_ttl=2.0,
    )  # fmt: skip
    running = asyncio.ensure_future(group.run_async())
    try:
        await wait_until(lambda: [s.state for s in group.statistics().shards] == ["running"] * 2, 30, "both shards")
        _deny_app(srv, conf, [f"$KV.rjet_cursors_{NS}._rjet.{'member' if elastic else 'hb'}.>"])
        t0 = time.monotonic()
        what = "member" if elastic else r"hb\.\d_of_2"
        with pytest.raises(rjet.PermissionDenied, match=rf"publish to '\$KV\.rjet_cursors_permns\._rjet\.{what}\."):
            # was: "cannot write the lease ... (retrying)" / "cannot write a heartbeat ... (retrying)", for ever
            await asyncio.wait_for(asyncio.shield(running), 10)
        assert time.monotonic() - t0 < 3.0
        assert [s.state for s in group.statistics().shards] == ["stopped", "stopped"]  # gracefully
        assert group.worker_pids == {}
    finally:
        if not running.done():
            group.stop(force=True)
            await asyncio.wait([running], timeout=10)


def _rjet_as(srv: EmbeddedServer, home: Path, user: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["XDG_CONFIG_HOME"] = str(home)  # an empty one: no nats CLI context of the machine's
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rjet", *args, "--server", srv.url, "--user", user, "--password", "pw"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    return proc, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_the_command_line_tools_name_a_refused_subject_at_once(guarded: EmbeddedServer, tmp_path: Path) -> None:
    await _operator_made(guarded)
    ok, startup = _rjet_as(guarded, tmp_path, "admin", "cursor", "c", "--namespace", NS)  # a command's own time
    assert (ok.returncode, ok.stdout.strip()) == (0, "1"), ok.stderr
    # The reading tools need the set docs/reliability.md documents, and nothing more.
    for args in (["status", STREAM], ["cursor", "c", "--namespace", NS], ["group", "list", "--namespace", NS]):
        ok, _ = _rjet_as(guarded, tmp_path, "reader", *args)
        assert ok.returncode == 0, (args, ok.stderr)
    kv_read = r"publish to '\$JS\.API\.STREAM\.MSG\.GET\.KV_rjet_cursors_permns'"
    for user, args, subject in (
        # a user who may not read the cursor bucket (was: "cannot read cursor 'c': TimeoutError()" after 5 s
        # from `cursor --set`, "the NATS server did not answer in time" from `group describe`)
        ("no_kv_read", ["cursor", "c", "--namespace", NS], kv_read),
        ("no_kv_read", ["cursor", "c", "--namespace", NS, "--set", "1", "--stream", STREAM], kv_read),
        ("no_kv_read", ["status", STREAM, "--namespace", NS], kv_read),
        ("no_kv_read", ["group", "describe", "g", "--namespace", NS, "--stream", STREAM], kv_read),
        # a consumer's set: no message gets of the stream, no stream listing (was: a timeout after 5 s)
        ("consumer", ["status", STREAM, "--namespace", NS], r"publish to '\$JS\.API\.STREAM\.MSG\.GET\.perm'"),
        ("no_list", ["status", STREAM], r"publish to '\$JS\.API\.STREAM\.LIST'"),
    ):
        proc, took = _rjet_as(guarded, tmp_path, user, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1, (args, proc.stderr)
        assert len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith("rjet: error: permission denied: "), (args, proc.stderr)
        assert re.search(subject, lines[0]), (args, lines[0])
        assert took < startup + 2.0, (args, took, startup)  # was: 5 s more (the API timeout)
