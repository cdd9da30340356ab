"""The worker process of test_sql_faults.py: a transactional consumer that inserts one row per event
into ``effects`` through ``tx``, up to the stream's head, then prints ``head``.

``python sql_worker.py NATS_URL STREAM DATABASE_URL CONCURRENCY BATCH SHAPE`` (``BATCH`` 0: none;
``SHAPE`` ``async``, or ``sync``: a sync handler, SQLite only, its transaction on the connection's
thread). It prints ``ready`` once its store is open; the test SIGKILLs it at random points and
starts it again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from typing import Any

import rjet
from rjet.sql import SqlCursorStore


async def main(nats_url: str, stream_name: str, db_url: str, concurrency: int, batch: int, sync: bool) -> None:
    nc = await rjet.connect(nats_url)
    try:
        stream = rjet.Stream(nc.jetstream(), stream_name)
        insert = "INSERT INTO effects (seq, fid) VALUES (?, ?)"
        if not db_url.startswith("sqlite:"):
            insert = insert.replace("?", "%s")

        async def one(fate: rjet.Fate, event: rjet.Event, tx: Any) -> None:
            await tx.execute(insert, (event.id_int, event.foreign_id))

        async def many(fate: rjet.Fate, events: list[rjet.Event], tx: Any) -> None:
            rows = [(e.id_int, e.foreign_id) for e in events]
            if db_url.startswith("sqlite:"):
                await tx.executemany(insert, rows)
            else:
                async with tx.cursor() as cursor:
                    await cursor.executemany(insert, rows)

        def sync_one(fate: rjet.Fate, event: rjet.Event, tx: sqlite3.Connection) -> None:
            tx.execute(insert, (event.id_int, event.foreign_id))

        def sync_many(fate: rjet.Fate, events: list[rjet.Event], tx: sqlite3.Connection) -> None:
            tx.executemany(insert, [(e.id_int, e.foreign_id) for e in events])

        fn: Any = (sync_many if batch else sync_one) if sync else (many if batch else one)
        async with await SqlCursorStore.open(db_url, flush_interval=0.05) as store:
            consumer = rjet.Consumer(
                "c",
                fn,
                transactional=True,
                concurrency=concurrency,
                batch=rjet.Batch(batch, max_wait=0.005) if batch else None,
            )
            print("ready", flush=True)
            try:
                await rjet.run(rjet.Spec(stream.stream, store, consumer, to_head=True))
            except rjet.HeadReached:
                print("head", flush=True)
    finally:
        await nc.close()


if __name__ == "__main__":
    url, name, db, k, b, shape = sys.argv[1:7]
    asyncio.run(main(url, name, db, int(k), int(b), shape == "sync"))
