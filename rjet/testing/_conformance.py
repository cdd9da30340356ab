"""The referee between :class:`rjet.testing.MemoryStream` and the real :class:`rjet.Stream`.

:func:`check_stream` runs the same inserts, reads, removals, re-creations and runs on a fresh stream
from a factory and compares what happened (events, errors with their messages, cursors, dead
letters) with one expected transcript, written down once from a real stream on a nats-server. rjet's
own tests run it over both (``tests/test_stream_conformance.py``): a difference fails.

Transcripts name no stream: a stream's name is written ``<stream>`` (``<dlq>`` for a dead-letter
stream) and identities ``<id1>``, ``<id2>``... in the order they first appear.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Protocol

from rjet.consumer import Batch, Consumer
from rjet.cursors import MemCursorStore
from rjet.deadletter import DeadLetter, DeadLetterSink
from rjet.errors import EventsRemoved, HeadReached, RjetError, Tempted
from rjet.event import Event
from rjet.fate import Fate
from rjet.reader import ReadConfig
from rjet.retry import RetryPolicy
from rjet.run import Spec, StreamClientLike, run, run_forever

__all__ = ["ConformingClient", "ConformingStream", "StreamFactory", "check_stream"]


class ConformingClient(StreamClientLike, Protocol):
    """A reader of a :class:`ConformingStream`: what ``run`` reads through (:class:`rjet.StreamClientLike`),
    with the figures :func:`check_stream` compares too, and ``async for``. :class:`rjet.StreamClient`
    and :class:`rjet.testing.MemoryStreamClient` are ones."""

    @property
    def head(self) -> int: ...

    @property
    def last_sequence(self) -> int: ...

    @property
    def num_pending(self) -> int: ...

    def __aiter__(self) -> AsyncIterator[Event]: ...


class ConformingStream(Protocol):
    """What :func:`check_stream` drives: :class:`rjet.testing.MemoryStream` is one; a real
    :class:`rjet.Stream` is one with ``remove_through`` (a purge up to a sequence), ``recreate`` (delete
    and create) and ``dead_letter_sink`` (an :class:`rjet.DeadLetterStream` over it) added."""

    @property
    def name(self) -> str: ...

    async def insert(self, foreign_id: str, type: int, data: bytes = b"", *, msg_id: str | None = None) -> int: ...

    async def insert_once(self, foreign_id: str, type: int, data: bytes = b"", *, msg_id: str) -> tuple[int, bool]: ...

    async def insert_many(
        self, events: Iterable[tuple[str, int, bytes] | tuple[str, int, bytes, str]]
    ) -> list[int]: ...

    async def stream(
        self,
        after: str = "",
        *,
        from_head: bool = False,
        to_head: bool = False,
        stream_id: str | None = None,
        key_filter: Callable[[str], bool] | None = None,
    ) -> ConformingClient: ...

    async def remove_through(self, seq: int) -> None: ...

    async def recreate(self) -> None: ...

    def dead_letter_sink(self) -> DeadLetterSink: ...


StreamFactory = Callable[[ReadConfig], Awaitable[ConformingStream]]
"""``await factory(read)``: a new, empty stream of its own name whose readers use ``read``."""

_WAIT = 0.3  # seconds a reader is given to show that it waits


class _Transcript:
    """Lines of what happened, with stream names and identities replaced by labels."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._names: list[tuple[str, str]] = []
        self._ids: dict[str, str] = {}

    def name(self, stream: ConformingStream, label: str) -> None:
        self._names.append((stream.name, label))

    def norm(self, text: str) -> str:
        for name, _ in self._names:
            for found in re.findall(re.escape(name) + r"@[0-9][0-9T:.+-]*[0-9]", text):
                self._ids.setdefault(found, f"<id{len(self._ids) + 1}>")
                text = text.replace(found, self._ids[found])
        for name, label in sorted(self._names, key=lambda n: -len(n[0])):
            text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", label, text)
        return text

    def __call__(self, line: str) -> None:
        self.lines.append(self.norm(line))

    def error(self, what: str, e: BaseException) -> None:
        self(f"{what} -> {type(e).__name__}: {e}")


