"""What every command shares: connection options, one-line errors, logging, running a coroutine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click
import nats.errors
import nats.js.errors
from rich.console import Console

import rjet

if TYPE_CHECKING:
    from nats.aio.client import Client

T = TypeVar("T")

DEFAULT_SERVER: Final = "nats://127.0.0.1:4222"

EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


class CliError(click.ClickException):
    """A failure the user can act on: shown as one line ``rjet: error: ...``, exit status 1."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    def show(self, file: Any = None) -> None:
        click.echo(f"rjet: error: {self.format_message()}", err=True)


class CliInterrupted(CliError):
    """Ctrl-C ended the command after it said what it had done: exit status 130."""

    exit_code = EXIT_INTERRUPTED


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) folded into one blank."""
    return re.sub(r"\s+", " ", text).strip()


def describe(err: BaseException) -> str:
    """A one-line description of ``err`` for the user."""
    if isinstance(err, nats.js.errors.APIError) and err.description:
        return f"JetStream: {err.description} (code {err.err_code})"
    if isinstance(err, TimeoutError | nats.errors.TimeoutError):
        return "the NATS server did not answer in time"
    text = str(err) or type(err).__name__
    return one_line(text)


# Errors that are about the environment (server, stream, files), not bugs: one line, exit 1.
USER_ERRORS: Final = (rjet.RjetError, nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)


@dataclasses.dataclass(frozen=True, slots=True)
class Connection:
    """The connection options every command takes; ``connect()`` opens a client with them."""

    servers: tuple[str, ...]
    creds: str | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 2.0

    @property
    def url(self) -> str:
        """The servers, comma-separated, as the user gave them."""
        return ",".join(self.servers)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`rjet.connect` (nats-py's ``connect``)."""
        opts: dict[str, Any] = {"connect_timeout": self.connect_timeout, "name": "rjet-cli"}
        for flag, path in (("--creds", self.creds), ("--nkey", self.nkey)):
            if path:
                if not os.path.isfile(path):
                    raise CliError(f"{flag} {path}: no such file")
                if importlib.util.find_spec("nkeys") is None:
                    raise CliError(f"{flag} needs the nkeys package: pip install 'nats-py[nkeys]'")
        if self.creds:
            opts["user_credentials"] = self.creds
        if self.nkey:
            opts["nkeys_seed"] = self.nkey
        if self.user is not None:
            opts["user"] = self.user
        if self.password is not None:
            opts["password"] = self.password
        if self.token is not None:
            opts["token"] = self.token
        if self.tls_ca or self.tls_cert:
            opts["tls"] = self.tls_context()
        return opts

    def tls_context(self) -> ssl.SSLContext:
        """A client TLS context trusting ``tls_ca`` (or the system's CAs), with a client certificate if given."""
        try:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise CliError(f"cannot load TLS files: {describe(e)}") from None
        return ctx

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Client]:
        """``async with conn.connect() as nc``: a NATS client, closed on the way out."""
        nc = await rjet.connect(list(self.servers), **self.options())
        try:
            yield nc
        finally:
            if not nc.is_closed:
                with contextlib.suppress(Exception):  # a server that went away meanwhile
                    await nc.close()


def _split_servers(value: str) -> tuple[str, ...]:
    servers = tuple(s.strip() for s in value.split(",") if s.strip())
    if not servers:
        raise click.BadParameter("give at least one server URL", param_hint="--server")
    return servers


