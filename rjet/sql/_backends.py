"""The two databases an :class:`rjet.sql.SqlCursorStore` runs on, behind one small interface.

SQLite through aiosqlite (each connection a thread of its own running the standard library's
``sqlite3``: the handler gets an ``aiosqlite.Connection`` it awaits, and the event loop never blocks
on the file), PostgreSQL through psycopg 3's ``AsyncConnection``. rjet's own statements are written
with ``?`` placeholders; the PostgreSQL backend turns them into ``%s``.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from typing import Any, Protocol

from rjet.errors import ConfigError, CursorStoreError

__all__ = ["Backend", "backend_for"]

Params = Sequence[object]


class Backend(Protocol):
    """One database: how to connect, and how rjet's statements run on a connection."""

    kind: str  # "sqlite" or "postgresql"
    where: str  # for messages: the file, or host/database (never a password)

    async def connect(self) -> Any: ...

    async def begin(self, conn: Any) -> None: ...

    async def commit(self, conn: Any) -> None: ...

    async def rollback(self, conn: Any) -> None: ...

    def in_transaction(self, conn: Any) -> bool: ...

    async def execute(self, conn: Any, sql: str, params: Params = ()) -> int: ...

    async def executemany(self, conn: Any, sql: str, rows: Sequence[Params]) -> None: ...

    async def fetchall(self, conn: Any, sql: str, params: Params = ()) -> list[tuple[Any, ...]]: ...

    async def close(self, conn: Any) -> None: ...

    def lock_clause(self) -> str:
        """What makes a read of the cursor's row hold it until commit (empty where the whole
        transaction already holds the database, as SQLite's ``BEGIN IMMEDIATE`` does)."""
        ...

    def errors(self) -> tuple[type[BaseException], ...]:
        """The driver's errors (what a store turns into :class:`rjet.CursorStoreError`)."""
        ...


class _Sqlite:
    """SQLite: WAL, ``synchronous=FULL`` (a committed transaction survives a power loss, not only a
    crash of the process), ``busy_timeout`` 30 s, and ``BEGIN IMMEDIATE`` so that a transaction holds
    the write lock from its start (no deadlock on a read lock upgraded late)."""

    kind = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = path

    async def connect(self) -> Any:
        import aiosqlite

        conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA busy_timeout=30000")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def begin(self, conn: Any) -> None:
        await conn.execute("BEGIN IMMEDIATE")

    async def commit(self, conn: Any) -> None:
        await conn.execute("COMMIT")

    async def rollback(self, conn: Any) -> None:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")

    def in_transaction(self, conn: Any) -> bool:
        return bool(conn.in_transaction)

    async def execute(self, conn: Any, sql: str, params: Params = ()) -> int:
        # The cursor is not closed: closing is one more round trip to the connection's thread, and
        # sqlite3 finalises the statement when the cursor goes (its rowcount is read here, no trip).
        cursor = await conn.execute(sql, tuple(params))
        return int(cursor.rowcount)

    async def executemany(self, conn: Any, sql: str, rows: Sequence[Params]) -> None:
        await conn.executemany(sql, [tuple(r) for r in rows])

    async def fetchall(self, conn: Any, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        async with conn.execute(sql, tuple(params)) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def close(self, conn: Any) -> None:
        await conn.close()

    def lock_clause(self) -> str:
        return ""

    def errors(self) -> tuple[type[BaseException], ...]:
        import sqlite3

        return (sqlite3.Error, OSError, ValueError)


class _Postgres:
    """PostgreSQL: autocommit connections on which rjet sends ``BEGIN`` and ``COMMIT`` itself (the
    handler's ``tx`` is inside that transaction); the cursor's row is read ``FOR SHARE`` at the end of
    a transaction, so a takeover's update waits for it to commit, and a commit after a takeover
    changes nothing."""

    kind = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError as e:  # never the URL itself in the message: it may carry a password
            raise ConfigError(f"rjet.sql: bad PostgreSQL URL {url.split('@')[-1]!r}: {e}") from None
        self.where = f"{parts.hostname or 'localhost'}:{port or 5432}{parts.path or '/'}"

    async def connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise ConfigError(
                "rjet.sql: postgresql:// needs psycopg 3: pip install 'rjet[postgres]' (in a checkout:"
                " pip install -e '.[postgres]')"
            ) from None
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=5)

    async def begin(self, conn: Any) -> None:
        await conn.execute("BEGIN")

    async def commit(self, conn: Any) -> None:
        await conn.execute("COMMIT")

    async def rollback(self, conn: Any) -> None:
        import psycopg

        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await conn.execute("ROLLBACK")

    def in_transaction(self, conn: Any) -> bool:
        import psycopg

        return bool(conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS)

    async def execute(self, conn: Any, sql: str, params: Params = ()) -> int:
        cursor = await conn.execute(sql.replace("?", "%s"), tuple(params))
        return int(cursor.rowcount)

    async def executemany(self, conn: Any, sql: str, rows: Sequence[Params]) -> None:
        async with conn.cursor() as cursor:
            await cursor.executemany(sql.replace("?", "%s"), [tuple(r) for r in rows])

    async def fetchall(self, conn: Any, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        cursor = await conn.execute(sql.replace("?", "%s"), tuple(params))
        return [tuple(row) for row in await cursor.fetchall()]

    async def close(self, conn: Any) -> None:
        await conn.close()

    def lock_clause(self) -> str:
        return " FOR SHARE"

    def errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error, OSError)


def backend_for(url: str) -> Backend:
    """The backend of ``url``: ``sqlite:///PATH`` (``sqlite:///:memory:`` is refused: a store in
    memory would forget its cursors), ``postgresql://...`` (or ``postgres://``)."""
    if not isinstance(url, str):
        raise ConfigError(f"rjet.sql: the database URL must be a str, not {url!r}")
    scheme, sep, rest = url.partition("://")
    if scheme == "sqlite" and sep:
        path = rest[1:] if rest.startswith("/") else rest
        if not path or path == ":memory:":
            raise ConfigError(
                f"rjet.sql: {url!r} names no file: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        return _Sqlite(path)
    if scheme in ("postgresql", "postgres") and sep:
        return _Postgres(url)
    raise ConfigError(
        f"rjet.sql: unsupported database URL {url.split('@')[-1]!r}: use sqlite:///PATH or postgresql://..."
    )


def store_error(backend: Backend, what: str, err: BaseException) -> CursorStoreError:
    """``err`` of the driver as a one-line :class:`rjet.CursorStoreError` naming the database."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CursorStoreError(f"{backend.kind} cursor store at {backend.where}: {what}: {detail}")
