"""``rjet bench``: rjet's hot paths beside plain nats-py, same server, same data, each with a verdict:
the rows of the README's Performance table, which is this command's ``--markdown`` output."""

from __future__ import annotations

import datetime
import json
import shlex
import sys

import click

from rjet.cli._bench_report import machine, markdown, report, verdict
from rjet.cli._bench_run import Figure, Measured, run_bench
from rjet.cli._common import (
    Connection,
    embedded_connection_options,
    run,
    show_progress,
    stderr_console,
    stdout_console,
)
from rjet.server import EmbeddedServer

__all__ = ["Figure", "bench", "report", "verdict"]


def _as_json(measured: Measured, events: int, rounds: int, now: datetime.datetime) -> str:
    rows = [
        {"path": f.path, "unit": f.unit, "rjet": f.rjet, "detail": f.detail, "baseline_name": f.baseline_name,
         "baseline": f.baseline, "ratio": f.ratio, "target": f.target, "meets": f.meets}
        for f in measured.figures
    ]  # fmt: skip
    return json.dumps(
        {"date": now.isoformat(timespec="seconds"), "machine": machine(measured.server_version),
         "events": events, "rounds": rounds, "seconds": round(measured.seconds, 1), "rows": rows,
         "not_measured": measured.not_measured, "failed": measured.failed},
        indent=2,
    )  # fmt: skip


@click.command()
@click.option("--events", type=click.IntRange(min=1000), default=100_000, show_default=True, help="Events per path.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Best of this many runs.")
@click.option("--full", is_flag=True, help="Add the long memory read (10x --events; a minute more at 100,000).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures, date and machine as JSON.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print them as the README's Markdown table.")
@click.option("--check", is_flag=True, help="Exit with status 1 when a figure misses its target.")
@embedded_connection_options
def bench(
    conn: Connection, events: int, rounds: int, full: bool, as_json: bool, as_markdown: bool, check: bool
) -> None:
    """Measure insert, read, shard scan, cursor and memory paths against plain nats-py.

    Without --server it starts an embedded nats-server. Each figure is the best of --rounds runs, the
    paths compared taken in turns; the nats-py baselines use their own connection, on the same server
    and the same data. Each has a verdict against its target (ok, MISSED, or - for none), and a last
    line says which were missed. The exit status is 1 when a row could not be measured (the reason is
    printed). The README's Performance table is the --markdown output.
    """
    if as_json and as_markdown:
        raise click.UsageError("give --json or --markdown, not both")
    err = stderr_console()
    chatty = show_progress(err) and not as_json and not as_markdown  # quiet in pipes, files and CI logs

    def progress(what: str) -> None:
        if chatty:
            err.print(f"measuring {what} ...", highlight=False)

    def measure(servers: list[str]) -> Measured:
        return run(run_bench(servers, conn.options(), events=events, rounds=rounds, full=full, progress=progress))

    if conn.servers:
        measured = measure(list(conn.servers))
    else:
        with EmbeddedServer() as srv:
            if chatty:
                err.print(f"started nats-server at {srv.url} (temporary storage)", highlight=False)
            measured = measure([srv.url])
    now = datetime.datetime.now(datetime.UTC)
    table, last_line, all_met = report(measured.figures, events, rounds)
    if as_json:
        click.echo(_as_json(measured, events, rounds, now))
        click.echo(last_line, err=True)
    elif as_markdown:
        click.echo(markdown(measured, events, rounds, shlex.join(["rjet", *sys.argv[1:]]), now=now))
    else:
        out = stdout_console()
        out.print(table)
        out.print(last_line, highlight=False)
        for what in measured.not_measured:
            out.print(f"not measured: {what}", highlight=False)
        for what in measured.failed:
            out.print(f"[bold red]FAILED[/]: {what}", highlight=False)
        out.print(f"{measured.seconds:.0f} s", highlight=False)
    for what in measured.failed if as_json or as_markdown else ():
        click.echo(f"FAILED: {what}", err=True)
    if measured.failed:
        raise click.exceptions.Exit(1)  # a row went unmeasured: not a result to paste or to pass
    if check and not all_met:
        raise click.exceptions.Exit(1)
