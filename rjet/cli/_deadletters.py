"""``rjet deadletters``: read back the dead letters consumers recorded, and replay them."""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import json
import re
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Literal

import click
import nats.js.errors

import rjet
from rjet.cli._common import CliError, Connection, age, connection_options, data_text, iso, one_line, run
from rjet.deadletter import DeadLetterStream, StoredDeadLetter
from rjet.wire import decode_type, foreign_id_of, guard_api, rjet_headers

if TYPE_CHECKING:
    from nats.js import JetStreamContext

_WIDTH: Final = 80  # `list` fits 80 columns
_CONSUMER_MAX: Final = 14
_EVENT_MAX: Final = 20
_ERROR_MIN: Final = 8  # with a 10-digit SEQ and every other column full, still 80
_SHARD_RE: Final = re.compile(r"^(.+)_\d+_of_\d+$")
_RANGE_RE: Final = re.compile(r"^(\d+)(?:-(\d+))?$")
_STREAM_NOT_FOUND: Final = 10059


@click.group()
def deadletters() -> None:
    """List, show and replay the dead letters in a dead-letter stream.

    STREAM is the dead-letter stream: the one given to rjet.DeadLetterStream.create, or
    Parallel(..., dead_letters=STREAM) and its workers.

    \b
        rjet deadletters list orders_dlq
        rjet deadletters list orders_dlq --consumer billing --json \\
            --since 2026-12-01T08:00:00Z
        rjet deadletters show orders_dlq 3
        rjet deadletters replay orders_dlq 3 5-9 --dry-run
        rjet deadletters replay orders_dlq --consumer billing
        rjet deadletters replay orders_dlq --consumer billing \\
            --to-stream billing_retry --create
    """


def _matches(consumer: str, names: frozenset[str]) -> bool:
    """Whether a record of ``consumer`` is one of ``names``: the consumer, or a shard of a group named so."""
    if not names or consumer in names:
        return True
    shard = _SHARD_RE.match(consumer)
    return shard is not None and shard.group(1) in names


def _warn_invalid(err: rjet.DecodeError) -> None:
    click.echo(f"rjet: deadletters: {err}; skipped it", err=True)


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.UsageError(f"--since {value!r}: not an ISO 8601 date and time") from None
    if when.tzinfo is None:
        raise click.UsageError(f"--since {value!r}: give a time zone (Z or +01:00)")
    return when


_consumer_option = click.option(
    "--consumer",
    "consumers",
    multiple=True,
    metavar="NAME",
    help="Only consumer NAME's dead letters (a Parallel group's name takes its shards' too); repeatable.",
)


# ----------------------------------------------------------------- list


@deadletters.command("list")
@click.argument("stream")
@_consumer_option
@click.option("--since", metavar="DATETIME", help="Only those recorded at or after this ISO 8601 time.")
@click.option("--last", type=click.IntRange(min=1), metavar="N", help="Only the last N (of those the filters keep).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: the whole record and its SEQ.")
@connection_options
def list_letters(
    conn: Connection, stream: str, consumers: tuple[str, ...], since: str | None, last: int | None, as_json: bool
) -> None:
    """STREAM's dead letters, one line each: SEQ, when recorded (UTC), consumer, the event
    (source stream:sequence), attempts, error (cut to fit 80 columns).

    SEQ is the dead letter's sequence in STREAM, what `show` and `replay` take. A range of events
    removed before the consumer read them shows as stream:first..last, with 0 attempts. With --json
    each line is the full record: seq, consumer, stream, event_id, type, foreign_id, timestamp (the
    event's), metadata (base64; null with "metadata_omitted": its size when it was too large to
    store), error, attempts, at (when recorded).
    """
    when = _since(since)
    found = run(_list(conn, stream, frozenset(consumers), when, last))
    if as_json:
        for letter in found:
            click.echo(json.dumps(letter.to_dict(), ensure_ascii=False))
        return
    if not found:
        click.echo(f"no dead letters in stream {stream!r}" + (" (with these filters)" if consumers or since else ""))
        return
    for line in format_list(found):
        click.echo(line)


