"""Deployments beyond one plain server: a JetStream domain, least-privilege users."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import rjet
from rjet.parallel import Parallel, ShardsFailed
from rjet.server import EmbeddedServer


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
    ]
    conf = tmp_path / "perm.conf"
    conf.write_text(
        "accounts {\n  APP {\n    jetstream: enabled\n    users: [\n      "
        + "\n      ".join(users)
        + "\n    ]\n  }\n}\n"
    )
    with EmbeddedServer(extra_args=["-c", str(conf)]) as srv:
        yield srv


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
