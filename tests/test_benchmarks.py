"""The benchmark suite keeps working: every benchmark runs once, on small data, without timing.

Its figures are not judged here (targets live in the benchmarks; ``pytest benchmarks
--benchmark-only`` measures them). This only catches a benchmark that no longer runs against the
code, which would otherwise go unnoticed until the next measurement.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_every_benchmark_runs_once_on_small_data() -> None:
    env = {**os.environ, "RJET_BENCH_EVENTS": "2000"}
    args = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-disable", "-q", "-x"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
