"""``rjet group``: a Parallel group's shards, members, cursors and lag in one view; reset or delete
them at once (what ``kafka-consumer-groups`` does for Kafka). A view over :mod:`rjet.parallel.admin`."""

from __future__ import annotations

import contextlib
import json
import time
from datetime import datetime
from typing import Any

import click

from rjet import StreamNotFound
from rjet.cli._common import Connection, age, connection_options, run, stdout_console
from rjet.cli._layout import expired_line, member_line, table, width, wrap
from rjet.parallel import admin
from rjet.sql import SqlCursorStore

_first_at = admin.sequence_at  # what rjet/cli/_tail.py imports from here


@click.group()
def group() -> None:
    """List, describe, reset, prune and delete the cursors of Parallel groups (sharded consumers).

    \b
        rjet group list --namespace shop
        rjet group describe billing --namespace shop --stream orders
        rjet group reset billing --namespace shop --stream orders \\
            --to-datetime 2026-12-01T08:00:00Z
        rjet group reset billing --namespace shop --stream orders \\
            --shift-by -1000 --execute
        rjet group prune billing --namespace shop --execute
        rjet group delete billing --namespace shop --execute
    """


_namespace = click.option(
    "--namespace", required=True, metavar="NS", help="Cursor namespace (KV bucket rjet_cursors_NS)."
)
_json = click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
_cursors = click.option(
    "--cursors",
    metavar="URL",
    help="The SQL database that keeps the shard cursors of a group run with --cursors URL"
    " (sqlite:///PATH, postgresql://...).",
)


@group.command("list")
@_namespace
@_json
@_cursors
@connection_options
def list_groups(conn: Connection, namespace: str, as_json: bool, cursors: str | None) -> None:
    """The groups in NAMESPACE: shard count, old generations, whether they run, where their
    shard cursors are (bucket or sql), members.

    A group run with --cursors URL is listed from its group record; its old
    generations are read from that database with --cursors URL.
    """
    found = run(_list(conn, namespace, cursors))
    if as_json:
        for g in found:
            click.echo(json.dumps(_group_json(g)))
        return
    limit = width()
    if not found:
        _echo(wrap(f"no Parallel group in namespace {namespace!r}", limit))
        return
    rows = [[g.name, str(g.n or "?"), _old(g), "yes" if g.running else "no", g.cursors, _members(g)] for g in found]
    headers = ("group", "n", "old n", "running", "cursors", "members")
    _echo(table(headers, rows, limit, right=(False, True, False, False, False, False), details=1), bold=1)
    unread = [g.name for g in found if not g.cursors_read]
    if unread:
        said = f"shard cursors in an SQL database ({', '.join(unread)}): add --cursors URL to read them"
        _echo(wrap(said, limit, hang=0))


@group.command("describe")
@click.argument("name")
@_namespace
@click.option("--stream", required=True, metavar="STREAM", help="The stream the group reads (for the lag).")
@_json
@_cursors
@connection_options
def describe_group(
    conn: Connection, name: str, namespace: str, stream: str, as_json: bool, cursors: str | None
) -> None:
    """Group NAME's shards (cursor, lag, who runs them), its total lag, and its members."""
    g = run(_describe(conn, name, namespace, stream, cursors))
    if as_json:
        click.echo(json.dumps(_group_json(g)))
        return
    limit = width()
    total = "?" if g.lag_events is None else f"{g.lag_events:,}"
    head = f"group {g.name} in {g.namespace}: n={g.n or '?'}, lag {total} event(s)" + (
        f"; old generations n={','.join(map(str, g.old_generations))}" if g.old_generations else ""
    )
    head += "; shard cursors in the SQL database" if g.cursors == "sql" else ""
    _echo(wrap(head, limit))
    rows = [
        [s.name, str(s.cursor), str(s.done_above or "-"), "?" if s.lag_events is None else f"{s.lag_events:,}",
         running_on(s.runners)]
        for s in g.shards
    ]  # fmt: skip
    headers = ("shard", "cursor", "done above", "lag", "running on")
    _echo(table(headers, rows, limit, right=(False, True, True, True, False), details=1), bold=1)
    for m in g.members:
        if m.state != "expired":
            _echo(wrap(member_line(m.member, m.host, m.pid, m.state, age(m.age), age(m.ttl), m.shards), limit))
    expired = [(m.member, m.host, m.pid, age(m.age), due(m.removed_in)) for m in g.members if m.state == "expired"]
    if expired:
        _echo(wrap(expired_line(g.name, g.namespace, expired), limit))


