"""Interop with Go rjet and other NATS clients (docs/interop.md): each row of its tables, on a real
server, with the messages published as raw frames (a nats-py header dict cannot hold a repeated
header or bytes that are not UTF-8).

Each message is read by rjet on both lanes (its own frame parser, and nats-py's plain subscription,
which ``RJET_FAST_PATHS=0`` makes the only one) and by :func:`go_reads`, Go rjet's ``parseEvent``
redone on the stored header block, so the tables say what both sides see.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

import rjet
from rjet._nats.client import hpub
from rjet.server import EmbeddedServer

LANES = pytest.mark.parametrize("fast_lane", [True, False], ids=["fast", "nats-py"])


# ----------------------------------------------------------------- the other side


async def publish_raw(nc: Client, subject: str, block: bytes | None, body: bytes = b"") -> int:
    """Publish one message as the wire frame ``block`` makes it (``HPUB``, or ``PUB`` without one);
    returns its stream sequence, once stored."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    if block is None:
        frame = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), inbox.encode(), len(body), body)
    else:
        frame = hpub(subject.encode(), inbox.encode(), block, body)
    await nc._send_command(frame)
    await nc.flush()
    ack = json.loads((await sub.next_msg(timeout=5)).data)
    assert "seq" in ack, ack
    return int(ack["seq"])


async def stored(nc: Client, stream: str, seq: int) -> tuple[str, bytes]:
    """(subject, raw header block) of a stored message, as the server holds it."""
    reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode(), timeout=5)
    msg = json.loads(reply.data)["message"]
    return msg["subject"], base64.b64decode(msg.get("hdrs", ""))


def go_header_get(block: bytes, name: str) -> str:
    """nats.go's ``Header.Get``: the first value of exactly that (case-sensitive) name, '' if none."""
    for line in block.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key == name.encode():
            return value.strip(b" \t").decode("utf-8", "surrogateescape")  # a Go string holds any bytes
    return ""


def go_atoi(text: str) -> int:
    """Go's ``strconv.Atoi`` on a 64-bit platform: ValueError where Go returns an error."""
    body = text[1:] if text[:1] in "+-" else text
    if not body or not body.isascii() or not body.isdigit():
        raise ValueError(f"strconv.Atoi: parsing {text!r}: invalid syntax")
    n = int(text)
    if not -(2**63) <= n < 2**63:
        raise ValueError(f"strconv.Atoi: parsing {text!r}: value out of range")
    return n


def go_path_unescape(text: str) -> str:
    """Go's ``url.PathUnescape``: ``%XX`` escapes decoded, '+' kept; ValueError on a bad escape."""
    raw = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == ord("%"):
            pair = raw[i + 1 : i + 3]
            if len(pair) < 2 or any(c not in b"0123456789abcdefABCDEF" for c in pair):
                raise ValueError(f"invalid URL escape {raw[i : i + 3]!r}")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def go_reads(subject: str, block: bytes) -> tuple[int, str, str]:
    """Go rjet's ``parseEvent`` on a stored message: (Type, ForeignID, and the ForeignID that
    ``WithForeignIDParser`` with ``url.PathUnescape`` of ``rjet_foreign_id`` gives)."""
    value = go_header_get(block, "reflex_type")
    typ = go_atoi(value) if value else 0
    fid = go_header_get(block, "rjet_foreign_id")
    return typ, subject, go_path_unescape(fid) if fid else subject


async def rjet_reads(js: JetStreamContext, name: str, fast_lane: bool) -> list[rjet.Event | rjet.DecodeError]:
    """Every message of the stream as rjet's reader decodes it, on one lane (an undecodable one as its error)."""
    stream = rjet.Stream(js, name, read=rjet.ReadConfig(fast_lane=fast_lane))
    out: list[rjet.Event | rjet.DecodeError] = []
    after = ""
    while True:
        async with await stream.stream(after, to_head=True) as client:
            try:
                async for event in client:
                    out.append(event)  # noqa: PERF401 (one by one: those before a DecodeError count too)
                return out
            except rjet.DecodeError as e:
                out.append(e)
                after = str(e.seq)


# ----------------------------------------------------------------- what Go rjet sees of rjet's inserts

