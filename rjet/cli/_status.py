"""``rjet status``: where each consumer (or shard) of a stream stands, from the stored cursors, and
which host runs each shard, from the heartbeats ``rjet.parallel`` keeps beside them."""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import click
import nats.js.errors
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

import rjet
from rjet._nats.client import api_prefix, connection
from rjet._nats.denials import denials, exactly, guard_api
from rjet.cli._common import CliError, Connection, age, connection_options, iso, run, stdout_console
from rjet.cursors import encode_key, kv_keys
from rjet.parallel._elastic import group_names, members
from rjet.parallel._keys import DEFAULT_TTL
from rjet.parallel._reshard import heartbeats

if TYPE_CHECKING:
    from nats.js import JetStreamContext

_BUCKET_PREFIX: Final = "rjet_cursors_"
_KV_STREAM_PREFIX: Final = "KV_" + _BUCKET_PREFIX
_HEARTBEAT_TTL: Final = DEFAULT_TTL  # for heartbeats that do not carry their own


@dataclasses.dataclass(frozen=True, slots=True)
class Runner:
    """A ``Parallel`` group running a shard, from its heartbeat."""

    host: str
    pid: int  # of the process that runs Parallel.run (the workers' supervisor)
    group: str
    heartbeat_seconds_ago: float
    stale: bool  # older than the group's heartbeat_ttl: it stopped without a clean shutdown (or clocks are off)
    member: str | None = None  # the elastic group member that runs it


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    """One cursor: where it is and how far behind the stream."""

    namespace: str
    name: str
    cursor: int
    lag_events: int | None  # None when the cursor is past the stream's end
    lag_seconds: float | None  # age of the oldest event not yet handled; 0 when caught up
    idle_seconds: float | None  # time since the cursor was last written
    note: str = ""
    runners: tuple[Runner, ...] = ()  # groups whose heartbeat for this shard is still stored


@click.command()
@click.argument("stream")
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    metavar="NS",
    help="Cursor namespace(s) to show (repeatable; default: every rjet cursor namespace on the server).",
)
@click.option("--name", "pattern", metavar="GLOB", help="Only consumers whose name matches, e.g. 'mailer*'.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per consumer (with --watch: one document per look)."
)
@click.option(
    "-w",
    "--watch",
    type=click.FloatRange(min=0.1),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Look again every SECONDS (default 2) until Ctrl-C: redrawn in place on a terminal.",
)
@connection_options
def status(
    conn: Connection, stream: str, namespaces: tuple[str, ...], pattern: str | None, as_json: bool, watch: float | None
) -> None:
    """Show each consumer's cursor on STREAM, its lag, its last activity, and where each shard runs.

    \b
    cursor         the ID of the last event the consumer handled (its stored cursor)
    lag            events in STREAM after the cursor, and the age of the oldest of them
    last activity  when the cursor was last stored (stores write at most every second or
                   so, and only when it moves: a caught-up consumer with nothing to do
                   looks quiet)
    running on     for a Parallel shard, the host and pid of each group whose heartbeat for it
                   is stored (the pid of the process running Parallel.run); a heartbeat older
                   than the group's heartbeat_ttl is marked stale: that group stopped without
                   a clean shutdown, or its host's clock is off
    Cursors are read, never claimed: running consumers are not disturbed. A cursor namespace is not
    tied to a stream, so use --namespace to leave out consumers of other streams.
    With --watch it looks again every few seconds until Ctrl-C (exit status 0); with --json too,
    each look is one JSON document on one line ("consumers" and "members" lists).
    """
    try:
        run(_status(conn, stream, namespaces, pattern, as_json, watch))
    except KeyboardInterrupt:
        if watch is None:
            raise
        # Ctrl-C is how a watch ends, not a failure.


async def _namespaces(js: JetStreamContext) -> list[str]:
    found: list[str] = []
    offset = 0
    while True:
        listing = f"{api_prefix(js)}.STREAM.LIST"
        page = await denials(connection(js)).guard(exactly(listing), js.streams_info(offset))
        if not page:
            return sorted(found)
        offset += len(page)
        names = [i.config.name or "" for i in page]
        found += [n[len(_KV_STREAM_PREFIX) :] for n in names if n.startswith(_KV_STREAM_PREFIX)]


async def _msg_time(js: JetStreamContext, stream: str, **kwargs: Any) -> float | None:
    try:
        msg = await guard_api(js, stream, js.get_msg(stream, **kwargs))
    except nats.js.errors.NotFoundError:
        return None
    return msg.time.timestamp() if msg.time else None