async def _list(
    conn: Connection, stream: str, consumers: frozenset[str], since: datetime | None, last: int | None
) -> list[StoredDeadLetter]:
    async with conn.connect() as nc:
        dlq = DeadLetterStream(rjet.Stream(nc.jetstream(), stream))
        kept: collections.deque[StoredDeadLetter] = collections.deque(maxlen=last)
        async with contextlib.aclosing(dlq.records(on_invalid=_warn_invalid)) as letters:
            async for letter in letters:
                if _matches(letter.record.consumer, consumers) and (since is None or letter.record.at >= since):
                    kept.append(letter)
        return list(kept)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def _cut_event(stream: str, event_id: str, width: int) -> str:
    """``stream:event_id`` in ``width`` columns, the stream's name cut first: the sequence matters most."""
    text = f"{stream}:{event_id}"
    room = width - len(event_id) - 4  # "...:"
    if len(text) <= width or room < 1:
        return _cut(text, width)
    return f"{stream[:room]}...:{event_id}"


def format_list(letters: list[StoredDeadLetter]) -> list[str]:
    """The lines of ``list``: a header and one line per dead letter, none wider than 80 columns."""
    rows = [
        (
            str(x.seq),
            x.record.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            _printable(x.record.consumer),
            _cut_event(_printable(x.record.stream), _printable(x.record.event_id), _EVENT_MAX),
            str(x.record.attempts),
            one_line(x.record.error),
        )
        for x in letters
    ]
    head = ("SEQ", "RECORDED (UTC)", "CONSUMER", "EVENT", "ATT", "ERROR")
    w_seq = max(len(head[0]), *(len(r[0]) for r in rows))
    w_consumer = min(_CONSUMER_MAX, max(len(head[2]), *(len(r[2]) for r in rows)))
    w_event = min(_EVENT_MAX, max(len(head[3]), *(len(r[3]) for r in rows)))
    w_tries = max(len(head[4]), *(len(r[4]) for r in rows))
    fixed = w_seq + 1 + 19 + 1 + w_consumer + 1 + w_event + 1 + w_tries + 1
    w_error = max(_ERROR_MIN, _WIDTH - fixed)

    def line(r: tuple[str, str, str, str, str, str]) -> str:
        return (
            f"{r[0]:>{w_seq}} {r[1]:<19} {_cut(r[2], w_consumer):<{w_consumer}} {_cut(r[3], w_event):<{w_event}}"
            f" {r[4]:>{w_tries}} {_cut(r[5], w_error)}"
        ).rstrip()

    return [line(head), *(line(r) for r in rows)]


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)


# ----------------------------------------------------------------- show


@deadletters.command("show")
@click.argument("stream")
@click.argument("seq", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="The record as one JSON object (as `list --json` prints it).")
@connection_options
def show(conn: Connection, stream: str, seq: int, as_json: bool) -> None:
    """Dead letter SEQ of STREAM in full: the consumer, the event (stream, sequence, type, foreign
    ID, time, data), the attempts, the whole error, and when it was recorded.

    Data that was too large to store in the record is looked up in the source stream: the output
    says whether that stream still holds it (then `replay` takes it from there) or it is lost.
    """
    letter, source = run(_show(conn, stream, seq))
    if as_json:
        click.echo(json.dumps(letter.to_dict(), ensure_ascii=False))
        return
    for key, value in _show_lines(stream, letter, source):
        click.echo(f"{key + ':':<12} {value}")


async def _show(conn: Connection, stream: str, seq: int) -> tuple[StoredDeadLetter, _Source | None]:
    async with conn.connect() as nc:
        js = nc.jetstream()
        dlq = DeadLetterStream(rjet.Stream(js, stream))
        letter = await dlq.get(seq)
        if letter is None:
            state = (await dlq.stream.info()).state
            held = f"it holds {state.first_seq}..{state.last_seq}" if state.messages else "it is empty"
            raise CliError(f"no dead letter {seq} in stream {stream!r} ({held})")
        source = await _fetch_source(js, letter) if letter.metadata_omitted is not None else None
        return letter, source


