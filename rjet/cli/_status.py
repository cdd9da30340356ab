"""``rjet status``: where each consumer (or shard) of a stream stands, from the stored cursors, and
which host runs each shard, from the heartbeats ``rjet.parallel`` keeps beside them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rjet.cli._common import Connection, age, connection_options, iso, run, stdout_console
from rjet.parallel import admin

if TYPE_CHECKING:
    from nats.js import JetStreamContext


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


def _row(c: admin.ConsumerInfo) -> Row:
    runners = tuple(
        Runner(r.host, r.pid, r.run_id, round(r.age, 1), not r.live, r.member) for r in c.runners
    )  # freshest first
    return Row(c.namespace, c.name, c.cursor, c.lag_events, c.lag_seconds, c.idle_seconds, c.note, runners)


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


def _member_row(namespace: str, m: admin.MemberInfo) -> MemberRow:
    return MemberRow(namespace, m.group, m.member, m.host, m.pid, round(m.age, 1), m.live, m.shards)


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
    state = await admin.stream_state(js, name)
    nss = tuple(namespaces) or tuple(await admin.namespaces(js))
    stores = [await admin.open_namespace(js, ns) for ns in nss]
    rows = [_row(c) for store in stores for c in await admin.consumers(store, state, pattern=pattern)]
    members = [_member_row(store.namespace, m) for store in stores for m in await admin.members(store)]
    return View(
        state.name, state.events, state.first_seq, state.last_seq, state.last_stored, nss, tuple(rows), tuple(members)
    )


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
