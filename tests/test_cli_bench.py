"""``rjet bench`` prints the rows of the README's Performance table (#28): the README's table is its
``--markdown`` output, so the test reads the README's rows and finds each in what the command prints
(as JSON, as a table, as Markdown). Real commands on a real embedded server, tiny ``--events``: the
figures are not judged here (``rjet bench --check`` judges them), only that every row is measured."""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console
from test_cli import rjet_cmd

from rjet.cli._bench import report
from rjet.cli._bench_report import COLUMNS, markdown
from rjet.cli._bench_run import Figure, Measured

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ("--events", "2000", "--rounds", "1", "--full")


def _table(lines: list[str]) -> list[list[str]]:
    """The cells of a Markdown table's lines (each starts and ends with ``|``)."""
    rows = []
    for line in lines:
        assert (line.startswith("| ") and line.endswith(" |")) or re.fullmatch(r"\|(---\|)+", line), line
        rows.append([c.strip() for c in line[1:-1].split("|")])
    return rows


def readme_rows() -> list[list[str]]:
    """The rows of the table in the README's Performance section, header and rule left out."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    header, rule, *rows = _table(lines[start:end])
    assert header == list(COLUMNS), header
    assert set(rule) == {"---"}, rule
    return rows


def test_the_readme_quotes_a_table_of_rjet_bench() -> None:
    rows = readme_rows()
    assert len(rows) >= 12, rows  # not a parse that found nothing, so that the checks below check nothing
    assert all(len(r) == len(COLUMNS) for r in rows), rows
    text = README.read_text(encoding="utf-8").split("\n## Performance\n", 1)[1]
    # The line above the table names the command, the date and the machine.
    assert re.search(r"^`rjet bench [^`]*--markdown[^`]*`, \d{4}-\d\d-\d\d \d\d:\d\d UTC, \d+ s: ", text, re.M), text


@pytest.mark.timeout(240)
def test_bench_measures_every_row_the_readme_quotes() -> None:
    paths = [r[0] for r in readme_rows()]
    proc = rjet_cmd("bench", *SMALL, "--json", timeout=220)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert [r["path"] for r in got["rows"]] == paths  # the same rows, in the same order
    assert got["not_measured"] == []
    assert got["failed"] == []
    assert all(r["rjet"] > 0 and r["baseline"] > 0 and r["ratio"] > 0 for r in got["rows"]), got["rows"]
    assert set(got["machine"]) == {"cpu", "os", "python", "nats-py", "nats-server"}
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", got["machine"]["nats-server"]), got["machine"]
    # The table a terminal shows: each path whole, on a line of its own, with a verdict.
    figures = [
        Figure(r["path"], r["unit"], r["rjet"], r["baseline_name"], r["baseline"], r["target"], detail=r["detail"])
        for r in got["rows"]
    ]
    table, _, _ = report(figures, 2000, 1)
    drawn = io.StringIO()
    Console(width=200, file=drawn).print(table)
    shown = [line.split("│")[1].strip() for line in drawn.getvalue().splitlines() if line.startswith("│")]
    assert [p for p in shown if p] == paths, drawn.getvalue()


@pytest.mark.timeout(240)
def test_bench_markdown_is_a_table_with_its_date_and_machine() -> None:
    proc = rjet_cmd("bench", *SMALL, "--markdown", timeout=220)
    assert proc.returncode == 0, proc.stderr
    first, blank, *rest = proc.stdout.splitlines()
    assert re.fullmatch(
        r"`rjet bench --events 2000 --rounds 1 --full --markdown`, \d{4}-\d\d-\d\d \d\d:\d\d UTC, \d+ s: "
        r".+ x \d+ cores \(.+\), \w+ 3\.\d+\.\d+\S*, nats-py \d+\.\d+\.\d+, nats-server \d+\.\d+\.\d+\S*; "
        r"2,000 events over 1,000 foreign IDs, each figure the best of 1 round\(s\)\.",
        first,
    ), first
    assert blank == ""
    end = next(i for i, line in enumerate(rest) if not line.startswith("|"))
    header, rule, *rows = _table(rest[:end])
    assert header == list(COLUMNS)
    assert len(rule) == len(COLUMNS)
    assert [r[0] for r in rows] == [r[0] for r in readme_rows()]
    assert all(len(r) == len(COLUMNS) and r[-1] in ("ok", "MISSED", "-") for r in rows), rows
    after = rest[end:]
    assert after[0] == "", after
    assert after[1].startswith("targets: "), after


def test_json_and_markdown_are_one_or_the_other() -> None:
    proc = rjet_cmd("bench", "--json", "--markdown")
    assert proc.returncode == 2, proc.stderr
    assert "give --json or --markdown, not both" in proc.stderr


def test_a_check_the_measurement_made_is_a_target_too() -> None:
    flush = Figure("flush", "ms", 3.0, "100 puts", 16.0, "one round trip per batch", condition=True)
    assert flush.meets is True  # no bounds: the condition alone is the target
    assert dataclasses.replace(flush, condition=False).meets is False
    assert dataclasses.replace(flush, condition=None).meets is None
    assert dataclasses.replace(flush, condition=True, max_ratio=0.1).meets is False  # both are checked


def test_markdown_names_rows_left_out_and_rows_that_failed() -> None:
    figures = [Figure("insert_many", "events/s", 300.0, "publish_async", 100.0, ">= 2x", min_ratio=2)]
    measured = Measured(
        figures, ["worker memory, long read: with --full"], ["rjet bench, worker memory: stopped"], "2.15.1", 12.0
    )
    text = markdown(measured, 2000, 1, "rjet bench --markdown", now=datetime.datetime(2026, 12, 7, 17, 4))
    assert text.startswith("`rjet bench --markdown`, 2026-12-07 17:04 UTC, 12 s: "), text
    assert "nats-server 2.15.1; 2,000 events over 1,000 foreign IDs" in text
    assert "| insert_many | 300 events/s | publish_async: 100 events/s | 3.00x | >= 2x | ok |" in text.splitlines()
    assert text.splitlines()[-2:] == [
        "targets: all 1 met. Not measured: worker memory, long read: with --full.",
        "FAILED: rjet bench, worker memory: stopped.",
    ]
