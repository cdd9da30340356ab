"""``rjet deadletters list|show|replay`` on real dead letters: a consumer that always fails records them
through ``rjet.run``; the commands read them back and replay them into their source stream, where a
consumer handles them, round trip."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable

import pytest
from nats.js import JetStreamContext
from test_cli import _one_line_error, rjet_cmd

import rjet
from rjet.deadletter import StoredDeadLetter, record_for
from rjet.server import EmbeddedServer


async def bury(
    js: JetStreamContext,
    source: rjet.Stream,
    dlq_name: str,
    fails: Callable[[rjet.Event], bool],
    *,
    consumer: str = "billing",
    store: rjet.MemCursorStore | None = None,
) -> rjet.MemCursorStore:
    """Run ``consumer`` over ``source`` to its head, failing every event ``fails`` picks: each is
    tried twice and recorded in the dead-letter stream ``dlq_name``. Returns the cursor store."""
    dlq = await rjet.DeadLetterStream.create(js, dlq_name)

    def fn(fate: rjet.Fate, event: rjet.Event) -> None:
        if fails(event):
            raise ValueError(f"cannot bill {event.foreign_id}")

    store = store or rjet.MemCursorStore()
    policy = rjet.DeadLetter(dlq, attempts=2, backoff=0)
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(source.stream, store, rjet.Consumer(consumer, fn, dead_letter=policy), to_head=True))
    return store


async def events(stream: rjet.Stream, after: int = 0) -> list[rjet.Event]:
    async with await stream.stream(str(after) if after else "", to_head=True) as client:
        return [e async for e in client]


def column(stream: str, event_id: str) -> str:
    """The EVENT column of ``list``: stream:event_id in 20 characters, the stream's name cut first."""
    text = f"{stream}:{event_id}"
    return text if len(text) <= 20 else f"{stream[: 20 - len(event_id) - 4]}...:{event_id}"


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, once it exited 0."""
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def test_list_show_replay_round_trip(server: EmbeddedServer, name: str, js: JetStreamContext) -> None:
    url = server.url
    name = name.split("_")[0] + "_orders"  # short, as real names are: the list's text shows whole errors
    source = await rjet.Stream.create(js, name)
    await source.insert_many(
        [("ok-1", 1, b"a"), ("k2", 2, b'{"total": 12}'), ("k3", 3, b"\x00\xff binary"), ("ok-4", 1, b"d")]
    )
    dlq = f"{name}_dlq"
    store = await bury(js, source, dlq, lambda e: e.foreign_id.startswith("k"))
    assert store.cursors == {"billing": "4"}

    # list: a header and one line per dead letter, in 80 columns.
    out = ok(rjet_cmd("deadletters", "list", dlq, "-s", url))
    lines = out.splitlines()
    assert lines[0].split() == ["SEQ", "RECORDED", "(UTC)", "CONSUMER", "EVENT", "ATT", "ERROR"]
    assert len(lines) == 3
    assert all(len(line) <= 80 for line in lines), lines
    assert lines[1].split()[0] == "1"
    assert lines[1].split()[3:] == ["billing", column(name, "2"), "2", "ValueError:", "cannot", "bill", "k2"]
    assert lines[2].split()[3:] == ["billing", column(name, "3"), "2", "ValueError:", "cannot", "bill", "k3"]
    # --json: the full records, one per line.
    out = ok(rjet_cmd("deadletters", "list", dlq, "--json", "-s", url))
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["seq"], r["consumer"], r["stream"], r["event_id"], r["type"], r["foreign_id"]) for r in records] == [
        (1, "billing", name, "2", 2, "k2"),
        (2, "billing", name, "3", 3, "k3"),
    ]
    assert [base64.b64decode(r["metadata"]) for r in records] == [b'{"total": 12}', b"\x00\xff binary"]
    assert [(r["attempts"], r["error"]) for r in records] == [
        (2, "ValueError: cannot bill k2"),
        (2, "ValueError: cannot bill k3"),
    ]
    assert "metadata_omitted" not in records[0]
    # Filters.
    assert ok(rjet_cmd("deadletters", "list", dlq, "--consumer", "shipping", "-s", url)).strip() == (
        f"no dead letters in stream {dlq!r} (with these filters)"
    )
    out = ok(rjet_cmd("deadletters", "list", dlq, "--last", "1", "--json", "-s", url))
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [2]
    out = ok(rjet_cmd("deadletters", "list", dlq, "--since", "2000-01-01T00:00:00Z", "--json", "-s", url))
    assert len(out.splitlines()) == 2
    out = ok(rjet_cmd("deadletters", "list", dlq, "--since", "2999-01-01T00:00:00Z", "-s", url))
    assert out.startswith("no dead letters")

    # show: one record in full.
    out = ok(rjet_cmd("deadletters", "show", dlq, "1", "-s", url))
    shown = dict(line.split(":", 1) for line in out.splitlines())
    shown = {k: v.strip() for k, v in shown.items()}
    assert shown["dead letter"] == f"1 of stream {dlq}"
    assert shown["consumer"] == "billing"
    assert shown["event"] == f"2 of stream {name}"
    assert (shown["type"], shown["foreign id"], shown["attempts"]) == ("2", "k2", "2")
    assert shown["data"] == '(13 bytes) {"total": 12}'
    assert shown["error"] == "ValueError: cannot bill k2"
    out = ok(rjet_cmd("deadletters", "show", dlq, "2", "--json", "-s", url))
    assert json.loads(out) == records[1]
    proc = rjet_cmd("deadletters", "show", dlq, "9", "-s", url)
    assert proc.returncode == 1
    assert _one_line_error(proc) == f"rjet: error: no dead letter 9 in stream {dlq!r} (it holds 1..2)"

    # A dry run says exactly what it would do, and inserts nothing.
    out = ok(rjet_cmd("deadletters", "replay", dlq, "--all", "--dry-run", "-s", url))
    assert out.splitlines() == [
        f"would replay 1 (billing, {name}:2) -> stream {name}: type 2, foreign id k2, 13 bytes (from the record)",
        f"would replay 2 (billing, {name}:3) -> stream {name}: type 3, foreign id k3, 9 bytes (from the record)",
        "dry run: would replay 2, lost 0; nothing inserted (any replayed in the last 2m00s, the duplicate window,"
        " would be skipped)",
    ]
    assert (await source.info()).state.last_seq == 4

    # Replay: the events are in the source stream again, with their type, foreign ID and data.
    out = ok(rjet_cmd("deadletters", "replay", dlq, "--all", "-s", url))
    assert out.splitlines() == [
        f"replayed 1 (billing, {name}:2) -> stream {name} sequence 5",
        f"replayed 2 (billing, {name}:3) -> stream {name} sequence 6",
        "replayed 2, skipped 0 (already replayed), lost 0",
    ]
    again = await events(source, after=4)
    assert [(e.id, e.type, e.foreign_id, e.metadata) for e in again] == [
        ("5", 2, "k2", b'{"total": 12}'),
        ("6", 3, "k3", b"\x00\xff binary"),
    ]
    msg = await js.get_msg(name, 5)
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == f"rjet-replay-{dlq}-1"

    # The consumer, fixed, handles them from where it stopped.
    handled: list[tuple[str, str]] = []
    fixed = rjet.Consumer("billing", lambda f, e: handled.append((e.id, e.foreign_id)))
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(source.stream, store, fixed, to_head=True))
    assert handled == [("5", "k2"), ("6", "k3")]

    # Replayed again within the duplicate window: nothing is stored twice.
    out = ok(rjet_cmd("deadletters", "replay", dlq, "1-2", "-s", url))
    assert out.splitlines() == [
        f"skipped 1 (billing, {name}:2): already replayed (stream {name} sequence 5)",
        f"skipped 2 (billing, {name}:3): already replayed (stream {name} sequence 6)",
        "replayed 0, skipped 2 (already replayed), lost 0",
    ]
    out = ok(rjet_cmd("deadletters", "replay", dlq, "2", "--consumer", "billing", "-s", url))
    assert out.splitlines()[-1] == "replayed 0, skipped 1 (already replayed), lost 0"
    assert (await source.info()).state.last_seq == 6


async def test_data_left_out_of_the_record_is_replayed_from_the_source_until_it_is_purged(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    url = server.url
    source = await rjet.Stream.create(js, name)
    big = b"x" * int(js._nc.max_payload * 0.8)  # base64 in the record would not fit a message
    await source.insert_many([("ok", 1, b""), ("big", 5, big), ("small", 6, b"s")])
    dlq = f"{name}_dlq"
    await bury(js, source, dlq, lambda e: e.foreign_id != "ok")
    [r1, r2] = [json.loads(line) for line in ok(rjet_cmd("deadletters", "list", dlq, "--json", "-s", url)).splitlines()]
    assert (r1["event_id"], r1["metadata"], r1["metadata_omitted"]) == ("2", None, len(big))
    assert r2["event_id"] == "3"
    out = ok(rjet_cmd("deadletters", "show", dlq, "1", "-s", url))
    assert (
        f"data:        not in the record ({len(big)} bytes, too large): stream {name} still holds it at sequence 2"
        in out
    )

    out = ok(rjet_cmd("deadletters", "replay", dlq, "1", "--dry-run", "-s", url))
    assert out.splitlines()[0] == (
        f"would replay 1 (billing, {name}:2) -> stream {name}: type 5, foreign id big, {len(big)} bytes"
        f" (from stream {name} sequence 2)"
    )
    assert (await source.info()).state.last_seq == 3
    out = ok(rjet_cmd("deadletters", "replay", dlq, "1", "-s", url))
    assert out.splitlines() == [
        f"replayed 1 (billing, {name}:2) -> stream {name} sequence 4",
        "replayed 1, skipped 0 (already replayed), lost 0",
    ]
    [replayed] = await events(source, after=3)
    assert (replayed.type, replayed.foreign_id, replayed.metadata == big) == (5, "big", True)

    # The source event is purged: the data is lost, and replay says which dead letter and why.
    await js.purge_stream(name, seq=3)  # removes 1 and 2
    out = rjet_cmd("deadletters", "show", dlq, "1", "-s", url).stdout
    assert f"lost: sequence 2 is no longer in stream {name!r} (removed by its limits or purged)" in out
    for dry in ((), ("--dry-run",)):
        proc = rjet_cmd("deadletters", "replay", dlq, "--all", *dry, "-s", url)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == (
            f"lost 1 (billing, {name}:2): its data was too large for the record, and sequence 2 is no longer in"
            f" stream {name!r} (removed by its limits or purged)"
        )
        assert lines[-1] == (
            "dry run: would replay 1, lost 1; nothing inserted (any replayed in the last 2m00s, the duplicate"
            " window, would be skipped)"
            if dry
            else "replayed 1, skipped 0 (already replayed), lost 1"
        )
        assert _one_line_error(proc) == "rjet: error: 1 dead letter(s) lost: 1"
    assert [e.foreign_id for e in await events(source)] == ["small", "big", "small"]


async def test_what_cannot_be_replayed_is_named_and_a_group_takes_its_shards(
    server: EmbeddedServer, name: str, js: JetStreamContext
) -> None:
    url = server.url
    source = await rjet.Stream.create(js, name)
    await source.insert("k", 1, b"body")
    await js.publish(f"{name}.events", b"", headers={"reflex_type": "x", "rjet_foreign_id": "b"})
    dlq = f"{name}_dlq"
    await bury(js, source, dlq, lambda e: True, consumer="billing_1_of_2")
    sink = rjet.DeadLetterStream(rjet.Stream(js, dlq))
    await sink(record_for("billing_2_of_2", name, "5..9", None, rjet.EventsRemoved(name, 5, 9), 0))
    await rjet.Stream(js, dlq).insert("x", 0, b"not a record")  # something else in the stream

    proc = rjet_cmd("deadletters", "list", dlq, "--consumer", "billing", "-s", url)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert [(r[0], r[3], r[4], r[5]) for r in rows] == [
        ("1", "billing_1_of_2", column(name, "1"), "2"),
        ("2", "billing_1_of_2", column(name, "2"), "1"),
        ("3", "billing_2_of_2", column(name, "5..9"), "0"),
    ]
    assert f"rjet: deadletters: stream {dlq!r} sequence 4: not a dead-letter record" in proc.stderr
    assert ok(rjet_cmd("deadletters", "list", dlq, "--consumer", "billing_2_of_2", "-s", url)).count("\n") == 2

    proc = rjet_cmd("deadletters", "replay", dlq, "--all", "--to-stream", f"{name}_retry", "-s", url)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (  # after the line about sequence 4
        f"rjet: error: stream '{name}_retry' not found (--create makes it): dead letter(s) 1 go there; nothing replayed"
    )
    proc = rjet_cmd(
        "deadletters", "replay", dlq, "--consumer", "billing", "--to-stream", f"{name}_retry", "--create", "-s", url
    )
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"created stream '{name}_retry'",
        f"replayed 1 (billing_1_of_2, {name}:1) -> stream {name}_retry sequence 1",
        f"not replayable 2 (billing_1_of_2, {name}:2): the message was not an rjet event; read it with"
        " `rjet tail --headers`",
        f"not replayable 3 (billing_2_of_2, {name}:5..9): events 5..9 were removed before they were read:"
        " nothing to insert",
        "replayed 1, skipped 0 (already replayed), lost 0, not replayable 2",
    ]
    assert "rjet: error: 2 not replayable: 2, 3" in proc.stderr
    [copy] = await events(rjet.Stream(js, f"{name}_retry"))
    assert (copy.type, copy.foreign_id, copy.metadata) == (1, "k", b"body")
    assert (await source.info()).state.last_seq == 2  # the source stream is left alone

    proc = rjet_cmd("deadletters", "replay", dlq, "7", "1-1", "-s", url)
    assert proc.returncode == 1
    assert (
        proc.stderr.splitlines()[-1]
        == f"rjet: error: no dead letter 7 in stream {dlq!r} (it holds 1..4); nothing replayed"
    )
    proc = rjet_cmd("deadletters", "replay", dlq, "-s", url)
    assert proc.returncode == 2
    assert "say which dead letters to replay" in proc.stderr
    proc = rjet_cmd("deadletters", "list", f"{name}_nope", "-s", url)
    assert proc.returncode == 1
    assert _one_line_error(proc) == f"rjet: error: stream '{name}_nope' not found"


def test_a_record_reads_back_as_it_was_written() -> None:
    from datetime import UTC, datetime

    at = datetime(2026, 12, 1, 8, 0, 3, 123456, tzinfo=UTC)
    event = rjet.Event("7", 3, "order-17", datetime(2026, 12, 1, 8, tzinfo=UTC), b"\x00body")
    whole = rjet.DeadLetterRecord("billing", "orders", "7", event, "ValueError: no", 5, at)
    assert rjet.DeadLetterRecord.from_json(whole.to_json()) == whole
    letter = StoredDeadLetter.parse("dlq", 1, whole.to_json(200))  # too small for the data: left out
    assert (letter.metadata_omitted, letter.record.event and letter.record.event.metadata) == (5, b"")
    assert (letter.source_seq, letter.removed, letter.to_dict()["metadata"]) == (7, None, None)
    gap = rjet.DeadLetterRecord("billing", "orders", "5..9", None, "EventsRemoved: gone", 0, at)
    letter = StoredDeadLetter.parse("dlq", 2, gap.to_json())
    assert (letter.record, letter.removed, letter.source_seq) == (gap, (5, 9), None)
    for bad in (b"not json", b"[]", b'{"consumer": "c"}', whole.to_json().replace(b'"7"', b'"x"')):
        with pytest.raises(rjet.DecodeError, match="sequence 3: not a dead-letter record"):
            StoredDeadLetter.parse("dlq", 3, bad)
