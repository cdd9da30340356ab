"""A zombie member of an elastic group whose shard cursors are in PostgreSQL: the member and its worker
processes SIGSTOPped past their lease while the other member takes their shards over (frozen at a
moment they hold no cursor row's lock, which would make the takeover wait), then SIGCONTed.
Its workers commit nothing after the takeover (each transaction commits only while its claim holds,
and the takeover's claim replaced it), and the table holds each event exactly once. (Slow: every
test under tests/faults/ is.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sql_fixtures import SqlDb, postgres_server, sql_db

import rjet
from rjet.parallel import shard_name, shard_of
from rjet.server import EmbeddedServer
from rjet.testing import KeyOrder, wait_until

__all__ = ["postgres_server", "sql_db"]  # the fixtures, imported for pytest

N = 4
COUNT = 8000

# One row per event, naming the worker process that committed it.
_HANDLER = """
import asyncio, os

async def handle(fate, event, tx):
    await asyncio.sleep(0.001)
    await tx.execute("INSERT INTO effects (seq, fid, who) VALUES (%s, %s, %s)",
                     (event.id_int, event.foreign_id, str(os.getpid())))
"""


def _start_member(server: EmbeddedServer, name: str, directory: Path, member: str, url: str) -> subprocess.Popen[str]:
    args = [
        sys.executable, "-m", "rjet", "worker", name, "zombie_handler:handle", "--group", name, "-n", str(N),
        "--namespace", name, "--elastic", "--member-id", member, "--heartbeat-interval", "0.2", "--heartbeat-ttl",
        "1.0", "--flush-interval", "0.2", "--cursors", url, "--transactional", "-q", "-s", server.url,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(directory) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Its own process group: the test stops the member and its worker processes together, as a host
    # freezing would.
    return subprocess.Popen(args, cwd=directory, env=env, start_new_session=True, text=True)


async def _stop_members(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGCONT)
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            await asyncio.to_thread(p.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _in_group(pgid: int, pids: set[int]) -> set[int]:
    """The processes of ``pids`` in process group ``pgid`` (a member's workers)."""
    out = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pgid:
                out.add(pid)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sql_db", ["postgresql", "postgresql-pipeline"], indirect=True)
async def test_a_member_paused_past_its_lease_commits_nothing_after_the_takeover(
    server: EmbeddedServer, stream: rjet.Stream, name: str, tmp_path: Path, sql_db: SqlDb
) -> None:
    sql_db.create_effects()
    (tmp_path / "zombie_handler.py").write_text(textwrap.dedent(_HANDLER))
    fids = [f"k{i % 200}" for i in range(COUNT)]
    events = dict(zip(await stream.insert_many([(fid, 1, b"") for fid in fids]), fids, strict=True))

    def rows() -> list[tuple[int, str, int]]:
        return [(int(s), str(f), int(w)) for s, f, w in sql_db.query("SELECT seq, fid, who FROM effects ORDER BY id")]

    def owners() -> dict[str, int]:
        """The pid of the runner holding each shard cursor (runner ids are host:pid:token)."""
        found = sql_db.query("SELECT name, owner FROM rjet_cursors WHERE owner IS NOT NULL")
        return {str(n): int(str(o).split(":")[1]) for n, o in found if str(o).count(":") >= 2}

    def holding_a_cursor_row() -> bool:
        """Whether a session has sat for 0.2 s (frozen) in a transaction that locked cursor rows (updated
        or read them FOR SHARE: a lock on the table stronger than a plain read's). A handler's
        transaction locks its row only in its last message, inside the server; a flush or a claim in
        flight holds it across round trips."""
        held = sql_db.query(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
            " JOIN pg_class c ON c.oid = l.relation WHERE a.state = 'idle in transaction'"
            " AND c.relname = 'rjet_cursors' AND l.mode <> 'AccessShareLock'"
            " AND a.state_change < now() - interval '200 milliseconds'"
        )
        return bool(held[0][0])

    a = _start_member(server, name, tmp_path, "a", sql_db.url)
    b = _start_member(server, name, tmp_path, "b", sql_db.url)
    try:
        await wait_until(lambda: len(rows()) > COUNT // 10, 90, "both members handling")
        await wait_until(lambda: len(_in_group(a.pid, {w for *_, w in rows()})) >= 1, 30, "a's workers handling")
        await wait_until(lambda: len(_in_group(a.pid, set(owners().values()))) >= 1, 30, "a holding shards")
        zombies = _in_group(a.pid, set(owners().values()))  # a's workers, each holding a shard cursor
        a_shards = {k for k, pid in owners().items() if pid in zombies}

        # a and its workers freeze, transactions in flight and all; but not one that holds a shard
        # cursor's row (a flush or a claim between its UPDATE and its COMMIT): PostgreSQL makes the
        # takeover's claim wait for it until the frozen session's idle-in-transaction timeout ends it
        # (30 s: tests/faults/test_sql_faults.py shows that wait), longer than this test should take.
        # Frozen in such a window, a is woken and frozen again.
        tries = 0
        while tries < 30:
            tries += 1
            os.killpg(a.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            await asyncio.sleep(0.3)
            if not holding_a_cursor_row():
                break
            os.killpg(a.pid, signal.SIGCONT)
            await asyncio.sleep(0.05)
        assert not holding_a_cursor_row(), "a was frozen holding a cursor's row lock 30 times in a row"
        # b takes a's shards over once a's lease is a TTL (1 s) old: its workers claim the cursors.
        await wait_until(
            lambda: all(owners().get(k) not in zombies for k in a_shards), 60, "b claiming a's shard cursors"
        )
        taken_after = time.monotonic() - stopped_at
        committed_by_zombies = sum(1 for *_, w in rows() if w in zombies)
        # b handles events of a's shards meanwhile.
        taken = {int(k.rsplit("_", 3)[1]) - 1 for k in a_shards}
        before = len(rows())
        await wait_until(
            lambda: sum(1 for _, f, w in rows()[before:] if shard_of(f, N) in taken and w not in zombies) >= 20,
            60,
            "b handling a's shards",
        )
        await asyncio.sleep(1.0)  # a stays frozen a while longer: several TTLs in all
        os.killpg(a.pid, signal.SIGCONT)
        await wait_until(lambda: len({s for s, *_ in rows()}) >= COUNT, 150, "every event handled")
        await asyncio.sleep(1.0)  # whatever a zombie still had in flight has had its chance to commit
    finally:
        await _stop_members(a, b)

    final = rows()
    after = sum(1 for *_, w in final if w in zombies)
    assert after == committed_by_zombies, (
        f"the paused workers committed {after - committed_by_zombies} rows after the takeover"
    )
    seqs = sorted(s for s, *_ in final)
    assert len(seqs) == len(set(seqs)), f"{len(seqs) - len(set(seqs))} events applied twice"
    assert seqs == sorted(events)
    order = KeyOrder()
    for seq, fid, _ in final:
        assert events[seq] == fid
        order.record(seq, fid)
    order.check(sorted(events))
    assert {shard_name(name, m, N) for m in taken} == a_shards
    print(
        f"zombie: a's {len(zombies)} worker(s) held {sorted(a_shards)}; frozen at try {tries}; taken over"
        f" {taken_after:.1f}s after the"
        f" SIGSTOP; they committed {committed_by_zombies} rows before it and 0 after; {COUNT} events, each once"
    )
