"""``rjet tail``: print a stream's events, as text or JSON lines."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from typing import Any

import click

import rjet
from rjet.cli._common import Connection, connection_options, iso, run

_FLUSH_EVERY = 0.2  # seconds between flushes of stdout while events keep coming


@click.command()
@click.argument("stream")
@click.option("--after", default="", metavar="CURSOR", help="Start after this event ID (default: from the start).")
@click.option("--from-head", is_flag=True, help="Print only events inserted from now on.")
@click.option(
    "--cursor",
    "consumer",
    metavar="NAME",
    help="Start after consumer NAME's stored cursor (read, not claimed; needs --namespace).",
)
@click.option("--namespace", metavar="NS", help="Cursor namespace of --cursor.")
@click.option("--to-head", is_flag=True, help="Stop after the events present at start.")
@click.option("-n", "--limit", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop when no event arrived for this long.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines (what `rjet insert` reads).")
@connection_options
def tail(
    conn: Connection,
    stream: str,
    after: str,
    from_head: bool,
    consumer: str | None,
    namespace: str | None,
    to_head: bool,
    limit: int | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Print STREAM's events in order: from the start, after a cursor, or only new ones.

    \b
    Text lines are tab-separated: ID, timestamp (UTC), type, foreign ID, data. Data is shown as
    text when it is UTF-8 (control characters escaped), else as base64:... With --json each line
    is {"id", "timestamp", "type", "foreign_id", "data"}, with "data_b64" instead of "data" for
    binary data. Without --to-head, --limit or --timeout it follows the stream until Ctrl-C.
    """
    if sum([bool(after), from_head, consumer is not None]) > 1:
        raise click.UsageError("give at most one of --after, --from-head and --cursor")
    if consumer is not None and not namespace:
        raise click.UsageError("--cursor needs --namespace (the cursor store's namespace)")
    run(_tail(conn, stream, after, from_head, consumer, namespace, to_head, limit, timeout, as_json))


def format_text(event: rjet.Event) -> str:
    """One tab-separated line: ID, timestamp, type, foreign ID, data."""
    try:
        data = event.metadata.decode()
    except UnicodeDecodeError:
        data = "base64:" + base64.b64encode(event.metadata).decode()
    else:
        if not data.isprintable():
            data = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in data)
    fid = event.foreign_id if event.foreign_id.isprintable() else repr(event.foreign_id)
    return f"{event.id}\t{iso(event.timestamp)}\t{event.type}\t{fid}\t{data}"


def format_json(event: rjet.Event) -> str:
    """One JSON object, in the shape `rjet insert` reads."""
    out: dict[str, Any] = {
        "id": event.id,
        "timestamp": iso(event.timestamp),
        "type": event.type,
        "foreign_id": event.foreign_id,
    }
    try:
        out["data"] = event.metadata.decode()
    except UnicodeDecodeError:
        out["data_b64"] = base64.b64encode(event.metadata).decode()
    return json.dumps(out, ensure_ascii=False)


async def _tail(
    conn: Connection,
    name: str,
    after: str,
    from_head: bool,
    consumer: str | None,
    namespace: str | None,
    to_head: bool,
    limit: int | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    fmt = format_json if as_json else format_text
    out = sys.stdout
    async with conn.connect() as nc:
        js = nc.jetstream()
        if consumer is not None and namespace:
            # Reading never creates: a mistyped namespace or cursor name says so.
            store = await rjet.JetStreamCursorStore.bind(js, namespace)
            record = await store.peek_record(consumer)
            if record is None:
                click.echo(f"no cursor {consumer!r} in namespace {namespace!r}: reading from the beginning", err=True)
            after = record.cursor if record is not None else ""
        stream = rjet.Stream(js, name)
        async with await stream.stream(after, from_head=from_head, to_head=to_head) as client:
            printed = 0
            flushed = time.monotonic()
            while limit is None or printed < limit:
                try:
                    if timeout is None:
                        event = await client.recv()
                    else:
                        event = await asyncio.wait_for(client.recv(), timeout)
                except (rjet.HeadReached, TimeoutError):
                    break
                out.write(fmt(event) + "\n")
                printed += 1
                now = time.monotonic()
                if client.num_pending == 0 or now - flushed > _FLUSH_EVERY:
                    out.flush()
                    flushed = now
    out.flush()
