"""``rjet worker``: run shards of a Parallel group with a handler given as ``module:function``."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
from typing import Any, Literal

import click
from rich.console import Console
from rich.table import Table

from rjet.cli._common import (
    CliError,
    Connection,
    connection_options,
    parse_shards,
    run,
    setup_logging,
    stdout_console,
)
from rjet.consumer import check_handler
from rjet.errors import ConfigError
from rjet.event import Event
from rjet.fate import Fate
from rjet.parallel import Parallel, ShardStats, Summary

log = logging.getLogger("rjet.cli")


def load_handler(spec: str) -> Any:
    """The callable that ``module:function`` (or ``module:object.attribute``) names."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"handler {spec!r}: give it as module:function, e.g. myapp.handlers:on_order")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise CliError(f"handler {spec!r}: cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"handler {spec!r}: {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise CliError(f"handler {spec!r} is not callable")
    return obj


class ImportedHandler:
    """A handler named by ``module:function``, imported again in each worker process.

    It travels to the workers as its name only, so the function need not be picklable, and a
    missing module fails the same way in the parent (at start) and in a worker.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._fn: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.spec = state["spec"]
        self._fn = None

    def __call__(self, fate: Fate, event: Event, *tx: Any) -> Any:
        fn = self._fn
        if fn is None:
            fn = self._fn = load_handler(self.spec)
        return fn(fate, event, *tx)

    def __repr__(self) -> str:
        return f"ImportedHandler({self.spec!r})"


class ImportedAsyncHandler(ImportedHandler):
    """An :class:`ImportedHandler` whose function is a coroutine function (so that a concurrent
    consumer awaits it on the event loop instead of calling it in a thread)."""

    async def __call__(self, fate: Fate, event: Event, *tx: Any) -> Any:
        return await super().__call__(fate, event, *tx)


def imported(spec: str, *, transactional: bool = False) -> Any:
    """The handler ``spec`` names, as it travels to worker processes (imported here to check it);
    ``transactional``: ``[async] def function(fate, event, tx)``, an async one passed on as a
    coroutine function (a sync one runs on SQLite only: ``Parallel`` refuses it on PostgreSQL)."""
    fn = load_handler(spec)
    try:
        check_handler(fn, owner=spec, transactional=transactional)  # here, not in every worker (which retries forever)
    except ConfigError as e:
        raise CliError(str(e)) from None
    if transactional and inspect.iscoroutinefunction(fn):
        return ImportedAsyncHandler(spec).__call__
    return ImportedAsyncHandler(spec) if inspect.iscoroutinefunction(fn) else ImportedHandler(spec)


@click.command()
@click.argument("stream")
@click.argument("handler", metavar="MODULE:FUNCTION")
@click.option("--name", "--group", "name", required=True, help="The group's name; shard cursors are NAME_M_of_N.")
@click.option("-n", "--shards", "n", type=click.IntRange(min=1), required=True, help="Shards in the group (all hosts).")
@click.option(
    "--shard",
    "only",
    multiple=True,
    metavar="M[-M]",
    help="Run only these shards, numbered 1..N as in the cursor names (repeatable; e.g. 1-4); default: all.",
)
@click.option("--namespace", required=True, metavar="NS", help="Cursor namespace (KV bucket rjet_cursors_NS).")
@click.option(
    "--cursors",
    metavar="URL",
    help="Keep the shard cursors in this SQL database (sqlite:///PATH, postgresql://USER:PW@HOST/DB) instead of"
    " the namespace's bucket, which keeps the heartbeats, leases and group record.",
)
@click.option(
    "--transactional",
    is_flag=True,
    help="FUNCTION is async def function(fate, event, tx): what it writes through tx commits with the shard's"
    " progress, in one transaction (needs --cursors).",
)
@click.option("--type", "types", type=int, multiple=True, help="Handle only events of this type (repeatable).")
@click.option("--to-head", is_flag=True, help="Stop once the events present at start are handled.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="K",
    help="Handler calls in flight per shard, one at a time per foreign ID (sync handlers: K threads).",
)
@click.option(
    "--on-error",
    type=click.Choice(["stop", "retry"]),
    default=None,
    help="stop: a handler error stops the shard's run (retried by a restart); retry: only its foreign ID"
    " waits and retries. Default: stop with --concurrency 1, retry above.",
)
@click.option(
    "--loop",
    type=click.Choice(["asyncio", "uvloop"]),
    default="asyncio",
    show_default=True,
    help="Each worker's event loop; uvloop (pip install uvloop) does more with --concurrency and waiting handlers.",
)
@click.option(
    "--elastic",
    is_flag=True,
    help="Join the group as a member: the live members share the shards out (no --shard), take over a"
    " member's shards when it dies and hand them over when one joins.",
)
@click.option(
    "--member-id", metavar="ID", help="A stable member id (--elastic): a restart within the TTL keeps its shards."
)
@click.option(
    "--max-shards", type=click.IntRange(min=1), metavar="K", help="At most K shards on this member (--elastic)."
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="How often shard heartbeats (and member leases) are written.",
)
@click.option(
    "--heartbeat-ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a heartbeat or lease counts as fresh: a dead member's shards move after about this long.",
)
@click.option(
    "--flush-interval",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between cursor writes of each shard.",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="On SIGINT/SIGTERM, how long to let handlers in flight finish before killing workers.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics of the shards at http://HOST:PORT/metrics, and the probes /healthz"
    " (liveness) and /readyz (readiness) beside them (needs rjet[metrics]).",
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
@click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only, and print no summary.")
@click.pass_context
@connection_options
def worker(
    ctx: click.Context,
    conn: Connection,
    stream: str,
    handler: str,
    name: str,
    n: int,
    only: tuple[str, ...],
    namespace: str,
    cursors: str | None,
    transactional: bool,
    types: tuple[int, ...],
    to_head: bool,
    concurrency: int,
    on_error: Literal["stop", "retry"] | None,
    loop: Literal["asyncio", "uvloop"],
    elastic: bool,
    member_id: str | None,
    max_shards: int | None,
    heartbeat_interval: float,
    heartbeat_ttl: float,
    flush_interval: float,
    stop_timeout: float,
    metrics_port: int | None,
    metrics_host: str,
    quiet: bool,
) -> None:
    """Consume STREAM with shards of a Parallel group, one process each, calling MODULE:FUNCTION.

    FUNCTION is called as function(fate, event), plain or async, one event at a
    time per shard (up to --concurrency K at a time) and in stream order per
    foreign ID; raising stops the shard's run, which retries the event (with
    --on-error retry only that foreign ID waits). The current directory is on
    the import path. Run the same NAME and -n on every host, each with its own
    --shard range:

    \b
        host A:  rjet worker orders billing:on_order --name billing -n 4 \\
                     --shard 1-2 --namespace shop
        host B:  rjet worker orders billing:on_order --name billing -n 4 \\
                     --shard 3-4 --namespace shop

    Stops gracefully on SIGINT or SIGTERM (a second one forces) and prints a
    summary.
    """
    parent = ctx.find_root().params
    if not quiet:
        setup_logging(parent.get("verbose", 0), parent.get("log_json", False), floor=logging.INFO)
    if elastic and only:
        raise click.UsageError("--elastic assigns the shards itself: give --elastic or --shard, not both")
    if not elastic and (member_id or max_shards):
        raise click.UsageError("--member-id and --max-shards need --elastic")
    if transactional and not cursors:
        raise click.UsageError("--transactional needs --cursors URL (the database its transactions run in)")
    shards = None if elastic else parse_shards(only, n)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    group = Parallel(
        name,
        n,
        imported(handler, transactional=transactional),
        servers=list(conn.servers),
        stream=stream,
        namespace=namespace,
        cursors=cursors,
        transactional=transactional,
        connect_options=conn.options,
        shards=shards,
        types=types or None,
        stop_timeout=stop_timeout,
        handler_timing=metrics_port is not None,
        concurrency=concurrency,
        on_error=on_error,
        loop=loop,
        heartbeat_interval=heartbeat_interval,
        heartbeat_ttl=heartbeat_ttl,
        flush_interval=flush_interval,
        elastic=elastic,
        member_id=member_id,
        max_shards=max_shards,
    )
    if metrics_port is None:
        summary = group.run(to_head=to_head)
    else:
        summary = run(_run_with_metrics(group, to_head, metrics_host, metrics_port))
    if not quiet:
        print_summary(summary, stdout_console())


async def _run_with_metrics(group: Parallel, to_head: bool, host: str, port: int) -> Summary:
    try:
        from prometheus_client import CollectorRegistry

        from rjet.metrics import ParallelCollector, serve_metrics
    except ImportError:
        raise CliError("--metrics-port needs prometheus-client: pip install 'rjet[metrics]'") from None
    registry = CollectorRegistry()
    registry.register(ParallelCollector(group))
    running: asyncio.Task[Summary] | None = None

    def healthz() -> tuple[bool, str]:
        # Answered on the supervisor's own event loop: a wedged loop does not answer at all.
        if running is None or running.done():
            return False, "the group is not running"
        return True, f"the supervisor of {len(group.shards)} shard(s) is running"

    def readyz() -> tuple[bool, str]:
        if running is None or running.done():
            return False, "the group is not running"
        if group.stopping:
            return False, "stopping: its workers finish and flush"
        return readiness(group.statistics().shards)

    checks = {"/healthz": healthz, "/readyz": readyz}
    async with serve_metrics(registry, host=host, port=port, checks=checks) as server:
        bound = server.sockets[0].getsockname()
        log.info("serving metrics at http://%s:%d/metrics (probes: /healthz, /readyz)", bound[0], bound[1])
        running = asyncio.ensure_future(group.run_async(to_head=to_head, handle_signals=True))
        return await running


def readiness(shards: tuple[ShardStats, ...]) -> tuple[bool, str]:
    """Whether every shard this process runs has its worker running its consumer (connected, its
    cursor claimed): ``(ready, reason)``. An elastic member's shards that run elsewhere do not count."""
    mine = [s for s in shards if s.state != "elsewhere"]
    not_ready = [f"{s.name} {_why_not_ready(s)}" for s in mine if _why_not_ready(s)]
    if not_ready:
        return False, "; ".join(not_ready)
    if not mine:
        return True, "no shard assigned to this member"
    return True, f"{len(mine)} shard(s) running"


def _why_not_ready(s: ShardStats) -> str:
    if s.state == "running":
        # The worker reports its figures once it runs its consumer, which claims the cursor first.
        return "" if s.live is not None and s.live.runs > 0 else "connecting"
    if s.state == "done":
        return ""
    if s.state == "waiting" and s.restarts:
        return f"waiting to restart (restart #{s.restarts})"
    return s.state


def print_summary(summary: Summary, console: Console) -> None:
    """A table of what each shard did."""
    table = Table(title=f"parallel {summary.name!r}, n={summary.n}", title_justify="left", header_style="bold")
    for col in ("shard", "state", "handled", "skipped", "restarts", "cursor"):
        table.add_column(col, justify="left" if col in ("shard", "state") else "right")
    for s in summary.shards:
        table.add_row(s.name, s.state, f"{s.handled:,}", f"{s.skipped:,}", str(s.restarts), s.cursor or "-")
    console.print(table)
