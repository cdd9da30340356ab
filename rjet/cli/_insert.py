"""``rjet insert``: insert events given as arguments, or as JSON lines on stdin."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, NamedTuple, TypeVar

import click
from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

import rjet
from rjet.cli._common import CliError, Connection, connection_options, run, show_progress, stderr_console

_BATCH = 1000

T = TypeVar("T")


class _Item(NamedTuple):
    foreign_id: str
    type: int
    data: bytes
    msg_id: str | None


@click.command()
@click.argument("stream")
@click.argument("foreign_ids", nargs=-1, metavar="[FOREIGN_ID]...")
@click.option("-t", "--type", "type_", type=int, default=0, show_default=True, help="Event type.")
@click.option("-d", "--data", default="", help="Event data (UTF-8 text) for events given as arguments.")
@click.option("--create", is_flag=True, help="Create the stream (with rjet's defaults) when it does not exist.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@connection_options
def insert(
    conn: Connection, stream: str, foreign_ids: tuple[str, ...], type_: int, data: str, create: bool, quiet: bool
) -> None:
    """Insert events into STREAM: one per FOREIGN_ID argument, or JSON lines from stdin.

    \b
    With FOREIGN_ID arguments, each gets an event of --type with --data:
        rjet insert orders order-17 order-18 --type 1 --data '{"total": 12}'
    Without, each stdin line is a JSON object (blank lines are skipped):
        {"foreign_id": "order-17", "type": 1, "data": "text or any JSON value"}
    "type" defaults to --type; "data" is stored as UTF-8 text when it is a string and as compact
    JSON otherwise; "data_b64" gives binary data instead; "msg_id" makes the insert idempotent
    within the stream's duplicate window. Other keys (such as "id" and "timestamp" from
    `rjet tail --json`) are ignored, so `rjet tail A --json --to-head | rjet insert B` copies a stream.

    Prints how many events were inserted and their first and last sequence (event ID).
    """
    if foreign_ids:
        items = [_Item(fid, type_, data.encode(), None) for fid in foreign_ids]
        run(_insert(conn, stream, create, quiet, args=items))
    else:
        if data:
            raise click.UsageError("--data applies to FOREIGN_ID arguments; give data in each JSON line instead")
        if sys.stdin.isatty() and not quiet:
            click.echo("rjet: reading JSON lines from stdin (Ctrl-D to end)", err=True)
        run(_insert(conn, stream, create, quiet, lines=sys.stdin, default_type=type_))


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
    typ = obj.get("type", default_type)
    if isinstance(typ, bool) or not isinstance(typ, int):
        raise CliError(f'{where}: "type" must be an integer, not {typ!r}')
    msg_id = obj.get("msg_id")
    if msg_id is not None and not isinstance(msg_id, str):
        raise CliError(f'{where}: "msg_id" must be a string')
    return _Item(fid, typ, _data(obj, where), msg_id)


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
    def __init__(self, stream: rjet.Stream) -> None:
        self.stream = stream
        self.count = 0
        self.first = 0
        self.last = 0

    async def add(self, items: list[_Item]) -> None:
        """Insert ``items`` in order: runs without msg_id pipelined, the others one at a time."""
        run: list[_Item] = []
        for item in [*items, None]:
            if item is not None and item.msg_id is None:
                run.append(item)
                continue
            if run:
                self._record(await self._many(run))
                run = []
            if item is not None:
                self._record([await self._one(item)])

    async def _many(self, items: list[_Item]) -> list[int]:
        try:
            return await self.stream.insert_many([(i.foreign_id, i.type, i.data) for i in items])
        except rjet.InsertError as e:
            self.count += e.stored
            raise CliError(f"{e}; {self.count} event(s) of this command stored before it") from e

    async def _one(self, item: _Item) -> int:
        try:
            return await self.stream.insert(item.foreign_id, item.type, item.data, msg_id=item.msg_id)
        except rjet.InsertError as e:
            raise CliError(f"{e}; {self.count} event(s) of this command stored before it") from e

    def _record(self, seqs: list[int]) -> None:
        if seqs:
            self.first = self.first or seqs[0]
            self.last = seqs[-1]
            self.count += len(seqs)


async def _insert(
    conn: Connection,
    name: str,
    create: bool,
    quiet: bool,
    *,
    args: list[_Item] | None = None,
    lines: IO[str] | None = None,
    default_type: int = 0,
) -> None:
    async with conn.connect() as nc:
        js = nc.jetstream()
        stream = await rjet.Stream.create(js, name) if create else rjet.Stream(js, name)
        await stream.info()  # StreamNotFound before reading any input
        inserter = _Inserter(stream)
        try:
            if args is not None:
                await inserter.add(args)
            elif lines is not None:
                await _from_lines(inserter, lines, default_type, quiet)
        finally:
            if not quiet and inserter.count:
                click.echo(
                    f"inserted {inserter.count} event(s) into stream {name!r}:"
                    f" sequences {inserter.first}..{inserter.last}"
                )
        if not quiet and not inserter.count:
            click.echo(f"inserted no events into stream {name!r}")


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


async def _from_lines(inserter: _Inserter, lines: IO[str], default_type: int, quiet: bool) -> None:
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
            except CliError as e:
                return batch, e, True
            if item is not None:
                batch.append(item)
        return batch, None, False

    with progress:
        task = progress.add_task("insert", total=None, stream=inserter.stream.name)
        done = False
        while not done:
            batch, error, done = await _in_daemon_thread(read_batch)
            await inserter.add(batch)
            progress.update(task, completed=inserter.count)
            if error is not None:
                raise error
