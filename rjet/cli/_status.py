"""``rjet status``: where each consumer (or shard) of a stream stands, from the stored cursors, and
which host runs each shard, from the heartbeats ``rjet.parallel`` keeps beside them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import json
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import click
from rich.console import Console
from rich.live import Live
from rich.text import Text

from rjet.cli._common import Connection, age, connection_options, iso, run, stdout_console
from rjet.cli._group import due
from rjet.cli._layout import expired_line, member_line, table, width, wrap
from rjet.parallel import admin
from rjet.sql import SqlCursorStore

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
    recorded_in: str | None = None  # the stream (name@created) its record names; None: names none


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
@click.option(
    "--cursors",
    metavar="URL",
    help="Read the cursors of --namespace NS from this SQL database (a group run with --cursors URL).",
)
@connection_options
def status(
    conn: Connection,
    stream: str,
    namespaces: tuple[str, ...],
    pattern: str | None,
    as_json: bool,
    watch: float | None,
    cursors: str | None,
) -> None:
    """Show each consumer's cursor on STREAM, its lag, its last activity, and where each shard runs.

    \b
    cursor         the ID of the last event the consumer handled
    lag            events in STREAM after the cursor, and the age of the oldest
    last activity  when the cursor was last stored (at most every second or so,
                   and only when it moves: a caught-up consumer looks quiet)
    running on     for a Parallel shard: the host and pid (of Parallel.run) of
                   each group whose heartbeat for it is stored; one older than
                   the group's heartbeat_ttl is marked stale (that group
                   stopped without a clean shutdown, or its host's clock is off)

    Only the cursors recorded in STREAM are shown, and, listed apart, those
    whose record names no stream (written by a tool or an older rjet), with how
    to name it. Cursors are read, never claimed: running consumers are not
    disturbed. The members of the elastic groups shown come after them: live,
    stopped, and the expired leases of members gone (rjet group prune).

    The view fits the terminal's width ($COLUMNS, else 80 in a pipe): a name too
    long for its column gets a line of its own. With --watch it looks again
    every few seconds until Ctrl-C (exit status 0); with --json too, each look
    is one JSON document on one line ("consumers", "no_stream" and "members").
    """
    if cursors is not None and len(namespaces) != 1:
        raise click.UsageError("--cursors URL goes with one --namespace NS: the namespace whose cursors it keeps")
    try:
        run(_status(conn, stream, namespaces, pattern, as_json, watch, cursors=cursors))
    except KeyboardInterrupt:
        if watch is None:
            raise
        # Ctrl-C is how a watch ends, not a failure.


def _row(c: admin.ConsumerInfo) -> Row:
    runners = tuple(
        Runner(r.host, r.pid, r.run_id, round(r.age, 1), not r.live, r.member) for r in c.runners
    )  # freshest first
    return Row(
        c.namespace, c.name, c.cursor, c.lag_events, c.lag_seconds, c.idle_seconds, c.note, runners, c.recorded_in
    )


@dataclasses.dataclass(frozen=True, slots=True)
class MemberRow:
    """One member of an elastic group, from its lease, and the shards it runs (their heartbeats)."""

    stream: str | None  # the stream its group reads; None: not known (no shard cursor read)
    namespace: str
    group: str
    member: str
    host: str
    pid: int
    lease_seconds_ago: float
    live: bool
    shards: tuple[str, ...]
    state: str  # live, stopped (gracefully, with a stable id: its shards wait for it) or expired
    ttl: float  # the lease's
    removed_in: float | None  # an expired lease: seconds until the group's live members delete it
    cursors: str  # where the group's shard cursors are: bucket or sql
    cursors_read: bool  # False: in an SQL database this look did not read (no --cursors)


def _member_row(stream: str | None, g: admin.GroupInfo, m: admin.MemberInfo) -> MemberRow:
    return MemberRow(
        stream, g.namespace, m.group, m.member, m.host, m.pid, round(m.age, 1), m.live, m.shards, m.state, m.ttl,
        None if m.removed_in is None else round(m.removed_in, 1), g.cursors, g.cursors_read,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class View:
    """What one look at the stream and its cursor namespaces found."""

    stream: str
    events: int
    first_seq: int
    last_seq: int
    last_insert: float | None  # when the last event was stored (seconds since the epoch)
    namespaces: tuple[str, ...]
    rows: tuple[Row, ...]  # the cursors recorded in this stream
    unknown: tuple[Row, ...]  # the cursors whose record names no stream: they may count in any
    members: tuple[MemberRow, ...]  # of the elastic groups with a cursor among rows or unknown
    elsewhere: tuple[MemberRow, ...] = ()  # of the elastic groups whose stream is not known (no cursor read)


async def _look(
    js: JetStreamContext,
    name: str,
    namespaces: tuple[str, ...],
    pattern: str | None,
    cursors: SqlCursorStore | None = None,
) -> View:
    state = await admin.stream_state(js, name)
    nss = tuple(namespaces) or tuple(await admin.namespaces(js))
    rows: list[Row] = []
    members: list[MemberRow] = []
    elsewhere: list[MemberRow] = []
    for ns in nss:
        store = await admin.open_namespace(js, ns)
        seen = await admin.overview(store, state, pattern=pattern, cursors=cursors)  # one read of each store
        found = [_row(c) for c in seen.consumers]
        rows += found
        for g in seen.groups:
            if _shard_of(g.name, found):
                members += [_member_row(state.name, g, m) for m in g.members]
            elif not g.streams and _named(g, pattern):  # no cursor read says which stream it reads
                elsewhere += [_member_row(None, g, m) for m in g.members]
    placed = tuple(r for r in rows if r.recorded_in is not None)
    unknown = tuple(r for r in rows if r.recorded_in is None)
    return View(
        state.name, state.events, state.first_seq, state.last_seq, state.last_stored, nss, placed, unknown,
        tuple(members), tuple(elsewhere),
    )  # fmt: skip


def _named(g: admin.GroupInfo, pattern: str | None) -> bool:
    """Whether --name GLOB takes group ``g``: its name or the name of one of its shards matches."""
    if pattern is None:
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for name in (g.name, *(s.name for s in g.shards)))


def _shard_of(group: str, rows: list[Row]) -> bool:
    """Whether a row is the cursor of a shard of ``group`` (``<group>_<m>_of_<n>``)."""
    shard = re.compile(re.escape(group) + r"_\d+_of_\d+")
    return any(shard.fullmatch(r.name) for r in rows)


async def _status(
    conn: Connection,
    name: str,
    namespaces: tuple[str, ...],
    pattern: str | None,
    as_json: bool,
    watch: float | None,
    *,
    cursors: str | None = None,
) -> None:
    async with conn.connect() as nc, contextlib.AsyncExitStack() as stack:
        js = nc.jetstream()
        sql = await stack.enter_async_context(await SqlCursorStore.open(cursors)) if cursors else None
        if watch is None:
            view = await _look(js, name, namespaces, pattern, sql)
            if as_json:
                for line in _json_lines(view):
                    click.echo(line)
            else:
                _print(stdout_console(), _render(view))
            return
        await _watch(js, name, namespaces, pattern, as_json, watch, sql)


async def _watch(
    js: JetStreamContext,
    name: str,
    namespaces: tuple[str, ...],
    pattern: str | None,
    as_json: bool,
    every: float,
    cursors: SqlCursorStore | None = None,
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
            view = await _look(js, name, namespaces, pattern, cursors)
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
    """Without --watch: one JSON object per consumer of the stream, one per cursor that names no
    stream ("stream" null, no lag), then one per elastic group member."""
    lines = [json.dumps({"stream": view.stream, "last_seq": view.last_seq, **dataclasses.asdict(r)}) for r in view.rows]
    lines += [json.dumps({"stream": None, "last_seq": None, **dataclasses.asdict(r)}) for r in view.unknown]
    # Lines of their own kind: they have "member", not "cursor"; "stream" null for a group whose stream
    # is not known.
    lines += [json.dumps(dataclasses.asdict(m)) for m in view.members + view.elsewhere]
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
        "no_stream": [dataclasses.asdict(r) for r in view.unknown],
        "members": [dataclasses.asdict(m) for m in view.members + view.elsewhere],
    }


def _print(console: Console, view: Text) -> None:
    # Laid out for the width already (names whole, no trailing spaces): printed as is.
    console.print(view, soft_wrap=True, highlight=False)


_HEADERS: Final = ("consumer", "cursor", "lag (events)", "lag (time)", "last activity", "running on", "")
_RIGHT: Final = (False, True, True, True, True, False, False)


def _render(view: View, *, watching: float | None = None, columns: int | None = None) -> Text:
    """The view as lines of at most ``columns`` (the terminal's width, else $COLUMNS, else 80)."""
    limit = columns or width()
    since = "" if view.last_insert is None else f", last insert {age(time.time() - view.last_insert)} ago"
    head = f"stream {view.stream}: {view.events} event(s), sequences {view.first_seq}..{view.last_seq}{since}"
    out = Text()
    _lines(out, wrap(head, limit), bold=(len("stream "), len("stream ") + len(view.stream)))
    if watching is not None:
        when = f"every {watching:g}s, at {datetime.now().strftime('%H:%M:%S')}; Ctrl-C ends"
        _lines(out, wrap(when, limit), style="dim")
    if not view.rows:
        where = ", ".join(view.namespaces) if view.namespaces else "any namespace"
        _lines(out, wrap(f"no consumer cursors of stream {view.stream} in {where}", limit))
    for ns, rows in _by_namespace(view.rows):
        cells = [
            [
                r.name, str(r.cursor), "-" if r.lag_events is None else str(r.lag_events), age(r.lag_seconds),
                "-" if r.idle_seconds is None else f"{age(r.idle_seconds)} ago",
                _running(r.runners), r.note,
            ]
            for r in rows
        ]  # fmt: skip
        _table(out, f"namespace {ns}:", table(_HEADERS, cells, limit, right=_RIGHT, details=2))
    for line in _member_lines(view.members, limit):
        _lines(out, [line])
    if view.elsewhere:
        _lines(out, [""])
        for line in _member_lines(view.elsewhere, limit):
            _lines(out, [line])
    if view.unknown:
        _lines(out, [""])
        said = (
            f"{len(view.unknown)} cursor(s) name no stream (written by a tool, or by an older rjet): they may"
            " count in any, so no lag is shown. To name one's stream: rjet cursor NAME --namespace NS --set SEQ"
            " --stream STREAM (a consumer's next cursor write names it too)."
        )
        _lines(out, wrap(said, limit, hang=0))
        for ns, rows in _by_namespace(view.unknown):
            cells = [
                [r.name, str(r.cursor), "-" if r.idle_seconds is None else f"{age(r.idle_seconds)} ago",
                 _running(r.runners)]
                for r in rows
            ]  # fmt: skip
            headers = ("consumer", "cursor", "last activity", "running on")
            _table(out, f"namespace {ns}:", table(headers, cells, limit, right=(False, True, True, False), details=1))
    out.rstrip()
    return out


def _by_namespace(rows: tuple[Row, ...]) -> list[tuple[str, list[Row]]]:
    found: dict[str, list[Row]] = {}
    for r in rows:
        found.setdefault(r.namespace, []).append(r)
    return list(found.items())


def _lines(out: Text, lines: list[str], *, style: str = "", bold: tuple[int, int] | None = None) -> None:
    for line in lines:
        start = len(out)
        out.append(line + "\n", style=style)
        if bold is not None:
            out.stylize("bold", start + bold[0], start + bold[1])
            bold = None


def _table(out: Text, title: str, lines: list[str]) -> None:
    _lines(out, [title])
    _lines(out, lines[:1], style="bold")
    _lines(out, lines[1:])


def _member_lines(members: tuple[MemberRow, ...], limit: int) -> list[str]:
    """Per elastic group: a line per live or stopped member, then its expired leases in one line."""
    out: list[str] = []
    groups: dict[tuple[str, str], list[MemberRow]] = {}
    for m in members:
        groups.setdefault((m.namespace, m.group), []).append(m)
    for (ns, group), ms in groups.items():
        current = [m for m in ms if m.state != "expired"]
        expired = [m for m in ms if m.state == "expired"]
        counts = f"{len(current)} member(s)" if current else "no member"
        counts += f", {len(expired)} expired lease(s)" if expired else ""
        head = f"elastic group {group} (namespace {ns}): {counts}"
        if ms[0].stream is None:
            head += (
                f"; stream unknown: its shard cursors are in an SQL database (rjet status STREAM --namespace {ns}"
                " --cursors URL)"
                if not ms[0].cursors_read
                else "; stream unknown: no shard cursor yet"
            )
        out += wrap(head, limit)
        for m in current:
            line = member_line(m.member, m.host, m.pid, m.state, age(m.lease_seconds_ago), age(m.ttl), m.shards)
            out += wrap(line, limit, indent=2)
        if expired:
            gone = [(m.member, m.host, m.pid, age(m.lease_seconds_ago), due(m.removed_in)) for m in expired]
            out += wrap(expired_line(group, ns, gone), limit, indent=2)
    return out


def _running(runners: tuple[Runner, ...]) -> str:
    """Who runs a shard, as ``rjet group describe`` says it too: live heartbeats, then stale ones marked."""
    return ", ".join([_where(r) for r in runners if not r.stale] + [_where(r) for r in runners if r.stale]) or "-"


def _where(r: Runner) -> str:
    who = f"member {r.member} ({r.host} pid {r.pid})" if r.member else f"{r.host} pid {r.pid}"
    return who + (f" (stale: heartbeat {age(r.heartbeat_seconds_ago)} ago)" if r.stale else "")