async def _rows(
    js: JetStreamContext, stream: str, namespace: str, pattern: str | None, first: int, last: int
) -> list[Row]:
    bucket = _BUCKET_PREFIX + namespace
    try:
        kv = await guard_api(js, "KV_" + bucket, js.key_value(bucket))
    except nats.js.errors.BucketNotFoundError:
        raise CliError(f"cursor namespace {namespace!r} not found (no KV bucket {bucket!r})") from None
    store = rjet.JetStreamCursorStore(kv, namespace)
    cursors = await store.cursors()
    # A cursor recorded in another stream is not this stream's consumer: its "lag" here would be fake.
    records = dict(zip(cursors, await asyncio.gather(*(store.peek_record(n) for n in cursors)), strict=True))
    cursors = {
        n: v
        for n, v in cursors.items()
        if (r := records[n]) is None or r.stream is None or r.stream.split("@")[0] == stream
    }
    beats = await heartbeats(kv, await kv_keys(kv))
    now = time.time()

    async def row(name: str, value: str) -> Row | None:
        if value and not (value.isascii() and value.isdigit()):
            return None  # not a cursor: someone else's key (cursors() leaves out rjet's own records)
        cursor = int(value or 0)
        written = await _msg_time(js, "KV_" + bucket, subject=f"$KV.{bucket}.{encode_key(name)}")
        idle = None if written is None else now - written
        if cursor > last:
            return Row(namespace, name, cursor, None, None, idle, "ahead of the stream: another stream's cursor?")
        lag = last - cursor
        if not lag:
            return Row(namespace, name, cursor, 0, 0.0, idle)
        if cursor + 1 < first:
            return Row(namespace, name, cursor, lag, None, idle, f"expired: events {cursor + 1}..{first - 1} are gone")
        oldest = await _msg_time(js, stream, seq=cursor + 1, subject=">", next=True)
        return Row(namespace, name, cursor, lag, None if oldest is None else max(0.0, now - oldest), idle)

    def runners(name: str) -> tuple[Runner, ...]:
        found = sorted(beats.get(name, ()), key=lambda b: b.age)
        return tuple(
            Runner(b.host, b.pid, b.group, round(b.age, 1), b.age >= (b.ttl or _HEARTBEAT_TTL), b.member) for b in found
        )

    picked = [(n, v) for n, v in sorted(cursors.items()) if pattern is None or fnmatch.fnmatchcase(n, pattern)]
    rows = await asyncio.gather(*(row(n, v) for n, v in picked))
    return [dataclasses.replace(r, runners=runners(r.name)) for r in rows if r is not None]


@dataclasses.dataclass(frozen=True, slots=True)
class MemberRow:
    """One member of an elastic group, from its lease, and the shards it runs (their heartbeats)."""

    namespace: str
    group: str
    member: str
    host: str
    pid: int
    lease_seconds_ago: float
    live: bool
    shards: tuple[str, ...]


async def _members(js: JetStreamContext, namespace: str) -> list[MemberRow]:
    try:
        kv = await guard_api(js, "KV_" + _BUCKET_PREFIX + namespace, js.key_value(_BUCKET_PREFIX + namespace))
    except nats.js.errors.BucketNotFoundError:
        return []
    keys = await kv_keys(kv)
    beats = await heartbeats(kv, keys)
    out = []
    for group in sorted(group_names(keys)):
        for m in await members(kv, group, _HEARTBEAT_TTL):
            runs = sorted(
                shard for shard, found in beats.items()
                if any(b.member == m.member and b.age < (b.ttl or _HEARTBEAT_TTL) for b in found)
            )  # fmt: skip
            out.append(MemberRow(namespace, group, m.member, m.host, m.pid, round(m.seen_ago, 1), m.live, tuple(runs)))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class View:
    """What one look at the stream and its cursor namespaces found."""

    stream: str
    events: int
    first_seq: int
    last_seq: int
    last_insert: float | None  # when the last event was stored (seconds since the epoch)
    namespaces: tuple[str, ...]
    rows: tuple[Row, ...]
    members: tuple[MemberRow, ...]


async def _look(js: JetStreamContext, name: str, namespaces: tuple[str, ...], pattern: str | None) -> View:
    info = await rjet.Stream(js, name).info()
    first, last = info.state.first_seq, info.state.last_seq
    last_insert = await _msg_time(js, name, seq=last) if last else None
    nss = tuple(namespaces) or tuple(await _namespaces(js))
    rows = [r for ns in nss for r in await _rows(js, name, ns, pattern, first, last)]
    member_rows = [m for ns in nss for m in await _members(js, ns)]
    return View(name, info.state.messages, first, last, last_insert, nss, tuple(rows), tuple(member_rows))


