"""Connecting to NATS with a clear error when no server answers."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
from nats.aio.client import Client

from rjet.errors import ConnectError

__all__ = ["connect"]


async def connect(servers: str | list[str] = "nats://127.0.0.1:4222", **options: Any) -> Client:
    """``nats.connect`` with rjet's defaults, raising :class:`rjet.ConnectError` naming the servers.

    ``options`` go to nats-py's ``connect`` (``user_credentials``, ``user``/``password``, ``token``,
    ``tls``, ...). Defaults: ``connect_timeout=2`` and ``max_reconnect_attempts=-1``: once connected,
    the client keeps reconnecting through outages; a server that is down at start is reported after
    ``connect_timeout`` seconds instead of being retried forever.
    """
    urls = [servers] if isinstance(servers, str) else list(servers)
    timeout = float(options.setdefault("connect_timeout", 2))
    options.setdefault("max_reconnect_attempts", -1)
    errors: list[BaseException] = []
    user_error_cb = options.pop("error_cb", None)

    async def error_cb(e: Exception) -> None:
        errors.append(e)
        if user_error_cb is not None:
            await user_error_cb(e)

    nc = Client()
    try:
        await asyncio.wait_for(nc.connect(urls, error_cb=error_cb, **options), timeout)
    except ModuleNotFoundError as e:
        raise ConnectError(
            f"cannot connect to NATS at {', '.join(urls)}: credentials and nkeys need the '{e.name}' package:"
            " pip install 'nats-py[nkeys]'"
        ) from e
    except (TimeoutError, OSError, nats.errors.Error) as e:
        with contextlib.suppress(Exception):
            await nc.close()
        # The first refusal of credentials explains more than the reset connections that follow it.
        auth = [x for x in errors if "authoriz" in str(x).lower() or "authentic" in str(x).lower()]
        detail = repr(auth[0]) if auth else repr(errors[-1]) if errors else repr(e)
        raise ConnectError(f"cannot connect to NATS at {', '.join(urls)} within {timeout:g}s: {detail}") from e
    return nc
