"""Cursors in the application's own SQL database, and exactly-once effects.

:class:`SqlCursorStore` keeps cursors in SQLite (``sqlite:///PATH``, built in) or PostgreSQL
(``postgresql://...``, ``pip install 'rjet[postgres]'``), with claims, fencing and exact progress like
:class:`rjet.JetStreamCursorStore`. It is the store that runs ``rjet.Consumer(...,
transactional=True)``: the handler ``fn(fate, event, tx)`` writes through ``tx`` (the driver's own
connection, inside an open transaction) and rjet records the event as done in the same transaction,
committed only while the runner holds the claim.

::

    async with await rjet.sql.SqlCursorStore.open("sqlite:///app.db") as cursors:
        ...
"""

from rjet.sql._store import SqlClaim, SqlCursorStore

__all__ = ["SqlClaim", "SqlCursorStore"]
