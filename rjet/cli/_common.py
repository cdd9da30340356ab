"""What every command shares: connection options, one-line errors, logging, running a coroutine."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re
import shlex
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click
import nats.errors
import nats.js.errors
from rich.console import Console

import rjet
from rjet.parallel import ShardsFailed

if TYPE_CHECKING:
    from nats.aio.client import Client

T = TypeVar("T")

DEFAULT_SERVER: Final = "nats://127.0.0.1:4222"

EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


class CliError(click.ClickException):
    """A failure the user can act on: shown as one line ``rjet: error: ...``, exit status 1; with
    ``hints`` (command lines that go on, :func:`error_hints`), a line ``rjet: hint: ...`` for each."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, hints: Sequence[str] = ()) -> None:
        super().__init__(one_line(message))
        self.hints = tuple(hints)

    def show(self, file: Any = None) -> None:
        click.echo(f"rjet: error: {self.format_message()}", err=True)
        for hint in self.hints:
            click.echo(f"rjet: hint: {hint}", err=True)


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


def cursor_hint(err: BaseException) -> str | None:
    """The ``rjet cursor`` command line that makes the move a cursor error names, or None.

    Rendered from the error's fields (its ``move``, ``stream``, ``consumer`` or ``name``,
    ``namespace``, or ``cursors``: an SQL store's URL); NAME, NS, SEQ and STREAM stand for what the
    raiser did not know. None for other errors, and for a consumer whose store has neither a
    namespace nor a URL (``rjet cursor`` cannot address it).
    """
    if isinstance(err, rjet.CursorBucketGone):
        if not err.name:
            return None
        consumer: str | None = err.name
        stream: str | None = err.stream.partition("@")[0] if err.stream else None
    elif isinstance(err, rjet.CursorExpired | rjet.StreamRecreated | rjet.CursorAhead):
        consumer, stream = err.consumer, err.stream
    else:
        return None
    namespace, url = err.namespace, getattr(err, "cursors", None)
    if namespace or not url:
        if consumer is not None and not namespace:
            return None
        store = f"--namespace {namespace or 'NS'}"
    else:
        store = f"--cursors {shlex.quote(url)}"
    move = err.move or "SEQ"
    where = "" if move == "beginning" else f" --stream {stream or 'STREAM'}"
    return f"rjet cursor {consumer or 'NAME'} {store} --set {move}{where}"


def error_hints(err: BaseException) -> tuple[str, ...]:
    """The command lines that go on from ``err``: its :func:`cursor_hint`; for a
    :class:`rjet.parallel.ShardsFailed`, that of each failed shard's error (in shard order), from
    the error the shard's process raised."""
    if isinstance(err, ShardsFailed):
        hints = (cursor_hint(e) for _, e in sorted(err.errors.items()))
        return tuple(h for h in hints if h is not None)
    hint = cursor_hint(err)
    return () if hint is None else (hint,)


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
    inbox_prefix: str | None = None
    tls_first: bool = False
    context: str | None = None
    """The nats context the settings came from, if any (named in connection errors)."""

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
        if self.inbox_prefix:
            opts["inbox_prefix"] = self.inbox_prefix
        if self.tls_first:
            opts["tls_handshake_first"] = True
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
        try:
            nc = await rjet.connect(list(self.servers), **self.options())
        except rjet.ConnectError as e:
            if self.context is None:
                raise
            raise rjet.ConnectError(f"{e} (settings from nats context {self.context!r})") from e
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
    for s in servers:
        scheme, sep, _ = s.partition("://")
        if sep and scheme.lower() not in ("nats", "tls", "ws", "wss"):
            raise click.BadParameter(
                f"{s!r}: {scheme}:// is not a NATS URL scheme: use nats://, tls://, ws:// or wss://",
                param_hint="--server",
            )
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


# ----------------------------------------------------------------- nats contexts (the nats CLI's files)

# Context fields, as the nats CLI writes them (nats-io/jsm.go natscontext, NATS ADR-21): those rjet maps
# to its options, and those it cannot honour, which it refuses rather than connect elsewhere or as
# someone else. The rest (description, color_scheme, jetstream_event_prefix) do not change a connection.
_CONTEXT_STRINGS: Final = ("url", "user", "password", "token", "creds", "nkey", "cert", "key", "ca", "inbox_prefix")
_CONTEXT_UNSUPPORTED: Final = (
    "nsc",
    "jetstream_domain",
    "jetstream_api_prefix",
    "user_jwt",
    "socks_proxy",
    "windows_cert_store",
    "windows_cert_match_by",
    "windows_cert_match",
    "windows_ca_certs_match",
)
_CREDENTIAL_SCHEMES: Final = ("nsc", "op", "env", "data")  # besides file://, for creds and nkey


@dataclasses.dataclass(frozen=True, slots=True)
class NatsContext:
    """A nats CLI context: its name, its file, and the settings rjet uses from it (the non-empty ones)."""

    name: str
    path: str
    settings: dict[str, str]
    tls_first: bool = False

    def get(self, key: str) -> str | None:
        """The setting, None when unset or empty (the nats CLI writes every field, empty ones as "")."""
        return self.settings.get(key) or None


