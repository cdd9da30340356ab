"""``rjet demo``: insert events for many foreign IDs while a Parallel group consumes them, and check order.

Its parts: ``_demo_check.py`` (the handlers' record of what they did, and the check of it: order,
duplicates, shards) and ``_demo_view.py`` (the live view and the summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click
import nats.errors
import nats.js.errors
from rich.console import Console

import rjet
from rjet.cli._common import CliError, Connection, embedded_connection_options, run, show_progress, stderr_console
from rjet.cli._demo_check import GROUP, Checker, DemoHandler, Tally, on_start
from rjet.cli._demo_view import display, print_summary, say
from rjet.fate import NEVER, RandomFate
from rjet.parallel import Parallel, Summary
from rjet.partitions import DEFAULT_PARTITIONS, Partitions
from rjet.server import EmbeddedServer
from rjet.wire import guard_api

if TYPE_CHECKING:
    from nats.js import JetStreamContext


_BATCH: Final = 250
_TICK: Final = 0.1
_STALL: Final = 30.0  # seconds without progress before the demo gives up
_AGAIN: Final = 0.05  # seconds between cancellations of an inserter that goes on


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


class Demo:
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

    def shard_time(self, t: Tally, now: float) -> float:
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
                    GROUP,
                    cfg.workers,
                    DemoHandler(str(outdir), cfg.cost_us),
                    servers=list(conn.servers),
                    stream=self.stream_name,
                    namespace=self.stream_name,
                    connect_options=conn.options,
                    fate=RandomFate(cfg.fate) if cfg.fate else NEVER,
                    on_start=on_start,
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
            with display(self) as update:
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
            await _cancel(inserter)
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


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` until it has ended. On Python 3.11 an insert may swallow a cancellation that
    arrives as its ack does (``asyncio.wait_for``, CPython gh-86296; why ``rjet/_tasks.py`` exists),
    and the inserter would go on inserting while the demo waits for it. Its failure, if any, is the
    caller's to retrieve."""
    while task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_AGAIN)


async def _delete(js: JetStreamContext, name: str) -> None:
    for what in (name, f"KV_rjet_cursors_{name}"):
        # A refused delete is given up at once (PermissionDenied), not after the API timeout.
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError, rjet.PermissionDenied):
            await guard_api(js, what, js.delete_stream(what))


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
    d = Demo(cfg, err, f"rjet_demo_{secrets.token_hex(4)}")
    name = d.stream_name
    if conn.servers:
        try:
            ok = _run_demo(d, conn)
        finally:
            if keep and d.created:
                say(f"kept stream {name} and its cursors; look at them with:")
                say(f"  rjet status {name} --namespace {name} --server {conn.url}", wrap=False)
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
                say(
                    f"kept stream {name} and its cursors in {store}; the demo's nats-server has stopped. To"
                    " look at them, start one on that storage and ask it:"
                )
                say(f"  rjet server --store-dir {store} &", wrap=False)
                say(f"  rjet status {name} --namespace {name}", wrap=False)
    raise click.exceptions.Exit(0 if ok else 1)


def _run_demo(d: Demo, conn: Connection) -> bool:
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
            print_summary(cfg, d, d.checker, None if d.group is None else d.group.statistics(), "interrupted")
        raise
    if d.checker is None:  # it failed before the workers ran: nothing to sum up
        assert failure is not None
        raise failure
    if summary is None and d.group is not None:
        summary = d.group.statistics()  # where the group got to before the failure
    ok = print_summary(cfg, d, d.checker, summary, None if failure is None else failure.format_message())
    if failure is not None:
        raise failure
    return ok
