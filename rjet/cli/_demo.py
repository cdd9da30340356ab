"""``rjet demo``: insert events for many foreign IDs while a Parallel group consumes them, and check order.

Each worker's handler appends ``<sequence> <foreign id>`` to a file of its own (named after its shard
and process) in a temporary directory. The parent reads those files as they grow: it counts what each
shard handled, spots duplicates (at-least-once redeliveries) and order violations (an event handled
for the first time after a later event of the same foreign ID), and checks that each event was
handled by the shard its foreign ID belongs to.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click
import nats.errors
import nats.js.errors
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

import rjet
from rjet._nats.denials import guard_api
from rjet._tasks import cancel_and_wait
from rjet.cli._common import (
    CliError,
    Connection,
    embedded_connection_options,
    run,
    show_progress,
    stderr_console,
    stdout_console,
)
from rjet.fate import NEVER, Fate, RandomFate
from rjet.parallel import Parallel, Summary, shard_name, shard_of
from rjet.partitions import DEFAULT_PARTITIONS, Partitions
from rjet.server import EmbeddedServer
from rjet.testing import KeyOrder

if TYPE_CHECKING:
    from nats.js import JetStreamContext


_GROUP: Final = "demo"
_BATCH: Final = 250
_TICK: Final = 0.1
_STALL: Final = 30.0  # seconds without progress before the demo gives up

_shard_here: int | None = None  # the shard this worker process runs (set by _on_start, in the worker)


def _on_start(m: int) -> None:
    """Runs in each worker process before it consumes: remember which shard this process runs."""
    global _shard_here
    _shard_here = m


class DemoHandler:
    """The demo's handler: spins for ``cost_us`` microseconds, records the event, then tempts fate.

    Recording before ``fate.tempt()`` makes an injected failure look like a crash right after the side
    effect: the event is delivered again and shows up as a duplicate, never as a loss.
    """

    def __init__(self, outdir: str, cost_us: float) -> None:
        self.outdir = outdir
        self.cost_ns = int(cost_us * 1000)
        self._fd: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"outdir": self.outdir, "cost_ns": self.cost_ns}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.outdir = state["outdir"]
        self.cost_ns = state["cost_ns"]
        self._fd = None

    def __call__(self, fate: Fate, event: rjet.Event) -> None:
        if self.cost_ns:
            end = time.perf_counter_ns() + self.cost_ns
            while time.perf_counter_ns() < end:
                pass
        if self._fd is None:
            shard = "x" if _shard_here is None else str(_shard_here)
            path = os.path.join(self.outdir, f"{shard}-{os.getpid()}.log")
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(self._fd, f"{event.id} {event.foreign_id}\n".encode())
        fate.tempt()


@dataclasses.dataclass
class _Tally:
    """The parent's count of one shard."""

    name: str
    expected: int = 0
    handled: int = 0  # distinct events handled
    duplicates: int = 0
    violations: int = 0
    misrouted: int = 0  # events of other shards handled by this one
    top: int = 0  # highest sequence handled
    last: int = 0  # highest sequence inserted for this shard
    done_at: float | None = None
    pending: collections.deque[tuple[int, float]] = dataclasses.field(default_factory=collections.deque)
    rate: collections.deque[tuple[float, int]] = dataclasses.field(default_factory=collections.deque)


