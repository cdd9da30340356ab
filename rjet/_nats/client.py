"""The seam: nats-py's private attributes read and written behind accessors, and one probe.

Every use of a nats-py internal outside the protocol parser (:mod:`rjet._nats.parser`) goes through
this module: the connection's outgoing buffer (``_send_command``, ``_flush_pending``) and error
callback (``_error_cb``, chained by :mod:`rjet._nats.denials`), a subscription's ID (``_id``), a
JetStream context's API prefix, timeout and connection (``_prefix``, ``_timeout``, ``_nc``), a KV
bucket's names (``_name``, ``_stream``, ``_pre``, ``_js``) and its request inbox
(``_resp_sub_prefix``, ``_resp_map``, ``_subs``: failed at once when the server refuses to subscribe
to it). :mod:`rjet._nats` lists them all, with the parser's, and says why.

:func:`fast_paths` decides, once per connection, whether the fast paths may be used: nats-py is a
version rjet was tested against and has what they need. When it says no (or ``RJET_FAST_PATHS=0``
is set, which CI uses to run the suite on the plain paths), the reader uses an ordinary
subscription, ``insert_many`` publishes through ``nc.publish`` and cursor flushes write one key at
a time: slower, same results.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Final, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nats.aio.client import Client
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = [
    "KvNames",
    "api_prefix",
    "api_timeout",
    "attachment",
    "chain_error_callback",
    "connection",
    "fail_requests",
    "fast_paths",
    "header_dict",
    "hpub",
    "kv_names",
    "request_inbox",
    "send_raw",
    "subscription_id",
]

TESTED: Final = ("2.16",)
"""nats-py minor versions the fast paths were tested against (pyproject pins nats-py to them)."""
_ENV: Final = "RJET_FAST_PATHS"
_T = TypeVar("_T")


def fast_paths(nc: Client) -> bool:
    """Whether rjet's fast paths (fast-lane reads, raw publishes, atomic cursor batches) may be used
    on ``nc``: nats-py is a tested version and has the internals they need."""
    return attachment(nc, "fast_paths", lambda: _probe(nc))


def attachment(nc: Client, name: str, make: Callable[[], _T]) -> _T:
    """What rjet keeps with a connection (made on first use; it lives and dies with the connection)."""
    kept = vars(nc)
    key = f"_rjet_{name}"
    if key not in kept:
        kept[key] = make()
    found: _T = kept[key]
    return found


def _probe(nc: Client) -> bool:
    if os.environ.get(_ENV, "1") == "0":
        return False
    try:
        tested = version("nats-py").rsplit(".", 1)[0] in TESTED
    except Exception:  # metadata missing: an unusual install, not a tested one
        return False
    return (
        tested
        and callable(getattr(nc, "_send_command", None))
        and callable(getattr(nc, "_flush_pending", None))
        and hasattr(nc, "_ps")
        and callable(getattr(nc, "_error_cb", None))
    )


def connection(js: JetStreamContext) -> Client:
    """The connection a JetStream context talks over."""
    nc: Client = js._nc
    return nc


def api_prefix(js: JetStreamContext) -> str:
    """The JetStream API subject prefix (``$JS.API``, or a domain's, or an imported account's)."""
    prefix: str = js._prefix
    return prefix


def api_timeout(js: JetStreamContext) -> float:
    """The JetStream context's request timeout, in seconds."""
    timeout: float = js._timeout
    return timeout


def subscription_id(sub: Subscription) -> int:
    """The subscription's ID on the wire (the ``sid`` of its MSG/HMSG frames)."""
    sid: int = sub._id
    return sid


@dataclasses.dataclass(frozen=True, slots=True)
class KvNames:
    """A KV bucket's names: ``bucket``, its stream ``stream`` (``KV_<bucket>``), the subject prefix
    of its keys ``prefix`` (``$KV.<bucket>.``), and the JetStream context ``js`` it was bound with."""

    bucket: str
    stream: str
    prefix: str
    js: JetStreamContext


def kv_names(kv: KeyValue) -> KvNames:
    """The names of ``kv``'s bucket."""
    return KvNames(kv._name, kv._stream, kv._pre, kv._js)


def hpub(subject: bytes, reply: bytes, header_block: bytes, data: bytes) -> bytes:
    """One ``HPUB`` frame (``reply`` may be empty)."""
    size = len(header_block)
    if reply:
        return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject, reply, size, size + len(data), header_block, data)
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject, size, size + len(data), header_block, data)


async def send_raw(nc: Client, frames: list[bytes], payload_bytes: int, *, flush: bool = False) -> None:
    """Hand ``frames`` (complete protocol frames) to the connection's outgoing buffer in one piece,
    counting them in nats-py's statistics as its own publishes would be (``payload_bytes``: their
    bodies). Only where :func:`fast_paths` said yes."""
    nc.stats["out_msgs"] += len(frames)
    nc.stats["out_bytes"] += payload_bytes
    await nc._send_command(b"".join(frames))
    if flush:
        await nc._flush_pending()


def chain_error_callback(nc: Client, before: Callable[[Exception], None]) -> None:
    """Make ``before(err)`` run ahead of the connection's own error callback, for every error."""
    previous: Callable[[Exception], Awaitable[None]] = nc._error_cb

    async def error_cb(err: Exception) -> None:
        before(err)
        await previous(err)

    nc._error_cb = error_cb


def request_inbox(nc: Client) -> str | None:
    """The subject of the subscription that ``nc.request`` waits on for every answer
    (``_INBOX.<id>.*``), or None before the connection's first request."""
    prefix = getattr(nc, "_resp_sub_prefix", None)
    return prefix.decode() + "*" if prefix else None


_dropping: set[asyncio.Task[None]] = set()  # unsubscriptions under way (a reference keeps each task alive)


def fail_requests(nc: Client, error: Callable[[], BaseException]) -> None:
    """Fail every request waiting on ``nc``'s request inbox with ``error()``, and let the next request
    subscribe to a new inbox: the server refused this one, so no answer would ever come (each request
    would wait out its timeout), and a refusal is told once, when the subscription is made."""
    for future in list(getattr(nc, "_resp_map", {}).values()):
        if not future.done():
            future.set_exception(error())
    subject = request_inbox(nc)
    if subject is None:
        return
    nc._resp_sub_prefix = None
    for sub in list(getattr(nc, "_subs", {}).values()):
        if sub.subject == subject:
            task = asyncio.ensure_future(_unsubscribe(sub))
            _dropping.add(task)
            task.add_done_callback(_dropping.discard)


async def _unsubscribe(sub: Subscription) -> None:
    with contextlib.suppress(Exception):  # a closed or draining connection drops it anyway
        await sub.unsubscribe()


def header_dict(header_block: bytes) -> dict[str, Any]:
    """The headers of a raw ``NATS/1.0`` block, for a plain ``nc.publish`` (the fallback path)."""
    headers: dict[str, Any] = {}
    for line in header_block.decode().split("\r\n")[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip()] = value.strip()
    return headers
