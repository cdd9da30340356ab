"""The worker process: one shard of a :class:`rjet.parallel.Parallel` group, with its own loop and connection.

The parent starts :func:`main` in a spawned process with a :class:`WorkerConfig`, the handler, and its
end of a pipe; the messages both ways are in ``rjet/parallel/_messages.py``.

Stopping is graceful: no new handler call starts, the one in flight finishes, the cursor is flushed.
SIGINT is ignored (the parent owns Ctrl-C); SIGTERM stops like the parent's message does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import multiprocess

from rjet._nats.connect import connect
from rjet._tasks import cancel_and_wait
from rjet.cursors import Capabilities, Claim, JetStreamCursorStore
from rjet.deadletter import DeadLetterStream
from rjet.errors import (
    PERMANENT,
    CursorConflict,
    RjetError,
)
from rjet.parallel._messages import Finished, Log, Outcome, Progress, Started, Stop, ToParent, pack_error
from rjet.parallel._options import GroupHandler, ParallelOptions
from rjet.parallel._shard import key_filter, log_fields, shard_name
from rjet.parallel._sql import Handled, handled_before
from rjet.run import Spec, run_forever
from rjet.sql import SqlCursorStore
from rjet.stats import ConsumerStats
from rjet.stream import Stream

if TYPE_CHECKING:
    from multiprocess.connection import Connection
    from nats.js import JetStreamContext

__all__ = [
    "EXIT_CRASH", "EXIT_FATAL", "EXIT_FENCED", "EXIT_UNGUARDED", "ConnectOptions", "WorkerConfig",
    "exit_if_importing_main", "main",
]  # fmt: skip

log = logging.getLogger("rjet.parallel")

EXIT_CRASH: Final = 1
"""An unexpected error (in set-up, say): the parent restarts the worker after a backoff."""
EXIT_FENCED: Final = 3
"""Another runner claimed this shard's cursor: the parent does not restart the worker."""
EXIT_FATAL: Final = 4
"""An error that a restart cannot fix (an expired cursor, say): the parent does not restart it."""
EXIT_UNGUARDED: Final = 5
"""The worker, importing the parent's main module, found that it starts a group at import time (no
``if __name__ == "__main__":`` guard): the parent stops with one error naming the fix."""

# Errors that restarting cannot fix end the shard "failed" (a conflict ends it "fenced"); the same
# list run_forever raises instead of running again.
_FATAL: Final = PERMANENT


def exit_if_importing_main() -> None:
    """End this process quietly when it is a spawned process importing its parent's main module.

    A script that starts a group at import time (no ``if __name__ == "__main__":`` guard) would
    otherwise start it again in every worker process, each of them spawning workers of its own,
    restarted forever, with a traceback each. The parent recognises the exit status and says what
    to change, once.
    """
    if getattr(multiprocess.current_process(), "_inheriting", False):
        os._exit(EXIT_UNGUARDED)


ConnectOptions: TypeAlias = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None
"""Options for :func:`rjet.connect`, or a function that returns them (called in each process)."""


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Everything one worker needs besides the handler; it travels to the child process."""

    name: str
    n: int
    m: int
    servers: tuple[str, ...]
    stream: str
    namespace: str
    options: ParallelOptions
    connect_options: ConnectOptions = None
    to_head: bool = False
    log_level: int = logging.WARNING
    report_interval: float = 0.25
    fence_interval: float = 1.0

    @property
    def shard(self) -> str:
        """The shard's consumer and cursor name."""
        return shard_name(self.name, self.m, self.n)


def connect_options(options: ConnectOptions) -> dict[str, Any]:
    """The connect options, calling the factory when one was given."""
    if options is None:
        return {}
    if callable(options):
        options = options()
    return dict(options)