def nats_config_dir() -> str:
    """Where the nats CLI keeps its configuration: ``$XDG_CONFIG_HOME/nats``, else ``~/.config/nats``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "nats")


def load_context(name: str | None, *, source: str = "") -> NatsContext | None:
    """The nats context ``name``, or with None the one selected in ``context.txt`` (None when none is).

    ``source`` says where the name came from, for errors (" (from $NATS_CONTEXT)"). Raises
    :class:`CliError` for an unknown name (naming the directory searched), an unreadable or
    malformed file, and settings rjet cannot honour.
    """
    base = nats_config_dir()
    if name is None:
        selected = os.path.join(base, "context.txt")
        try:
            with open(selected, encoding="utf-8") as f:
                name = f.read().strip()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CliError(f"cannot read the selected nats context from {selected}: {describe(e)}") from None
        if not name:
            return None
        source = f" (selected in {selected})"
    directory = os.path.join(base, "context")
    if ".." in name or os.sep in name or "/" in name:
        raise CliError(f"nats context name {name!r}{source} is invalid: no '/' or '..'")
    path = os.path.join(directory, name + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CliError(f"unknown nats context {name!r}{source}: no {name}.json in {directory}") from None
    except (OSError, ValueError) as e:
        raise CliError(f"nats context {name!r}: cannot read {path}: {describe(e)}") from None
    if not isinstance(raw, dict):
        raise CliError(f"nats context {name!r}: {path} does not hold a JSON object")
    for key in _CONTEXT_UNSUPPORTED:
        if raw.get(key):
            raise CliError(f"nats context {name!r} ({path}) sets {key!r}, which rjet does not support")
    settings: dict[str, str] = {}
    for key in _CONTEXT_STRINGS:
        value = raw.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise CliError(f"nats context {name!r} ({path}): {key!r} must be a string, not {value!r}")
        if key in ("creds", "nkey", "cert", "key", "ca"):
            value = _context_path(name, key, value)
        settings[key] = value
    return NatsContext(name, path, settings, tls_first=raw.get("tls_first") is True)


def _context_path(name: str, key: str, value: str) -> str:
    """A file setting as a path: ``file://`` URIs and ``~`` expanded; other credential URIs refused."""
    scheme, sep, _ = value.partition(":")
    if sep and scheme.lower() in _CREDENTIAL_SCHEMES:
        raise CliError(
            f"nats context {name!r}: {key} {scheme}:... is a credential URI, which rjet does not resolve:"
            " give a file path"
        )
    return os.path.expanduser(value.removeprefix("file://"))


def _from_context(
    nctx: NatsContext, conn: Connection, *, server_given: bool, auth_given: bool, tls_given: bool
) -> Connection:
    """``conn`` with what the context sets and the user did not give (command line or environment)."""
    get = nctx.get
    changes: dict[str, Any] = {"context": nctx.name}
    if not server_given:
        changes["servers"] = _split_servers(get("url") or DEFAULT_SERVER)
    if not auth_given:
        # The nats CLI's choice when a context holds several: user, else creds, else nkey; a token too.
        if get("user"):
            changes["user"], changes["password"] = get("user"), nctx.settings.get("password", "")
        elif get("creds"):
            changes["creds"] = get("creds")
        elif get("nkey"):
            changes["nkey"] = get("nkey")
        if get("token"):
            changes["token"] = get("token")
    if not tls_given:
        changes["tls_ca"] = get("ca")
        if get("cert") and get("key"):
            changes["tls_cert"], changes["tls_key"] = get("cert"), get("key")
    changes["inbox_prefix"] = get("inbox_prefix")
    changes["tls_first"] = nctx.tls_first
    return dataclasses.replace(conn, **changes)


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
        context: str | None,
        **kwargs: Any,
    ) -> T:
        servers = _split_servers(server) if server is not None else ()
        conn = Connection(servers, creds, nkey, user, password, token, tls_ca, tls_cert, tls_key, connect_timeout)
        ctx = click.get_current_context()
        given = functools.partial(_given, ctx)
        if embedded_default:
            # Like $NATS_URL, neither $NATS_CONTEXT nor the selected context replace the embedded server.
            nctx = load_context(context) if context is not None else None
        else:
            source = " (from $NATS_CONTEXT)" if given("context") == "env" else ""
            nctx = load_context(context, source=source)
        if nctx is not None:
            conn = _from_context(
                nctx,
                conn,
                server_given=given("server") is not None,
                auth_given=any(v is not None for v in (creds, nkey, user, password, token)),
                tls_given=any(v is not None for v in (tls_ca, tls_cert, tls_key)),
            )
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
    if embedded_default:
        context_option = click.option(
            "--context",
            metavar="NAME",
            help="Connect with the nats CLI context NAME instead of starting an embedded server.",
        )
    else:
        context_option = click.option(
            "--context",
            envvar="NATS_CONTEXT",
            metavar="NAME",
            help="The nats CLI context to connect with (default: the selected one) [env: NATS_CONTEXT].",
        )
    decorated: Any = wrapper
    for option in reversed([server_option, context_option, *_AUTH_OPTIONS]):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def _given(ctx: click.Context, param: str) -> str | None:
    """Where the user gave option ``param``: "cli", "env", or None (its default)."""
    source = ctx.get_parameter_source(param)
    if source is click.core.ParameterSource.COMMANDLINE:
        return "cli"
    if source is click.core.ParameterSource.ENVIRONMENT:
        return "env"
    return None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion; environment errors become one-line :class:`CliError`."""
    try:
        return asyncio.run(coro)
    except BrokenPipeError:
        raise  # a closed stdout (`rjet tail ... | head`): click exits quietly
    except USER_ERRORS as e:
        raise CliError(describe(e), hints=error_hints(e)) from e


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


def data_text(data: bytes) -> str:
    """Data as text when it is UTF-8 (control characters escaped), else ``base64:...``."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode()
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text


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