@group.command("reset")
@click.argument("name")
@_namespace
@click.option("--stream", required=True, metavar="STREAM", help="The stream the group reads.")
@click.option("--to-earliest", is_flag=True, help="Before the stream's first retained event.")
@click.option("--to-latest", is_flag=True, help="After every event the stream holds now.")
@click.option("--to-seq", type=click.IntRange(min=1), metavar="SEQ", help="The next event handled is SEQ.")
@click.option("--to-datetime", metavar="ISO", help="The next event handled is the first stored at or after ISO.")
@click.option("--shift-by", type=int, metavar="N", help="Move every cursor by N events (negative: handle again).")
@click.option(
    "--skip-removed",
    is_flag=True,
    help="Accept a position before the stream's first retained event: the cursors are set just before that"
    " event and the events removed in between are skipped.",
)
@click.option("--execute", is_flag=True, help="Write the new cursors (without it: show them, a dry run).")
@_json
@_cursors
@connection_options
def reset_group(
    conn: Connection,
    name: str,
    namespace: str,
    stream: str,
    to_earliest: bool,
    to_latest: bool,
    to_seq: int | None,
    to_datetime: str | None,
    shift_by: int | None,
    skip_removed: bool,
    execute: bool,
    as_json: bool,
    cursors: str | None,
) -> None:
    """Move every shard cursor of group NAME at once; a dry run unless --execute.

    Refused while any shard of the group runs (stop it everywhere first). Exact progress above the
    old cursors is dropped. Give exactly one of the --to-* / --shift-by options. Each new record
    names STREAM as it is now (a stream deleted and created again later raises
    rjet.StreamRecreated). Refused: a position past the stream's last sequence, one before its first
    retained event (unless --skip-removed; --shift-by stops there when the cursor was not before it
    already), shard cursors recorded in another stream, and --shift-by of cursors recorded in an
    earlier stream of the same name. A group run with --cursors URL: give the same --cursors URL
    (its rows are written in one transaction).
    """
    given = (to_earliest, to_latest, to_seq is not None, to_datetime is not None, shift_by is not None)
    if sum(given) != 1:
        raise click.UsageError("give exactly one of --to-earliest, --to-latest, --to-seq, --to-datetime, --shift-by")
    when = None
    if to_datetime is not None:
        try:
            when = datetime.fromisoformat(to_datetime.replace("Z", "+00:00"))
        except ValueError:
            raise click.UsageError(f"--to-datetime {to_datetime!r}: not an ISO date and time") from None
        if when.tzinfo is None:
            raise click.UsageError(f"--to-datetime {to_datetime!r}: give a time zone (Z or +01:00)")
    target = admin.ResetTarget(to_earliest, to_latest, to_seq, when, shift_by)
    plan = run(_reset(conn, name, namespace, stream, target, execute, skip_removed, cursors))
    for note in plan.notes:
        click.echo(f"rjet: {note}", err=True)
    if as_json:
        moves = [{"shard": m.name, "old": m.old, "new": m.new} for m in plan.moves]
        click.echo(json.dumps({"group": name, "executed": execute, "cursors": moves}))
        return
    for m in plan.moves:
        click.echo(f"{m.name}: {m.old} -> {m.new}")
    click.echo(f"{len(plan.moves)} cursor(s) " + ("moved" if execute else "would move (a dry run: add --execute)"))


@group.command("prune")
@click.argument("name")
@_namespace
@click.option("--execute", is_flag=True, help="Delete (without it: list what would go, a dry run).")
@connection_options
def prune_group(conn: Connection, name: str, namespace: str, execute: bool) -> None:
    """Delete group NAME's expired member leases and stale heartbeats.

    What members that were killed (or stopped with a stable id and did not come back) left behind:
    the group ignores them, and the views list them until they go. Each is read again before it is
    deleted: one written since (its member came back) stays. Cursors and the group record are kept;
    the group may be running.
    """
    keys = run(_prune(conn, name, namespace, execute))
    for key in keys:
        click.echo(key)
    click.echo(f"{len(keys)} key(s) " + ("deleted" if execute else "would be deleted (a dry run: add --execute)"))


@group.command("delete")
@click.argument("name")
@_namespace
@click.option("--execute", is_flag=True, help="Delete (without it: list what would go, a dry run).")
@_cursors
@connection_options
def delete_group(conn: Connection, name: str, namespace: str, execute: bool, cursors: str | None) -> None:
    """Delete group NAME's cursors (every shard count), group record, heartbeats and member leases.

    Refused while any shard of the group runs. The next run of the group starts from the beginning.
    A group run with --cursors URL: give the same --cursors URL; its rows there (shard cursors and
    reshard mark) go too, in one transaction.
    """
    plan = run(_delete(conn, name, namespace, execute, cursors))
    for key in plan.keys:
        click.echo(key)
    for row in plan.rows:
        click.echo(f"{row} (row in the SQL database)")
    what = f"{len(plan.keys)} key(s)" + (f" and {len(plan.rows)} row(s)" if plan.rows else "")
    click.echo(f"{what} " + ("deleted" if execute else "would be deleted (a dry run: add --execute)"))


# ----------------------------------------------------------------- the views


async def _list(conn: Connection, namespace: str, url: str | None) -> list[admin.GroupInfo]:
    async with conn.connect() as nc, contextlib.AsyncExitStack() as stack:
        store = await admin.open_namespace(nc.jetstream(), namespace)
        cursors = await stack.enter_async_context(await SqlCursorStore.open(url)) if url else None
        return await admin.list_groups(store, cursors=cursors)