class _Link:
    """The worker's end of the pipe; sends never raise (a vanished parent just stops the worker)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.broken = False

    def send(self, msg: ToParent) -> None:
        if self.broken:
            return
        with self.lock:
            try:
                self.conn.send(msg)
            except (OSError, EOFError, ValueError):
                self.broken = True


class _Forward(logging.Handler):
    """Sends log records to the parent, which hands them to its own logging configuration; each
    carries ``fields`` (the shard's: group, shard, n, consumer) unless it has its own."""

    def __init__(self, link: _Link, process_name: str, fields: Mapping[str, str | int] | None = None) -> None:
        super().__init__()
        self.link = link
        self.process_name = process_name
        self.fields = dict(fields or {})

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text = f"{text}\n{logging.Formatter().formatException(record.exc_info)}"
            elif record.exc_text:
                text = f"{text}\n{record.exc_text}"
            if record.stack_info:
                text = f"{text}\n{record.stack_info}"
            data = {
                k: v
                for k, v in record.__dict__.items()
                if isinstance(v, str | int | float | bool | type(None)) and k not in ("msg", "exc_text", "stack_info")
            }
            data.update(msg=text, args=None, exc_info=None, exc_text=None, stack_info=None)
            data["processName"] = self.process_name
            for key, value in self.fields.items():
                data.setdefault(key, value)
            self.link.send(Log(data))
        except Exception:
            self.handleError(record)


class _Watched:
    """The shard's cursor store as ``run`` sees it, keeping the claim ``run`` holds, which the fence
    watch confirms (the claim protocol: any claiming store). ``namespace`` is the store's own (run
    names it in cursor errors), when it has one."""

    def __init__(self, store: JetStreamCursorStore | SqlCursorStore) -> None:
        self.store = store
        self.held: Claim | None = None
        self.namespace = getattr(store, "namespace", None)

    @property
    def capabilities(self) -> Capabilities:
        return self.store.capabilities

    async def claim(self, name: str, *, owner: str | None = None, after: str | None = None) -> Claim:
        claim: Claim = await self.store.claim(name, owner=owner, after=after)
        self.held = claim
        return claim

    async def get_cursor(self, name: str) -> str:
        return await self.store.get_cursor(name)

    async def set_cursor(self, name: str, cursor: str) -> None:
        await self.store.set_cursor(name, cursor)

    async def flush(self) -> None:
        await self.store.flush()


class _Worker:
    def __init__(self, cfg: WorkerConfig, fn: GroupHandler, link: _Link) -> None:
        self.cfg = cfg
        self.fn = fn
        self.link = link
        self.stats = ConsumerStats(cfg.shard, timing=cfg.options.worker.handler_timing)
        self.stop = asyncio.Event()
        self.store: JetStreamCursorStore | SqlCursorStore | None = None

    @property
    def handled(self) -> int:
        return self.stats.handled

    @property
    def skipped(self) -> int:
        return self.stats.snapshot().skipped

    def key_filter(self) -> Callable[[str], bool]:
        return key_filter(self.cfg.m, self.cfg.n)

    def request_stop(self) -> None:
        """Stop gracefully: no new handler call starts, the one in flight finishes, the cursor is flushed."""
        self.stop.set()

    def _on_parent(self) -> None:
        conn = self.link.conn
        try:
            while conn.poll():
                msg = conn.recv()
                if isinstance(msg, Stop):
                    self.request_stop()
        except (EOFError, OSError):
            self.link.broken = True
            asyncio.get_running_loop().remove_reader(conn.fileno())
            self.request_stop()

    def cursor(self) -> str:
        return (self.store.last_written(self.cfg.shard) if self.store is not None else None) or ""

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.report_interval)
            snap = self.stats.snapshot()
            flushes = self.store.flushes if self.store is not None else 0
            self.link.send(Progress(snap.handled, snap.skipped, self.cursor(), snap, flushes))

    async def _watch_fence(self, watched: _Watched) -> None:
        # The store notices a second runner at its next write; this notices it while idle too:
        # confirming a lost claim makes it lost, and run stops with CursorConflict.
        while True:
            await asyncio.sleep(self.cfg.fence_interval)
            claim = watched.held
            if claim is None or claim.lost is not None:
                continue
            try:
                await claim.confirm()
            except RjetError as e:
                if claim.lost is not None:
                    return
                log.debug("shard %r: cannot check the cursor claim: %s", self.cfg.shard, e)

    async def _open_store(self, js: JetStreamContext) -> JetStreamCursorStore | SqlCursorStore:
        """The shard's cursor store: the group's SQL database, or the namespace's bucket."""
        cfg = self.cfg
        work = cfg.options.worker
        if cfg.options.target.cursors is not None:
            pool = max(16, cfg.options.consumer.concurrency + 2)  # a transaction per handler call in flight
            return await SqlCursorStore.open(
                cfg.options.target.cursors, flush_interval=work.flush_interval, pool_size=pool
            )
        # A worker paused or cut off past its group's heartbeat TTL may have lost its shard to
        # another runner (an elastic member that took over): it looks before its next event.
        return await JetStreamCursorStore.create(
            js, cfg.namespace, flush_interval=work.flush_interval, claim_lease=cfg.options.heartbeats.ttl / 2
        )

    async def run(self) -> tuple[Outcome, BaseException | None]:
        """Consume until done, stopped, fenced or failed: the outcome and the error that ended it."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_reader(self.link.conn.fileno(), self._on_parent)
        nc = await connect(list(cfg.servers), **connect_options(cfg.connect_options))
        helpers: list[asyncio.Task[None]] = []
        try:
            js = nc.jetstream(**cfg.options.target.jetstream_options())
            work = cfg.options.worker
            store = self.store = await self._open_store(js)
            watched = _Watched(store)
            handled: Handled | None = None
            if isinstance(store, SqlCursorStore):  # exact across a reshard: what old shards handled is skipped
                handled = await handled_before(store, cfg.name, cfg.m, cfg.n)
                if handled is not None:
                    log.info("shard %r: skips the events an earlier n handled (%r)", cfg.shard, handled)
            stream = Stream(js, cfg.stream, read=work.read)
            view = await stream.shard(cfg.m, cfg.n)
            if view is not None:
                # A partitioned stream: the server sends only this shard's events. The key filter
                # stays, so an event whose subject disagrees with its foreign ID is still not handled
                # by the wrong shard.
                stream = view
            log.debug("shard %r: reading %s", cfg.shard, "its partitions only" if view else "the whole stream")
            if work.on_start is not None:
                result = work.on_start(cfg.m)
                if result is not None and inspect.isawaitable(result):
                    await result
            dead_letters = cfg.options.consumer.dead_letters
            sink = await DeadLetterStream.create(js, dead_letters) if dead_letters else None
            consumer = cfg.options.consumer.consumer(
                cfg.shard, self.fn, key_filter=self.key_filter(), sink=sink, handled=handled
            )
            spec = Spec(stream.stream, watched, consumer, to_head=cfg.to_head, lag=work.lag)
            self.link.send(Started(os.getpid()))
            helpers = [loop.create_task(self._report()), loop.create_task(self._watch_fence(watched))]
            try:
                await run_forever(
                    spec,
                    retry_delay=work.retry_delay,
                    max_backoff=work.max_backoff,
                    stats=self.stats,
                    stop=self.stop,
                )
                outcome: Outcome = "stopped" if self.stop.is_set() else "done"
                await store.close()
            except CursorConflict as e:
                log.error("shard %r stopped for good: %s", cfg.shard, e)
                return "fenced", e
            except _FATAL as e:
                log.error("shard %r stopped for good: %s", cfg.shard, e, exc_info=e)
                return "fatal", e
            return outcome, None
        finally:
            await cancel_and_wait(helpers)  # the fence watcher's reads may swallow one (rjet/_tasks.py)
            if isinstance(self.store, SqlCursorStore):  # its connections (flushed by run already)
                with contextlib.suppress(Exception):
                    await self.store.close()
            with contextlib.suppress(Exception):
                await nc.close()


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The worker's event loop (``WorkerOptions.loop``); None: asyncio's."""
    if loop == "uvloop":
        import uvloop  # checked to be there by WorkerOptions

        return uvloop.new_event_loop
    return None


