"""``rjet cursor``: read a consumer's stored cursor, or move it on purpose (after CursorExpired, say)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

import rjet
from rjet.cli._common import CliError, Connection, connection_options, run
from rjet.parallel import admin
from rjet.sql import SqlCursorStore

if TYPE_CHECKING:
    from nats.js import JetStreamContext


def _check_set(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A usage error (exit status 2) for anything but a stream sequence, first, last or beginning."""
    if value is None or value in ("first", "last", "beginning") or (value.isascii() and value.isdigit()):
        return value
    raise click.BadParameter(f"{value!r}: give a stream sequence, 'first', 'last' or 'beginning'", ctx, param)


@click.command()
@click.argument("name")
@click.option("--namespace", metavar="NS", help="Cursor namespace (KV bucket rjet_cursors_NS).")
@click.option(
    "--cursors",
    metavar="URL",
    help="The SQL database that keeps it instead (sqlite:///PATH, postgresql://...; no --namespace).",
)
@click.option(
    "--set",
    "value",
    metavar="SEQ|first|last|beginning",
    callback=_check_set,
    help="Store a new cursor: a stream sequence, 'first' (just before the stream's first retained event),"
    " 'last' (after every event present now) or 'beginning' (no cursor: from the start).",
)
@click.option(
    "--stream",
    metavar="STREAM",
    help="The stream the cursor counts in: needed for 'first' and 'last', and for SEQ when the stored record"
    " names no stream.",
)
@click.option(
    "--skip-removed",
    is_flag=True,
    help="Accept a SEQ before the stream's first retained event: the cursor is set just before that event and"
    " the events removed in between are skipped.",
)
@connection_options
def cursor(
    conn: Connection,
    name: str,
    namespace: str | None,
    cursors: str | None,
    value: str | None,
    stream: str | None,
    skip_removed: bool,
) -> None:
    """Print consumer NAME's stored cursor, or with --set, move it.

    Moving a cursor is how to go on after rjet.CursorExpired (events after the
    cursor expired: --set first) or rjet.CursorAhead (the stream was recreated:
    --set beginning). Stop the consumer first: one that is running is fenced by
    the write and stops with CursorConflict.

    \b
        rjet cursor billing --namespace shop --set first --stream orders

    The new record names the stream it counts in (--stream, or the one the
    stored record names), so a stream deleted and created again later raises
    rjet.StreamRecreated. Refused: a stream that does not exist, SEQ past its
    last sequence, SEQ before its first retained event (unless --skip-removed),
    and a cursor recorded in another stream (or in an earlier stream of the same
    name, unless --stream names it). With --cursors URL the same, on its row in
    that database (the streams are still read from the server).
    """
    if cursors is not None and namespace is not None:
        raise click.UsageError("--cursors URL names the cursor's store: without --namespace")
    if cursors is None and namespace is None:
        raise click.UsageError("Missing option '--namespace' (or --cursors URL).")
    if value in ("first", "last") and not stream:
        raise click.UsageError(f"--set {value} needs --stream")
    if skip_removed and value is None:
        raise click.UsageError("--skip-removed goes with --set")
    if cursors is not None and value is None:
        click.echo(run(_sql_cursor(name, cursors)))
        return
    click.echo(run(_cursor(conn, name, namespace, value, stream, skip_removed, cursors)))


async def _cursor(
    conn: Connection,
    name: str,
    namespace: str | None,
    value: str | None,
    stream: str | None,
    skip_removed: bool,
    url: str | None = None,
) -> str:
    async with conn.connect() as nc:
        js = nc.jetstream()
        if url is not None:
            assert value is not None
            async with await SqlCursorStore.open(url) as sql:
                return await _set(sql, name, value, stream, skip_removed, js)
        assert namespace is not None
        if value is None:  # reading never creates: an unknown namespace or cursor is an error
            async with await rjet.JetStreamCursorStore.bind(js, namespace) as store:
                record = await store.peek_record(name)
            if record is None:
                raise CliError(f"no cursor {name!r} in namespace {namespace!r}")
            if record.done:  # on stderr: stdout stays the cursor alone, for scripts
                click.echo(f"{name}: {_done_count(record)} event(s) above it done already (exact progress)", err=True)
            return record.cursor or "(none: from the beginning)"
        async with await rjet.JetStreamCursorStore.create(js, namespace) as store:
            return await _set(store, name, value, stream, skip_removed, js)


async def _set(
    store: rjet.JetStreamCursorStore | SqlCursorStore,
    name: str,
    value: str,
    stream: str | None,
    skip_removed: bool,
    js: JetStreamContext,
) -> str:
    try:
        change = await admin.set_cursor(store, name, value, stream=stream, skip_removed=skip_removed, js=js)
    except admin.NeedsStream as e:
        raise click.UsageError(str(e)) from None
    old, new = (change.old.cursor if change.old is not None else ""), change.new.cursor
    dropped = (
        f" (dropped the {_done_count(change.old)} event(s) recorded as done above {old})"
        if change.old and change.old.done
        else ""
    )
    said = "".join(f" ({note})" for note in change.notes)
    return f"{name}: {old or '(none)'} -> {new or '(none: from the beginning)'}{dropped}{said}"


async def _sql_cursor(name: str, url: str) -> str:
    async with await SqlCursorStore.open(url) as store:
        record = await store.peek_record(name)
    if record is None:
        raise CliError(f"no cursor {name!r} in {url.split('@')[-1]}")
    if record.done:  # on stderr: stdout stays the cursor alone, for scripts
        click.echo(f"{name}: {_done_count(record)} event(s) above it done already (exact progress)", err=True)
    return record.cursor or "(none: from the beginning)"


def _done_count(record: rjet.CursorRecord) -> int | str:
    """How many events ``record`` holds as done above its cursor ("?" when unreadable)."""
    count = admin.done_count(record)
    return "?" if count is None else count
