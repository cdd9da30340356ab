"""``rjet bench``: rjet's hot paths beside plain nats-py, same server, same data, in about a minute."""

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


@click.command()
@click.option("--events", type=click.IntRange(min=1000), default=100_000, show_default=True, help="Events per path.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Best of this many runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON for machines.")
@embedded_connection_options
def bench(conn: Connection, events: int, rounds: int, as_json: bool) -> None:
    """Measure insert, ordered read, shard scan and cursor paths against plain nats-py.

    Without --server it starts an embedded nats-server. Each figure is the best of --rounds runs; the
    nats-py baselines use their own connection, on the same server and the same data.
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
    if as_json:
        rows = [
            {"path": f.path, "unit": f.unit, "rjet": f.rjet, "baseline_name": f.baseline_name,
             "baseline": f.baseline, "ratio": f.ratio, "target": f.target, "events": events}
            for f in figures
        ]  # fmt: skip
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"rjet bench ({events:,} events, best of {rounds})")
    for column in ("path", "rjet", "baseline", "ratio", "target"):
        table.add_column(column, justify="left" if column in ("path", "target") else "right")
    for f in figures:
        baseline = f"{f.baseline_name}: {_fmt(f.baseline, f.unit)}"
        table.add_row(f.path, _fmt(f.rjet, f.unit), baseline, f"{f.ratio:.2f}x" if f.ratio else "-", f.target)
    stdout_console().print(table)