class Checker:
    """Reads the handlers' record files as they grow and checks per-key order."""

    def __init__(self, outdir: Path, n: int) -> None:
        self.outdir = outdir
        self.n = n
        self.shards = [_Tally(shard_name(_GROUP, m, n)) for m in range(n)]
        self.unique = 0
        self.inserted = 0
        self._files: dict[str, tuple[int, bytes]] = {}  # file name -> (offset, partial last line)
        self._order: list[str] = []
        self._keys = KeyOrder()
        self._shard_of: dict[str, int] = {}

    def shard(self, foreign_id: str) -> int:
        m = self._shard_of.get(foreign_id)
        if m is None:
            m = self._shard_of[foreign_id] = shard_of(foreign_id, self.n)
        return m

    def expect(self, seqs: list[int], foreign_ids: list[str], at: float) -> None:
        """Note inserted events (sequence, foreign ID), stored at ``at``."""
        self.inserted += len(seqs)
        for seq, fid in zip(seqs, foreign_ids, strict=True):
            t = self.shards[self.shard(fid)]
            t.expected += 1
            t.last = max(t.last, seq)
            if seq > t.top:
                t.pending.append((seq, at))

    def poll(self) -> None:
        """Read what the handlers wrote since the last poll."""
        with os.scandir(self.outdir) as it:
            new = [(e.stat().st_mtime_ns, e.name) for e in it if e.name not in self._files]
        for _, name in sorted(new):
            self._files[name] = (0, b"")
            self._order.append(name)
        for name in self._order:
            offset, partial = self._files[name]
            with open(self.outdir / name, "rb") as f:
                f.seek(offset)
                data = f.read()
            if not data:
                continue
            lines = (partial + data).split(b"\n")
            self._files[name] = (offset + len(data), lines.pop())
            writer = name.partition("-")[0]
            for line in lines:
                seq_text, _, fid = line.decode().partition(" ")
                self._record(int(seq_text), fid, writer)

    def _record(self, seq: int, fid: str, writer: str) -> None:
        m = self.shard(fid)
        t = self.shards[m]
        if writer != str(m) and writer.isdigit() and int(writer) < self.n:
            self.shards[int(writer)].misrouted += 1
        violations = len(self._keys.violations)
        if not self._keys.record(seq, fid):
            t.duplicates += 1
            return
        self.unique += 1
        t.handled += 1
        t.violations += len(self._keys.violations) - violations
        if seq > t.top:
            t.top = seq
        while t.pending and t.pending[0][0] <= t.top:
            t.pending.popleft()

    @property
    def duplicates(self) -> int:
        return sum(t.duplicates for t in self.shards)

    @property
    def violations(self) -> int:
        return sum(t.violations for t in self.shards)

    @property
    def misrouted(self) -> int:
        return sum(t.misrouted for t in self.shards)


def _per_s(count: int, seconds: float) -> str:
    """An average rate, formatted the same in the live view and the summary (so they agree)."""
    return f"{count / seconds:,.0f}" if seconds > 0 else "-"


@dataclasses.dataclass(frozen=True, slots=True)
class DemoConfig:
    """What ``rjet demo`` runs."""

    events: int
    keys: int
    workers: int
    cost_us: float
    rate: float
    fate: float
    seed: int
    keep: bool
    give_up: float = _STALL
    partitioned: bool = False

    @property
    def layout(self) -> Partitions | None:
        """The demo stream's partitions (None: not partitioned)."""
        return Partitions(DEFAULT_PARTITIONS) if self.partitioned else None


