"""Parallel: a group of worker processes, one per shard, supervised by the calling process.

The parent (this module) checks the stream, writes its shards' heartbeats, reshards when ``n``
changed, then spawns one worker per shard (:mod:`rjet.parallel._worker`) and supervises them: it
restarts crashed workers with exponential backoff, forwards their logs, counts their progress, and
stops them gracefully on :meth:`Parallel.stop`, SIGINT or SIGTERM (a second one forces).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import threading
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

import multiprocess
from multiprocess.reduction import ForkingPickler

from rjet._nats.connect import connect
from rjet._nats.denials import guard_api
from rjet._tasks import cancel_and_wait
from rjet.consumer import Handler, check_handler
from rjet.cursors import JetStreamCursorStore
from rjet.errors import ConfigError, CursorStoreError, PermissionDenied, RjetError, Stopped, is_permanent
from rjet.parallel._elastic import Membership, busy_shards, default_member_id
from rjet.parallel._errors import ReshardRefused, ShardsFailed
from rjet.parallel._messages import Finished, Log, Progress, Started, Stop, ToParent
from rjet.parallel._options import ParallelOptions
from rjet.parallel._reshard import Heartbeats, ReshardReport, prepare, recorded_n
from rjet.parallel._results import ShardStats, Summary
from rjet.parallel._shard import check_n, log_fields, shard_name
from rjet.parallel._worker import (
    EXIT_FATAL,
    EXIT_FENCED,
    EXIT_UNGUARDED,
    ConnectOptions,
    WorkerConfig,
    connect_options,
    exit_if_importing_main,
)
from rjet.parallel._worker import main as worker_main
from rjet.stats import StatsSnapshot
from rjet.stream import Stream

if TYPE_CHECKING:
    from multiprocess.connection import Connection
    from multiprocess.context import SpawnContext, SpawnProcess
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = ["Parallel", "ParallelOptions", "ShardStats", "Summary"]

log = logging.getLogger("rjet.parallel")

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_TICK: Final = 0.05
_OPEN_ATTEMPTS: Final = 8  # a second apart
_FINAL: Final = frozenset({"done", "stopped", "fenced", "failed"})
_ELSEWHERE: Final = frozenset({"elsewhere", "taking"})  # an elastic member's shards it does not run


class _Shard:
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


class Parallel:
    """Consume one stream with ``n`` worker processes, each handling one shard of the foreign IDs.

    Shard ``m`` handles exactly the events whose ``shard_of(event.foreign_id, n) == m``, one at a time
    and in stream order, and keeps its own cursor ``shard_name(name, m, n)`` in the
    :class:`rjet.JetStreamCursorStore` of ``namespace``. Every shard reads the whole stream and skips
    (cheaply) the events of other shards; its cursor advances past them too.

    ``fn(fate, event)`` may be sync or async, a closure or a lambda: it is sent to the workers with
    ``dill``. ``servers`` is a URL or a list of them, ``stream`` the stream's name,
    ``connect_options`` options for :func:`rjet.connect` (or a function returning them, called in
    each process; use that for options that cannot be pickled, such as an ``ssl.SSLContext``).
    ``options`` are the fields of :class:`ParallelOptions`.

    ::

        def handle(fate, event):
            fate.tempt()
            db.upsert(event.foreign_id, event.metadata)

        if __name__ == "__main__":           # worker processes import the main module
            group = Parallel("indexer", 4, handle, servers="nats://127.0.0.1:4222", stream="orders",
                             namespace="shop")
            group.run()                      # until SIGINT/SIGTERM or group.stop()
            summary = group.run(to_head=True)  # until every shard handled what the stream holds now

    Worker processes are spawned (never forked), each with its own event loop and NATS connection.
    """

    def __init__(
        self,
        name: str,
        n: int,
        fn: Handler,
        *,
        servers: str | Sequence[str],
        stream: str,
        namespace: str,
        connect_options: ConnectOptions = None,
        **options: Any,
    ) -> None:
        check_n(n)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"Parallel: name must be a non-empty str, not {name!r}")
        if not callable(fn):
            raise ConfigError(f"Parallel {name!r}: handler {fn!r} is not callable")
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ConfigError(f"Parallel {name!r}: servers must be a URL or a list of URLs, not {servers!r}")
        for what, value in (("stream", stream), ("namespace", namespace)):
            if not isinstance(value, str) or not _NAME_RE.match(value):
                raise ConfigError(f"Parallel {name!r}: {what} {value!r} is invalid: use letters, digits, '_', '-'")
        if connect_options is not None and not callable(connect_options) and not hasattr(connect_options, "items"):
            raise ConfigError(f"Parallel {name!r}: connect_options must be a mapping or a function returning one")
        try:
            self.options = ParallelOptions(**options)
        except TypeError as e:
            raise ConfigError(f"Parallel {name!r}: {e} (see rjet.parallel.ParallelOptions)") from None
        # Checked here, before any worker starts, as each worker's Consumer would check it.
        check_handler(fn, batch=self.options.batch is not None, owner=f"Parallel {name!r}")
        shards = tuple(range(n)) if self.options.shards is None else tuple(self.options.shards)
        self.member: str | None = None
        if self.options.elastic:
            self.member = self.options.member_id or default_member_id()
        if not shards or len(set(shards)) != len(shards):
            raise ConfigError(f"Parallel {name!r}: shards must be distinct shard indexes, not {shards!r}")
        for m in shards:
            shard_name(name, m, n)
        self.name = name
        self.n = n
        self.fn = fn
        self.servers = tuple(urls)
        self.stream = stream
        self.namespace = namespace
        self.connect_options = connect_options
        self.shards: tuple[int, ...] = tuple(sorted(shards))
        self.reshard: ReshardReport | None = None
        self._states = {m: _Shard(m, shard_name(name, m, n)) for m in self.shards}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stops = 0
        self._forced = ""
        self._running = False
        self._wanted: frozenset[int] = frozenset()  # elastic: the shards the assignment gives this member
        self._busy: frozenset[int] = frozenset()  # elastic: shards another group still holds
        self._letting_go: frozenset[int] = frozenset()  # elastic: shards the assignment gives to others
        self._chores: set[asyncio.Task[None]] = set()
        self._unguarded = False  # a worker found the main module starting a group at import time
        self._superseded = ""  # another n took the group record over while this group ran
        self._fatal: BaseException | None = None  # what ended one of the group's own loops: the group stops with it

    # ----------------------------------------------------------------- public surface

    def run(self, *, to_head: bool = False) -> Summary:
        """Run the group until stopped (or, with ``to_head``, until every shard reached the head).

        Blocks. In the main thread it handles SIGINT and SIGTERM: the first stops gracefully (no new
        handler call starts, those in flight finish, every cursor is flushed, then it returns the
        summary), a second one kills the workers and raises :class:`rjet.Stopped`.

        Raises :class:`rjet.parallel.ReshardRefused` when ``n`` changed while shards of the old ``n``
        run, :class:`rjet.parallel.ShardsFailed` when shards stopped for good (fenced out by another
        runner of the same shard, or a permanent error such as an expired cursor), and
        :class:`rjet.StreamNotFound` / :class:`rjet.ConnectError` before starting any worker, and
        :class:`rjet.PermissionDenied` naming the subject when the group's own requests are refused
        (its heartbeats, lease or group record: at once before any worker starts; later, once its
        workers have stopped gracefully).
        """
        exit_if_importing_main()
        in_main = threading.current_thread() is threading.main_thread()
        return asyncio.run(self.run_async(to_head=to_head, handle_signals=in_main))

    async def run_async(self, *, to_head: bool = False, handle_signals: bool = False) -> Summary:
        """:meth:`run` for callers inside an event loop; the workers are processes all the same.

        Signal handlers are installed only with ``handle_signals`` (main thread only). Stop it with
        :meth:`stop`, or cancel it: cancelling stops gracefully, then raises ``CancelledError``.
        """
        exit_if_importing_main()
        if self._running:
            raise ConfigError(f"Parallel {self.name!r} is already running")
        if to_head and self.options.elastic:
            raise ConfigError(
                f"Parallel {self.name!r}: an elastic group runs until stopped (to_head is for fixed shards)"
            )
        if handle_signals and threading.current_thread() is not threading.main_thread():
            raise ConfigError("Parallel: handle_signals needs the main thread")
        try:
            ForkingPickler.dumps((self.fn, self._worker_config(0, to_head)))
        except Exception as e:
            raise ConfigError(
                f"Parallel {self.name!r}: the handler or an option cannot be sent to a worker process: {e!r}"
            ) from e
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stops = 0
        self._forced = ""
        self._unguarded = False
        self._superseded = ""
        self._fatal = None
        self._states = {m: _Shard(m, shard_name(self.name, m, self.n)) for m in self.shards}
        self.reshard = None
        try:
            nc = await connect(list(self.servers), **connect_options(self.connect_options))
            try:
                return await self._run(nc, to_head, handle_signals)
            finally:
                with contextlib.suppress(Exception):
                    await nc.close()
        finally:
            self._running = False
            self._loop = None

    def stop(self, *, force: bool = False) -> None:
        """Stop the running group gracefully (or kill its workers with ``force`` or a second call).

        Safe from any thread and from signal handlers; does nothing when the group is not running.
        """
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._request_stop, force)

    @property
    def stopping(self) -> bool:
        """True from a stop request until the group has stopped (its workers finish and flush)."""
        return self._running and self._stops > 0

    @property
    def worker_pids(self) -> dict[int, int]:
        """The process ID of each shard's live worker, by shard index."""
        return {m: s.proc.pid for m, s in self._states.items() if s.proc is not None and s.proc.pid is not None}

    def statistics(self) -> Summary:
        """A snapshot of what the group did so far (counts arrive from workers every 0.25 s)."""
        return Summary(self.name, self.n, tuple(s.stats() for s in self._states.values()), self.reshard)

    def __repr__(self) -> str:
        return f"Parallel({self.name!r}, n={self.n}, shards={list(self.shards)}, stream={self.stream!r})"

    # ----------------------------------------------------------------- the run

    def _worker_config(self, m: int, to_head: bool) -> WorkerConfig:
        o = self.options
        root = logging.getLogger()
        level = min(root.getEffectiveLevel(), log.getEffectiveLevel())
        return WorkerConfig(
            name=self.name,
            n=self.n,
            m=m,
            servers=self.servers,
            stream=self.stream,
            namespace=self.namespace,
            options=o,
            connect_options=self.connect_options,
            to_head=to_head,
            log_level=level,
            fence_interval=max(0.2, min(o.flush_interval, o.heartbeat_interval)),
        )

    async def _run(self, nc: Client, to_head: bool, handle_signals: bool) -> Summary:
        js = nc.jetstream(**self.options.jetstream_options())
        stream = Stream(js, self.stream)
        info = await stream.info()
        if stream.partitions is not None and not stream.partitions.divides(self.n):
            log.warning(
                "parallel %r: stream %r has %d partitions, which %d shards cannot split; every shard reads"
                " the whole stream and skips other shards' events (correct, slower). Shard counts that"
                " divide it: %s",
                self.name, self.stream, stream.partitions.count, self.n,
                ", ".join(map(str, stream.partitions.shard_counts()[:16])),
            )  # fmt: skip
        o = self.options
        replicas = o.cursor_replicas or info.config.num_replicas or 1
        store = await _open_store(js, self.namespace, replicas)
        bucket_stream = f"KV_{store.bucket}"
        bucket = await guard_api(js, bucket_stream, js.stream_info(bucket_stream))
        if (bucket.config.num_replicas or 1) < (info.config.num_replicas or 1):
            log.warning(
                "parallel %r: cursor bucket %r has %d replica(s), fewer than stream %r's %d: losing a node"
                " can stop every cursor write",
                self.name, store.bucket, bucket.config.num_replicas or 1, self.stream, info.config.num_replicas,
            )  # fmt: skip
        group = uuid.uuid4().hex
        fixed = () if o.elastic else self.shards  # an elastic member beats only the shards it takes
        beats = Heartbeats(
            store.kv, self.name, self.n, fixed, group, interval=o.heartbeat_interval, ttl=o.heartbeat_ttl,
            member=self.member,
        )  # fmt: skip
        membership = await self._hold(store, beats)
        loop = asyncio.get_running_loop()
        loops = self._start_loops(store.kv, beats, membership)
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        if membership is not None:
            log.info(
                "parallel %r: joining as member %s (n=%d) on stream %r: the assignment gives it its shards",
                self.name, membership.member, self.n, self.stream,
                extra={"group": self.name, "n": self.n, "stream": self.stream, "member": membership.member},
            )  # fmt: skip
        else:
            log.info(
                "parallel %r: starting shards %s of n=%d on stream %r",
                self.name, [m + 1 for m in self.shards], self.n, self.stream,
                extra={"group": self.name, "n": self.n, "stream": self.stream},
            )  # fmt: skip
        try:
            await self._supervise(to_head, beats)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await cancel_and_wait(loops)
            if membership is not None:
                await membership.release()
            self._kill_all(reap=True)  # only workers left behind by an error are still there
            await asyncio.gather(*self._chores, return_exceptions=True)
            await beats.clear()
        if self._unguarded:
            raise ConfigError(
                f"Parallel {self.name!r}: the worker processes import your main module, which starts the group"
                ' again when imported: put the code that starts it under `if __name__ == "__main__":`'
            )
        if self._fatal is not None:
            raise self._fatal
        await self._final_cursors(store)
        if self._superseded:
            raise ReshardRefused(self._superseded, {})
        summary = self.statistics()
        failures = {s.m: f"{s.state}: {s.detail}" for s in self._states.values() if s.state in ("fenced", "failed")}
        if failures:
            fenced = frozenset(s.m for s in self._states.values() if s.state == "fenced")
            raise ShardsFailed(failures, fenced, summary)
        if self._forced:
            raise Stopped(f"parallel {self.name!r}: {self._forced}; shards killed mid-way resume from their last flush")
        log.info(
            "parallel %r: %s: handled %d, skipped %d; cursors %s",
            self.name,
            "reached the head" if to_head and not self._stops else "stopped",
            summary.handled,
            summary.skipped,
            {s.name: s.cursor for s in summary.shards},
        )
        return summary

    def _start_loops(self, kv: KeyValue, beats: Heartbeats, membership: Membership | None) -> list[asyncio.Task[None]]:
        """The group's own loops: its heartbeats, the watch of its record, an elastic member's
        coordination. Each retries what retrying can fix; whatever else ends one ends the group."""
        loop = asyncio.get_running_loop()
        loops = [loop.create_task(beats.run()), loop.create_task(self._watch(kv))]
        if membership is not None:
            loops.append(loop.create_task(self._coordinate(membership, beats)))
        for task in loops:
            task.add_done_callback(self._loop_ended)
        return loops

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """One of the group's own loops (heartbeats, the record's watch, an elastic member's
        coordination) ended: by an error (a PermissionDenied, say), the group stops gracefully and
        :meth:`run_async` raises it."""
        if not task.cancelled() and (e := task.exception()) is not None:
            self._fail(e)

    def _fail(self, err: BaseException) -> None:
        """Stop the group gracefully because of ``err`` (retrying cannot fix it): :meth:`run_async`
        raises it once every worker stopped."""
        if self._fatal is not None:
            return
        self._fatal = err
        log.error("parallel %r: stopping: %s", self.name, err, exc_info=None if is_permanent(err) else err)
        if not self._stops:
            self._request_stop(False)

    async def _final_cursors(self, store: JetStreamCursorStore) -> None:
        async def peek(s: _Shard) -> None:
            with contextlib.suppress(RjetError, TimeoutError):
                s.cursor = await asyncio.wait_for(store.peek(s.name), 5.0)

        await asyncio.gather(*(peek(s) for s in self._states.values()))

    async def _hold(self, store: JetStreamCursorStore, beats: Heartbeats) -> Membership | None:
        """Make this group live (its shard heartbeats, or an elastic member's lease naming ``n``),
        then take the group record for ``n`` and make the cursors ready (:func:`prepare`): the
        order that lets exactly one ``n`` of the group run. Returns the elastic membership."""
        o = self.options
        membership: Membership | None = None
        if o.elastic:
            assert self.member is not None
            membership = Membership(
                store.kv, self.name, self.member, ttl=o.heartbeat_ttl, max_shards=o.max_shards,
                static=o.member_id is not None, n=self.n,
            )  # fmt: skip
        await beats.beat()
        try:
            if membership is not None:
                await membership.beat()
            self.reshard = await prepare(
                store.kv, self.name, self.n, group=beats.group, ttl=o.heartbeat_ttl, shards=beats.shards,
                member=self.member,
            )  # fmt: skip
        except BaseException:
            await beats.clear()
            if membership is not None:
                await membership.leave()  # refused: this member holds nothing, whatever its id
            raise
        return membership

    async def _watch(self, kv: KeyValue) -> None:
        """Stop the group if the group record comes to name another ``n``: a group of that ``n`` took
        it over because this one looked gone (paused or cut off past ``heartbeat_ttl``)."""
        while not self._stops:
            await asyncio.sleep(self.options.heartbeat_interval)
            try:
                n = await recorded_n(kv, self.name)
            except CursorStoreError as e:
                if is_permanent(e):
                    raise
                log.warning("parallel %r: %s (retrying)", self.name, e)
                continue
            if n is not None and n != self.n:
                self._superseded = (
                    f"parallel {self.name!r}: n={n} took the group over while this group of n={self.n} looked"
                    f" gone (no heartbeat or lease for {self.options.heartbeat_ttl:g}s); it stopped. One n runs"
                    f" at a time: stop n={n} first to run n={self.n} again"
                )
                log.error("%s", self._superseded)
                self._request_stop(False)
                return

    async def _coordinate(self, membership: Membership, beats: Heartbeats) -> None:
        """An elastic member's loop: keep the lease fresh, and work out which shards to run."""
        o = self.options
        previous: tuple[int, ...] | None = None
        last_view: frozenset[int] = frozenset()
        last_owner: dict[int, str] = {}  # shard -> its member in the previous view
        last_members: frozenset[str] = frozenset()  # the live members of the previous view
        while True:
            try:
                await membership.beat()
                mine, whole = await membership.view(self.n)
                busy = await busy_shards(membership.kv, self.name, self.n, beats.group, o.heartbeat_ttl)
            except CursorStoreError as e:  # a PermissionDenied is no CursorStoreError: it ends the group
                if is_permanent(e):
                    raise
                log.warning("parallel %r: member %s: %s (retrying)", self.name, membership.member, e)
            else:
                if mine != previous:
                    gained = sorted(set(mine) - set(previous or ()))
                    lost = sorted(set(previous or ()) - set(mine))
                    log.info(
                        "parallel %r: member %s: assignment %s (+%s -%s) of n=%d over %d live member(s): %s",
                        self.name, membership.member, [m + 1 for m in mine], [m + 1 for m in gained],
                        [m + 1 for m in lost], self.n, len(whole),
                        "; ".join(f"{k} {[m + 1 for m in v]}" for k, v in sorted(whole.items())),
                    )  # fmt: skip
                    previous = mine
                # A shard is taken once two views in a row give it to this member: members that joined
                # at the same moment see each other by then, and the member that had it is seen
                # holding it (its heartbeat) until it has handed it over. A shard whose member is gone
                # (its lease expired or deleted) is taken at the first view that gives it here, by a
                # member that was in the previous view: every member that sees the departure computes
                # the same new owner, so waiting one more heartbeat would only lengthen the takeover.
                owner = {m: member for member, shards in whole.items() for m in shards}
                orphans = (
                    {m for m in mine if m in last_owner and last_owner[m] not in whole}
                    if self.member in last_members
                    else set()
                )
                self._wanted, self._busy = frozenset(mine) & (last_view | orphans), frozenset(busy)
                self._letting_go = frozenset(range(self.n)) - frozenset(mine)
                last_view, last_owner, last_members = frozenset(mine), owner, frozenset(whole)
                if self._wake is not None:
                    self._wake.set()
            await asyncio.sleep(o.heartbeat_interval)

    def _rebalance(self, s: _Shard, now: float, beats: Heartbeats) -> None:
        """An elastic member's moves for one shard: take it once it is free, let it go when it moves."""
        wanted = s.m in self._wanted
        if s.state == "elsewhere" and wanted and s.m not in self._busy and now >= s.next_start:
            s.state = "taking"  # its heartbeat goes out first: a member deciding later sees it taken
            self._chore(self._take(s, beats))
        elif s.state in ("running", "starting") and s.m in self._letting_go and not s.leaving:
            s.leaving = True
            self._send(s, Stop())
            log.info(
                "parallel %r: member %s hands %s over (its worker finishes and flushes)",
                self.name, self.member, s.name,
                extra=log_fields(self.name, s.m, self.n, self.member),
            )  # fmt: skip
        elif s.state == "waiting" and s.m in self._letting_go:
            s.state = "elsewhere"
            self._chore(beats.remove(s.m))

    async def _take(self, s: _Shard, beats: Heartbeats) -> None:
        try:
            await beats.add(s.m)
        except (CursorStoreError, PermissionDenied) as e:
            if is_permanent(e):  # the shard's heartbeat refused, say: this member cannot run it
                beats.drop(s.m)
                s.state = "elsewhere"
                self._fail(e)
                return
            log.warning(
                "parallel %r: member %s cannot take %s yet: %s", self.name, self.member, s.name, e,
                extra=log_fields(self.name, s.m, self.n, self.member),
            )  # fmt: skip
            s.state = "elsewhere"
            return
        if s.state == "taking" and self._stops:
            s.state = "elsewhere"
        elif s.state == "taking":
            s.state, s.next_start = "waiting", 0.0
            log.info(
                "parallel %r: member %s takes %s", self.name, self.member, s.name,
                extra=log_fields(self.name, s.m, self.n, self.member),
            )  # fmt: skip
            if self._wake is not None:
                self._wake.set()

    def _chore(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _supervise(self, to_head: bool, beats: Heartbeats) -> None:
        ctx = multiprocess.get_context("spawn")
        for s in self._states.values():
            s.state = "elsewhere" if self.options.elastic else "waiting"
        try:
            await self._drive(ctx, to_head, beats)
        except asyncio.CancelledError:
            log.info("parallel %r: cancelled: stopping gracefully", self.name)
            self._request_stop(False)
            await self._drive(ctx, to_head, beats)
            raise

    async def _drive(self, ctx: SpawnContext, to_head: bool, beats: Heartbeats) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        next_report = 0.0
        while True:
            now = loop.time()
            for s in self._states.values():
                if self.options.elastic and not self._stops:
                    self._rebalance(s, now, beats)
                self._poll(ctx, s, now, to_head, beats)
            if all(s.state in _FINAL or (s.state in _ELSEWHERE and self._stops) for s in self._states.values()):
                return
            if deadline is not None and now >= next_report:  # a stop that takes a while says what it waits for
                waiting = [s.name for s in self._states.values() if s.state not in _FINAL | _ELSEWHERE]
                log.info("parallel %r: stopping: waiting for %s", self.name, ", ".join(waiting))
                next_report = now + 5.0
            if self._stops and deadline is None:
                deadline = now + self.options.stop_timeout
                next_report = now + 5.0
                for s in self._states.values():
                    if s.state == "waiting":
                        s.state = "stopped"
                    elif s.conn is not None:
                        self._send(s, Stop())
            if deadline is not None and not self._forced and (self._stops > 1 or now > deadline):
                self._forced = (
                    "forced to stop" if self._stops > 1 else f"not stopped within {self.options.stop_timeout}s"
                )
                log.error("parallel %r: %s: killing the workers still running", self.name, self._forced)
                self._kill_all()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _TICK)

    def _start(self, ctx: SpawnContext, s: _Shard, to_head: bool) -> None:
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=worker_main,
            args=(self._worker_config(s.m, to_head), self.fn, child),
            name=f"rjet:{s.name}",
            daemon=True,
        )
        with _children_ignore_sigint():
            proc.start()
        child.close()
        s.proc, s.conn = proc, parent
        s.state, s.outcome, s.detail = "starting", None, ""
        s.started_at = asyncio.get_running_loop().time()
        log.debug(
            "parallel %r: started worker of %s (pid %s)", self.name, s.name, proc.pid,
            extra=log_fields(self.name, s.m, self.n),
        )  # fmt: skip

    def _poll(self, ctx: SpawnContext, s: _Shard, now: float, to_head: bool, beats: Heartbeats) -> None:
        self._drain(s)
        if s.proc is not None and s.proc.exitcode is not None:
            self._drain(s)
            self._on_exit(s, s.proc.exitcode, now, beats)
        if s.state == "waiting" and not self._stops and now >= s.next_start:
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

    def _drain(self, s: _Shard) -> None:
        conn = s.conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._on_message(s, conn.recv())
        except (EOFError, OSError):
            pass

    def _on_message(self, s: _Shard, msg: ToParent) -> None:
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
                s.cursor = msg.cursor or s.cursor
            case _:
                log.error("parallel %r: %s sent a message of no known kind: %r", self.name, s.name, msg)

    def _on_exit(self, s: _Shard, code: int, now: float, beats: Heartbeats) -> None:
        assert s.proc is not None
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
            s.state, self._unguarded = "failed", True
            self._stops = max(self._stops, 1)
            self._kill_all()  # every worker fails alike: none of them can run
            return
        fenced = code == EXIT_FENCED or s.outcome == "fenced"
        if self.options.elastic and not self._stops and (s.leaving or fenced):
            # Handed over (or taken by a member that saw this one as gone): it may come back later.
            s.state, s.leaving = "elsewhere", False
            self._chore(beats.remove(s.m))
            if fenced:  # not at once: the member that has it lets it go first, if it is to come back
                s.next_start = now + 2 * self.options.heartbeat_interval
                log.warning(
                    "parallel %r: member %s lost %s to another member: %s", self.name, self.member, s.name, s.detail,
                    extra=log_fields(self.name, s.m, self.n, self.member),
                )  # fmt: skip
            else:
                log.info(
                    "parallel %r: member %s handed %s over", self.name, self.member, s.name,
                    extra=log_fields(self.name, s.m, self.n, self.member),
                )  # fmt: skip
            return
        if fenced:
            s.state = "fenced"
            beats.drop(s.m)
            log.error(
                "parallel %r: %s stopped for good, fenced out by a newer runner: %s", self.name, s.name, s.detail,
                extra=log_fields(self.name, s.m, self.n),
            )  # fmt: skip
        elif code == EXIT_FATAL or s.outcome == "fatal":
            s.state = "failed"
            log.error(
                "parallel %r: %s stopped for good: %s", self.name, s.name, s.detail,
                extra=log_fields(self.name, s.m, self.n),
            )  # fmt: skip
        elif code == 0 and s.outcome == "done":
            s.state = "done"
            log.info("parallel %r: %s reached the head", self.name, s.name, extra=log_fields(self.name, s.m, self.n))
        elif self._stops:
            s.state = "stopped"
            if code != 0 and not self._unguarded:
                log.warning(
                    "parallel %r: worker of %s (pid %s) %s while stopping",
                    self.name,
                    s.name,
                    pid,
                    _exit(code, s, killed_here=bool(self._forced)),
                    extra=log_fields(self.name, s.m, self.n),
                )
        else:
            lived = now - s.started_at
            reset = s.delay == 0 or lived >= self.options.restart_reset
            s.delay = self.options.restart_delay if reset else min(s.delay * 2, self.options.max_restart_delay)
            s.delay = max(s.delay, self.options.restart_delay)
            s.restarts += 1
            s.state = "waiting"
            s.next_start = now + s.delay
            log.error(
                "parallel %r: worker of %s (pid %s) %s after %.1fs; restarting it in %.1fs (restart #%d)",
                self.name,
                s.name,
                pid,
                _exit(code, s),
                lived,
                s.delay,
                s.restarts,
                extra=log_fields(self.name, s.m, self.n),
            )

    # ----------------------------------------------------------------- stopping

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stops:
            log.warning("parallel %r: %s again: killing the workers", self.name, sig.name)
        else:
            log.warning(
                "parallel %r: %s: stopping gracefully within %gs (send it again to force)",
                self.name,
                sig.name,
                self.options.stop_timeout,
            )
        self._request_stop(False)

    def _request_stop(self, force: bool) -> None:
        self._stops += 2 if force else 1
        if self._wake is not None:
            self._wake.set()

    def _send(self, s: _Shard, msg: Stop) -> None:
        if s.conn is not None:
            with contextlib.suppress(OSError, ValueError):
                s.conn.send(msg)

    def _kill_all(self, *, reap: bool = False) -> None:
        for s in self._states.values():
            if s.proc is not None and s.proc.exitcode is None:
                with contextlib.suppress(Exception):
                    s.proc.kill()
                    if reap:
                        s.proc.join(2.0)


async def _open_store(js: JetStreamContext, namespace: str, replicas: int) -> JetStreamCursorStore:
    """The cursor store; a bucket that does not answer in time (a cluster electing its leader) is
    tried again for a few seconds before the group gives up."""
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            return await JetStreamCursorStore.create(js, namespace, replicas=replicas)
        except CursorStoreError as e:
            if not isinstance(e.__cause__, TimeoutError) or attempt == _OPEN_ATTEMPTS - 1:
                raise
            log.warning("cursor namespace %r: %s; trying again", namespace, e)
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


def _exit(code: int, s: _Shard, *, killed_here: bool = False) -> str:
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