def _event(e: Event) -> str:
    return f"event {e.id} type={e.type} fid={e.foreign_id!r} data={e.metadata!r}"


async def _try(log: _Transcript, what: str, op: Awaitable[object]) -> object:
    try:
        result = await op
    except RjetError as e:
        log.error(what, e)
        return None
    log(f"{what} -> {result!r}")
    return result


async def _open(log: _Transcript, what: str, op: Awaitable[ConformingClient]) -> ConformingClient | None:
    try:
        client = await op
    except RjetError as e:
        log.error(what, e)
        return None
    log(f"{what} -> open, head {client.head}")
    return client


async def _read(log: _Transcript, client: ConformingClient, n: int | None = None, *, wait: float = 5.0) -> None:
    """Log what ``next_or_skip`` returns, ``n`` items or until it raises (or waits ``wait`` seconds)."""
    count = 0
    while n is None or count < n:
        count += 1
        try:
            item = await asyncio.wait_for(client.next_or_skip(), wait)
        except TimeoutError:
            log(f"  waits (nothing within {wait:g}s)")
            return
        except RjetError as e:
            log.error("  recv", e)
            return
        if isinstance(item, Event):
            log(f"  {_event(item)}")
        elif isinstance(item, EventsRemoved):
            log(f"  skipped removed {item.first}..{item.last} (certain={item.certain})")
        else:
            log(f"  passed over other keys through {item}")


async def _settle(log: _Transcript, client: ConformingClient, seq: int) -> None:
    """Wait until the reader fetched through ``seq`` (a real one gets its events over the network)."""
    for _ in range(1000):  # 5 seconds at most
        if client.last_sequence >= seq:
            break
        await asyncio.sleep(0.005)
    if client.last_sequence != seq:
        log(f"  fetched through {client.last_sequence}, not {seq}")


# ----------------------------------------------------------------- scenarios


async def _inserts(make: StreamFactory, log: _Transcript) -> None:
    s = await make(ReadConfig())
    log.name(s, "<stream>")
    await _try(log, "insert a/1", s.insert("a", 1, b"x"))
    await _try(
        log,
        "insert_many 3",
        s.insert_many([("ü/ key*", 0, b""), ("b", 2**63 - 1, bytearray(b"\x00\xff")), (" spaced ", 3, b"{}")]),  # type: ignore[list-item]
    )
    await _try(log, "insert_once m", s.insert_once("a", 1, b"", msg_id="m"))
    await _try(log, "insert_once m again", s.insert_once("a", 1, b"other", msg_id="m"))
    await _try(log, "insert m again, padded", s.insert("a", 1, msg_id=" m "))
    await _try(log, "insert_many with m and n", s.insert_many([("a", 1, b"", "m"), ("a", 1, b"", "n"), ("a", 1, b"")]))
    await _try(log, "insert_many []", s.insert_many([]))
    await _try(log, "insert_many from a generator", s.insert_many((f"g{i}", i, b"") for i in range(2)))
    for what, op in [
        ("insert empty foreign id", s.insert("", 1)),
        ("insert type -1", s.insert("a", -1)),
        ("insert type True", s.insert("a", True)),
        ("insert type 2**63", s.insert("a", 2**63)),
        ("insert foreign id 7", s.insert(7, 1)),  # type: ignore[arg-type]
        ("insert str data", s.insert("a", 1, "text")),  # type: ignore[arg-type]
        ("insert blank msg_id", s.insert("a", 1, msg_id=" ")),
        ("insert msg_id with a newline", s.insert("a", 1, msg_id="a\nb")),
        ("insert surrogate foreign id", s.insert("\udc80", 1)),
        ("insert 1 MiB", s.insert("a", 1, bytes(1024 * 1024))),
        ("insert_many bad #1", s.insert_many([("a", 1, b""), ("", 1, b"")])),
        ("insert_many bad type #2", s.insert_many([("a", 1, b""), ("a", 1, b""), ("a", -5, b"")])),
        ("insert_many str data #1", s.insert_many([("a", 1, b""), ("a", 1, "x")])),  # type: ignore[list-item]
        ("insert_many too large #1", s.insert_many([("a", 1, b""), ("a", 1, bytes(1024 * 1024))])),
    ]:
        await _try(log, what, op)
    await _try(log, "insert after the refusals", s.insert("z", 9))
    before = time.time()
    await s.insert("t", 1)
    after = time.time()
    client = await _open(log, "open to_head", s.stream(to_head=True))
    if client is not None:
        events = []
        async for e in client:
            events.append(e)
            log(f"  {_event(e)}")
        stamp = events[-1].timestamp.timestamp()
        log(f"  last timestamp within its insert: {before - 0.05 <= stamp <= after + 0.05}")
        log(f"  timestamps in order: {all(a.timestamp <= b.timestamp for a, b in itertools.pairwise(events))}")
        await client.close()