class _Demo:
    def __init__(self, cfg: DemoConfig, console: Console, stream_name: str) -> None:
        self.cfg = cfg
        self.console = console
        self.live = show_progress(console)
        self.t0 = 0.0
        self.t_end: float | None = None
        self.insert_done: float | None = None
        self.head = 0  # the last event's sequence
        self.stream_name = stream_name
        self.created = False  # whether the demo's stream exists (what --keep keeps)
        self.checker: Checker | None = None
        self.group: Parallel | None = None

    # Every rate the demo shows, live and in the summary, is an average since the first insert (t0):
    # the same numbers in both places, the live ones settling on the summary's at the end.

    def handling_time(self, now: float) -> float:
        """Seconds from the first insert to the last event handled (or to ``now`` while running)."""
        return (self.t_end or now) - self.t0

    def insert_time(self, now: float) -> float:
        """Seconds from the first insert to the last (or to ``now`` while inserting)."""
        return (self.insert_done or now) - self.t0

    def shard_time(self, t: _Tally, now: float) -> float:
        """Seconds from the first insert to the shard's last event (or to ``now``)."""
        return (t.done_at or self.t_end or now) - self.t0

    # ----------------------------------------------------------------- the run

    async def run(self, conn: Connection) -> tuple[Checker, Summary | None]:
        cfg = self.cfg
        async with conn.connect() as nc:
            js = nc.jetstream()
            stream = await rjet.Stream.create(js, self.stream_name, partitions=cfg.layout.count if cfg.layout else None)
            self.created = True
            outdir = Path(tempfile.mkdtemp(prefix="rjet-demo-"))
            try:
                self.checker = Checker(outdir, cfg.workers)
                self.group = Parallel(
                    _GROUP,
                    cfg.workers,
                    DemoHandler(str(outdir), cfg.cost_us),
                    servers=list(conn.servers),
                    stream=self.stream_name,
                    namespace=self.stream_name,
                    connect_options=conn.options,
                    fate=RandomFate(cfg.fate) if cfg.fate else NEVER,
                    on_start=_on_start,
                    stop_timeout=5.0,
                    restart_delay=0.2,
                    flush_interval=0.25,
                )
                summary = await self._run_group(stream, self.group, self.checker)
                return self.checker, summary
            finally:
                shutil.rmtree(outdir, ignore_errors=True)
                if not cfg.keep and nc.is_connected:
                    await _delete(js, self.stream_name)

    async def _run_group(self, stream: rjet.Stream, group: Parallel, checker: Checker) -> Summary | None:
        task = asyncio.create_task(group.run_async())
        inserter: asyncio.Task[None] | None = None
        try:
            await self._wait_started(group, task)
            self.t0 = time.monotonic()
            inserter = asyncio.create_task(self._insert(stream, checker))
            with self._display() as update:
                await self._watch(task, inserter, checker, update)
            group.stop()
            return await task
        except BaseException:
            # Interrupted or failed: the demo's data is throwaway, so kill the workers rather than wait
            # for them (on Ctrl-C the terminal may have stopped the embedded server already).
            logging.getLogger("rjet.parallel").setLevel(logging.CRITICAL)
            group.stop(force=True)
            raise
        finally:
            await cancel_and_wait([inserter])  # it may swallow one cancellation (rjet/_tasks.py)
            if not task.done():
                await asyncio.wait({task}, timeout=1.5)
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            for t in (inserter, task):
                if t is not None and t.done() and not t.cancelled():
                    t.exception()  # retrieved: no "exception was never retrieved" warning

    async def _wait_started(self, group: Parallel, task: asyncio.Task[Summary]) -> None:
        deadline = time.monotonic() + 60
        while True:
            if task.done():
                task.result()
                raise CliError("the worker group stopped before it started")
            shards = group.statistics().shards
            if len(shards) == self.cfg.workers and all(s.state == "running" for s in shards):
                return
            if time.monotonic() > deadline:
                raise CliError(f"the {self.cfg.workers} worker processes did not start within 60s")
            await asyncio.sleep(0.05)

    async def _insert(self, stream: rjet.Stream, checker: Checker) -> None:
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        names = [f"key-{k}" for k in range(cfg.keys)]
        sent = 0
        while sent < cfg.events:
            size = min(_BATCH, cfg.events - sent)
            fids = [names[rng.randrange(cfg.keys)] for _ in range(size)]
            seqs = await stream.insert_many([(fid, 1, b'{"n":%d}' % (sent + i)) for i, fid in enumerate(fids)])
            checker.expect(seqs, fids, time.time())
            self.head = max(self.head, seqs[-1])
            sent += size
            if cfg.rate:
                ahead = self.t0 + sent / cfg.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            else:
                await asyncio.sleep(0)
        self.insert_done = time.monotonic()

    async def _watch(
        self,
        task: asyncio.Task[Summary],
        inserter: asyncio.Task[None],
        checker: Checker,
        update: Any,
    ) -> None:
        last_progress, last_unique = time.monotonic(), -1
        while True:
            now = time.monotonic()
            checker.poll()
            if self.insert_done is not None:
                for t in checker.shards:
                    if t.done_at is None and t.handled >= t.expected:
                        t.done_at = now
            update()
            if inserter.done() and inserter.exception() is not None:
                inserter.result()
            if checker.unique >= self.cfg.events and self.insert_done is not None:
                if self.t_end is None:
                    self.t_end = now
                    for t in checker.shards:
                        t.done_at = t.done_at or now
                if self._caught_up():
                    update()
                    return
            if task.done():
                task.result()
                raise CliError("the worker group stopped before every event was handled")
            if checker.unique != last_unique:
                last_progress, last_unique = now, checker.unique
            elif now - last_progress > self.cfg.give_up:
                if self.t_end is not None:
                    raise CliError("every event was handled, but not every shard's cursor got to its last in time")
                raise CliError(
                    f"no progress for {self.cfg.give_up:g}s: {checker.unique} of {self.cfg.events} events handled"
                    + (" (every handler call fails: --fate 1)" if self.cfg.fate >= 1 else "")
                )
            await asyncio.sleep(_TICK)

    def _caught_up(self) -> bool:
        """Whether every shard has stored a cursor at the last event it reads: the stream's last (it read
        past the others' events too), or on a partitioned stream that it can split, its own last."""
        if self.group is None or self.checker is None:
            return False
        layout = self.cfg.layout
        own = layout is not None and layout.divides(self.cfg.workers)
        for s in self.group.statistics().shards:
            target = self.checker.shards[s.shard].last if own else self.head
            if not (s.cursor.isdigit() and int(s.cursor) >= target):
                return False
        return True

    # ----------------------------------------------------------------- the display

    @contextlib.contextmanager
    def _display(self) -> Iterator[Any]:
        if not self.live:
            yield lambda: None
            return
        with Live(self._render(), console=self.console, auto_refresh=False, transient=False) as live:
            handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
            old = [h.setStream(sys.stderr) for h in handlers]  # through Live's proxy: logs print above it
            last = 0.0

            def update() -> None:
                nonlocal last
                now = time.monotonic()
                if now - last >= 0.125:
                    live.update(self._render(), refresh=True)
                    last = now

            try:
                yield update
                live.update(self._render(), refresh=True)
            finally:
                for h, stream in zip(handlers, old, strict=True):
                    if stream is not None:
                        h.setStream(stream)

    def _render(self) -> RenderableType:
        cfg = self.cfg
        checker = self.checker
        if checker is None or not self.t0:
            return Text("starting workers...")
        now = time.monotonic()
        wall = time.time()
        table = Table.grid(padding=(0, 2))
        bar = max(10, min(30, self.console.width - 70))  # the rest of a row takes about 60 columns
        for justify in ("left", "left", "right", "right", "right"):
            table.add_column(justify=justify)
        table.add_row(
            "inserted",
            ProgressBar(total=cfg.events, completed=checker.inserted, width=bar),
            f"{checker.inserted:,} / {cfg.events:,}",
            "",
            f"{_per_s(checker.inserted, self.insert_time(now))} ev/s",
        )
        lag_events, lag_age = 0, 0.0
        for t in checker.shards:
            age = wall - t.pending[0][1] if t.pending else 0.0
            lag_events += len(t.pending)
            lag_age = max(lag_age, age)
            table.add_row(
                t.name,
                ProgressBar(total=max(t.expected, 1), completed=t.handled, width=bar),
                f"{t.handled:,} / {t.expected:,}",
                f"lag {len(t.pending):,} ({age:.1f}s)",
                f"{_per_s(t.handled, self.shard_time(t, now))} ev/s",
            )
        took = self.handling_time(now)
        line = Text.assemble(
            f"handled {checker.unique:,} of {cfg.events:,} in {took:.2f}s:"
            f" {_per_s(checker.unique, took)} events/s since the first insert\n",
            f"lag {lag_events:,} events ({lag_age:.1f}s) · duplicates {checker.duplicates} · order violations ",
            (str(checker.violations), "bold red" if checker.violations else "bold green"),
        )
        return Group(table, line)


