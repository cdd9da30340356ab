"""``rjet tail``: print a stream's events, as text or JSON lines."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import click
import nats.errors
import nats.js.errors
from nats.js import api

import rjet
from rjet.cli._common import Connection, connection_options, data_text, iso, run
from rjet.parallel.admin import sequence_at
from rjet.stream import parse_cursor
from rjet.wire import guard_api

if TYPE_CHECKING:
    from nats.js import JetStreamContext

_FLUSH_EVERY = 0.2  # seconds between flushes of stdout while events keep coming
_PREVIEW: Final = 80  # characters of an undecodable message's data shown
# A viewer shows what the stream holds: events removed before tail got to them (retention, a purge,
# a deleted message) are passed over with a warning on stderr, not the end of it.
_READ: Final = rjet.ReadConfig(on_removed="skip")


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
@click.option("--since", metavar="DATETIME", help="Start at the first event stored at or after this ISO 8601 time.")
@click.option(
    "--last",
    type=click.IntRange(min=1),
    metavar="N",
    help="Start with the stream's last N events (with --type or --foreign-id: the last N that match).",
)
@click.option("--to-head", is_flag=True, help="Stop after the events present at start.")
@click.option("-n", "--limit", type=click.IntRange(min=1), help="Stop after this many events (printed ones).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Stop when no event arrived for this long.",
)
@click.option("--type", "types", type=int, multiple=True, metavar="N", help="Only events of type N (repeatable).")
@click.option("--foreign-id", "foreign_ids", multiple=True, metavar="ID", help="Only events about ID (repeatable).")
@click.option("--subject", "show_subject", is_flag=True, help="Also print each event's NATS subject.")
@click.option("--headers", "show_headers", is_flag=True, help="Also print each event's NATS headers.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines (what `rjet insert` reads).")
@connection_options
def tail(
    conn: Connection,
    stream: str,
    after: str,
    from_head: bool,
    consumer: str | None,
    namespace: str | None,
    since: str | None,
    last: int | None,
    to_head: bool,
    limit: int | None,
    timeout: float | None,
    types: tuple[int, ...],
    foreign_ids: tuple[str, ...],
    show_subject: bool,
    show_headers: bool,
    as_json: bool,
) -> None:
    """Print STREAM's events in order: from the start, after a cursor, from a time, the last N, or only new ones.

    Text lines are tab-separated: ID, timestamp (UTC), type, foreign ID, [subject], [headers as a
    JSON object], data. Data is shown as text when it is UTF-8 (control characters escaped), else
    as base64:... With --json each line is {"id", "timestamp", "type", "foreign_id", ["subject"],
    ["headers"], "data"}, with "data_b64" instead of "data" for binary data.

    --type and --foreign-id keep the events that match any of their values, both when both are
    given. A message that is not an rjet event (a malformed rjet header) is reported on stderr
    with its sequence, subject, reason and the start of its data, and tail goes on.

    Without --to-head, --limit or --timeout it follows the stream until Ctrl-C.
    """
    positions = (bool(after), from_head, consumer is not None, since is not None, last is not None)
    if sum(positions) > 1:
        raise click.UsageError("give at most one of --after, --from-head, --cursor, --since and --last")
    if consumer is not None and not namespace:
        raise click.UsageError("--cursor needs --namespace (the cursor store's namespace)")
    when = None
    if since is not None:
        try:
            when = datetime.fromisoformat(since)
        except ValueError:
            raise click.UsageError(f"--since {since!r}: not an ISO 8601 date and time") from None
        if when.tzinfo is None:
            raise click.UsageError(f"--since {since!r}: give a time zone (Z or +01:00)")
    start = _Start(after, from_head, consumer, namespace, when, last)
    show = _Show(show_subject, show_headers, as_json)
    run(_tail(conn, stream, start, to_head, limit, timeout, frozenset(types), frozenset(foreign_ids), show))


@dataclasses.dataclass(frozen=True, slots=True)
class _Start:
    """Where tail starts: at most one of these is given."""

    after: str
    from_head: bool
    consumer: str | None
    namespace: str | None
    since: datetime | None
    last: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Show:
    """What each line shows besides the event."""

    subject: bool
    headers: bool
    as_json: bool

    @property
    def raw(self) -> bool:
        """Whether lines need the messages' subjects or headers."""
        return self.subject or self.headers