async def _reading(make: StreamFactory, log: _Transcript) -> None:
    s = await make(ReadConfig())
    log.name(s, "<stream>")
    client = await _open(log, "empty: open to_head", s.stream(to_head=True))
    if client is not None:
        await _read(log, client)
        await client.close()
    await _open(log, "empty: open after 1", s.stream("1"))
    await s.insert_many([("a", 1, b"1"), ("b", 1, b"2"), ("a", 2, b"3"), ("b", 2, b"4"), ("c", 1, b"5")])
    for what, after in [("after ''", ""), ("after 2", "2"), ("after 5", "5")]:
        client = await _open(log, f"open {what} to_head", s.stream(after, to_head=True))
        if client is not None:
            await _read(log, client)
            await client.close()
    for what, after in [("after 6", "6"), ("after x", "x"), ("after -1", "-1"), ("after 1.0", "1.0")]:
        await _open(log, f"open {what}", s.stream(after))
    client = await _open(log, "open from_head to_head", s.stream("2", from_head=True, to_head=True))
    if client is not None:
        await _read(log, client)
        await client.close()
    client = await _open(log, "open key a to_head", s.stream(to_head=True, key_filter=lambda k: k == "a"))
    if client is not None:
        await _settle(log, client, 5)
        await _read(log, client)
        await client.close()
    client = await _open(log, "open from_head", s.stream(from_head=True))
    if client is not None:
        await _read(log, client, 1, wait=_WAIT)
        await _try(log, "insert while it waits", s.insert("d", 1, b"6"))
        await _read(log, client, 1)
        log(f"  num_pending {client.num_pending}, last_sequence {client.last_sequence}")
        await client.close()
        await _read(log, client, 1)
        await client.close()
    client = await _open(log, "open after 3 (no to_head)", s.stream("3"))
    if client is not None:
        await _read(log, client, 3)
        await _read(log, client, 1, wait=_WAIT)
        await _try(log, "insert 7", s.insert("e", 1, b"7"))
        await _read(log, client, 1)
        await _read(log, client, 1, wait=_WAIT)
        await client.close()