def main(cfg: WorkerConfig, fn: GroupHandler, conn: Connection) -> None:
    """The worker process's entry: consume shard ``cfg.m`` of ``cfg.n`` until done, stopped or fenced."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    link = _Link(conn)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_Forward(link, f"rjet:{cfg.shard}", log_fields(cfg.name, cfg.m, cfg.n)))
    root.setLevel(cfg.log_level)
    worker = _Worker(cfg, fn, link)
    outcome: Outcome
    error: BaseException | None
    try:
        with asyncio.Runner(loop_factory=_loop_factory(cfg.options.worker.loop)) as runner:
            outcome, error = runner.run(worker.run())
    except CursorConflict as e:  # in set-up, before run_forever: classified as run() classifies it
        log.error("shard %r stopped for good: %s", cfg.shard, e)
        outcome, error = "fenced", e
    except _FATAL as e:  # a PermissionDenied while opening the cursor store, say: a restart cannot fix it
        log.error("shard %r stopped for good: %s", cfg.shard, e, exc_info=e)
        outcome, error = "fatal", e
    except RjetError as e:
        log.error("shard %r: worker failed: %s", cfg.shard, e, exc_info=e)
        outcome, error = "crashed", e
    except BaseException as e:
        log.error("shard %r: worker crashed", cfg.shard, exc_info=e)
        outcome, error = "crashed", e
    code = {"fenced": EXIT_FENCED, "fatal": EXIT_FATAL, "crashed": EXIT_CRASH}.get(outcome, 0)
    detail = ""
    if isinstance(error, CursorConflict):  # its text says it all; the parent's log line says "fenced out"
        detail = str(error)
    elif error is not None:
        detail = f"{type(error).__name__}: {error}"
    link.send(Finished(outcome, detail, worker.handled, worker.skipped, worker.cursor(), pack_error(error)))
    with contextlib.suppress(OSError):
        conn.close()
    sys.exit(code)
