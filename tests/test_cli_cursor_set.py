"""``rjet cursor --set`` and ``rjet group reset --execute`` keep the cursor's promises: each record they
write names the stream it counts in, each position is checked against that stream, and a running
consumer is fenced by a conflict that names the tool."""

from __future__ import annotations

import asyncio

import pytest
from nats.js import JetStreamContext
from test_cli import _one_line_error, rjet_cmd

import rjet
from rjet.reader import stream_identity as _identity
from rjet.server import EmbeddedServer
from rjet.testing import wait_until


async def _record(js: JetStreamContext, ns: str, cursor: str) -> rjet.CursorRecord | None:
    async with await rjet.JetStreamCursorStore.bind(js, ns) as store:
        return await store.peek_record(cursor)


def _noop(fate: rjet.Fate, event: rjet.Event) -> None:
    pass


async def test_set_records_the_stream_so_a_recreated_stream_raises_stream_recreated(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 10)
    identity = _identity(await stream.info())
    ns = f"ns_{name}"[:60]
    proc = rjet_cmd("cursor", "c", "--namespace", ns, "--set", "5", "--stream", name, "-s", server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "c: (none) -> 5"
    record = await _record(js, ns, "c")
    assert record is not None
    assert (record.cursor, record.stream) == ("5", identity)  # was: no stream recorded
    assert record.owner is not None
    assert record.owner.startswith("rjet cursor --set (")
    # A sequence without --stream counts in the stream the record names.
    proc = rjet_cmd("cursor", "c", "--namespace", ns, "--set", "7", "-s", server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "c: 5 -> 7"
    assert (rec := await _record(js, ns, "c")) is not None
    assert (rec.cursor, rec.stream) == ("7", identity)

    # The stream is deleted and created again: the cursor's 7 is not the new stream's 7.
    await js.delete_stream(name)
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 10)
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        with pytest.raises(rjet.StreamRecreated):  # was: events 8..10 read, 1..7 skipped silently
            await rjet.run(rjet.Spec(stream.stream, store, rjet.Consumer("c", _noop), to_head=True))
    # Without --stream a sequence is refused: it may have been read from the old stream's cursor.
    proc = rjet_cmd("cursor", "c", "--namespace", ns, "--set", "3", "-s", server.url)
    assert proc.returncode == 1
    assert "deleted and created again" in _one_line_error(proc)
    assert f"--stream {name}" in _one_line_error(proc)
    proc = rjet_cmd("cursor", "c", "--namespace", ns, "--set", "3", "--stream", name, "-s", server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("c: 7 -> 3 (stream ")
    new_identity = _identity(await stream.info())
    assert (rec := await _record(js, ns, "c")) is not None
    assert (rec.cursor, rec.stream) == ("3", new_identity)
    # 'beginning' names the stream too (the record's, as it is now).
    proc = rjet_cmd("cursor", "c", "--namespace", ns, "--set", "beginning", "-s", server.url)
    assert proc.returncode == 0, proc.stderr
    assert (rec := await _record(js, ns, "c")) is not None
    assert (rec.cursor, rec.stream) == ("", new_identity)


async def test_set_refuses_positions_the_stream_cannot_mean(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    stream = await rjet.Stream.create(js, name, max_msgs=5)
    await stream.insert_many([("k", 1, b"")] * 10)  # 1..5 removed: first 6, last 10
    other = await rjet.Stream.create(js, f"{name}_b")
    await other.insert_many([("k", 1, b"")] * 3)
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        await store.set_cursor("plain", "8")  # a record that names no stream (rjet 0.1, or a hand-written one)
    url = server.url

    def cmd(cursor: str, *args: str) -> tuple[int, str, str]:
        proc = rjet_cmd("cursor", cursor, "--namespace", ns, *args, "-s", url)
        return proc.returncode, proc.stdout.strip(), proc.stderr

    code, _, err = cmd("plain", "--set", "9")  # was: accepted, and stored without a stream
    assert code == 2
    assert "--set 9 needs --stream" in err
    code, _, err = cmd("plain", "--set", "9", "--stream", "nosuch")  # was: accepted
    assert code == 1
    assert "stream 'nosuch' not found: cursor 'plain' not moved" in err
    code, _, err = cmd("plain", "--set", "999999", "--stream", name)  # was: accepted (CursorAhead at the next run)
    assert code == 1
    assert f"999999 is past the last sequence of stream {name!r} (10)" in err
    code, _, err = cmd("plain", "--set", "2", "--stream", name)  # was: accepted (CursorExpired at the next run)
    assert code == 1
    assert "events 3..5 were removed" in err
    assert "--skip-removed" in err
    assert (rec := await _record(js, ns, "plain")) is not None
    assert (rec.cursor, rec.stream) == ("8", None)  # nothing written
    code, out, err = cmd("plain", "--set", "2", "--stream", name, "--skip-removed")
    assert code == 0, err
    assert out == (
        f"plain: 8 -> 5 (events 3..5 were removed from stream {name!r} (its first retained sequence is 6): skipped)"
    )
    code, out, err = cmd("plain", "--set", "5", "--stream", name)  # the sequence before the first retained: fine
    assert code == 0, err

    # A cursor of stream A is not set "for" stream B.
    code, _, err = cmd("plain", "--set", "1", "--stream", f"{name}_b")  # was: accepted
    assert code == 1
    assert f"counts in stream {name!r}" in err
    assert f"not in {name + '_b'!r}" in err
    code, _, err = cmd("plain", "--set", "last", "--stream", f"{name}_b")
    assert code == 1
    assert (rec := await _record(js, ns, "plain")) is not None
    assert (rec.cursor, rec.stream) == ("5", _identity(await stream.info()))
    # Starting it over on B is a deliberate 'beginning' with B named.
    code, out, err = cmd("plain", "--set", "beginning", "--stream", f"{name}_b")
    assert code == 0, err
    code, out, err = cmd("plain", "--set", "2")
    assert (code, out) == (0, "plain: (none) -> 2"), err
    assert (rec := await _record(js, ns, "plain")) is not None
    assert (rec.cursor, rec.stream) == ("2", _identity(await other.info()))


async def test_set_fences_a_running_consumer_with_a_conflict_naming_the_tool(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 3)
    ns = f"ns_{name}"[:60]
    handled: list[str] = []
    store = await rjet.JetStreamCursorStore.create(js, ns, flush_interval=0.05)
    consumer = rjet.Consumer("c", lambda fate, event: handled.append(event.id))
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, store, consumer)))
    try:
        await wait_until(lambda: len(handled) == 3, 10, "3 events handled")
        await wait_until(lambda: store.last_written("c") == "3", 10, "cursor 3 written")
        proc = await asyncio.to_thread(rjet_cmd, "cursor", "c", "--namespace", ns, "--set", "1", "--stream", name,
                                       "-s", server.url)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "c: 3 -> 1"
        await stream.insert("k", 1, b"")  # the runner handles it, and its next write is fenced
        with pytest.raises(rjet.CursorConflict, match=r"owner rjet cursor --set \("):
            await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
    assert (rec := await _record(js, ns, "c")) is not None
    assert rec.cursor == "1"  # the tool's write stands


