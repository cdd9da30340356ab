"""``rjet cursor``: read a consumer's stored cursor, or move it on purpose (after CursorExpired, say)."""

from __future__ import annotations

import click

import rjet
from rjet._progress import decode_done
from rjet.cli._common import CliError, Connection, connection_options, run


@click.command()
@click.argument("name")
@click.option("--namespace", required=True, metavar="NS", help="Cursor namespace (KV bucket rjet_cursors_NS).")
@click.option(
    "--set",
    "value",
    metavar="SEQ|first|last|beginning",
    help="Store a new cursor: a stream sequence, 'first' (just before the stream's first retained event),"
    " 'last' (after every event present now) or 'beginning' (no cursor: from the start).",
)
@click.option("--stream", metavar="STREAM", help="The stream that 'first' and 'last' refer to.")
@connection_options
def cursor(conn: Connection, name: str, namespace: str, value: str | None, stream: str | None) -> None:
    """Print consumer NAME's stored cursor, or with --set, move it.

    \b
    Moving a cursor is how to go on after rjet.CursorExpired (events after the cursor expired:
    --set first) or rjet.CursorAhead (the stream was recreated: --set beginning). Stop the
    consumer first: one that is running is fenced by the write and stops with CursorConflict.
        rjet cursor billing --namespace shop --set first --stream orders
    """
    if value in ("first", "last") and not stream:
        raise click.UsageError(f"--set {value} needs --stream")
    click.echo(run(_cursor(conn, name, namespace, value, stream)))


async def _cursor(conn: Connection, name: str, namespace: str, value: str | None, stream: str | None) -> str:
    async with conn.connect() as nc:
        js = nc.jetstream()
        if value is None:  # reading never creates: an unknown namespace or cursor is an error
            async with await rjet.JetStreamCursorStore.bind(js, namespace) as store:
                record = await store.peek_record(name)
            if record is None:
                raise CliError(f"no cursor {name!r} in namespace {namespace!r}")
            if record.done:  # on stderr: stdout stays the cursor alone, for scripts
                click.echo(f"{name}: {_done_count(record)} event(s) above it done already (exact progress)", err=True)
            return record.cursor or "(none: from the beginning)"
        async with await rjet.JetStreamCursorStore.create(js, namespace) as store:
            if value == "beginning":
                new = ""
            elif value in ("first", "last"):
                assert stream is not None
                state = (await rjet.Stream(js, stream).info()).state
                new = str(max(state.first_seq - 1, 0) if value == "first" else state.last_seq)
            elif value.isascii() and value.isdigit():
                new = str(int(value))
            else:
                raise CliError(f"--set {value!r}: give a stream sequence, 'first', 'last' or 'beginning'")
            record = await store.peek_record(name)
            old = record.cursor if record is not None else ""
            await store.set_cursor(name, new)
            await store.flush()
            dropped = (
                f" (dropped the {_done_count(record)} event(s) recorded as done above {old})"
                if record and record.done
                else ""
            )
            return f"{name}: {old or '(none)'} -> {new or '(none: from the beginning)'}{dropped}"


def _done_count(record: rjet.CursorRecord) -> int | str:
    """How many events ``record`` holds as done above its cursor ("?" when unreadable)."""
    try:
        return len(decode_done(int(record.cursor or 0), record.done or ""))
    except ValueError:
        return "?"
