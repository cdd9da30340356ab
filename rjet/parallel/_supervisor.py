"""Supervision: the parent's side of a group's worker processes, one per shard.

:class:`Supervisor` starts each worker (spawned, with SIGINT ignored until it handles signals itself),
polls them (their log records, progress and last word, over a pipe: ``rjet/parallel/_messages.py``),
restarts a worker that died with exponential backoff, and stops them: gracefully (a :class:`Stop`
message: no new handler call, the calls in flight finish, the cursor is flushed), by force once that
takes longer than ``stop_timeout`` or on a second request. A shard stops for good when it is fenced
out by a newer runner or meets an error that a restart cannot fix. An elastic member's
:class:`rjet.parallel._coordinator.Coordinator` moves shards in and out through :attr:`rebalance`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

import multiprocess

from rjet.errors import is_permanent
from rjet.parallel._messages import Finished, Log, Progress, Started, Stop, ToParent, unpack_error
from rjet.parallel._options import GroupHandler
from rjet.parallel._results import ShardStats
from rjet.parallel._shard import log_fields, shard_name
from rjet.parallel._worker import EXIT_FATAL, EXIT_FENCED, EXIT_UNGUARDED, WorkerConfig
from rjet.parallel._worker import main as worker_main

if TYPE_CHECKING:
    from multiprocess.connection import Connection
    from multiprocess.context import SpawnContext, SpawnProcess

    from rjet.parallel._heartbeats import Heartbeats
    from rjet.parallel._options import SupervisionOptions
    from rjet.stats import StatsSnapshot

__all__ = ["ELSEWHERE", "FINAL", "ShardProcess", "Supervisor"]

log = logging.getLogger("rjet.parallel")

_TICK: Final = 0.05
FINAL: Final = frozenset({"done", "stopped", "fenced", "failed"})
"""The states a shard ends a run in."""
ELSEWHERE: Final = frozenset({"elsewhere", "taking"})
"""An elastic member's shards that it does not run (yet)."""


class ShardProcess:
    """The parent's view of one shard: its current worker, its counts, its restart backoff."""

    def __init__(self, m: int, name: str) -> None:
        self.m = m
        self.name = name
        self.proc: SpawnProcess | None = None
        self.conn: Connection | None = None
        self.state = "idle"
        self.started_at = 0.0
        self.next_start = 0.0
        self.delay = 0.0
        self.restarts = 0
        self.handled_before = 0
        self.skipped_before = 0
        self.handled = 0
        self.skipped = 0
        self.cursor = ""
        self.live: StatsSnapshot | None = None
        self.flushes = 0
        self.outcome: str | None = None
        self.detail = ""
        self.error: BaseException | None = None  # what ended its last worker, when it could travel
        self.leaving = False  # elastic: the worker was asked to stop because the shard moves elsewhere

    def stats(self) -> ShardStats:
        return ShardStats(
            self.m,
            self.name,
            self.handled_before + self.handled,
            self.skipped_before + self.skipped,
            self.cursor,
            self.restarts,
            self.state,
            self.live,
            self.flushes,
        )