async def _removal(make: StreamFactory, log: _Transcript) -> None:
    s = await make(ReadConfig())
    log.name(s, "<stream>")
    await s.insert_many([("k", 1, b"")] * 10)
    await s.remove_through(3)
    log("removed through 3")
    client = await _open(log, "open after '' to_head", s.stream(to_head=True))
    if client is not None:
        await _read(log, client, 2)
        await client.close()
    await _open(log, "open after 2", s.stream("2"))
    await _open(log, "open after 1", s.stream("1"))
    client = await _open(log, "open after 3 to_head", s.stream("3", to_head=True))
    if client is not None:
        await _read(log, client, 1)
        await client.close()
    await s.remove_through(2)
    log("removed through 2 (again: nothing)")
    await _open(log, "open after 2", s.stream("2"))
    await s.remove_through(10)
    log("removed through 10 (all)")
    client = await _open(log, "open after '' to_head", s.stream(to_head=True))
    if client is not None:
        await _read(log, client)
        await client.close()
    await _open(log, "open after 9", s.stream("9"))
    client = await _open(log, "open after 10 to_head", s.stream("10", to_head=True))
    if client is not None:
        await _read(log, client)
        await client.close()
    await _try(log, "insert", s.insert("k", 1))
    await s.remove_through(20)
    log("removed through 20 (past the end)")
    await _open(log, "open after 11", s.stream("11"))
    await _open(log, "open after 20", s.stream("20"))
    await _open(log, "open after 21", s.stream("21"))
    await _try(log, "insert", s.insert("k", 1))
    await _try(log, "insert_once d", s.insert_once("k", 1, msg_id="d"))
    await s.remove_through(22)
    log("removed through 22")
    await _try(log, "insert_once d again (the window outlives a removal)", s.insert_once("k", 1, msg_id="d"))
    empty = await make(ReadConfig())
    log.name(empty, "<other>")
    await empty.remove_through(4)
    log("empty stream: removed through 4")
    await _try(log, "insert", empty.insert("k", 1))


async def _removed_while_reading(make: StreamFactory, log: _Transcript) -> None:
    for read in (ReadConfig(batch=2, max_buffered=2), ReadConfig(batch=2, max_buffered=2, on_removed="skip")):
        s = await make(read)
        log.name(s, "<stream>")
        log(f"batch 2, max_buffered 2, on_removed={read.on_removed}")
        await s.insert_many([("k", 1, b"")] * 10)
        client = await _open(log, "open after ''", s.stream())
        if client is None:
            continue
        await _read(log, client, 1)
        await _settle(log, client, 3)
        await s.remove_through(6)
        log("removed through 6")
        await _read(log, client, 6)
        await _read(log, client, 1)
        await client.close()
        await _open(log, "open after 3", s.stream("3"))
        client = await _open(log, "open after 6 to_head", s.stream("6", to_head=True))
        if client is not None:
            await _read(log, client)
            await client.close()
    s = await make(ReadConfig(batch=2, max_buffered=2))
    log.name(s, "<stream>")
    log("batch 2, max_buffered 2: what a reader fetched before a removal it still delivers")
    await s.insert_many([("k", 1, b"")] * 6)
    client = await _open(log, "open after ''", s.stream())
    if client is not None:
        await _read(log, client, 1)
        await _settle(log, client, 3)
        await s.remove_through(3)
        log("removed through 3")
        await _read(log, client, 5)
        await _read(log, client, wait=_WAIT)
        await client.close()
    s = await make(ReadConfig(batch=1, max_buffered=1))
    log.name(s, "<stream>")
    log("batch 1, max_buffered 1: a to_head reader whose remaining events are removed")
    await s.insert_many([("k", 1, b"")] * 10)
    client = await _open(log, "open to_head", s.stream(to_head=True))
    if client is not None:
        await _read(log, client, 1)
        await _settle(log, client, 2)
        await s.remove_through(10)
        log("removed through 10")
        await _read(log, client, 1)
        await _read(log, client, wait=_WAIT)
        await _try(log, "insert", s.insert("k", 1))
        await _read(log, client)
        await client.close()


