"""``rjet insert``: insert events given as arguments, or as JSON lines on stdin."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Final, NamedTuple, NoReturn, TypeVar

import click
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

import rjet
from rjet.cli._common import (
    EXIT_USAGE,
    CliError,
    CliInterrupted,
    Connection,
    connection_options,
    run,
    show_progress,
    stderr_console,
)
from rjet.wire import check_type, encode_header_block

if TYPE_CHECKING:
    from nats.js import JetStreamContext, api

_BATCH = 1000

T = TypeVar("T")


class _Item(NamedTuple):
    foreign_id: str
    type: int
    data: bytes
    msg_id: str | None
    line: int = 0  # the stdin line it came from (0: an argument)


# ----------------------------------------------------------------- --create and the stream's options


class _BadValue(CliError):
    """A bad option value, said in one line; exit status 2, as for click's usage errors."""

    exit_code = EXIT_USAGE


class _OneLineType(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.5 on, not in 8.1
    """A parameter type whose bad values are one-line errors naming the option."""

    def fail(self, message: str, param: click.Parameter | None = None, ctx: click.Context | None = None) -> NoReturn:
        flag = max(param.opts, key=len) if param is not None and param.opts else self.name  # --type, not -t
        raise _BadValue(f"{flag}: {message}")


_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS: Final = {"d": 86400, "h": 3600, "m": 60, "s": 1}


class _Duration(_OneLineType):
    """A duration like ``90s``, ``30m``, ``1h``, ``7d`` or ``1h30m``, in seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip().lower()
        parts = _DURATION_RE.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            self.fail(f"{value!r} is not a duration: give a number and a unit, like 90s, 30m, 1h, 7d or 1h30m", param)
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
        if seconds <= 0:
            self.fail(f"{value!r}: the duration must be longer than 0 (leave the option out for no limit)", param)
        return seconds


_SIZE_RE: Final = re.compile(r"(\d+)\s*([kmgt]i?b?|b)?")
_SIZE_POWER: Final = {"k": 1, "m": 2, "g": 3, "t": 4}


class _Size(_OneLineType):
    """A size in bytes: ``1000000``, ``512MiB`` (powers of 1024), ``10GB`` or ``10G`` (powers of 1000)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = _SIZE_RE.fullmatch(str(value).strip().lower())
        if match is None or int(match.group(1)) <= 0:
            self.fail(f"{value!r} is not a size: give bytes, like 1000000, 512MiB, 10GB or 1TiB", param)
        unit = match.group(2) or "b"
        base = 1024 if "i" in unit else 1000
        return int(match.group(1)) * int(base ** _SIZE_POWER.get(unit[0], 0))


class _Count(_OneLineType):
    """A whole number from ``lo`` to ``hi``."""

    name = "integer"

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            n = int(str(value).strip())
        except ValueError:
            n = self.lo - 1
        if not self.lo <= n <= self.hi:
            self.fail(f"{value!r} is not a whole number from {self.lo:,} to {self.hi:,}", param)
        return n


class _EventType(_OneLineType):
    """An event type, as ``insert`` takes it (:func:`rjet.wire.check_type`)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if not isinstance(value, int):
            try:
                value = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not an integer", param)
        try:
            return check_type(value)
        except rjet.InvalidEvent as e:
            self.fail(str(e), param)


def _duration_text(seconds: float | None) -> str:
    """``1h30m`` for 5400.0; ``unlimited`` for 0 or None (how the server says no limit)."""
    if not seconds:
        return "unlimited"
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest, out = int(seconds), ""
    for unit, size in _UNIT_SECONDS.items():
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out


def _limit_text(value: int | None) -> str:
    return "unlimited" if value is None or value < 0 else f"{value:,}"


_STREAM_OPTIONS: Final[list[Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
    click.option(
        "--subjects",
        multiple=True,
        metavar="SUBJECT[,SUBJECT...]",
        help="With --create: the stream's subjects [default: STREAM.>].",
    ),
    click.option(
        "--partitions",
        type=_Count(1, 65536),  # rjet.Partitions' limit
        metavar="P",
        help="With --create: a partitioned stream of P partitions; a group whose shard count divides P reads"
        " each shard's events with a server-side filter (720 divides 1-6, 8-10, 12, 15, 16, ...).",
    ),
    click.option(
        "--replicas",
        type=_Count(1, 5),
        metavar="R",
        help="With --create: copies of each event in a cluster [default: 1].",
    ),
    click.option(
        "--max-age",
        type=_Duration(),
        metavar="DURATION",
        help="With --create: remove events older than this (90s, 30m, 1h, 7d, 1h30m) [default: keep them].",
    ),
    click.option(
        "--max-bytes",
        type=_Size(),
        metavar="SIZE",
        help="With --create: keep at most this much (512MiB, 10GB), removing the oldest events first.",
    ),
    click.option(
        "--max-msgs",
        type=_Count(1, 2**63 - 1),
        metavar="N",
        help="With --create: keep at most N events, removing the oldest first.",
    ),
]


def _stream_options(f: Callable[..., T]) -> Callable[..., T]:
    decorated: Any = f
    for option in reversed(_STREAM_OPTIONS):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True, slots=True)
class _CreateSpec:
    """What ``--create`` and the stream options ask for; None fields were not given."""

    subjects: tuple[str, ...] | None = None
    partitions: int | None = None
    replicas: int | None = None
    max_age: float | None = None
    max_bytes: int | None = None
    max_msgs: int | None = None

    @classmethod
    def of(cls, create: bool, options: dict[str, Any]) -> _CreateSpec | None:
        """The spec of ``--create`` (None without it); :class:`_BadValue` for options that cannot go together."""
        subjects = tuple(s.strip() for value in options["subjects"] for s in value.split(","))
        given = {k: v for k, v in options.items() if v is not None and v != ()}
        if not create:
            if given:
                flag = "--" + next(iter(given)).replace("_", "-")
                raise _BadValue(f"{flag} applies with --create: a stream's options are set when it is created")
            return None
        if any(not s or " " in s for s in subjects):
            raise _BadValue(f"--subjects: {', '.join(subjects)!r} has an empty subject or one with a blank")
        if options["partitions"] and subjects and not subjects[0].endswith(".>"):
            raise _BadValue(
                f"--subjects: with --partitions the first subject must end in '.>' (events are stored on"
                f" subjects below it that carry their partition), not {subjects[0]!r}"
            )
        return cls(**{**given, "subjects": subjects or None})

    def overrides(self) -> dict[str, Any]:
        """The :class:`nats.js.api.StreamConfig` fields given."""
        fields = {"num_replicas": self.replicas, "max_age": self.max_age}
        fields.update(max_bytes=self.max_bytes, max_msgs=self.max_msgs)
        return {k: v for k, v in fields.items() if v is not None}

    def differences(self, config: api.StreamConfig, partitions: rjet.Partitions | None) -> list[str]:
        """How an existing stream differs from the options given, one phrase each."""
        diffs = []
        if self.subjects is not None and sorted(config.subjects or []) != sorted(self.subjects):
            diffs.append(f"subjects are {', '.join(config.subjects or []) or 'none'}, not {', '.join(self.subjects)}")
        if self.partitions is not None and (partitions is None or partitions.count != self.partitions):
            now = "it is not partitioned" if partitions is None else f"it has {partitions.count} partitions"
            diffs.append(f"{now}, not {self.partitions}")
        if self.replicas is not None and (config.num_replicas or 1) != self.replicas:
            diffs.append(f"replicas are {config.num_replicas or 1}, not {self.replicas}")
        if self.max_age is not None and abs((config.max_age or 0) - self.max_age) > 1e-6:
            diffs.append(f"max-age is {_duration_text(config.max_age)}, not {_duration_text(self.max_age)}")
        limits: list[tuple[str, int | None, int | None]] = [
            ("max-bytes", config.max_bytes, self.max_bytes),
            ("max-msgs", config.max_msgs, self.max_msgs),
        ]
        for flag, have, want in limits:
            if want is not None and have != want:
                diffs.append(f"{flag} is {_limit_text(have)}, not {_limit_text(want)}")
        return diffs


async def _open_stream(js: JetStreamContext, name: str, create: _CreateSpec | None) -> rjet.Stream:
    """The stream to insert into: bound, created with ``create``'s options, or an error naming how an
    existing one differs from them (never silently another layout than asked for)."""
    stream = rjet.Stream(js, name)
    try:
        info = await stream.info()
    except rjet.StreamNotFound:
        if create is None:
            raise
        created = await rjet.Stream.create(
            js, name, create.subjects, partitions=create.partitions, **create.overrides()
        )
        await created.info()
        return created
    if create is not None:
        diffs = create.differences(info.config, stream.partitions)
        if diffs:
            raise CliError(
                f"stream {name!r} exists with other options: {'; '.join(diffs)}. Nothing inserted: leave those"
                " options out to insert into it as it is, or use another stream name"
            )
    return stream


@click.command()
@click.argument("stream")
@click.argument("foreign_ids", nargs=-1, metavar="[FOREIGN_ID]...")
@click.option("-t", "--type", "type_", type=_EventType(), default=0, show_default=True, help="Event type.")
@click.option("-d", "--data", default="", help="Event data (UTF-8 text) for events given as arguments.")
@click.option(
    "--create",
    is_flag=True,
    help="Create the stream when it does not exist (rjet's defaults, or the stream options below).",
)
@_stream_options
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@connection_options
def insert(
    conn: Connection,
    stream: str,
    foreign_ids: tuple[str, ...],
    type_: int,
    data: str,
    create: bool,
    quiet: bool,
    **stream_options: Any,
) -> None:
    """Insert events into STREAM: one per FOREIGN_ID argument, or JSON lines from stdin.

    With FOREIGN_ID arguments, each gets an event of --type with --data:

    \b
        rjet insert orders order-17 order-18 --type 1 --data '{"total": 12}'

    Without, each stdin line is a JSON object (blank lines are skipped):

    \b
        {"foreign_id": "order-17", "type": 1, "data": "text or any JSON value"}

    "type" defaults to --type; "data" is stored as UTF-8 text when it is a
    string and as compact JSON otherwise; "data_b64" gives binary data instead;
    "msg_id" makes the insert idempotent within the stream's duplicate window.
    Other keys (such as "id" and "timestamp" from `rjet tail --json`) are
    ignored, so `rjet tail A --json --to-head | rjet insert B` copies a stream.

    Prints how many events were inserted and their first and last sequence
    (event ID).

    --create with stream options makes the stream they describe, for example the
    partitioned layout that `rjet worker` groups read with server-side
    filtering:

    \b
        rjet insert orders --create --partitions 720 --max-age 7d order-17

    A stream that exists already must have the options given (an error names
    each difference).
    """
    spec = _CreateSpec.of(create, stream_options)
    if foreign_ids:
        items = [_Item(fid, type_, data.encode(), None) for fid in foreign_ids]
        run(_insert(conn, stream, spec, quiet, args=items))
    else:
        if data:
            raise click.UsageError("--data applies to FOREIGN_ID arguments; give data in each JSON line instead")
        if sys.stdin.isatty() and not quiet:
            click.echo("rjet: reading JSON lines from stdin (Ctrl-D to end)", err=True)
        run(_insert(conn, stream, spec, quiet, lines=sys.stdin, default_type=type_))


def parse_line(line: str, lineno: int, default_type: int) -> _Item | None:
    """The event a JSON line describes, None for a blank line; :class:`CliError` naming the line."""
    if not line.strip():
        return None
    where = f"stdin line {lineno}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise CliError(f"{where}: not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CliError(f"{where}: expected a JSON object with a foreign_id, got {type(obj).__name__}")
    fid = obj.get("foreign_id")
    if not isinstance(fid, str) or not fid:
        raise CliError(f'{where}: "foreign_id" must be a non-empty string')
    try:
        typ = check_type(obj.get("type", default_type), '"type"')
    except rjet.InvalidEvent as e:
        raise CliError(f"{where}: {e}") from None
    msg_id = obj.get("msg_id")
    if msg_id is not None and not isinstance(msg_id, str):
        raise CliError(f'{where}: "msg_id" must be a string')
    return _Item(fid, typ, _data(obj, where), msg_id, lineno)


def _data(obj: dict[str, Any], where: str) -> bytes:
    if "data_b64" in obj:
        if "data" in obj:
            raise CliError(f'{where}: give "data" or "data_b64", not both')
        try:
            return base64.b64decode(obj["data_b64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise CliError(f'{where}: "data_b64" is not base64') from None
    value = obj.get("data", "")
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class _Inserter:
    """Inserts items and counts exactly what the server acknowledged: stored, or de-duplicated."""

    def __init__(self, stream: rjet.Stream) -> None:
        self.stream = stream
        self.count = 0
        self.duplicates = 0
        self.first = 0
        self.last = 0
        self.last_line = 0  # the last stdin line whose event is acknowledged

    async def add(self, items: list[_Item]) -> None:
        """Insert ``items`` in order: runs without msg_id pipelined, the others one at a time."""
        run: list[_Item] = []
        for item in [*items, None]:
            if item is not None and item.msg_id is None:
                run.append(item)
                continue
            if run:
                self._record(run, await self._many(run))
                run = []
            if item is not None:
                await self._one(item)

    async def _many(self, items: list[_Item]) -> list[int]:
        try:
            return await self.stream.insert_many([(i.foreign_id, i.type, i.data) for i in items])
        except rjet.InsertError as e:
            self.count += e.stored
            if e.stored:
                self.last_line = items[e.stored - 1].line
            raise CliError(f"{_where(items[e.index])}: {e}; {self._so_far()}") from e
        except rjet.InvalidEvent as e:
            raise CliError(f"{e}; {self._so_far()}") from e

    async def _one(self, item: _Item) -> None:
        assert item.msg_id is not None
        try:
            seq, stored = await self.stream.insert_once(item.foreign_id, item.type, item.data, msg_id=item.msg_id)
        except (rjet.InsertError, rjet.InvalidEvent) as e:
            raise CliError(f"{_where(item)}: {e}; {self._so_far()}") from e
        if stored:
            self._record([item], [seq])
        else:
            self.duplicates += 1
            self.last_line = item.line or self.last_line

    def _record(self, items: list[_Item], seqs: list[int]) -> None:
        if seqs:
            self.first = self.first or seqs[0]
            self.last = seqs[-1]
            self.count += len(seqs)
            self.last_line = items[-1].line or self.last_line

    def _so_far(self) -> str:
        return f"{self.count} event(s) of this command stored before it" + (
            f", through stdin line {self.last_line}" if self.last_line else ""
        )

    def summary(self, name: str) -> str:
        dup = f"; {self.duplicates} de-duplicated (msg_id seen before: not stored again)" if self.duplicates else ""
        if not self.count:
            return f"inserted no events into stream {name!r}{dup}"
        return f"inserted {self.count} event(s) into stream {name!r}: sequences {self.first}..{self.last}{dup}"


def _where(item: _Item) -> str:
    return f"stdin line {item.line}" if item.line else f"foreign id {item.foreign_id!r}"


async def _insert(
    conn: Connection,
    name: str,
    create: _CreateSpec | None,
    quiet: bool,
    *,
    args: list[_Item] | None = None,
    lines: IO[str] | None = None,
    default_type: int = 0,
) -> None:
    async with conn.connect() as nc:
        js = nc.jetstream()
        stream = await _open_stream(js, name, create)  # StreamNotFound before reading any input
        inserter = _Inserter(stream)
        limit = nc.max_payload
        try:
            if args is not None:
                for item in args:
                    _check_size(item, limit)
                await inserter.add(args)
            elif lines is not None:
                await _from_lines(inserter, lines, default_type, quiet, limit)
        except CliError:
            if not quiet:
                click.echo(inserter.summary(name))
            raise
        if not quiet:
            click.echo(inserter.summary(name))


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a daemon thread: unlike ``asyncio.to_thread``, a read blocked on a terminal does not
    keep Ctrl-C from ending the program."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as e:
            result, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="rjet-stdin", daemon=True).start()
    return await fut


def _check_size(item: _Item, limit: int) -> None:
    """:class:`CliError` naming the input line of an event larger than a message may be."""
    try:
        size = len(encode_header_block(item.foreign_id, item.type, item.msg_id)) + len(item.data)
    except rjet.InvalidEvent as e:
        raise CliError(f"{_where(item)}: {e}") from None
    if size > limit:
        raise CliError(
            f"{_where(item)}: the event is {size:,} bytes with its headers; the server takes {limit:,} at most"
        )


async def _from_lines(inserter: _Inserter, lines: IO[str], default_type: int, quiet: bool, limit: int) -> None:
    console = stderr_console()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("inserting into [bold]{task.fields[stream]}[/]"),
        MofNCompleteColumn(),
        TextColumn("events"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not show_progress(console),
        transient=True,
    )
    lineno = 0

    def read_batch() -> tuple[list[_Item], CliError | None, bool]:
        """Up to a batch of events, the parse error that ended it, and whether stdin is done."""
        nonlocal lineno
        batch: list[_Item] = []
        while len(batch) < _BATCH:
            line = lines.readline()
            if not line:
                return batch, None, True
            lineno += 1
            try:
                item = parse_line(line, lineno, default_type)
                if item is not None:
                    _check_size(item, limit)
            except CliError as e:
                return batch, e, True  # the good lines before it are inserted, then it is reported
            if item is not None:
                batch.append(item)
        return batch, None, False

    # Ctrl-C ends reading, not a batch in flight: the count printed is what the server stored.
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    handled_signal = threading.current_thread() is threading.main_thread()
    if handled_signal:
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    try:
        with progress:
            task = progress.add_task("insert", total=None, stream=inserter.stream.name)
            done = False
            while not done:
                reading = asyncio.ensure_future(_in_daemon_thread(read_batch))
                stop = asyncio.ensure_future(interrupted.wait())
                await asyncio.wait({reading, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if not reading.done():
                    reading.cancel()
                    raise _Interrupted
                batch, error, done = reading.result()
                await inserter.add(batch)
                progress.update(task, completed=inserter.count)
                if error is not None:
                    raise error
                if interrupted.is_set():
                    raise _Interrupted
    except _Interrupted:
        where = f"; the next stdin line to insert is {inserter.last_line + 1}" if inserter.last_line else ""
        raise CliInterrupted(f"interrupted{where}") from None
    finally:
        if handled_signal:
            loop.remove_signal_handler(signal.SIGINT)


class _Interrupted(Exception):
    pass