def _show_lines(stream: str, letter: StoredDeadLetter, source: _Source | None) -> list[tuple[str, str]]:
    r, e = letter.record, letter.record.event
    lines = [("dead letter", f"{letter.seq} of stream {stream}"), ("consumer", _printable(r.consumer))]
    removed = letter.removed
    if removed is not None:
        lines.append(("events", f"{removed[0]}..{removed[1]} of stream {r.stream}: removed before they were read"))
    else:
        lines.append(("event", f"{r.event_id} of stream {r.stream}"))
    if e is not None:
        lines += [
            ("type", str(e.type)),
            ("foreign id", _printable(e.foreign_id)),
            ("stored", iso(e.timestamp)),
        ]
        if letter.metadata_omitted is None:
            lines.append(("data", f"({len(e.metadata)} bytes) {data_text(e.metadata)}"))
        else:
            where = f"not in the record ({letter.metadata_omitted} bytes, too large): "
            if source is not None and source.event is not None:
                where += f"stream {r.stream} still holds it at sequence {r.event_id}"
            else:
                where += f"lost: {source.why if source else 'not looked up'}"
            lines.append(("data", where))
    elif removed is None:
        lines.append(("data", "none: the message was not an rjet event (see the error)"))
    lines += [
        ("attempts", str(r.attempts)),
        ("error", one_line(r.error)),
        ("recorded", f"{iso(r.at)} ({age((datetime.now(UTC) - r.at).total_seconds())} ago)"),
    ]
    return lines


# ----------------------------------------------------------------- the source event of a record without its data


@dataclasses.dataclass(frozen=True, slots=True)
class _Source:
    """The source stream's event for a record stored without its data, or why there is none."""

    event: rjet.Event | None
    why: str = ""


async def _fetch_source(js: JetStreamContext, letter: StoredDeadLetter) -> _Source:
    """The event at the record's sequence of its source stream, checked to be the one dead-lettered
    (same type, foreign ID and stored time), decoded as rjet's reader decodes it."""
    r, e, seq = letter.record, letter.record.event, letter.source_seq
    assert e is not None
    assert seq is not None
    try:
        msg = await guard_api(js, r.stream, js.get_msg(r.stream, seq))
    except nats.js.errors.NotFoundError as err:
        if err.err_code == _STREAM_NOT_FOUND:
            return _Source(None, f"stream {r.stream!r} no longer exists")
        return _Source(None, f"sequence {seq} is no longer in stream {r.stream!r} (removed by its limits or purged)")
    hdr = base64.b64decode(msg.hdrs) if isinstance(msg.hdrs, str) else msg.hdrs
    try:
        typ_raw, fid_raw = rjet_headers(hdr) if hdr else (None, None)
        typ = decode_type(typ_raw, r.stream, seq)
        fid = (msg.subject or "") if fid_raw is None else foreign_id_of(fid_raw, r.stream, seq)
    except rjet.DecodeError as err:
        return _Source(None, f"sequence {seq} of stream {r.stream!r} is not an rjet event now ({err})")
    stored = msg.time or datetime.fromtimestamp(0, UTC)
    source = rjet.Event(str(seq), typ, fid, stored, msg.data or b"")
    if (typ, fid, source.timestamp_us) != (e.type, e.foreign_id, e.timestamp_us):
        return _Source(
            None,
            f"sequence {seq} of stream {r.stream!r} holds another event now (type {typ}, foreign id {fid!r},"
            f" stored {iso(stored)}): the stream was deleted and created again",
        )
    return _Source(source)


# ----------------------------------------------------------------- replay


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """What replay does with one dead letter."""

    letter: StoredDeadLetter
    kind: Literal["replay", "lost", "cannot"]
    target: str = ""
    event: rjet.Event | None = None  # what is inserted: the type, foreign ID and data
    why: str = ""  # for lost and cannot; for replay, where the data comes from

    @property
    def label(self) -> str:
        r = self.letter.record
        return f"{self.letter.seq} ({_printable(r.consumer)}, {r.stream}:{r.event_id})"


def _parse_selection(values: tuple[str, ...]) -> list[tuple[int, int]]:
    out = []
    for value in values:
        for part in value.split(","):
            m = _RANGE_RE.match(part.strip())
            if m is None:
                raise click.BadParameter(f"{part!r} is not a sequence or a range like 5-9", param_hint="SEQ")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) else lo
            if not 1 <= lo <= hi:
                raise click.BadParameter(f"{part!r} is not a range of sequences from 1 up", param_hint="SEQ")
            out.append((lo, hi))
    return out


def replay_msg_id(dlq: str, seq: int) -> str:
    """The ``msg_id`` replay inserts dead letter ``seq`` of ``dlq`` with: the same each run, so the
    target stream stores it once within its duplicate window."""
    return f"rjet-replay-{dlq}-{seq}"


