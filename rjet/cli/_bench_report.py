"""How ``rjet bench`` shows its figures: a table with a verdict per row and a line that sums them up,
the same rows as Markdown for the README (with the date and the machine), and the machine itself."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

from rich.table import Table

from rjet.cli._bench_figure import Figure
from rjet.cli._bench_run import Measured

__all__ = ["COLUMNS", "machine", "markdown", "report", "verdict"]

COLUMNS = ("path", "rjet", "baseline", "ratio", "target", "verdict")


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit.startswith("us"):
        return f"{value:,.2f} {unit}"
    if unit in ("ms", "MB"):
        return f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}"


def verdict(figure: Figure) -> str:
    """``ok`` when the figure meets its target, ``MISSED`` when not, ``-`` without a target."""
    meets = figure.meets
    return "-" if meets is None else "ok" if meets else "MISSED"


def _cells(f: Figure) -> tuple[str, str, str, str, str, str]:
    ours = _fmt(f.rjet, f.unit) + (f" ({f.detail})" if f.detail else "")
    ratio = f"{f.ratio:.2f}x" if f.ratio else "-"
    return f.path, ours, f"{f.baseline_name}: {_fmt(f.baseline, f.unit)}", ratio, f.target, verdict(f)


def _summary(figures: list[Figure]) -> tuple[str, bool]:
    judged = [f for f in figures if f.meets is not None]
    missed = [f for f in judged if not f.meets]
    if not missed:
        return f"targets: all {len(judged)} met", True
    what = "; ".join(
        f"{f.path} ({f'{f.ratio:.2f}x' if f.ratio else _fmt(f.rjet, f.unit)}, target {f.target})" for f in missed
    )
    return f"targets: {len(missed)} of {len(judged)} MISSED: {what}", False


def report(figures: list[Figure], events: int, rounds: int) -> tuple[Table, str, bool]:
    """The table of figures with a verdict each, the line that sums the verdicts up, and whether every
    target was met."""
    table = Table(title=f"rjet bench ({events:,} events, best of {rounds})")
    for column in COLUMNS:
        # A path is what a reader looks a row up by (the README's rows are this table's): never wrapped.
        table.add_column(column, justify="right" if column == "ratio" else "left", no_wrap=column == "path")
    for f in figures:
        *cells, mark = _cells(f)
        table.add_row(*cells, f"[bold red]{mark}[/]" if f.meets is False else mark)
    line, all_met = _summary(figures)
    return table, line, all_met


def machine(server_version: str) -> dict[str, str]:
    """What the figures were measured on: CPU model and count, OS, Python, nats-py, nats-server."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass  # not Linux: platform's answer stands
    return {
        "cpu": f"{model} x {os.cpu_count()}",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "nats-py": importlib.metadata.version("nats-py"),
        "nats-server": server_version,
    }


def markdown(measured: Measured, events: int, rounds: int, command: str, *, now: datetime.datetime) -> str:
    """The rows as a Markdown table, after a line that says which command measured them, when and on
    what, and before the verdicts' summary and the rows left out: pasted into the README as it is."""
    m = machine(measured.server_version)
    lines = [
        f"`{command}`, {now:%Y-%m-%d %H:%M} UTC, {measured.seconds:.0f} s: {m['cpu']} cores ({m['os']}), "
        f"{m['python']}, nats-py {m['nats-py']}, nats-server {m['nats-server']}; {events:,} events over "
        f"{min(events, 1000):,} foreign IDs, each figure the best of {rounds} round(s).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(f)) + " |" for f in measured.figures]
    summary, _ = _summary(measured.figures)
    lines += ["", summary + "." + "".join(f" Not measured: {what}." for what in measured.not_measured)]
    lines += [f"FAILED: {what}." for what in measured.failed]
    return "\n".join(lines)
