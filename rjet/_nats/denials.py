"""Permission violations, told promptly to the call that caused them.

nats-server answers a publish or subscription the user may not make with ``-ERR 'Permissions
Violation for Publish to "<subject>"'``, and nothing else: a request then waits out its whole
timeout (5 s) and ends as a bare timeout, saying nothing of permissions. nats-py hands the
``-ERR`` to the connection's error callback; :func:`denials` chains onto that callback once per
connection, and :meth:`Denials.guard` races a call against the violations of the subjects it uses,
so the call fails at once with :class:`rjet.PermissionDenied` naming the subject.

A refused subscription to the inbox that nats-py's requests wait on (``_INBOX.<id>.*``, made at
the connection's first request; the user lacks ``subscribe: _INBOX.>``) fails every request waiting
on it, guarded or not, with ``PermissionDenied("subscription", "_INBOX.<id>.*")``; the next request
subscribes again, so it is refused again at once (or works, once the permission is granted).

nats-py lower-cases the ``-ERR`` text, so a match compares lower-cased subjects and gives back the
subject as the caller spelled the part it knows (the prefix); the rest stays as reported.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from rjet._nats.client import (
    api_prefix,
    attachment,
    chain_error_callback,
    connection,
    fail_requests,
    kv_names,
    request_inbox,
)
from rjet.errors import PermissionDenied

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

__all__ = ["Denials", "api_requests", "denials", "either", "exactly", "guard_api", "guard_kv", "starts"]

_VIOLATION: Final = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.IGNORECASE)
_T = TypeVar("_T")
Match = Callable[[str], str | None]
"""``match(reported)``: the subject as the caller spells it, when ``reported`` (lower-cased) is one of its."""


class Denials:
    """The permission violations of one connection, matched to who waits on them."""

    def __init__(self, nc: Client | None = None) -> None:
        self._watchers: dict[int, tuple[Match, Callable[[PermissionDenied], None]]] = {}
        self._next = 0
        self._nc = weakref.ref(nc) if nc is not None else None  # the Denials is kept with nc: no cycle

    def on_error(self, err: BaseException) -> None:
        found = _VIOLATION.search(str(err))
        if found is None:
            return
        op, reported = found.group(1).lower(), found.group(2).lower()
        nc = self._nc() if self._nc is not None else None
        if op == "subscription" and nc is not None:
            inbox = request_inbox(nc)
            if inbox is not None and inbox.lower() == reported:
                fail_requests(nc, lambda: PermissionDenied(op, inbox))
        for match, callback in list(self._watchers.values()):
            subject = match(reported)
            if subject is not None:
                callback(PermissionDenied(op, subject))

    def watch(self, match: Match, callback: Callable[[PermissionDenied], None]) -> Callable[[], None]:
        """Call ``callback`` for every violation whose subject ``match`` accepts; returns the unwatch."""
        key = self._next
        self._next += 1
        self._watchers[key] = (match, callback)

        def unwatch() -> None:
            self._watchers.pop(key, None)

        return unwatch

    async def guard(self, match: Match, call: Awaitable[_T]) -> _T:
        """``await call``, or :class:`rjet.PermissionDenied` as soon as the server refuses one of its
        subjects (``match``); the call itself is then cancelled."""
        denied: asyncio.Future[_T] = asyncio.get_running_loop().create_future()

        def on_denied(err: PermissionDenied) -> None:
            if not denied.done():
                denied.set_exception(err)

        unwatch = self.watch(match, on_denied)
        task: asyncio.Future[_T] = asyncio.ensure_future(call)
        try:
            await asyncio.wait({task, denied}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            return denied.result()  # raises: it holds the PermissionDenied
        finally:
            unwatch()
            if not denied.done():
                denied.cancel()
            elif not denied.cancelled():
                denied.exception()  # retrieved: no "exception was never retrieved" warning
            if not task.done():
                task.cancel()
            # Its outcome is read however this ends (the caller cancelled while the request was
            # failing, say, as a connection closes): never "Task exception was never retrieved".
            task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def denials(nc: Client) -> Denials:
    """The connection's :class:`Denials`, chained onto its error callback on first use (and kept
    with the connection, so it lives and dies with it)."""

    def make() -> Denials:
        made = Denials(nc)
        chain_error_callback(nc, made.on_error)
        return made

    return attachment(nc, "denials", make)


def starts(*prefixes: str) -> Match:
    """A match for subjects that start with any of ``prefixes``."""
    lowered = [(p.lower(), p) for p in prefixes]

    def match(reported: str) -> str | None:
        for low, prefix in lowered:
            if reported.startswith(low):
                return prefix + reported[len(low) :]
        return None

    return match


def exactly(*subjects: str) -> Match:
    """A match for exactly ``subjects`` (a KV key's subject, say, where a prefix would take in longer keys)."""
    spelled = {s.lower(): s for s in subjects}
    return spelled.get


_STREAM_OPS: Final = tuple(
    f"{kind}.{op}"
    for kind, ops in (
        ("STREAM", "INFO CREATE UPDATE DELETE PURGE MSG.GET MSG.DELETE SNAPSHOT RESTORE LEADER.STEPDOWN PEER.REMOVE"),
        ("DIRECT", "GET"),
        ("CONSUMER", "CREATE DURABLE.CREATE INFO DELETE NAMES LIST MSG.NEXT LEADER.STEPDOWN PAUSE UNPIN"),
    )
    for op in ops.split()
)
"""The JetStream API operations whose subject names a stream next: ``<prefix>.<OP>.<stream>[.<more>]``."""


def api_requests(prefix: str, stream: str) -> Match:
    """A match for the JetStream API requests about ``stream`` (``<prefix>.<OP>.<stream>[.<more>]``:
    its info, message and direct gets, consumer operations...), whatever the operation; ``prefix`` is
    the API prefix (``$JS.API``, or a domain's)."""
    spelled = [(f"{prefix}.{op}.{stream}".lower(), f"{prefix}.{op}.{stream}") for op in _STREAM_OPS]

    def match(reported: str) -> str | None:
        for low, subject in spelled:
            if reported == low or reported.startswith(low + "."):
                return subject + reported[len(low) :]
        return None

    return match


def either(*matches: Match) -> Match:
    """A match for what any of ``matches`` accepts (the first that does spells it)."""

    def match(reported: str) -> str | None:
        for one in matches:
            if (subject := one(reported)) is not None:
                return subject
        return None

    return match


async def guard_api(js: JetStreamContext, stream: str, call: Awaitable[_T]) -> _T:
    """``await call``, a JetStream API request about ``stream`` (its info, a message get, a consumer
    create...), or :class:`rjet.PermissionDenied` naming the subject as soon as the server refuses it."""
    return await denials(connection(js)).guard(api_requests(api_prefix(js), stream), call)


async def guard_kv(kv: KeyValue, call: Awaitable[_T], *keys: str) -> _T:
    """``await call``, a request about ``kv``'s bucket (a read, or a write of ``keys``), or
    :class:`rjet.PermissionDenied` naming the subject as soon as the server refuses it. A write is
    matched by its key's subject only: a refused write of another key on the connection is not its."""
    names = kv_names(kv)
    reads = api_requests(api_prefix(names.js), names.stream)  # info, message and direct gets
    match = either(reads, exactly(*(names.prefix + key for key in keys))) if keys else reads
    return await denials(connection(names.js)).guard(match, call)
