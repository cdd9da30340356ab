"""``rjet group``: a Parallel group's shards, members, cursors and lag in one view; reset or delete
them at once (what ``kafka-consumer-groups`` does for Kafka). A view over :mod:`rjet.parallel.admin`."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import click
from rich.table import Table

from rjet import StreamNotFound
from rjet.cli._common import Connection, age, connection_options, run, stdout_console
from rjet.parallel import admin

_first_at = admin.sequence_at  # what rjet/cli/_tail.py imports from here


@click.group()
def group() -> None:
    """List, describe, reset and delete the cursors of Parallel groups (sharded consumers).

    \b
        rjet group list --namespace shop
        rjet group describe billing --namespace shop --stream orders
        rjet group reset billing --namespace shop --stream orders --to-datetime 2026-12-01T08:00:00Z
        rjet group reset billing --namespace shop --stream orders --shift-by -1000 --execute
        rjet group delete billing --namespace shop --execute
    """


_namespace = click.option(
    "--namespace", required=True, metavar="NS", help="Cursor namespace (KV bucket rjet_cursors_NS)."
)
_json = click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")


@group.command("list")
@_namespace
@_json
@connection_options
def list_groups(conn: Connection, namespace: str, as_json: bool) -> None:
    """The groups with cursors in NAMESPACE: shard count, generations, members, whether they run."""
    found = run(_list(conn, namespace))
    if as_json:
        for g in found:
            click.echo(json.dumps(_group_json(g)))
        return
    if not found:
        click.echo(f"no Parallel group in namespace {namespace!r}")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("group", "n", "old n", "members", "running"):
        table.add_column(col)
    for g in found:
        live = [m.member for m in g.live_members]
        table.add_row(
            g.name, str(g.n or "?"), ",".join(map(str, g.old_generations)) or "-", ", ".join(live) or "-",
            "yes" if g.running else "no",
        )  # fmt: skip
    stdout_console().print(table)


@group.command("describe")
@click.argument("name")
@_namespace
@click.option("--stream", required=True, metavar="STREAM", help="The stream the group reads (for the lag).")
@_json
@connection_options
def describe_group(conn: Connection, name: str, namespace: str, stream: str, as_json: bool) -> None:
    """Group NAME's shards (cursor, lag, who runs them), its total lag, and its members."""
    g = run(_describe(conn, name, namespace, stream))
    if as_json:
        click.echo(json.dumps(_group_json(g)))
        return
    console = stdout_console()
    total = "?" if g.lag_events is None else f"{g.lag_events:,}"
    console.print(
        f"group [bold]{g.name}[/] in {g.namespace}: n={g.n or '?'}, lag {total} event(s)"
        + (f"; old generations n={','.join(map(str, g.old_generations))}" if g.old_generations else ""),
        highlight=False,
        soft_wrap=True,
    )
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in [("shard", "left"), ("cursor", "right"), ("done above", "right"), ("lag", "right"),
                         ("running on", "left")]:  # fmt: skip
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for s in g.shards:
        lag = "?" if s.lag_events is None else f"{s.lag_events:,}"
        table.add_row(
            s.name, str(s.cursor), str(s.done_above or "-"), lag, ", ".join(r.where for r in s.running_on) or "-"
        )
    console.print(table)
    for m in g.members:
        state = "live" if m.live else "expired"
        console.print(
            f"member {m.member} on {m.host} pid {m.pid}: lease renewed {age(m.age)} ago ({state})",
            highlight=False,
            soft_wrap=True,
        )


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
) -> None:
    """Move every shard cursor of group NAME at once; a dry run unless --execute.

    Refused while any shard of the group runs (stop it everywhere first). Exact progress above the
    old cursors is dropped. Give exactly one of the --to-* / --shift-by options. Each new record
    names STREAM as it is now (a stream deleted and created again later raises
    rjet.StreamRecreated). Refused: a position past the stream's last sequence, one before its first
    retained event (unless --skip-removed; --shift-by stops there when the cursor was not before it
    already), shard cursors recorded in another stream, and --shift-by of cursors recorded in an
    earlier stream of the same name.
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
    plan = run(_reset(conn, name, namespace, stream, target, execute, skip_removed))
    for note in plan.notes:
        click.echo(f"rjet: {note}", err=True)
    if as_json:
        moves = [{"shard": m.name, "old": m.old, "new": m.new} for m in plan.moves]
        click.echo(json.dumps({"group": name, "executed": execute, "cursors": moves}))
        return
    for m in plan.moves:
        click.echo(f"{m.name}: {m.old} -> {m.new}")
    click.echo(f"{len(plan.moves)} cursor(s) " + ("moved" if execute else "would move (a dry run: add --execute)"))


@group.command("delete")
@click.argument("name")
@_namespace
@click.option("--execute", is_flag=True, help="Delete (without it: list what would go, a dry run).")
@connection_options
def delete_group(conn: Connection, name: str, namespace: str, execute: bool) -> None:
    """Delete group NAME's cursors (every shard count), generation record, heartbeats and member leases.

    Refused while any shard of the group runs. The next run of the group starts from the beginning.
    """
    keys = run(_delete(conn, name, namespace, execute))
    for key in keys:
        click.echo(key)
    click.echo(f"{len(keys)} key(s) " + ("deleted" if execute else "would be deleted (a dry run: add --execute)"))


# ----------------------------------------------------------------- the views


async def _list(conn: Connection, namespace: str) -> list[admin.GroupInfo]:
    async with conn.connect() as nc:
        return await admin.list_groups(await admin.open_namespace(nc.jetstream(), namespace))


async def _describe(conn: Connection, name: str, namespace: str, stream: str) -> admin.GroupInfo:
    async with conn.connect() as nc:
        js = nc.jetstream()
        state = await admin.stream_state(js, stream)
        return await admin.describe_group(await admin.open_namespace(js, namespace), name, stream=state)


async def _reset(
    conn: Connection,
    name: str,
    namespace: str,
    stream: str,
    target: admin.ResetTarget,
    execute: bool,
    skip_removed: bool,
) -> admin.ResetPlan:
    async with conn.connect() as nc:
        js = nc.jetstream()
        try:  # the stream is checked before the namespace, as the reset's own check words it
            await admin.stream_state(js, stream)
        except StreamNotFound as e:
            raise StreamNotFound(stream, f"group {name!r} not reset") from e
        store = await admin.open_namespace(js, namespace)
        return await admin.reset_group(store, name, stream, target, execute=execute, skip_removed=skip_removed)


async def _delete(conn: Connection, name: str, namespace: str, execute: bool) -> tuple[str, ...]:
    async with conn.connect() as nc:
        store = await admin.open_namespace(nc.jetstream(), namespace)
        return await admin.delete_group(store, name, execute=execute)


def _group_json(g: admin.GroupInfo) -> dict[str, Any]:
    now = time.time()
    shards = [
        {"name": s.name, "m": s.m + 1, "n": s.n, "cursor": s.cursor, "done_above": s.done_above,
         "lag_events": s.lag_events, "running_on": [r.where for r in s.running_on]}
        for s in g.shards
    ]  # fmt: skip
    members = [
        {"member": m.member, "host": m.host, "pid": m.pid, "max_shards": m.max_shards, "since": m.since,
         "seen_ago": m.age, "live": m.live, "n": m.n, "at": now}
        for m in g.members
    ]  # fmt: skip
    return {
        "group": g.name,
        "namespace": g.namespace,
        "n": g.n,
        "lag_events": g.lag_events,
        "running": g.running,
        "old_generations": list(g.old_generations),
        "shards": shards,
        "members": members,
    }
