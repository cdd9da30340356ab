"""Parallel: a group of worker processes, one per shard, supervised by the calling process.

The parent checks the stream, opens the cursor bucket, makes the group live and takes the group
record (``_coordinator.hold``: resharding when ``n`` changed), then runs the group's own loops (its
heartbeats, ``_heartbeats``; the record's watch and an elastic member's coordination,
``_coordinator``) beside the supervision of the workers (``_supervisor``; each worker is
``_worker``), and says how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

from multiprocess.reduction import ForkingPickler

from rjet._nats.connect import connect
from rjet._nats.denials import guard_api
from rjet._tasks import cancel_and_wait
from rjet.consumer import Batch, check_handler
from rjet.cursors import JetStreamCursorStore
from rjet.errors import ConfigError, CursorStoreError, RjetError, Stopped
from rjet.event import Event
from rjet.fate import Fate
from rjet.parallel._coordinator import Coordinator, hold, watch_record
from rjet.parallel._elastic import Membership, default_member_id
from rjet.parallel._errors import ReshardRefused, ShardsFailed
from rjet.parallel._heartbeats import Heartbeats
from rjet.parallel._options import (
    ConsumerOptions,
    ElasticOptions,
    GroupHandler,
    HeartbeatOptions,
    ParallelOptions,
    SupervisionOptions,
    TargetOptions,
    WorkerOptions,
)
from rjet.parallel._reshard import ReshardReport
from rjet.parallel._results import Summary
from rjet.parallel._shard import check_n, shard_name
from rjet.parallel._supervisor import Supervisor
from rjet.parallel._worker import ConnectOptions, WorkerConfig, connect_options, exit_if_importing_main
from rjet.reader import ReadConfig
from rjet.retry import RetryPolicy
from rjet.sql import SqlCursorStore
from rjet.stream import Stream

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from nats.js.api import StreamInfo
    from nats.js.kv import KeyValue

__all__ = ["Parallel"]

log = logging.getLogger("rjet.parallel")

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_OPEN_ATTEMPTS: Final = 8  # a second apart
# The defaults, from the option objects themselves (one place).
_C: Final = ConsumerOptions()
_W: Final = WorkerOptions()
_S: Final = SupervisionOptions()
_H: Final = HeartbeatOptions()


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

    The other keywords, each checked here (by the option object it belongs to, ``self.options``):

    - what runs (:class:`TargetOptions`, :class:`ElasticOptions`): ``shards`` (0-based; default all),
      or ``elastic=True`` with ``member_id`` and ``max_shards``; ``cursor_replicas``, ``js_domain``,
      ``js_api_prefix``; ``cursors``, a database URL (``"sqlite:///PATH"``, ``"postgresql://..."``)
      that keeps the shard cursors instead of the bucket (docs/sharding.md "SQL cursors");
    - each shard's :class:`rjet.Consumer` (:class:`ConsumerOptions`): ``types``, ``filter``, ``fate``,
      ``dead_letters``, ``dead_letter_attempts``, ``concurrency``, ``batch``, ``on_error``, ``retry``,
      ``max_waiting``, ``max_waiting_bytes``, ``transactional`` (with ``cursors``: the handler is
      ``[async] fn(fate, event, tx)``, its writes committed with the shard's progress; sync on SQLite only);
    - each worker process (:class:`WorkerOptions`): ``read``, ``lag``, ``flush_interval``,
      ``retry_delay``, ``max_backoff``, ``handler_timing``, ``on_start``, ``loop``;
    - supervision (:class:`SupervisionOptions`): ``restart_delay``, ``max_restart_delay``,
      ``restart_reset``, ``stop_timeout``;
    - liveness (:class:`HeartbeatOptions`): ``heartbeat_interval``, ``heartbeat_ttl``.

    ::

        def handle(fate, event):
            fate.tempt()
            db.upsert(event.foreign_id, event.metadata)

        if __name__ == "__main__":           # worker processes import the main module
            group = Parallel("indexer", 4, handle, servers="nats://127.0.0.1:4222", stream="orders",
                             namespace="shop", concurrency=64)
            group.run()                      # until SIGINT/SIGTERM or group.stop()
            summary = group.run(to_head=True)  # until every shard handled what the stream holds now

    Worker processes are spawned (never forked), each with its own event loop and NATS connection.
    """

    def __init__(
        self,
        name: str,
        n: int,
        fn: GroupHandler,
        *,
        servers: str | Sequence[str],
        stream: str,
        namespace: str,
        connect_options: ConnectOptions = None,
        shards: Sequence[int] | None = None,
        elastic: bool = False,
        member_id: str | None = None,
        max_shards: int | None = None,
        types: Iterable[int] | None = None,
        filter: Callable[[Event], bool] | None = None,
        fate: Fate = _C.fate,
        dead_letters: str | None = None,
        dead_letter_attempts: int = _C.dead_letter_attempts,
        concurrency: int = _C.concurrency,
        batch: Batch | None = None,
        on_error: Literal["stop", "retry"] | None = None,
        retry: RetryPolicy | None = None,
        max_waiting: int | None = None,
        max_waiting_bytes: int = _C.max_waiting_bytes,
        read: ReadConfig | None = None,
        lag: float | None = None,
        flush_interval: float = _W.flush_interval,
        retry_delay: float = _W.retry_delay,
        max_backoff: float = _W.max_backoff,
        handler_timing: bool = False,
        on_start: Callable[[int], Any] | None = None,
        loop: Literal["asyncio", "uvloop"] = _W.loop,
        restart_delay: float = _S.restart_delay,
        max_restart_delay: float = _S.max_restart_delay,
        restart_reset: float = _S.restart_reset,
        stop_timeout: float = _S.stop_timeout,
        heartbeat_interval: float = _H.interval,
        heartbeat_ttl: float = _H.ttl,
        cursor_replicas: int | None = None,
        js_domain: str | None = None,
        js_api_prefix: str | None = None,
        cursors: str | None = None,
        transactional: bool = False,
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
        if not elastic and (member_id is not None or max_shards is not None):
            raise ConfigError("Parallel: member_id and max_shards are for elastic groups (elastic=True)")
        self.options = ParallelOptions(
            consumer=ConsumerOptions(
                types=types, filter=filter, fate=fate, dead_letters=dead_letters,
                dead_letter_attempts=dead_letter_attempts, concurrency=concurrency, batch=batch, on_error=on_error,
                retry=retry, max_waiting=max_waiting, max_waiting_bytes=max_waiting_bytes, transactional=transactional,
            ),
            worker=WorkerOptions(
                read=read, lag=lag, flush_interval=flush_interval, retry_delay=retry_delay, max_backoff=max_backoff,
                handler_timing=handler_timing, on_start=on_start, loop=loop,
            ),
            supervision=SupervisionOptions(
                restart_delay=restart_delay, max_restart_delay=max_restart_delay, restart_reset=restart_reset,
                stop_timeout=stop_timeout,
            ),
            heartbeats=HeartbeatOptions(interval=heartbeat_interval, ttl=heartbeat_ttl),
            elastic=ElasticOptions(member_id=member_id, max_shards=max_shards) if elastic else None,
            target=TargetOptions(
                shards=shards, cursor_replicas=cursor_replicas, js_domain=js_domain, js_api_prefix=js_api_prefix,
                cursors=cursors,
            ),
        )  # fmt: skip
        # The handler's shape, checked here as each worker's Consumer would check it.
        check_handler(fn, batch=batch is not None, owner=f"Parallel {name!r}", transactional=transactional)
        if transactional and not inspect.iscoroutinefunction(fn) and cursors is not None:
            from rjet.sql._backends import backend_for  # rjet.sql imports no part of rjet.parallel

            if not backend_for(cursors).sync_transactions:
                raise ConfigError(
                    f"Parallel {name!r}: a sync transactional handler runs on SQLite only (its tx, a psycopg"
                    " AsyncConnection here, is awaited): async def fn(fate, event, tx)"
                )
        chosen = tuple(range(n)) if self.options.target.shards is None else tuple(self.options.target.shards)
        if not chosen or len(set(chosen)) != len(chosen):
            raise ConfigError(f"Parallel {name!r}: shards must be distinct shard indexes, not {chosen!r}")
        for m in chosen:
            shard_name(name, m, n)
        self.member: str | None = None
        if self.options.elastic is not None:
            self.member = self.options.elastic.member_id or default_member_id()
        self.name = name
        self.n = n
        self.fn = fn
        self.servers = tuple(urls)
        self.stream = stream
        self.namespace = namespace
        self.connect_options = connect_options
        self.shards: tuple[int, ...] = tuple(sorted(chosen))
        self.reshard: ReshardReport | None = None
        self._sup = self._supervisor()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False

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
        if to_head and self.options.elastic is not None:
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
        self._sup = self._supervisor()
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
            loop.call_soon_threadsafe(self._sup.request_stop, force)

    @property
    def stopping(self) -> bool:
        """True from a stop request until the group has stopped (its workers finish and flush)."""
        return self._running and self._sup.stops > 0

    @property
    def worker_pids(self) -> dict[int, int]:
        """The process ID of each shard's live worker, by shard index."""
        return self._sup.pids()

    def statistics(self) -> Summary:
        """A snapshot of what the group did so far (counts arrive from workers every 0.25 s)."""
        return Summary(self.name, self.n, self._sup.stats(), self.reshard)

    def __repr__(self) -> str:
        return f"Parallel({self.name!r}, n={self.n}, shards={list(self.shards)}, stream={self.stream!r})"

    # ----------------------------------------------------------------- the run

    def _supervisor(self) -> Supervisor:
        return Supervisor(
            self.name, self.n, self.shards, self.fn, self._worker_config, self.options.supervision,
            member=self.member, retake_after=2 * self.options.heartbeats.interval,
        )  # fmt: skip

    def _worker_config(self, m: int, to_head: bool) -> WorkerConfig:
        o = self.options
        level = min(logging.getLogger().getEffectiveLevel(), log.getEffectiveLevel())
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
            fence_interval=max(0.2, min(o.worker.flush_interval, o.heartbeats.interval)),
        )

    async def _run(self, nc: Client, to_head: bool, handle_signals: bool) -> Summary:
        o = self.options
        js = nc.jetstream(**o.target.jetstream_options())
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
        store = await self._open_store(js, info)
        # The shard cursors in SQL: the group record, heartbeats and leases stay in the bucket.
        cursors = None if o.target.cursors is None else await SqlCursorStore.open(o.target.cursors)
        try:
            return await self._hold_and_run(store, cursors, to_head, handle_signals)
        finally:
            if cursors is not None:
                await cursors.close()

    async def _hold_and_run(
        self, store: JetStreamCursorStore, cursors: SqlCursorStore | None, to_head: bool, handle_signals: bool
    ) -> Summary:
        o = self.options
        fixed = () if o.elastic is not None else self.shards  # an elastic member beats only the shards it takes
        beats = Heartbeats(
            store.kv, self.name, self.n, fixed, uuid.uuid4().hex, interval=o.heartbeats.interval,
            ttl=o.heartbeats.ttl, member=self.member,
        )  # fmt: skip
        membership, self.reshard = await hold(store.kv, self.name, self.n, beats, o, self.member, cursors)
        loop = asyncio.get_running_loop()
        loops = self._start_loops(store.kv, beats, membership)
        installed: list[signal.Signals] = []
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._sup.on_signal, sig)
                installed.append(sig)
        self._log_start(membership)
        try:
            await self._sup.run(to_head, beats)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await cancel_and_wait(loops)
            if membership is not None:
                await membership.release()
            self._sup.kill_all(reap=True)  # only workers left behind by an error are still there
            await self._sup.settle()
            await beats.clear()
        return await self._outcome(cursors or store, to_head)

    def _log_start(self, membership: Membership | None) -> None:
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

    async def _outcome(self, store: JetStreamCursorStore | SqlCursorStore, to_head: bool) -> Summary:
        """The summary of a run that ended, or the error that ended it."""
        sup = self._sup
        if sup.unguarded:
            raise ConfigError(
                f"Parallel {self.name!r}: the worker processes import your main module, which starts the group"
                ' again when imported: put the code that starts it under `if __name__ == "__main__":`'
            )
        if sup.fatal is not None:
            raise sup.fatal
        await self._final_cursors(store)
        if sup.superseded:
            raise ReshardRefused(sup.superseded, {})
        summary = self.statistics()
        failures = {s.shard: f"{s.state}: {sup.states[s.shard].detail}" for s in summary.shards
                    if s.state in ("fenced", "failed")}  # fmt: skip
        if failures:
            fenced = frozenset(s.shard for s in summary.shards if s.state == "fenced")
            errors = {m: e for m in failures if (e := sup.states[m].error) is not None}
            raise ShardsFailed(failures, fenced, summary, errors=errors)
        if sup.forced:
            raise Stopped(f"parallel {self.name!r}: {sup.forced}; shards killed mid-way resume from their last flush")
        log.info(
            "parallel %r: %s: handled %d, skipped %d; cursors %s",
            self.name,
            "reached the head" if to_head and not sup.stops else "stopped",
            summary.handled,
            summary.skipped,
            {s.name: s.cursor for s in summary.shards},
        )
        return summary

    def _start_loops(self, kv: KeyValue, beats: Heartbeats, membership: Membership | None) -> list[asyncio.Task[None]]:
        """The group's own loops: its heartbeats, the watch of its record, an elastic member's
        coordination. Each retries what retrying can fix; whatever else ends one (a PermissionDenied,
        say) stops the group gracefully, and :meth:`run_async` raises it."""
        loop = asyncio.get_running_loop()
        o = self.options
        loops = [
            loop.create_task(beats.run()),
            loop.create_task(watch_record(kv, self.name, self.n, o, self._sup)),
        ]
        if membership is not None:
            coordinator = Coordinator(
                membership, self.n, beats, self._sup, interval=o.heartbeats.interval, ttl=o.heartbeats.ttl
            )
            self._sup.rebalance = coordinator.rebalance
            loops.append(loop.create_task(coordinator.run()))
        for task in loops:
            task.add_done_callback(self._loop_ended)
        return loops

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (e := task.exception()) is not None:
            self._sup.fail(e)

    async def _final_cursors(self, store: JetStreamCursorStore | SqlCursorStore) -> None:
        async def peek(m: int, name: str) -> None:
            with contextlib.suppress(RjetError, TimeoutError):
                self._sup.states[m].cursor = await asyncio.wait_for(store.peek(name), 5.0)

        await asyncio.gather(*(peek(m, s.name) for m, s in self._sup.states.items()))

    async def _open_store(self, js: JetStreamContext, info: StreamInfo) -> JetStreamCursorStore:
        """The cursor store; a bucket that does not answer in time (a cluster electing its leader) is
        tried again for a few seconds before the group gives up. Warns when the bucket keeps fewer
        replicas than the stream."""
        replicas = self.options.target.cursor_replicas or info.config.num_replicas or 1
        store = await _open_store(js, self.namespace, replicas)
        bucket_stream = f"KV_{store.bucket}"
        bucket = await guard_api(js, bucket_stream, js.stream_info(bucket_stream))
        if (bucket.config.num_replicas or 1) < (info.config.num_replicas or 1):
            log.warning(
                "parallel %r: cursor bucket %r has %d replica(s), fewer than stream %r's %d: losing a node"
                " can stop every cursor write",
                self.name, store.bucket, bucket.config.num_replicas or 1, self.stream, info.config.num_replicas,
            )  # fmt: skip
        return store


async def _open_store(js: JetStreamContext, namespace: str, replicas: int) -> JetStreamCursorStore:
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            return await JetStreamCursorStore.create(js, namespace, replicas=replicas)
        except CursorStoreError as e:
            if not isinstance(e.__cause__, TimeoutError) or attempt == _OPEN_ATTEMPTS - 1:
                raise
            log.warning("cursor namespace %r: %s; trying again", namespace, e)
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")