@deadletters.command("replay")
@click.argument("stream")
@click.argument("seqs", nargs=-1, metavar="[SEQ|A-B]...")
@click.option("--all", "everything", is_flag=True, help="Every dead letter in STREAM (with --consumer: all of its).")
@_consumer_option
@click.option(
    "--to-stream",
    metavar="TARGET",
    help="Insert into TARGET instead of each record's source stream: a stream of one consumer's own.",
)
@click.option("--create", is_flag=True, help="Create --to-stream TARGET with rjet's defaults when it is missing.")
@click.option("--dry-run", is_flag=True, help="Say exactly what would be done and the counts; insert nothing.")
@connection_options
def replay(
    conn: Connection,
    stream: str,
    seqs: tuple[str, ...],
    everything: bool,
    consumers: tuple[str, ...],
    to_stream: str | None,
    create: bool,
    dry_run: bool,
) -> None:
    """Insert dead letters of STREAM again: into the stream they came from (every consumer of it
    reads them again), or with --to-stream into a stream of one consumer's own.

    Select by SEQ (as `list` shows it; ranges A-B, commas), --all, or --consumer NAME (with SEQs:
    those of NAME among them). Each event is inserted with its type, foreign ID and data: from the
    record, or, for a record stored without its data (too large), from the source stream at its
    sequence while it still holds that event; otherwise the dead letter is named as lost. A range
    of events removed before they were read, and a message that was not an rjet event, cannot be
    replayed. Each insert carries msg_id rjet-replay-STREAM-SEQ: replaying again within the target
    stream's duplicate window (2 minutes for rjet's streams) stores nothing and counts it as
    skipped. Prints one line per dead letter and "replayed N, skipped M (already replayed), lost K";
    exit status 1 when any was lost or not replayable.
    """
    if not (seqs or everything or consumers):
        raise click.UsageError("say which dead letters to replay: SEQ, A-B, --all or --consumer NAME")
    if seqs and everything:
        raise click.UsageError("give SEQs or --all, not both")
    if create and not to_stream:
        raise click.UsageError("--create goes with --to-stream")
    ranges = _parse_selection(seqs)
    failed = run(_replay(conn, stream, ranges, frozenset(consumers), to_stream, create, dry_run))
    if failed:
        raise CliError(failed)


async def _replay(
    conn: Connection,
    stream: str,
    ranges: list[tuple[int, int]],
    consumers: frozenset[str],
    to_stream: str | None,
    create: bool,
    dry_run: bool,
) -> str:
    """Replay (or with ``dry_run`` say what would be); the one-line error when any was lost or not
    replayable, else ""."""
    out = sys.stdout
    async with conn.connect() as nc:
        js = nc.jetstream()
        dlq = DeadLetterStream(rjet.Stream(js, stream))
        letters = await _select(dlq, ranges, consumers)
        plans = [await _plan(js, letter, to_stream) for letter in letters]
        targets, windows = await _targets(js, plans, to_stream, create, dry_run)
        replayed = skipped = 0
        lost = [p for p in plans if p.kind == "lost"]
        cannot = [p for p in plans if p.kind == "cannot"]
        for p in plans:
            if p.kind == "lost":
                out.write(f"lost {p.label}: {p.why}\n")
            elif p.kind == "cannot":
                out.write(f"not replayable {p.label}: {p.why}\n")
            elif dry_run:
                assert p.event is not None
                out.write(
                    f"would replay {p.label} -> stream {p.target}: type {p.event.type}, foreign id"
                    f" {_printable(p.event.foreign_id)}, {len(p.event.metadata)} bytes {p.why}\n"
                )
            else:
                assert p.event is not None
                stream_ = targets[p.target]
                assert stream_ is not None
                e = p.event
                seq, stored = await stream_.insert_once(
                    e.foreign_id, e.type, e.metadata, msg_id=replay_msg_id(stream, p.letter.seq)
                )
                if stored:
                    replayed += 1
                    out.write(f"replayed {p.label} -> stream {p.target} sequence {seq}\n")
                else:
                    skipped += 1
                    out.write(f"skipped {p.label}: already replayed (stream {p.target} sequence {seq})\n")
            out.flush()
        to_replay = sum(1 for p in plans if p.kind == "replay")
        if dry_run:
            summary = f"dry run: would replay {to_replay}, lost {len(lost)}"
        else:
            summary = f"replayed {replayed}, skipped {skipped} (already replayed), lost {len(lost)}"
        if cannot:
            summary += f", not replayable {len(cannot)}"
        if dry_run:
            summary += "; nothing inserted"
            shown = sorted({age(w) for w in windows.values()})
            if to_replay and shown:
                summary += f" (any replayed in the last {' or '.join(shown)}, the duplicate window, would be skipped)"
        out.write(summary + "\n")
        out.flush()
        parts = []
        if lost:
            parts.append(f"{len(lost)} dead letter(s) lost: {_seqs(lost)}")
        if cannot:
            parts.append(f"{len(cannot)} not replayable: {_seqs(cannot)}")
        return "; ".join(parts)