async def test_group_reset_records_the_stream_checks_positions_and_fences_runners(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    stream = await rjet.Stream.create(js, name, max_msgs=20)
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(30)])  # first 11, last 30
    identity = _identity(await stream.info())
    ns = f"ns_{name}"[:60]
    url = server.url
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        for shard in ("g_1_of_2", "g_2_of_2"):
            await store.set_cursor(shard, "25")  # written without a stream (as rjet 0.1 did)

    def reset(*args: str) -> tuple[int, str, str]:
        proc = rjet_cmd("group", "reset", "g", "--namespace", ns, *args, "-s", url)
        return proc.returncode, proc.stdout, proc.stderr

    code, _, err = reset("--stream", "nosuch", "--to-latest")
    assert code == 1
    assert "stream 'nosuch' not found: group 'g' not reset" in err
    code, _, err = reset("--stream", name, "--to-seq", "40", "--execute")  # was: written, CursorAhead later
    assert code == 1
    assert f"is past the last sequence of stream {name!r} (30)" in err
    code, _, err = reset("--stream", name, "--to-seq", "3", "--execute")  # was: written, CursorExpired later
    assert code == 1
    assert "events 3..10 were removed" in err
    code, out, err = reset("--stream", name, "--shift-by", "-100")  # replaying stops at the first retained event
    assert code == 0, err
    assert "g_1_of_2: 25 -> 10" in out

    # A runner of one shard (no group heartbeat: not refused) is fenced by the write, which names the tool.
    handled: list[str] = []
    runner = await rjet.JetStreamCursorStore.create(js, ns, flush_interval=0.05)
    consumer = rjet.Consumer("g_1_of_2", lambda fate, event: handled.append(event.id))
    task = asyncio.create_task(rjet.run(rjet.Spec(stream.stream, runner, consumer)))
    try:
        await wait_until(lambda: len(handled) == 5, 10, "5 events handled")
        await wait_until(lambda: runner.last_written("g_1_of_2") == "30", 10, "cursor 30 written")
        code, out, err = await asyncio.to_thread(reset, "--stream", name, "--to-seq", "3", "--skip-removed",
                                                 "--execute")  # fmt: skip
        assert code == 0, err
        assert "g_1_of_2: 30 -> 10" in out
        assert "g_2_of_2: 25 -> 10" in out
        assert "events 3..10 were removed" in err
        await stream.insert("k", 1, b"")
        with pytest.raises(rjet.CursorConflict, match=r"owner rjet group reset \("):
            await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.close()
    for shard in ("g_1_of_2", "g_2_of_2"):
        assert (rec := await _record(js, ns, shard)) is not None
        assert (rec.cursor, rec.stream) == ("10", identity)  # was: no stream recorded
        assert (rec.owner or "").startswith("rjet group reset (")

    # Shard cursors recorded in another stream are not reset "for" this one.
    other = await rjet.Stream.create(js, f"{name}_b")
    await other.insert_many([("k", 1, b"")] * 3)
    code, _, err = reset("--stream", f"{name}_b", "--to-earliest", "--execute")
    assert code == 1
    assert f"counts in stream {name!r}" in err
    assert (rec := await _record(js, ns, "g_2_of_2")) is not None
    assert (rec.cursor, rec.stream) == ("10", identity)
