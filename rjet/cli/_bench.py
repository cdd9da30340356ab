"""``rjet bench``: rjet's hot paths beside plain nats-py, same server, same data, each with a verdict."""

from __future__ import annotations

import json

import click
from rich.table import Table

from rjet.cli._bench_run import Figure, run_bench
from rjet.cli._common import (
    Connection,
    embedded_connection_options,
    run,
    show_progress,
    stderr_console,
    stdout_console,
)
from rjet.server import EmbeddedServer


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f} {unit}" if unit.startswith("us") else f"{value:,.0f} {unit}"


def verdict(figure: Figure) -> str:
    """``ok`` when the figure meets its target, ``MISSED`` when not, ``-`` without a target."""
    meets = figure.meets
    return "-" if meets is None else "ok" if meets else "MISSED"


def report(figures: list[Figure], events: int, rounds: int) -> tuple[Table, str, bool]:
    """The table of figures with a verdict each, the line that sums the verdicts up, and whether every
    target was met."""
    table = Table(title=f"rjet bench ({events:,} events, best of {rounds})")
    for column in ("path", "rjet", "baseline", "ratio", "target", "verdict"):
        table.add_column(column, justify="left" if column in ("path", "target", "verdict") else "right")
    for f in figures:
        baseline = f"{f.baseline_name}: {_fmt(f.baseline, f.unit)}"
        ratio = f"{f.ratio:.2f}x" if f.ratio else "-"
        mark = verdict(f)
        table.add_row(
            f.path,
            _fmt(f.rjet, f.unit),
            baseline,
            ratio,
            f.target,
            f"[bold red]{mark}[/]" if f.meets is False else mark,
        )
    judged = [f for f in figures if f.meets is not None]
    missed = [f for f in judged if not f.meets]
    if not missed:
        return table, f"targets: all {len(judged)} met", True
    what = "; ".join(
        f"{f.path} ({f'{f.ratio:.2f}x' if f.ratio else _fmt(f.rjet, f.unit)}, target {f.target})" for f in missed
    )
    return table, f"targets: {len(missed)} of {len(judged)} MISSED: {what}", False


@click.command()
@click.option("--events", type=click.IntRange(min=1000), default=100_000, show_default=True, help="Events per path.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Best of this many runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON for machines.")
@click.option("--check", is_flag=True, help="Exit with status 1 when a figure misses its target.")
@embedded_connection_options
def bench(conn: Connection, events: int, rounds: int, as_json: bool, check: bool) -> None:
    """Measure insert, ordered read, shard scan and cursor paths against plain nats-py.

    Without --server it starts an embedded nats-server. Each figure is the best of --rounds runs; the
    nats-py baselines use their own connection, on the same server and the same data. Each has a
    verdict against its target (ok, MISSED, or - for none), and a last line says which were missed.
    """
    err = stderr_console()
    chatty = show_progress(err) and not as_json  # quiet in pipes, files and CI logs

    def progress(what: str) -> None:
        if chatty:
            err.print(f"measuring {what} ...", highlight=False)

    def measure(servers: list[str]) -> list[Figure]:
        return run(run_bench(servers, conn.options(), events=events, rounds=rounds, progress=progress))

    if conn.servers:
        figures = measure(list(conn.servers))
    else:
        with EmbeddedServer() as srv:
            if chatty:
                err.print(f"started nats-server at {srv.url} (temporary storage)", highlight=False)
            figures = measure([srv.url])
    table, last_line, all_met = report(figures, events, rounds)
    if as_json:
        rows = [
            {"path": f.path, "unit": f.unit, "rjet": f.rjet, "baseline_name": f.baseline_name,
             "baseline": f.baseline, "ratio": f.ratio, "target": f.target, "meets": f.meets, "events": events}
            for f in figures
        ]  # fmt: skip
        click.echo(json.dumps(rows, indent=2))
        click.echo(last_line, err=True)
    else:
        out = stdout_console()
        out.print(table)
        out.print(last_line, highlight=False)
    if check and not all_met:
        raise click.exceptions.Exit(1)