_AUTH_OPTIONS: Final[list[Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
    click.option("--creds", envvar="NATS_CREDS", metavar="FILE", help="NATS credentials file [env: NATS_CREDS]."),
    click.option("--nkey", envvar="NATS_NKEY", metavar="FILE", help="NKey seed file [env: NATS_NKEY]."),
    click.option("--user", envvar="NATS_USER", help="User name [env: NATS_USER]."),
    click.option("--password", envvar="NATS_PASSWORD", help="Password [env: NATS_PASSWORD]."),
    click.option("--token", envvar="NATS_TOKEN", help="Authentication token [env: NATS_TOKEN]."),
    click.option("--tls-ca", envvar="NATS_CA", metavar="FILE", help="CA certificate to trust [env: NATS_CA]."),
    click.option("--tls-cert", envvar="NATS_CERT", metavar="FILE", help="Client certificate [env: NATS_CERT]."),
    click.option("--tls-key", envvar="NATS_KEY", metavar="FILE", help="Client certificate key [env: NATS_KEY]."),
    click.option(
        "--connect-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=2.0,
        show_default=True,
        metavar="SECONDS",
        help="Give up connecting after this long.",
    ),
]


def connection_options(f: Callable[..., T]) -> Callable[..., T]:
    """Add ``--server`` and the connection options to a command; it receives one ``conn: Connection``."""
    return _connection_options(f, embedded_default=False)


def embedded_connection_options(f: Callable[..., T]) -> Callable[..., T]:
    """:func:`connection_options` for ``rjet demo``: ``--server`` has no default and ignores ``$NATS_URL``.

    ``conn.servers`` is empty when the user gave none, meaning "start an embedded server".
    """
    return _connection_options(f, embedded_default=True)


def _connection_options(f: Callable[..., T], *, embedded_default: bool) -> Callable[..., T]:
    @functools.wraps(f)
    def wrapper(
        *args: Any,
        server: str | None,
        creds: str | None,
        nkey: str | None,
        user: str | None,
        password: str | None,
        token: str | None,
        tls_ca: str | None,
        tls_cert: str | None,
        tls_key: str | None,
        connect_timeout: float,
        **kwargs: Any,
    ) -> T:
        servers = _split_servers(server) if server is not None else ()
        conn = Connection(servers, creds, nkey, user, password, token, tls_ca, tls_cert, tls_key, connect_timeout)
        return f(*args, conn=conn, **kwargs)

    if embedded_default:
        server_option = click.option(
            "-s",
            "--server",
            metavar="URL[,URL...]",
            help="Use this NATS server instead of starting an embedded one.",
        )
    else:
        server_option = click.option(
            "-s",
            "--server",
            envvar="NATS_URL",
            default=DEFAULT_SERVER,
            show_default=True,
            metavar="URL[,URL...]",
            help="NATS server URL(s) [env: NATS_URL].",
        )
    decorated: Any = wrapper
    for option in reversed([server_option, *_AUTH_OPTIONS]):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion; environment errors become one-line :class:`CliError`."""
    try:
        return asyncio.run(coro)
    except BrokenPipeError:
        raise  # a closed stdout (`rjet tail ... | head`): click exits quietly
    except USER_ERRORS as e:
        raise CliError(describe(e)) from e


def stdout_console() -> Console:
    """The console for results: as wide as the terminal, or wide enough not to cut tables in pipes and logs."""
    console = Console()
    return console if console.is_terminal else Console(width=200)


def stderr_console() -> Console:
    """The console for progress displays: stderr, live only when it is a terminal."""
    return Console(stderr=True)


def show_progress(console: Console) -> bool:
    """Whether to draw live progress: only on a terminal (quiet in pipes, files and CI logs)."""
    return console.is_terminal and not console.is_dumb_terminal


def iso(ts: datetime) -> str:
    """A UTC timestamp as RFC 3339 with microseconds and a ``Z``."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def age(seconds: float | None) -> str:
    """A short human duration: ``0.4s``, ``12s``, ``5m03s``, ``2h10m``, ``3d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class JsonFormatter(logging.Formatter):
    """One JSON object per log record: time, level, logger, message, pid, and every ``extra`` field
    of the record (rjet's: ``consumer``, ``group``, ``shard`` (1-based) and ``n``, ``member``,
    ``stream``, ``seq``, ``event_type``, ``foreign_id``, ``attempt``/``attempts``, ``dead_letter``)."""

    _STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_") and key not in out:
                out[key] = _json_value(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out)


def _json_value(value: object) -> object:
    """``value`` as it goes into a JSON log line: as it is when JSON can hold it, else its repr."""
    if isinstance(value, str | int | float | bool | None):
        return value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def setup_logging(verbose: int, json_logs: bool, *, floor: int = logging.WARNING) -> None:
    """Log to stderr: WARNING by default (or ``floor``), INFO with ``-v``, DEBUG with ``-vv``."""
    level = max(logging.DEBUG, min(floor, logging.WARNING) - 10 * verbose)
    handler = logging.StreamHandler(sys.stderr)
    if json_logs:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def parse_shards(values: tuple[str, ...], n: int) -> list[int] | None:
    """0-based shard indices from 1-based ``--shard`` values (``3``, ``1-4``, ``1,2``); None for all."""
    if not values:
        return None
    out: set[int] = set()
    for value in values:
        for part in value.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise click.BadParameter(
                    f"{part!r} is not a shard number or range like 1-4", param_hint="--shard"
                ) from None
            if not 1 <= a <= b <= n:
                raise click.BadParameter(f"{part!r} is outside shards 1..{n}", param_hint="--shard")
            out.update(range(a - 1, b))
    return sorted(out)