async def _recreate(make: StreamFactory, log: _Transcript) -> None:
    s = await make(ReadConfig())
    log.name(s, "<stream>")
    await s.insert_many([("k", 1, b"old")] * 3)
    await _try(log, "insert_once r", s.insert_once("k", 1, msg_id="r"))
    client = await _open(log, "open to_head", s.stream(to_head=True))
    old = client.stream_id if client is not None else ""
    log(f"  stream_id {old}")
    if client is not None:
        await client.close()
    await s.recreate()
    log("recreated")
    await _open(log, "open after 4", s.stream("4"))
    await _open(log, "open after 4 in the old stream", s.stream("4", stream_id=old))
    await _try(log, "insert_once r (a new stream forgets)", s.insert_once("k", 1, msg_id="r"))
    await s.insert_many([("k", 2, b"new")] * 5)
    await _open(log, "open after 4 in the old stream", s.stream("4", stream_id=old))
    client = await _open(log, "open after 4 (no stream_id: no check)", s.stream("4"))
    if client is not None:
        log(f"  stream_id {client.stream_id}")
        await _read(log, client, 2)
        await _read(log, client, 1, wait=_WAIT)
        await client.close()
    for what, after, from_head in [("open after '' in the old stream", "", False), ("open from_head", "4", True)]:
        client = await _open(log, what, s.stream(after, stream_id=old, from_head=from_head, to_head=True))
        if client is not None:
            await _read(log, client, 1)
            await client.close()


async def _runs(make: StreamFactory, log: _Transcript) -> None:
    s = await make(ReadConfig())
    log.name(s, "<stream>")
    await s.insert_many([("a", 1, b""), ("b", 2, b""), ("c", 1, b""), ("a", 2, b""), ("b", 1, b""), ("c", 2, b"")])
    store = MemCursorStore()

    async def handled(consumer_name: str, spec_of: Callable[[Callable[..., object]], Spec]) -> None:
        seen: list[str] = []

        async def fn(fate: Fate, event: Event) -> None:
            seen.append(event.id)

        async def batch_fn(fate: Fate, events: list[Event]) -> None:
            seen.extend(e.id for e in events)

        spec = spec_of(batch_fn if consumer_name.startswith("batch") else fn)
        try:
            await asyncio.wait_for(run(spec), 10)
        except RjetError as e:
            log.error(f"run {consumer_name}", e)
        store_of = spec.cursor_store
        cursor = await store_of.get_cursor(consumer_name)
        log(f"  handled {sorted(seen, key=int)}, cursor {cursor!r}")

    def spec(name: str, **consumer: object) -> Callable[[Callable[..., object]], Spec]:
        return lambda fn: Spec(s.stream, store, Consumer(name, fn, **consumer), to_head=True)  # type: ignore[arg-type]

    await handled("plain", spec("plain"))
    await handled("types", spec("types", types=[2]))
    await handled("key", spec("key", key_filter=lambda k: k == "a"))
    await handled("key_c", spec("key_c", key_filter=lambda k: k == "c", concurrency=3))
    await handled("conc", spec("conc", concurrency=4))
    await handled("batch", spec("batch", batch=Batch(max_len=2, max_wait=0.0), concurrency=2))
    await store.set_cursor("late", "1")
    await s.remove_through(3)
    log("removed through 3")
    await handled("late", spec("late"))
    await store.set_cursor("ahead", "9")
    await handled("ahead", spec("ahead"))

    # Cursors and the stream they count in: the store records it with each cursor (MemCursorStore as
    # JetStreamCursorStore does), so a run after a re-creation does not read the new stream as the old.
    s2 = await make(ReadConfig())
    log.name(s2, "<other>")
    await s2.insert_many([("a", 1, b"")] * 3)

    def spec2(fn: Callable[..., object]) -> Spec:
        return Spec(s2.stream, store, Consumer("again", fn), to_head=True)  # type: ignore[arg-type]

    await handled("again", spec2)
    await s2.recreate()
    log("recreated")
    await s2.insert_many([("a", 1, b"")] * 5)
    await handled("again", spec2)
    await store.set_cursor("again", "")  # moved on purpose: from the beginning of the new stream
    await handled("again", spec2)