async def _describe(conn: Connection, name: str, namespace: str, stream: str, url: str | None) -> admin.GroupInfo:
    async with conn.connect() as nc, contextlib.AsyncExitStack() as stack:
        js = nc.jetstream()
        state = await admin.stream_state(js, stream)
        store = await admin.open_namespace(js, namespace)
        cursors = await stack.enter_async_context(await SqlCursorStore.open(url)) if url else None
        return await admin.describe_group(store, name, stream=state, cursors=cursors)


async def _reset(
    conn: Connection,
    name: str,
    namespace: str,
    stream: str,
    target: admin.ResetTarget,
    execute: bool,
    skip_removed: bool,
    url: str | None,
) -> admin.ResetPlan:
    async with conn.connect() as nc, contextlib.AsyncExitStack() as stack:
        js = nc.jetstream()
        try:  # the stream is checked before the namespace, as the reset's own check words it
            await admin.stream_state(js, stream)
        except StreamNotFound as e:
            raise StreamNotFound(stream, f"group {name!r} not reset") from e
        store = await admin.open_namespace(js, namespace)
        cursors = await stack.enter_async_context(await SqlCursorStore.open(url)) if url else None
        return await admin.reset_group(
            store, name, stream, target, execute=execute, skip_removed=skip_removed, cursors=cursors
        )


async def _prune(conn: Connection, name: str, namespace: str, execute: bool) -> tuple[str, ...]:
    async with conn.connect() as nc:
        store = await admin.open_namespace(nc.jetstream(), namespace)
        return await admin.prune_group(store, name, execute=execute)


async def _delete(conn: Connection, name: str, namespace: str, execute: bool, url: str | None) -> admin.DeletePlan:
    async with conn.connect() as nc, contextlib.AsyncExitStack() as stack:
        store = await admin.open_namespace(nc.jetstream(), namespace)
        cursors = await stack.enter_async_context(await SqlCursorStore.open(url)) if url else None
        return await admin.delete_group(store, name, execute=execute, cursors=cursors)


def _old(g: admin.GroupInfo) -> str:
    """The old generations column of ``group list``: "?" when the group's cursors were not read."""
    if not g.cursors_read:
        return "?"
    return ",".join(map(str, g.old_generations)) or "-"


def due(removed_in: float | None) -> str | None:
    """When the group's live members delete an expired lease, as the views say it (None: they do not)."""
    if removed_in is None:
        return None
    return "now" if removed_in < 1 else age(removed_in)


def _members(g: admin.GroupInfo) -> str:
    """The members column of ``group list``: the live ones, the stopped ones marked, the expired counted."""
    names = [m.member + (" (stopped)" if m.state == "stopped" else "") for m in g.members if m.state != "expired"]
    expired = sum(m.state == "expired" for m in g.members)
    return (", ".join(names) or "-") + (f" (+{expired} expired)" if expired else "")


def _echo(lines: list[str], *, bold: int = 0) -> None:
    console = stdout_console()
    for i, line in enumerate(lines):
        console.print(line, style="bold" if i < bold else "", soft_wrap=True, highlight=False, markup=False)


def running_on(runners: tuple[admin.RunnerInfo, ...]) -> str:
    """Who runs a shard, as ``rjet status`` says it too: the live heartbeats, then the stale ones marked."""
    live = [r.where for r in runners if r.live]
    stale = [f"{r.where} (stale: heartbeat {age(r.age)} ago)" for r in runners if not r.live]
    return ", ".join(live + stale) or "-"


def _group_json(g: admin.GroupInfo) -> dict[str, Any]:
    """A group as ``group list --json`` and ``group describe --json`` give it: what was not read
    (the shard cursors of an SQL group without --cursors) is null."""
    now = time.time()
    known = g.cursors_read
    shards = [
        {"name": s.name, "m": s.m + 1, "n": s.n, "cursor": s.cursor if known else None,
         "done_above": s.done_above if known else None, "lag_events": s.lag_events,
         "running_on": [r.where for r in s.running_on],
         "runners": [{"host": r.host, "pid": r.pid, "group": r.run_id, "heartbeat_seconds_ago": round(r.age, 1),
                      "stale": not r.live, "member": r.member} for r in s.runners]}
        for s in g.shards
    ]  # fmt: skip
    members = [
        {"member": m.member, "host": m.host, "pid": m.pid, "max_shards": m.max_shards, "since": m.since,
         "seen_ago": m.age, "live": m.live, "state": m.state, "shards": list(m.shards), "ttl": m.ttl, "n": m.n,
         "at": now, "removed_in": m.removed_in}
        for m in g.members
    ]  # fmt: skip
    return {
        "group": g.name,
        "namespace": g.namespace,
        "n": g.n,
        "lag_events": g.lag_events,
        "running": g.running,
        "cursors": g.cursors,
        "cursors_read": known,
        "streams": list(g.streams),
        "old_generations": list(g.old_generations) if known else None,
        "shards": shards,
        "members": members,
    }