async def _status(
    conn: Connection, name: str, namespaces: tuple[str, ...], pattern: str | None, as_json: bool, watch: float | None
) -> None:
    async with conn.connect() as nc:
        js = nc.jetstream()
        if watch is None:
            view = await _look(js, name, namespaces, pattern)
            if as_json:
                for line in _json_lines(view):
                    click.echo(line)
            else:
                _print(stdout_console(), _render(view))
            return
        await _watch(js, name, namespaces, pattern, as_json, watch)


async def _watch(
    js: JetStreamContext, name: str, namespaces: tuple[str, ...], pattern: str | None, as_json: bool, every: float
) -> None:
    """Look again every ``every`` seconds until interrupted: a view redrawn in place on a terminal,
    one view after another elsewhere, or one JSON document per look (``--json``)."""
    console = stdout_console()
    live = None if as_json or not console.is_terminal else Live(console=console, auto_refresh=False)
    try:
        if live is not None:
            live.start()
        while True:
            started = time.monotonic()
            view = await _look(js, name, namespaces, pattern)
            if as_json:
                click.echo(json.dumps(_document(view)))
            elif live is not None:
                live.update(_render(view, watching=every), refresh=True)
            else:
                _print(console, _render(view, watching=every))
                console.print()
            await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))
    finally:
        if live is not None:
            live.stop()


def _json_lines(view: View) -> list[str]:
    """Without --watch: one JSON object per consumer, then one per elastic group member."""
    lines = [json.dumps({"stream": view.stream, "last_seq": view.last_seq, **dataclasses.asdict(r)}) for r in view.rows]
    # Lines of their own kind: they have "member", not "cursor".
    lines += [json.dumps({"stream": view.stream, **dataclasses.asdict(m)}) for m in view.members]
    return lines


def _document(view: View) -> dict[str, Any]:
    """With --watch --json: the whole view as one JSON document (one line per refresh)."""
    return {
        "time": iso(datetime.now(UTC)),
        "stream": view.stream,
        "events": view.events,
        "first_seq": view.first_seq,
        "last_seq": view.last_seq,
        "consumers": [dataclasses.asdict(r) for r in view.rows],
        "members": [dataclasses.asdict(m) for m in view.members],
    }


def _print(console: Console, view: Group) -> None:
    for part in view.renderables:
        # Lines of text are printed whole (a terminal wraps them), not broken at the console's width.
        console.print(part, soft_wrap=isinstance(part, Text))


def _render(view: View, *, watching: float | None = None) -> Group:
    since = "" if view.last_insert is None else f", last insert {age(time.time() - view.last_insert)} ago"
    head = Text(f"stream {view.stream}: {view.events} event(s), sequences {view.first_seq}..{view.last_seq}{since}")
    head.stylize("bold", len("stream "), len("stream ") + len(view.stream))
    parts: list[RenderableType] = [head]
    if watching is not None:
        parts.append(Text(f"every {watching:g}s, at {datetime.now().strftime('%H:%M:%S')}; Ctrl-C ends", style="dim"))
    if not view.rows:
        where = ", ".join(view.namespaces) if view.namespaces else "any namespace"
        parts.append(Text(f"no consumer cursors in {where}"))
        return Group(*parts)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in [
        ("namespace", "left"),
        ("consumer", "left"),
        ("cursor", "right"),
        ("lag (events)", "right"),
        ("lag (time)", "right"),
        ("last activity", "right"),
        ("running on", "left"),
        ("", "left"),
    ]:
        # Names wrap rather than end in "…": billing_1… and billing_2… would be the same shard to a reader.
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in view.rows:
        table.add_row(
            r.namespace,
            r.name,
            str(r.cursor),
            "-" if r.lag_events is None else str(r.lag_events),
            age(r.lag_seconds),
            "-" if r.idle_seconds is None else f"{age(r.idle_seconds)} ago",
            ", ".join(map(_where, r.runners)) or "-",
            r.note,
        )
    parts.append(table)
    for mr in view.members:
        lease = f"lease renewed {age(mr.lease_seconds_ago)} ago" + ("" if mr.live else " (expired)")
        parts.append(
            Text(
                f"elastic group {mr.group} ({mr.namespace}): member {mr.member} on {mr.host} pid {mr.pid}, {lease};"
                f" runs {', '.join(mr.shards) or 'no shard'}"
            )
        )
    return Group(*parts)


def _where(r: Runner) -> str:
    who = f"member {r.member} ({r.host} pid {r.pid})" if r.member else f"{r.host} pid {r.pid}"
    return who + (f" (stale: heartbeat {age(r.heartbeat_seconds_ago)} ago)" if r.stale else "")