TRICKY_IDS = ["order-17", "a b", "1+2", "100%", "ü/ß", "tab\there", "日本", " lead"]


async def test_a_go_reader_sees_rjets_type_and_recovers_the_foreign_id_with_path_unescape(
    nc: Client, js: JetStreamContext, stream: rjet.Stream
) -> None:
    seqs = await stream.insert_many([(fid, i, b"{}") for i, fid in enumerate(TRICKY_IDS)])
    seqs.append(await stream.insert("k", 2**63 - 1))
    for seq, (fid, typ) in zip(seqs, [*((f, i) for i, f in enumerate(TRICKY_IDS)), ("k", 2**63 - 1)], strict=True):
        subject, block = await stored(nc, stream.name, seq)
        go_type, go_fid, go_recipe = go_reads(subject, block)
        assert (go_type, go_fid, go_recipe) == (typ, f"{stream.name}.events", fid)
    # QueryUnescape (Python's unquote_plus) is the wrong recipe: it reads '+' as a space.
    _, block = await stored(nc, stream.name, seqs[2])
    assert go_header_get(block, "rjet_foreign_id") == "1+2"


# ----------------------------------------------------------------- how rjet reads other clients' messages

# (row name, header block or None, what rjet and Go read: (type, foreign ID) with None for the
# subject, or the DecodeError's text for rjet and "error" for Go).
ROWS: list[tuple[str, bytes | None, tuple[int, str | None] | str]] = [
    ("no headers", None, (0, None)),
    ("go-style type only", b"NATS/1.0\r\nreflex_type: 5\r\n\r\n", (5, None)),
    ("go-style with other headers", b"NATS/1.0\r\nTrace-Id: x\r\nreflex_type: 6\r\nrjet_foreign_id: u-1\r\n\r\n",
     (6, "u-1")),
    ("repeated type: the first wins", b"NATS/1.0\r\nreflex_type: 9\r\nreflex_type: 10\r\n\r\n", (9, None)),
    ("repeated, rjet's layout first", b"NATS/1.0\r\nreflex_type: 9\r\nrjet_foreign_id: k\r\nreflex_type: 10\r\n"
     b"rjet_foreign_id: j\r\n\r\n", (9, "k")),
    ("repeated foreign ID", b"NATS/1.0\r\nreflex_type: 1\r\nrjet_foreign_id: k\r\nrjet_foreign_id: j\r\n\r\n",
     (1, "k")),
    ("canonical-case name is another header", b"NATS/1.0\r\nReflex_type: 5\r\nRjet_foreign_id: k\r\n\r\n", (0, None)),
    ("empty type", b"NATS/1.0\r\nreflex_type:\r\nrjet_foreign_id: k\r\n\r\n", (0, "k")),
    ("blank type", b"NATS/1.0\r\nreflex_type:   \r\n\r\n", (0, None)),
    ("signed types", b"NATS/1.0\r\nreflex_type: -3\r\n\r\n", (-3, None)),
    ("plus sign", b"NATS/1.0\r\nreflex_type: +4\r\n\r\n", (4, None)),
    ("largest int64", b"NATS/1.0\r\nreflex_type: 9223372036854775807\r\n\r\n", (2**63 - 1, None)),
    ("past int64", b"NATS/1.0\r\nreflex_type: 9223372036854775808\r\n\r\n", "is outside the 64-bit integer range"),
    ("digit separators", b"NATS/1.0\r\nreflex_type: 1_0\r\n\r\n", "header reflex_type '1_0' is not an integer"),
    ("not a number", b"NATS/1.0\r\nreflex_type: created\r\n\r\n", "header reflex_type 'created' is not an integer"),
    ("raw UTF-8 foreign ID", "NATS/1.0\r\nreflex_type: 1\r\nrjet_foreign_id: café\r\n\r\n".encode(), (1, "café")),
    ("another raw UTF-8 foreign ID", "NATS/1.0\r\nreflex_type: 1\r\nrjet_foreign_id: cafè\r\n\r\n".encode(),
     (1, "cafè")),
    ("percent-encoded UTF-8", b"NATS/1.0\r\nreflex_type: 1\r\nrjet_foreign_id: caf%C3%A9\r\n\r\n", (1, "café")),
    ("foreign ID not UTF-8", b"NATS/1.0\r\nreflex_type: 1\r\nrjet_foreign_id: caf\xe9\r\n\r\n",
     r"header rjet_foreign_id b'caf\xe9' is not UTF-8 (b'\xe9' at byte 3"),
]  # fmt: skip


