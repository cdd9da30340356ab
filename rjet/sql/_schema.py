"""The tables an :class:`rjet.sql.SqlCursorStore` keeps, versioned.

Version 1::

    rjet_schema  (version INTEGER NOT NULL)              one row: the version of these tables
    rjet_cursors (name TEXT PRIMARY KEY,                 the consumer's name
                  cursor BIGINT,                         the watermark (NULL: none yet)
                  done TEXT NOT NULL DEFAULT '',         exact progress above it (rjet/_progress.py)
                  stream TEXT,                           the identity of the stream it counts in
                  owner TEXT)                            the runner holding the claim
    rjet_done    (name TEXT, seq BIGINT,                 events a transactional consumer committed
                  PRIMARY KEY (name, seq))               above the watermark, one row each

A store opening an older version migrates it (each step in the transaction that records the new
version); a newer version than this rjet knows is refused.
"""

from __future__ import annotations

from typing import Any, Final

from rjet.errors import CursorStoreError
from rjet.sql._backends import Backend

__all__ = ["VERSION", "migrate"]

VERSION: Final = 1

_STEPS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        "CREATE TABLE IF NOT EXISTS rjet_cursors (name TEXT PRIMARY KEY, cursor BIGINT,"
        " done TEXT NOT NULL DEFAULT '', stream TEXT, owner TEXT)",
        "CREATE TABLE IF NOT EXISTS rjet_done (name TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (name, seq))",
    ),
}


async def migrate(backend: Backend, conn: Any) -> int:
    """Create or migrate the tables on ``conn``; returns the version found (0: none)."""
    await backend.begin(conn)
    try:
        if backend.kind == "postgresql":  # two stores creating the tables at once: one at a time
            await backend.execute(conn, "SELECT pg_advisory_xact_lock(7274652101)")
        await backend.execute(conn, "CREATE TABLE IF NOT EXISTS rjet_schema (version INTEGER NOT NULL)")
        rows = await backend.fetchall(conn, "SELECT version FROM rjet_schema")
        found = int(rows[0][0]) if rows else 0
        if found > VERSION:
            raise CursorStoreError(
                f"{backend.kind} cursor store at {backend.where}: its tables are version {found}, newer than"
                f" this rjet knows ({VERSION}): upgrade rjet"
            )
        for version in range(found + 1, VERSION + 1):
            for statement in _STEPS[version]:
                await backend.execute(conn, statement)
        if not rows:
            await backend.execute(conn, "INSERT INTO rjet_schema (version) VALUES (?)", (VERSION,))
        elif found < VERSION:
            await backend.execute(conn, "UPDATE rjet_schema SET version = ?", (VERSION,))
        await backend.commit(conn)
    except BaseException:
        await backend.rollback(conn)
        raise
    return found
