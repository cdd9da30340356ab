"""Parallel does not depend on the process start method the application picked (forkserver is the
default from Python 3.14): its workers are always spawned, each with its own loop and connection."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.server import EmbeddedServer

_SCRIPT = """
import multiprocessing, sys
import multiprocess
import rjet
from rjet.parallel import Parallel

def handle(fate, event):
    pass

if __name__ == "__main__":
    method = sys.argv[1]
    multiprocessing.set_start_method(method, force=True)
    multiprocess.set_start_method(method, force=True)
    group = Parallel("g", 2, handle, servers=sys.argv[2], stream=sys.argv[3], namespace=sys.argv[3])
    summary = group.run(to_head=True)
    print(multiprocessing.get_start_method(), summary.handled)
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
async def test_a_group_runs_whatever_start_method_the_application_set(
    server: EmbeddedServer, js: JetStreamContext, name: str, tmp_path: Path, method: str
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(40)])
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    proc = subprocess.run(  # noqa: ASYNC221 (a whole program's run, timed out below)
        [sys.executable, str(script), method, server.url, name],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [method, "40"]