def format_text(event: rjet.Event, subject: str | None = None, headers: Headers | None = None) -> str:
    """One tab-separated line: ID, timestamp, type, foreign ID, [subject], [headers], data."""
    fid = event.foreign_id if event.foreign_id.isprintable() else repr(event.foreign_id)
    extra = ""
    if subject is not None:
        extra += f"\t{subject}"
    if headers is not None:
        extra += "\t" + json.dumps(headers, ensure_ascii=True, separators=(",", ":"))
    return f"{event.id}\t{iso(event.timestamp)}\t{event.type}\t{fid}{extra}\t{data_text(event.metadata)}"


def format_json(event: rjet.Event, subject: str | None = None, headers: Headers | None = None) -> str:
    """One JSON object, in the shape `rjet insert` reads (it ignores "subject" and "headers")."""
    out: dict[str, Any] = {
        "id": event.id,
        "timestamp": iso(event.timestamp),
        "type": event.type,
        "foreign_id": event.foreign_id,
    }
    if subject is not None:
        out["subject"] = subject
    if headers is not None:
        out["headers"] = headers
    try:
        out["data"] = event.metadata.decode()
    except UnicodeDecodeError:
        out["data_b64"] = base64.b64encode(event.metadata).decode()
    return json.dumps(out, ensure_ascii=False)


Headers: TypeAlias = dict[str, str | list[str]]
"""A message's headers: a value per name, a list of them (in order) for a name that is repeated."""


def parse_headers(hdr: bytes | None) -> Headers:
    """Raw NATS header bytes (``NATS/1.0\\r\\nKey: value\\r\\n...``) as a dict; every value of a
    repeated header, as a list (the event took the first, as Go's ``Header.Get`` does)."""
    out: Headers = {}
    if not hdr:
        return out
    for line in hdr.decode("utf-8", "replace").split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep:
            key, value = key.strip(), value.strip()
            if key not in out:
                out[key] = value
            elif isinstance(seen := out[key], list):
                seen.append(value)
            else:
                out[key] = [seen, value]
    return out


async def _open(
    js: JetStreamContext, name: str, after: int, from_head: bool, to_head: bool, fids: frozenset[str], raw: bool
) -> rjet.StreamClient:
    key_filter: Callable[[str], bool] | None = fids.__contains__ if fids else None
    # --subject/--headers: the client keeps each event's subject and header block (ReadConfig.keep_raw).
    read = dataclasses.replace(_READ, keep_raw=True) if raw else _READ
    return await rjet.Stream(js, name, read=read).stream(
        str(after), from_head=from_head, to_head=to_head, key_filter=key_filter
    )


async def _start_after(js: JetStreamContext, name: str, start: _Start) -> int:
    """The stream sequence tail starts after."""
    if start.consumer is not None and start.namespace:
        # Reading never creates: a mistyped namespace or cursor name says so.
        store = await rjet.JetStreamCursorStore.bind(js, start.namespace)
        record = await store.peek_record(start.consumer)
        if record is None:
            click.echo(
                f"no cursor {start.consumer!r} in namespace {start.namespace!r}: reading from the beginning", err=True
            )
        return parse_cursor(record.cursor if record is not None else "", f"cursor {start.consumer!r}")
    if start.since is None and start.last is None:
        return parse_cursor(start.after, "--after")
    state = (await rjet.Stream(js, name).info()).state
    first, last = state.first_seq, state.last_seq
    if state.messages == 0:
        return last  # nothing stored: from whatever comes next
    if start.last is not None:
        return await _last_n(js, name, start.last, first, last, state.messages, state.num_deleted or 0)
    assert start.since is not None
    return await sequence_at(js, name, start.since, first, last) - 1


async def _last_matching(
    js: JetStreamContext, name: str, n: int, after: int, types: frozenset[int], fids: frozenset[str]
) -> int:
    """The sequence after which the stream holds its last ``n`` events that match the filters: read
    back in windows growing 4 times from the last ``n`` events (``after``) until ``n`` matched or the
    stream's beginning was read."""
    info = (await rjet.Stream(js, name).info()).state
    first, last = info.first_seq, info.last_seq
    window = max(last - after, n)
    while True:
        start = max(first - 1, last - window)
        seqs: collections.deque[int] = collections.deque(maxlen=n)
        async with await _open(js, name, start, False, True, fids, False) as client:
            with contextlib.suppress(rjet.HeadReached):
                while True:
                    event = await client.recv()
                    if event.id_int > last:
                        break
                    if not types or event.type in types:
                        seqs.append(event.id_int)
        if len(seqs) == n or start <= first - 1:
            return seqs[0] - 1 if seqs else last
        window *= 4