async def _delete(js: JetStreamContext, name: str) -> None:
    for what in (name, f"KV_rjet_cursors_{name}"):
        # A refused delete is given up at once (PermissionDenied), not after the API timeout.
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError, rjet.PermissionDenied):
            await guard_api(js, what, js.delete_stream(what))


def _stream_line(cfg: DemoConfig) -> str:
    layout = cfg.layout
    if layout is None:
        return "stream: not partitioned: every shard read every event (try --partitioned)"
    if layout.divides(cfg.workers):
        return f"stream: partitioned ({layout.count}): each shard read only its own events"
    return f"stream: partitioned ({layout.count}), but {cfg.workers} shards cannot split it: each read every event"


def _summary(
    cfg: DemoConfig, demo: _Demo, checker: Checker, summary: Summary | None, failure: str | None = None
) -> tuple[Table, list[str], bool]:
    """The summary table, the lines under it, and whether the demo passed; ``failure``: why it stopped early."""
    now = time.monotonic()
    started = demo.t0 > 0  # the workers ran and inserting began
    table = Table(
        title="rjet demo: summary",
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        show_edge=False,
        pad_edge=False,
    )
    # On a narrow terminal the one wrappable column's header breaks at its blank; names and numbers stay whole.
    for col in ("shard", "handled", "duplicates", "order violations", "restarts", "cursor", "events/s"):
        table.add_column(col, justify="left" if col == "shard" else "right", no_wrap=col != "order violations")
    stats = {s.shard: s for s in summary.shards} if summary is not None else {}
    for m, t in enumerate(checker.shards):
        s = stats.get(m)
        table.add_row(
            t.name,
            f"{t.handled:,}",
            str(t.duplicates),
            str(t.violations),
            "-" if s is None else str(s.restarts),
            "-" if s is None else s.cursor or "-",
            _per_s(t.handled, demo.shard_time(t, now)) if started else "-",
        )
    table.add_section()
    table.add_row(
        "total",
        f"{checker.unique:,}",
        str(checker.duplicates),
        str(checker.violations),
        "-" if summary is None else str(sum(s.restarts for s in summary.shards)),
        "",
        _per_s(checker.unique, demo.handling_time(now)) if started else "-",
    )
    lines = []
    if started:
        took, ins = demo.handling_time(now), demo.insert_time(now)
        lines += [
            f"handled {checker.unique:,} events in {took:.2f}s: {_per_s(checker.unique, took)} events/s over"
            f" {cfg.workers} shard(s)",
            "  (averages from the first insert to the last event handled, as shown live)",
            f"inserted {checker.inserted:,} events in {ins:.2f}s: {_per_s(checker.inserted, ins)} events/s",
        ]
    lines.append(_stream_line(cfg))
    problems = [failure] if failure else []
    if checker.unique != cfg.events:
        problems.append(f"{cfg.events - checker.unique:,} event(s) not handled")
    if checker.violations:
        problems.append(f"{checker.violations} order violation(s)")
    if checker.misrouted:
        problems.append(f"{checker.misrouted} event(s) handled by the wrong shard")
    if problems:
        lines.append("result: FAILED: " + "; ".join(problems))
    else:
        dup = f"; {checker.duplicates} duplicate(s) from redelivery (at-least-once)" if checker.duplicates else ""
        lines.append(f"result: OK: every event handled once or more, in order per foreign ID{dup}")
    return table, lines, not problems


