"""The ``rjet`` click group: global options, error reporting, and the commands."""

from __future__ import annotations

from typing import Any

import click

import rjet
from rjet.cli._bench import bench
from rjet.cli._common import EXIT_INTERRUPTED, USER_ERRORS, CliError, describe, error_hints, setup_logging
from rjet.cli._cursor import cursor
from rjet.cli._deadletters import deadletters
from rjet.cli._demo import demo
from rjet.cli._group import group
from rjet.cli._insert import insert
from rjet.cli._server import server
from rjet.cli._status import status
from rjet.cli._tail import tail
from rjet.cli._worker import worker

__all__ = ["cli", "main"]


class _Group(click.Group):
    """Reports environment errors as one line and Ctrl-C as exit status 130, without tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("rjet: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            raise  # click handles a closed stdout (`rjet tail ... | head`)
        except USER_ERRORS as e:
            raise CliError(describe(e), hints=error_hints(e)) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(rjet.__version__, "-V", "--version", prog_name="rjet")
@click.option("-v", "--verbose", count=True, help="Log more to stderr: -v info, -vv debug.")
@click.option("--log-json", is_flag=True, help="Log JSON lines instead of text.")
def cli(verbose: int, log_json: bool) -> None:
    """Consume NATS JetStream streams the reflex way: strictly ordered, at-least-once, resumable, sharded.

    Start with `rjet demo`. Every command that talks to NATS takes --server (default
    nats://127.0.0.1:4222 or $NATS_URL) and the usual credentials options; see `rjet COMMAND --help`.
    """
    setup_logging(verbose, log_json)


for _command in (demo, insert, tail, status, cursor, group, deadletters, worker, server, bench):
    cli.add_command(_command)


def main(args: list[str] | None = None) -> None:
    """Run the ``rjet`` command line (the console script and ``python -m rjet``)."""
    cli.main(args=args, prog_name="rjet")
