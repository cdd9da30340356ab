"""A Parallel shard whose cursor record vanishes (its bucket deleted and created again) stops for good
as `failed` with CursorBucketGone: not `fenced` (no other runner was seen), not restarted for ever,
and not started over from the beginning."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from test_parallel import group, insert, logger, read_logs, remember_shard

import rjet
from rjet.parallel import ShardsFailed
from rjet.server import EmbeddedServer
from rjet.testing import wait_until


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_shard_whose_cursor_bucket_is_recreated_ends_failed_naming_it(
    server: EmbeddedServer, js: JetStreamContext, name: str, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await insert(stream, 3000, keys=20)
    g = group(
        server, name, 1, logger(tmp_path, delay=0.002), on_start=remember_shard, flush_interval=0.05,
        restart_delay=0.1, retry_delay=0.05, max_backoff=0.2,
    )  # fmt: skip
    run = asyncio.create_task(g.run_async(to_head=True))

    def handled() -> int:
        return sum(len(rows) for rows in read_logs(tmp_path).values())

    await wait_until(lambda: handled() >= 200, 30, "200 events handled")
    bucket = f"rjet_cursors_{name}"
    await js.delete_key_value(bucket)
    await js.create_key_value(bucket=bucket)
    with pytest.raises(ShardsFailed) as caught:
        await asyncio.wait_for(run, 30)
    [(_, failure)] = caught.value.failures.items()
    assert failure.startswith("failed: CursorBucketGone"), failure  # was: "fenced: CursorConflict ... owner unknown"
    assert "vanished while this runner held it" in failure
    assert "on purpose to go on: to sequence " in failure  # where it was, in words
    assert not caught.value.fenced
    # The error itself, with the data the command line renders its hint from.
    gone = caught.value.errors[0]
    assert isinstance(gone, rjet.CursorBucketGone)
    assert (gone.name, gone.namespace, gone.bucket) == (f"{name}_1_of_1", name, bucket)
    assert gone.stream is not None
    assert gone.stream.partition("@")[0] == name
    assert int(gone.cursor) >= 1
    assert gone.move == gone.cursor
    assert f"to sequence {gone.cursor} " in failure
    seqs = [seq for rows in read_logs(tmp_path).values() for seq, _, _ in rows]
    assert seqs.count(1) == 1  # never started over from the beginning