@click.command()
@click.option("-e", "--events", type=click.IntRange(min=1), default=20_000, show_default=True, help="Events to insert.")
@click.option("-k", "--keys", type=click.IntRange(min=1), default=1000, show_default=True, help="Distinct foreign IDs.")
@click.option(
    "-w",
    "--workers",
    type=click.IntRange(min=1),
    default=lambda: os.cpu_count() or 1,
    show_default="number of cores",
    help="Shards, one worker process each.",
)
@click.option(
    "--handler-cost",
    type=click.FloatRange(min=0),
    default=50.0,
    show_default=True,
    metavar="MICROSECONDS",
    help="Simulated work per handled event (a busy loop).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="EVENTS/S",
    help="Insert at most this fast (default: as fast as the server takes them).",
)
@click.option(
    "--fate",
    type=click.FloatRange(min=0, max=1),
    default=0.0,
    metavar="P",
    help="Make each handler call fail with probability P after its work, to show redelivery.",
)
@click.option(
    "--partitioned",
    is_flag=True,
    help=f"Use a partitioned stream ({DEFAULT_PARTITIONS} partitions): each shard reads only its own events,"
    " filtered by the server.",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the foreign IDs' random order.")
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the demo's stream and cursors (for `rjet status`); without --server, in the embedded server's"
    " storage, with the commands to start a server on it.",
)
@click.option(
    "--give-up-after",
    "give_up",
    type=click.FloatRange(min=0, min_open=True),
    default=_STALL,
    show_default=True,
    metavar="S",
    help="Fail when no new event was handled for S seconds.",
)
@embedded_connection_options
def demo(
    conn: Connection,
    events: int,
    keys: int,
    workers: int,
    handler_cost: float,
    rate: float,
    fate: float,
    partitioned: bool,
    seed: int,
    keep: bool,
    give_up: float,
) -> None:
    """Insert events for many foreign IDs while a Parallel group of workers consumes them.

    Without --server it starts a nats-server of its own (on a free loopback port, with temporary
    storage) and removes it at the end. It shows live progress on a terminal, checks that each
    foreign ID's events are handled in order, and ends with a summary, also when it fails. Rates are
    averages since the first insert, live and in the summary. Exit status 0 only when every event was
    handled and no order was violated.
    """
    cfg = DemoConfig(events, keys, workers, handler_cost, rate, fate, seed, keep, give_up, partitioned)
    err = stderr_console()
    d = _Demo(cfg, err, f"rjet_demo_{secrets.token_hex(4)}")
    name = d.stream_name
    if conn.servers:
        try:
            ok = _run_demo(d, conn)
        finally:
            if keep and d.created:
                _say(f"kept stream {name} and its cursors; look at them with:")
                _say(f"  rjet status {name} --namespace {name} --server {conn.url}", wrap=False)
    else:
        # --keep keeps the server's storage too: the stream would go with a temporary one.
        store = tempfile.mkdtemp(prefix="rjet-demo-store-") if keep else None
        try:
            with EmbeddedServer(store_dir=store) as srv:
                err.print(f"started nats-server at {srv.url} ({store or 'temporary storage'})", highlight=False)
                ok = _run_demo(d, dataclasses.replace(conn, servers=(srv.url,)))
        finally:
            if store is not None and not d.created:
                shutil.rmtree(store, ignore_errors=True)  # nothing in it to keep
            elif store is not None:
                _say(
                    f"kept stream {name} and its cursors in {store}; the demo's nats-server has stopped. To"
                    " look at them, start one on that storage and ask it:"
                )
                _say(f"  rjet server --store-dir {store} &", wrap=False)
                _say(f"  rjet status {name} --namespace {name}", wrap=False)
    raise click.exceptions.Exit(0 if ok else 1)