class Supervisor:
    """The worker processes of one run of a group: ``config(m, to_head)`` is what shard ``m``'s worker
    gets besides ``fn``. ``member`` names an elastic member (its shards start ``elsewhere`` and come
    and go through :attr:`rebalance`); ``retake_after`` is how long such a member waits before it
    takes back a shard it lost to another member.

    It also holds how the run ends: stop requests (:meth:`request_stop`), a forced stop, an error of
    the group's own (:meth:`fail`), a worker that found the main module unguarded, a takeover of the
    group record by another ``n`` (:attr:`superseded`).
    """

    def __init__(
        self,
        name: str,
        n: int,
        shards: Iterable[int],
        fn: GroupHandler,
        config: Callable[[int, bool], WorkerConfig],
        options: SupervisionOptions,
        *,
        member: str | None = None,
        retake_after: float = 0.0,
    ) -> None:
        self.name = name
        self.n = n
        self.fn = fn
        self.config = config
        self.options = options
        self.member = member
        self.retake_after = retake_after
        self.states = {m: ShardProcess(m, shard_name(name, m, n)) for m in shards}
        self.rebalance: Callable[[ShardProcess, float], None] | None = None  # an elastic member's moves
        self.stops = 0
        self.forced = ""
        self.unguarded = False  # a worker found the main module starting a group at import time
        self.superseded = ""  # another n took the group record over while this group ran
        self.fatal: BaseException | None = None  # what ended one of the group's own loops
        self._wake = asyncio.Event()
        self._chores: set[asyncio.Task[None]] = set()
        self._beats: Heartbeats | None = None

    # ----------------------------------------------------------------- asked from outside

    def request_stop(self, force: bool = False) -> None:
        """Stop gracefully (a second request, or ``force``, kills the workers)."""
        self.stops += 2 if force else 1
        self.wake()

    def on_signal(self, sig: signal.Signals) -> None:
        """SIGINT or SIGTERM: the first stops gracefully, the second forces."""
        if self.stops:
            log.warning("parallel %r: %s again: killing the workers", self.name, sig.name)
        else:
            log.warning(
                "parallel %r: %s: stopping gracefully within %gs (send it again to force)",
                self.name, sig.name, self.options.stop_timeout,
            )  # fmt: skip
        self.request_stop(False)

    def fail(self, err: BaseException) -> None:
        """Stop the group gracefully because of ``err`` (retrying cannot fix it); the run raises it
        once every worker stopped."""
        if self.fatal is not None:
            return
        self.fatal = err
        log.error("parallel %r: stopping: %s", self.name, err, exc_info=None if is_permanent(err) else err)
        if not self.stops:
            self.request_stop(False)

    def wake(self) -> None:
        """Look at the shards now rather than at the next tick."""
        self._wake.set()

    def chore(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` beside the supervision (a heartbeat to write or delete); awaited at the end."""
        task = asyncio.get_running_loop().create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def send(self, s: ShardProcess, msg: Stop) -> None:
        """Tell shard ``s``'s worker, if it has one; never raises."""
        if s.conn is not None:
            with contextlib.suppress(OSError, ValueError):
                s.conn.send(msg)

    def kill_all(self, *, reap: bool = False) -> None:
        """Kill every live worker (and with ``reap``, wait a little for each)."""
        for s in self.states.values():
            if s.proc is not None and s.proc.exitcode is None:
                with contextlib.suppress(Exception):
                    s.proc.kill()
                    if reap:
                        s.proc.join(2.0)

    def stats(self) -> tuple[ShardStats, ...]:
        """Each shard's figures so far."""
        return tuple(s.stats() for s in self.states.values())

    def pids(self) -> dict[int, int]:
        """The process ID of each shard's live worker, by shard index."""
        return {m: s.proc.pid for m, s in self.states.items() if s.proc is not None and s.proc.pid is not None}

    async def settle(self) -> None:
        """Wait for the chores left (heartbeats being written or deleted)."""
        await asyncio.gather(*self._chores, return_exceptions=True)

    # ----------------------------------------------------------------- the run

    async def run(self, to_head: bool, beats: Heartbeats) -> None:
        """Start the workers and keep them until every shard ended (done, stopped, fenced, failed);
        cancelled, it stops them gracefully first, then raises ``CancelledError``."""
        self._beats = beats
        ctx = multiprocess.get_context("spawn")
        for s in self.states.values():
            s.state = "elsewhere" if self.member is not None else "waiting"
        try:
            await self._drive(ctx, to_head)
        except asyncio.CancelledError:
            log.info("parallel %r: cancelled: stopping gracefully", self.name)
            self.request_stop(False)
            await self._drive(ctx, to_head)
            raise

    async def _drive(self, ctx: SpawnContext, to_head: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        next_report = 0.0
        while True:
            now = loop.time()
            for s in self.states.values():
                if self.rebalance is not None and not self.stops:
                    self.rebalance(s, now)
                self._poll(ctx, s, now, to_head)
            if all(s.state in FINAL or (s.state in ELSEWHERE and self.stops) for s in self.states.values()):
                return
            if deadline is not None and now >= next_report:  # a stop that takes a while says what it waits for
                waiting = [s.name for s in self.states.values() if s.state not in FINAL | ELSEWHERE]
                log.info("parallel %r: stopping: waiting for %s", self.name, ", ".join(waiting))
                next_report = now + 5.0
            if self.stops and deadline is None:
                deadline = now + self.options.stop_timeout
                next_report = now + 5.0
                for s in self.states.values():
                    if s.state == "waiting":
                        s.state = "stopped"
                    elif s.conn is not None:
                        self.send(s, Stop())
            if deadline is not None and not self.forced and (self.stops > 1 or now > deadline):
                self.forced = "forced to stop" if self.stops > 1 else f"not stopped within {self.options.stop_timeout}s"
                log.error("parallel %r: %s: killing the workers still running", self.name, self.forced)
                self.kill_all()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _TICK)

    def _start(self, ctx: SpawnContext, s: ShardProcess, to_head: bool) -> None:
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=worker_main,
            args=(self.config(s.m, to_head), self.fn, child),
            name=f"rjet:{s.name}",
            daemon=True,
        )
        with _children_ignore_sigint():
            proc.start()
        child.close()
        s.proc, s.conn = proc, parent
        s.state, s.outcome, s.detail, s.error = "starting", None, "", None
        s.started_at = asyncio.get_running_loop().time()
        log.debug(
            "parallel %r: started worker of %s (pid %s)", self.name, s.name, proc.pid,
            extra=log_fields(self.name, s.m, self.n),
        )  # fmt: skip

    def _poll(self, ctx: SpawnContext, s: ShardProcess, now: float, to_head: bool) -> None:
        self._drain(s)
        if s.proc is not None and s.proc.exitcode is not None:
            self._drain(s)
            self._on_exit(s, s.proc.exitcode, now)
        if s.state == "waiting" and not self.stops and now >= s.next_start:
            if not s.restarts:
                self._start(ctx, s, to_head)  # a first start that fails is a configuration problem
                return
            try:
                self._start(ctx, s, to_head)
            except OSError as e:  # out of processes or memory, say: try again later
                s.delay = min(max(s.delay * 2, self.options.restart_delay), self.options.max_restart_delay)
                s.next_start = now + s.delay
                log.error(
                    "parallel %r: cannot start a worker of %s (%r); retrying in %.1fs", self.name, s.name, e, s.delay,
                    extra=log_fields(self.name, s.m, self.n),
                )  # fmt: skip

    def _drain(self, s: ShardProcess) -> None:
        conn = s.conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._on_message(s, conn.recv())
        except (EOFError, OSError):
            pass

    def _on_message(self, s: ShardProcess, msg: ToParent) -> None:
        match msg:
            case Log(record=fields):
                record = logging.makeLogRecord(fields)
                logger = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)
            case Progress():
                s.handled, s.skipped, s.live, s.flushes = msg.handled, msg.skipped, msg.live, msg.flushes
                s.cursor = msg.cursor or s.cursor
            case Started():
                if s.state == "starting":
                    s.state = "running"
            case Finished():
                s.outcome, s.detail, s.handled, s.skipped = msg.outcome, msg.detail, msg.handled, msg.skipped
                s.error = unpack_error(msg.error)
                s.cursor = msg.cursor or s.cursor
            case _:
                log.error("parallel %r: %s sent a message of no known kind: %r", self.name, s.name, msg)

    def _on_exit(self, s: ShardProcess, code: int, now: float) -> None:
        assert s.proc is not None
        assert self._beats is not None
        pid = s.proc.pid
        with contextlib.suppress(Exception):
            s.proc.join(0)
            s.proc.close()
        if s.conn is not None:
            s.conn.close()
        s.proc = s.conn = None
        s.handled_before += s.handled
        s.skipped_before += s.skipped
        s.handled = s.skipped = 0
        if code == EXIT_UNGUARDED:
            s.state, self.unguarded = "failed", True
            self.stops = max(self.stops, 1)
            self.kill_all()  # every worker fails alike: none of them can run
            return
        fenced = code == EXIT_FENCED or s.outcome == "fenced"
        if self.member is not None and not self.stops and (s.leaving or fenced):
            self._let_go(s, fenced, now)
            return
        fields = log_fields(self.name, s.m, self.n)
        if fenced:
            s.state = "fenced"
            self._beats.drop(s.m)
            log.error(
                "parallel %r: %s stopped for good, fenced out by a newer runner: %s", self.name, s.name, s.detail,
                extra=fields,
            )  # fmt: skip
        elif code == EXIT_FATAL or s.outcome == "fatal":
            s.state = "failed"
            log.error("parallel %r: %s stopped for good: %s", self.name, s.name, s.detail, extra=fields)
        elif code == 0 and s.outcome == "done":
            s.state = "done"
            log.info("parallel %r: %s reached the head", self.name, s.name, extra=fields)
        elif self.stops:
            s.state = "stopped"
            if code != 0 and not self.unguarded:
                how = _exit(code, s, killed_here=bool(self.forced))
                log.warning(
                    "parallel %r: worker of %s (pid %s) %s while stopping", self.name, s.name, pid, how, extra=fields
                )
        else:
            self._restart_later(s, code, pid, now)

    def _let_go(self, s: ShardProcess, fenced: bool, now: float) -> None:
        """An elastic member's worker ended because its shard moved: handed over (or taken by a member
        that saw this one as gone): it may come back later."""
        assert self._beats is not None
        s.state, s.leaving = "elsewhere", False
        self.chore(self._beats.remove(s.m))
        fields = log_fields(self.name, s.m, self.n, self.member)
        if fenced:  # not at once: the member that has it lets it go first, if it is to come back
            s.next_start = now + self.retake_after
            log.warning(
                "parallel %r: member %s lost %s to another member: %s", self.name, self.member, s.name, s.detail,
                extra=fields,
            )  # fmt: skip
        else:
            log.info("parallel %r: member %s handed %s over", self.name, self.member, s.name, extra=fields)

    def _restart_later(self, s: ShardProcess, code: int, pid: int | None, now: float) -> None:
        o = self.options
        lived = now - s.started_at
        reset = s.delay == 0 or lived >= o.restart_reset
        s.delay = o.restart_delay if reset else min(s.delay * 2, o.max_restart_delay)
        s.delay = max(s.delay, o.restart_delay)
        s.restarts += 1
        s.state = "waiting"
        s.next_start = now + s.delay
        log.error(
            "parallel %r: worker of %s (pid %s) %s after %.1fs; restarting it in %.1fs (restart #%d)",
            self.name, s.name, pid, _exit(code, s), lived, s.delay, s.restarts,
            extra=log_fields(self.name, s.m, self.n),
        )  # fmt: skip


def _exit(code: int, s: ShardProcess, *, killed_here: bool = False) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if killed_here:
            return f"was killed by {name} (by this group: a forced stop)"
        return f"was killed by {name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
    return f"exited with status {code}" + (f" ({s.detail})" if s.detail else "")


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Spawn with SIGINT ignored (inherited through exec), so that Ctrl-C, which the terminal sends to
    the whole process group, cannot kill a worker before it has set up its own signal handling."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