async def _failures(make: StreamFactory, log: _Transcript) -> None:
    s = await make(ReadConfig())
    log.name(s, "<stream>")
    dlq = await make(ReadConfig())
    log.name(dlq, "<dlq>")
    await s.insert_many([("a", 1, b"1"), ("b", 2, b"2"), ("a", 1, b"3"), ("b", 2, b"4")])
    store = MemCursorStore()
    seen: list[str] = []
    tempted: set[str] = set()

    async def tempting(fate: Fate, event: Event) -> None:
        seen.append(event.id)
        if event.id == "2" and event.id not in tempted:
            tempted.add(event.id)
            raise Tempted("injected")

    spec = Spec(s.stream, store, Consumer("fate", tempting), to_head=True)
    await asyncio.wait_for(run_forever(spec, retry_delay=0.01), 10)
    log(f"run_forever with a tempted event: handled {seen}, cursor {await store.get_cursor('fate')!r}")

    async def poison(fate: Fate, event: Event) -> None:
        seen.append(event.id)
        if event.metadata == b"2":
            raise ValueError(f"cannot handle {event.id}")

    for name, consumer in [
        ("dl", Consumer("dl", poison, dead_letter=DeadLetter(dlq.dead_letter_sink(), attempts=2, backoff=0.0))),
        (
            "dl_conc",
            Consumer(
                "dl_conc",
                poison,
                concurrency=3,
                dead_letter=DeadLetter(dlq.dead_letter_sink()),
                retry=RetryPolicy(backoff=0.0, max_backoff=0.0, attempts=3),
            ),
        ),
    ]:
        seen.clear()
        try:
            await asyncio.wait_for(run(Spec(s.stream, store, consumer, to_head=True)), 10)
        except HeadReached as e:
            log.error(f"run {name}", e)
        log(f"  handled {sorted(seen, key=int)}, cursor {await store.get_cursor(name)!r}")
    seen.clear()
    stopper = Consumer("stop", poison)
    with contextlib.suppress(ValueError):
        await asyncio.wait_for(run(Spec(s.stream, store, stopper, to_head=True)), 10)
    log(f"run without a dead letter: handled {seen}, cursor {await store.get_cursor('stop')!r}")
    client = await dlq.stream(to_head=True)
    async for letter in client:
        record = json.loads(letter.metadata)
        fields = {k: record[k] for k in ("consumer", "stream", "event_id", "type", "foreign_id", "error", "attempts")}
        fields["metadata"] = base64.b64decode(record["metadata"]).decode()
        log(f"dead letter {letter.id} fid={letter.foreign_id!r} type={letter.type} {json.dumps(fields)}")
    await client.close()


SCENARIOS: dict[str, Callable[[StreamFactory, _Transcript], Awaitable[None]]] = {
    "inserts": _inserts,
    "reading": _reading,
    "removal": _removal,
    "removed_while_reading": _removed_while_reading,
    "recreate": _recreate,
    "runs": _runs,
    "failures": _failures,
}


async def transcripts(factory: StreamFactory, only: Iterable[str] | None = None) -> dict[str, list[str]]:
    """What each scenario gives on ``factory``'s streams."""
    out = {}
    for name in only or SCENARIOS:
        log = _Transcript()
        await SCENARIOS[name](factory, log)
        out[name] = log.lines
    return out


async def check_stream(factory: StreamFactory, only: Iterable[str] | None = None) -> None:
    """Run every scenario (or those named in ``only``) on streams from ``factory`` and compare what
    happened with what a real :class:`rjet.Stream` does; ``AssertionError`` with a diff per scenario
    that differs.

    ``await factory(read)`` makes a new, empty stream of its own name whose readers use ``read``
    (see :class:`ConformingStream`). It takes about two seconds with a real stream (readers are given
    0.3 s to show that they wait), a few milliseconds with a :class:`rjet.testing.MemoryStream` under a
    :class:`rjet.testing.FakeClock`.
    """
    from rjet.testing._expected import EXPECTED

    got = await transcripts(factory, only)
    diffs = []
    for name, lines in got.items():
        want = EXPECTED[name]
        if lines != want:
            diff = difflib.unified_diff(want, lines, f"{name} (a real stream)", f"{name} (this one)", lineterm="")
            diffs.append("\n".join(diff))
    if diffs:
        raise AssertionError("the stream does not behave as a real rjet.Stream:\n" + "\n\n".join(diffs))