def _seqs(plans: list[_Plan], most: int = 20) -> str:
    """The dead letters' SEQs, the first ``most`` of them (each has its line on stdout)."""
    shown = ", ".join(str(p.letter.seq) for p in plans[:most])
    return shown + (f" and {len(plans) - most} more" if len(plans) > most else "")


async def _select(
    dlq: DeadLetterStream, ranges: list[tuple[int, int]], consumers: frozenset[str]
) -> list[StoredDeadLetter]:
    """The dead letters selected, in order; an error, before anything is done, for a SEQ or range
    that names none."""
    after = min(lo for lo, _ in ranges) - 1 if ranges else 0
    top = max(hi for _, hi in ranges) if ranges else None
    wanted = sorted(ranges)
    found: list[StoredDeadLetter] = []
    hits: collections.Counter[tuple[int, int]] = collections.Counter()
    async with contextlib.aclosing(dlq.records(after, on_invalid=_warn_invalid)) as letters:
        async for letter in letters:
            if top is not None and letter.seq > top:
                break
            inside = [rng for rng in wanted if rng[0] <= letter.seq <= rng[1]]
            if ranges and not inside:
                continue
            hits.update(inside)
            if _matches(letter.record.consumer, consumers):
                found.append(letter)
    missing = [rng for rng in wanted if not hits[rng]]
    if missing:
        named = ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in missing)
        state = (await dlq.stream.info()).state
        held = f"it holds {state.first_seq}..{state.last_seq}" if state.messages else "it is empty"
        raise CliError(f"no dead letter {named} in stream {dlq.stream.name!r} ({held}); nothing replayed")
    return found


async def _plan(js: JetStreamContext, letter: StoredDeadLetter, to_stream: str | None) -> _Plan:
    r, e = letter.record, letter.record.event
    removed = letter.removed
    if removed is not None:
        return _Plan(
            letter,
            "cannot",
            why=f"events {removed[0]}..{removed[1]} were removed before they were read: nothing to insert",
        )
    if e is None:
        return _Plan(letter, "cannot", why="the message was not an rjet event; read it with `rjet tail --headers`")
    target = to_stream or r.stream
    if letter.metadata_omitted is None:
        return _Plan(letter, "replay", target, e, "(from the record)")
    source = await _fetch_source(js, letter)
    if source.event is None:
        return _Plan(letter, "lost", target, why=f"its data was too large for the record, and {source.why}")
    return _Plan(letter, "replay", target, source.event, f"(from stream {r.stream} sequence {r.event_id})")


async def _targets(
    js: JetStreamContext, plans: list[_Plan], to_stream: str | None, create: bool, dry_run: bool
) -> tuple[dict[str, rjet.Stream | None], dict[str, float]]:
    """Each target stream, bound (None: to be created by --create, in a dry run), and its duplicate
    window in seconds; an error naming the dead letters that would go to a stream that does not
    exist, before anything is inserted."""
    names = sorted({p.target for p in plans if p.kind == "replay"})
    out: dict[str, rjet.Stream | None] = {}
    windows: dict[str, float] = {}
    for name in names:
        s = rjet.Stream(js, name)
        try:
            windows[name] = (await s.info()).config.duplicate_window or 0.0
        except rjet.StreamNotFound:
            if create and name == to_stream:
                if dry_run:
                    click.echo(f"would create stream {name!r} with rjet's defaults")
                    out[name] = None
                    continue
                s = await rjet.Stream.create(js, name)
                windows[name] = (await s.info()).config.duplicate_window or 0.0
                click.echo(f"created stream {name!r}")
            else:
                which = ", ".join(str(p.letter.seq) for p in plans if p.target == name and p.kind == "replay")
                hint = " (--create makes it)" if name == to_stream else ""
                raise CliError(
                    f"stream {name!r} not found{hint}: dead letter(s) {which} go there; nothing replayed"
                ) from None
        out[name] = s
    return out, windows


__all__ = ["deadletters", "format_list", "replay_msg_id"]