async def _last_n(js: JetStreamContext, name: str, n: int, first: int, last: int, stored: int, deleted: int) -> int:
    """The sequence after which the stream holds its last ``n`` events."""
    if stored <= n:
        return first - 1
    after = last - n
    # Deleted messages in between: step back until the server counts n events after the start.
    while deleted and after >= first:
        have = await _count_from(js, name, after + 1)
        if have >= n:
            break
        after = max(first - 1, after - (n - have))
    return after


async def _count_from(js: JetStreamContext, name: str, seq: int) -> int:
    """How many events the stream holds from sequence ``seq`` on: a throwaway consumer's pending count."""
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=seq,
        ack_policy=api.AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=10.0,
    )
    info = await guard_api(js, name, js.add_consumer(name, config))
    try:
        return info.num_pending or 0
    finally:
        with contextlib.suppress(rjet.PermissionDenied):  # not to be deleted: reaped after inactive_threshold
            await guard_api(js, name, js.delete_consumer(name, info.name))


async def _undecodable(js: JetStreamContext, name: str, err: rjet.DecodeError) -> str:
    """The line that reports a message that is not an rjet event: where it is, why, what it holds."""
    reason = str(err).removeprefix(f"stream {name!r} sequence {err.seq}: ")
    where = f"message {err.seq}"
    preview = ""
    try:
        msg = await guard_api(js, name, js.get_msg(name, err.seq))
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError, rjet.PermissionDenied) as e:
        where += f" (cannot read it back: {type(e).__name__})"
    else:
        data = msg.data or b""
        text = data_text(data)
        if len(text) > _PREVIEW:
            text = text[:_PREVIEW] + "..."
        where += f" on subject {msg.subject!r}"
        preview = f"; data ({len(data)} bytes): {text}"
    return f"rjet: tail: {where} is not an rjet event ({reason}){preview}; skipped it"


async def _tail(
    conn: Connection,
    name: str,
    start: _Start,
    to_head: bool,
    limit: int | None,
    timeout: float | None,
    types: frozenset[int],
    fids: frozenset[str],
    show: _Show,
) -> None:
    fmt = format_json if show.as_json else format_text
    out = sys.stdout
    async with conn.connect() as nc:
        js = nc.jetstream()
        after = await _start_after(js, name, start)
        if start.last is not None and (types or fids):
            after = await _last_matching(js, name, start.last, after, types, fids)
        try:
            client = await _open(js, name, after, start.from_head, to_head, fids, show.raw)
        except (rjet.CursorExpired, rjet.StreamRecreated, rjet.CursorAhead) as e:
            if start.consumer is None or not start.namespace:
                raise
            raise e.named(start.consumer, start.namespace) from None  # its hint: the real command line
        async with client:
            printed = 0
            flushed = time.monotonic()
            loop = asyncio.get_running_loop()
            timer: asyncio.TimerHandle | None = None

            def flush() -> None:
                nonlocal timer
                timer = None
                out.flush()

            while limit is None or printed < limit:
                try:
                    if timeout is None:
                        event = await client.recv()
                    else:
                        event = await asyncio.wait_for(client.recv(), timeout)
                except (rjet.HeadReached, TimeoutError):
                    break
                except rjet.DecodeError as e:
                    # The reader has passed it: report it in order and read on.
                    out.flush()
                    click.echo(await _undecodable(js, name, e), err=True)
                    continue
                if types and event.type not in types:
                    continue
                if not show.raw:
                    out.write(fmt(event) + "\n")
                else:
                    out.write(
                        fmt(
                            event,
                            client.last_subject if show.subject else None,
                            parse_headers(client.last_headers) if show.headers else None,
                        )
                        + "\n"
                    )
                printed += 1
                now = time.monotonic()
                if client.num_pending == 0 or now - flushed > _FLUSH_EVERY:
                    out.flush()
                    flushed = now
                elif timer is None:
                    # More events are coming, but maybe none that passes the filters: flush once
                    # the loop idles for a while, so a following tail never sits on printed lines.
                    timer = loop.call_later(_FLUSH_EVERY, flush)
            if timer is not None:
                timer.cancel()
    out.flush()
