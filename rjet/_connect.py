"""Connecting to NATS with a clear error when no server answers."""

from __future__ import annotations

from typing import Any

import nats
import nats.errors
from nats.aio.client import Client

from rjet.errors import ConnectError

__all__ = ["connect"]


async def connect(servers: str | list[str] = "nats://127.0.0.1:4222", **options: Any) -> Client:
    """``nats.connect`` with rjet's defaults, raising :class:`rjet.ConnectError` naming the servers.

    ``options`` go to ``nats.connect`` (``user_credentials``, ``token``, ``tls``, ...). Defaults:
    ``connect_timeout=2``, ``max_reconnect_attempts=-1`` (keep reconnecting once connected), and no
    initial retry, so a server that is down at start is reported after ``connect_timeout``.
    """
    urls = [servers] if isinstance(servers, str) else list(servers)
    options.setdefault("connect_timeout", 2)
    options.setdefault("max_reconnect_attempts", -1)
    options.setdefault("allow_reconnect", True)
    errors: list[BaseException] = []

    async def _record(e: Exception) -> None:
        errors.append(e)

    options.setdefault("error_cb", _record)
    try:
        return await nats.connect(urls, **options)
    except (nats.errors.NoServersError, OSError, TimeoutError, nats.errors.Error) as e:
        detail = f"{errors[-1]!r}" if errors else f"{e!r}"
        raise ConnectError(
            f"cannot connect to NATS at {', '.join(urls)} within {options['connect_timeout']}s: {detail}"
        ) from e
