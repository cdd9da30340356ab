"""What ``rjet demo`` shows: the live view while it runs, and the summary at the end.

Every rate, in both, is an average since the first insert: the same numbers in both places, the live
ones settling on the summary's at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from rjet.cli._common import stdout_console

if TYPE_CHECKING:
    from rjet.cli._demo import Demo, DemoConfig
    from rjet.cli._demo_check import Checker
    from rjet.parallel import Summary

__all__ = ["display", "print_summary", "say"]


def _per_s(count: int, seconds: float) -> str:
    """An average rate, formatted the same in the live view and the summary (so they agree)."""
    return f"{count / seconds:,.0f}" if seconds > 0 else "-"


@contextlib.contextmanager
def display(demo: Demo) -> Iterator[Callable[[], None]]:
    """The live view of ``demo`` while the block runs (on a terminal): it yields a function that redraws
    it, at most 8 times a second."""
    if not demo.live:
        yield lambda: None
        return
    with Live(_render(demo), console=demo.console, auto_refresh=False, transient=False) as live:
        handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
        old = [h.setStream(sys.stderr) for h in handlers]  # through Live's proxy: logs print above it
        last = 0.0

        def update() -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= 0.125:
                live.update(_render(demo), refresh=True)
                last = now

        try:
            yield update
            live.update(_render(demo), refresh=True)
        finally:
            for h, stream in zip(handlers, old, strict=True):
                if stream is not None:
                    h.setStream(stream)


def _render(demo: Demo) -> RenderableType:
    cfg = demo.cfg
    checker = demo.checker
    if checker is None or not demo.t0:
        return Text("starting workers...")
    now = time.monotonic()
    wall = time.time()
    table = Table.grid(padding=(0, 2))
    bar = max(10, min(30, demo.console.width - 70))  # the rest of a row takes about 60 columns
    for justify in ("left", "left", "right", "right", "right"):
        table.add_column(justify=justify)
    table.add_row(
        "inserted",
        ProgressBar(total=cfg.events, completed=checker.inserted, width=bar),
        f"{checker.inserted:,} / {cfg.events:,}",
        "",
        f"{_per_s(checker.inserted, demo.insert_time(now))} ev/s",
    )
    lag_events, lag_age = 0, 0.0
    for t in checker.shards:
        age = wall - t.pending[0][1] if t.pending else 0.0
        lag_events += len(t.pending)
        lag_age = max(lag_age, age)
        table.add_row(
            t.name,
            ProgressBar(total=max(t.expected, 1), completed=t.handled, width=bar),
            f"{t.handled:,} / {t.expected:,}",
            f"lag {len(t.pending):,} ({age:.1f}s)",
            f"{_per_s(t.handled, demo.shard_time(t, now))} ev/s",
        )
    took = demo.handling_time(now)
    line = Text.assemble(
        f"handled {checker.unique:,} of {cfg.events:,} in {took:.2f}s:"
        f" {_per_s(checker.unique, took)} events/s since the first insert\n",
        f"lag {lag_events:,} events ({lag_age:.1f}s) · duplicates {checker.duplicates} · order violations ",
        (str(checker.violations), "bold red" if checker.violations else "bold green"),
    )
    return Group(table, line)


def _stream_line(cfg: DemoConfig) -> str:
    layout = cfg.layout
    if layout is None:
        return "stream: not partitioned: every shard read every event (try --partitioned)"
    if layout.divides(cfg.workers):
        return f"stream: partitioned ({layout.count}): each shard read only its own events"
    return f"stream: partitioned ({layout.count}), but {cfg.workers} shards cannot split it: each read every event"


def _summary(
    cfg: DemoConfig, demo: Demo, checker: Checker, summary: Summary | None, failure: str | None = None
) -> tuple[Table, list[str], bool]:
    """The summary table, the lines under it, and whether the demo passed; ``failure``: why it stopped early."""
    now = time.monotonic()
    started = demo.t0 > 0  # the workers ran and inserting began
    table = Table(
        title="rjet demo: summary",
        title_justify="left",
        header_style="bold",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        show_edge=False,
        pad_edge=False,
    )
    # On a narrow terminal the one wrappable column's header breaks at its blank; names and numbers stay whole.
    for col in ("shard", "handled", "duplicates", "order violations", "restarts", "cursor", "events/s"):
        table.add_column(col, justify="left" if col == "shard" else "right", no_wrap=col != "order violations")
    stats = {s.shard: s for s in summary.shards} if summary is not None else {}
    for m, t in enumerate(checker.shards):
        s = stats.get(m)
        table.add_row(
            t.name,
            f"{t.handled:,}",
            str(t.duplicates),
            str(t.violations),
            "-" if s is None else str(s.restarts),
            "-" if s is None else s.cursor or "-",
            _per_s(t.handled, demo.shard_time(t, now)) if started else "-",
        )
    table.add_section()
    table.add_row(
        "total",
        f"{checker.unique:,}",
        str(checker.duplicates),
        str(checker.violations),
        "-" if summary is None else str(sum(s.restarts for s in summary.shards)),
        "",
        _per_s(checker.unique, demo.handling_time(now)) if started else "-",
    )
    lines = []
    if started:
        took, ins = demo.handling_time(now), demo.insert_time(now)
        lines += [
            f"handled {checker.unique:,} events in {took:.2f}s: {_per_s(checker.unique, took)} events/s over"
            f" {cfg.workers} shard(s)",
            "  (averages from the first insert to the last event handled, as shown live)",
            f"inserted {checker.inserted:,} events in {ins:.2f}s: {_per_s(checker.inserted, ins)} events/s",
        ]
    lines.append(_stream_line(cfg))
    problems = [failure] if failure else []
    if checker.unique != cfg.events:
        problems.append(f"{cfg.events - checker.unique:,} event(s) not handled")
    if checker.violations:
        problems.append(f"{checker.violations} order violation(s)")
    if checker.misrouted:
        problems.append(f"{checker.misrouted} event(s) handled by the wrong shard")
    if problems:
        lines.append("result: FAILED: " + "; ".join(problems))
    else:
        dup = f"; {checker.duplicates} duplicate(s) from redelivery (at-least-once)" if checker.duplicates else ""
        lines.append(f"result: OK: every event handled once or more, in order per foreign ID{dup}")
    return table, lines, not problems


def print_summary(cfg: DemoConfig, d: Demo, checker: Checker, summary: Summary | None, failure: str | None) -> bool:
    """Print the summary on stdout; whether the demo passed."""
    table, lines, ok = _summary(cfg, d, checker, summary, failure)
    stdout().print(table)
    for line in lines:
        say(line)
    return ok


def stdout() -> Console:
    """stdout: as wide as the terminal, or as $COLUMNS says (a pipe without it: wide, not to cut tables)."""
    return Console() if "COLUMNS" in os.environ else stdout_console()


def say(text: str, *, wrap: bool = True) -> None:
    """Print a line of the summary on stdout: wrapped at blanks to the terminal's width, or (a command
    to copy) kept whole."""
    stdout().print(text, highlight=False, soft_wrap=not wrap)