def _stdout() -> Console:
    """stdout: as wide as the terminal, or as $COLUMNS says (a pipe without it: wide, not to cut tables)."""
    return Console() if "COLUMNS" in os.environ else stdout_console()


def _say(text: str, *, wrap: bool = True) -> None:
    """Print a line of the summary on stdout: wrapped at blanks to the terminal's width, or (a command
    to copy) kept whole."""
    _stdout().print(text, highlight=False, soft_wrap=not wrap)


def _run_demo(d: _Demo, conn: Connection) -> bool:
    """Run the demo and print its summary; whether it passed. A failure that stopped it early is
    raised after the summary (as the one-line error)."""
    cfg = d.cfg
    layout = cfg.layout
    d.console.print(
        f"rjet demo: {cfg.events:,} events over {cfg.keys:,} foreign IDs, {cfg.workers} worker(s), handler cost"
        f" {cfg.cost_us:g}µs, stream {d.stream_name}"
        + (f" ({layout.count} partitions)" if layout else "")
        + f" on {conn.url}",
        highlight=False,
    )
    failure: CliError | None = None
    summary: Summary | None = None
    try:
        _, summary = run(d.run(conn))
    except CliError as e:
        failure = e
    except KeyboardInterrupt:
        if d.checker is not None:
            _print_summary(cfg, d, d.checker, None if d.group is None else d.group.statistics(), "interrupted")
        raise
    if d.checker is None:  # it failed before the workers ran: nothing to sum up
        assert failure is not None
        raise failure
    if summary is None and d.group is not None:
        summary = d.group.statistics()  # where the group got to before the failure
    ok = _print_summary(cfg, d, d.checker, summary, None if failure is None else failure.format_message())
    if failure is not None:
        raise failure
    return ok


def _print_summary(cfg: DemoConfig, d: _Demo, checker: Checker, summary: Summary | None, failure: str | None) -> bool:
    table, lines, ok = _summary(cfg, d, checker, summary, failure)
    _stdout().print(table)
    for line in lines:
        _say(line)
    return ok