@LANES
@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
async def test_other_clients_messages_read_as_go_rjet_reads_them(
    nc: Client, js: JetStreamContext, name: str, fast_lane: bool, row: tuple[str, bytes | None, Any]
) -> None:
    what, block, want = row
    await rjet.Stream.create(js, name)
    seq = await publish_raw(nc, f"{name}.other", block, b"body")
    [got] = await rjet_reads(js, name, fast_lane)
    subject, stored_block = await stored(nc, name, seq)
    assert stored_block == (block or b"")
    try:
        go: tuple[int, str] | str = go_reads(subject, stored_block)[::2]  # (Type, the recipe's ForeignID)
    except ValueError:
        go = "error"
    if isinstance(want, str):
        assert isinstance(got, rjet.DecodeError), got
        assert f"sequence {seq}: " in str(got)
        assert want in str(got)
        assert go == "error" or what == "foreign ID not UTF-8"  # a Go string holds any bytes
    else:
        assert isinstance(got, rjet.Event), got
        typ, fid = want
        assert (got.type, got.foreign_id, got.metadata) == (typ, fid or subject, b"body")
        assert go == (typ, fid or subject)


@LANES
async def test_a_repeated_type_is_handled_by_a_consumer_of_the_first_on_either_lane(
    nc: Client, js: JetStreamContext, name: str, fast_lane: bool
) -> None:
    stream = await rjet.Stream.create(js, name, read=rjet.ReadConfig(fast_lane=fast_lane))
    await publish_raw(nc, f"{name}.events", b"NATS/1.0\r\nreflex_type: 9\r\nreflex_type: 10\r\n\r\n")
    await stream.insert("k", 10)
    handled: list[tuple[int, int]] = []
    consumer = rjet.Consumer("nines", lambda fate, e: handled.append((e.id_int, e.type)), types=[9])
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(stream.stream, rjet.MemCursorStore(), consumer, to_head=True))
    assert handled == [(1, 9)]


@LANES
async def test_raw_non_ascii_foreign_ids_are_distinct_keys_for_a_key_filter(
    nc: Client, js: JetStreamContext, name: str, fast_lane: bool
) -> None:
    stream = await rjet.Stream.create(js, name, read=rjet.ReadConfig(fast_lane=fast_lane))
    for fid in ["café", "cafè", "café"]:
        block = f"NATS/1.0\r\nreflex_type: 1\r\nrjet_foreign_id: {fid}\r\n\r\n".encode()  # raw UTF-8
        await publish_raw(nc, f"{name}.events", block)
    async with await stream.stream(to_head=True, key_filter={"café"}.__contains__) as client:
        assert [(e.id_int, e.foreign_id) async for e in client] == [(1, "café"), (3, "café")]


def _tail(*args: str, config_home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["XDG_CONFIG_HOME"] = str(config_home)
    return subprocess.run(
        [sys.executable, "-m", "rjet", "tail", *args], capture_output=True, text=True, timeout=60, env=env
    )  # fmt: skip


async def test_tail_headers_shows_the_type_decoded_from_the_first_and_every_value(
    server: EmbeddedServer, nc: Client, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    await rjet.Stream.create(js, name)
    block = "NATS/1.0\r\nreflex_type: 9\r\nrjet_foreign_id: café\r\nreflex_type: 10\r\n\r\n".encode()
    await publish_raw(nc, f"{name}.events", block, b"x")
    proc = await asyncio.to_thread(_tail, name, "--to-head", "--headers", "-s", server.url, config_home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fields = proc.stdout.rstrip("\n").split("\t")
    assert fields[2:4] == ["9", "café"]
    headers: dict[str, Any] = json.loads(fields[4])
    assert headers == {"reflex_type": ["9", "10"], "rjet_foreign_id": "café"}
