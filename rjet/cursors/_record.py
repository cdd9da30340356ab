"""What a cursor's key holds (:class:`CursorRecord`), and how cursor names become KV keys."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
from typing import Final

from rjet.errors import ConfigError

__all__ = ["RESERVED_PREFIX", "CursorRecord", "decode_key", "encode_key"]

_KEY_RE: Final = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")
_ENCODED: Final = "_b64."  # prefix of encoded keys; names that start with it are encoded too
RESERVED_PREFIX: Final = "_rjet."
"""KV keys rjet keeps beside cursors (sharding's heartbeats and records); never a cursor's key."""


def encode_key(name: str) -> str:
    """The KV key for cursor ``name``: itself when it is a valid key, else a reversible encoding."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"cursor name must be a non-empty str, not {name!r}")
    if _KEY_RE.match(name) and not name.startswith((_ENCODED, RESERVED_PREFIX)):
        return name
    return _ENCODED + base64.urlsafe_b64encode(name.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def decode_key(key: str) -> str:
    """Inverse of :func:`encode_key`."""
    if not key.startswith(_ENCODED):
        return key
    raw = key[len(_ENCODED) :]
    return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-8", "surrogatepass")


@dataclasses.dataclass(frozen=True, slots=True)
class CursorRecord:
    """What a cursor's KV key holds: the cursor, the stream it counts in, the claim that wrote it, and
    the events done above the cursor.

    Stored as JSON, ``{"v":1,"cursor":"42","done":"r...","stream":"orders@2026-12-01T15:04:05.123456+00:00",
    "owner":"host:pid:token"}`` (``done``, ``stream`` and ``owner`` may be missing). ``done`` is the
    exact progress of a consumer with ``concurrency`` > 1: the stream sequences above ``cursor`` that
    were handled already, encoded relative to it (``rjet/_progress.py`` documents the encoding); a
    reader that does not know the field hands those events to its handler again, which
    at-least-once allows. A bare decimal (what rjet 0.1 and hand-written tools store) is a cursor
    alone, with no stream recorded and no owner.
    """

    cursor: str = ""
    stream: str | None = None
    owner: str | None = None
    done: str | None = None

    def encode(self) -> bytes:
        """The stored form."""
        c = self.cursor
        # A flush encodes one record per cursor: a decimal needs no JSON escaping, and the rest of a
        # record (the claim's stream and owner) is the same for every write of the claim.
        head = b'{"v":1,"cursor":"%s"' % c.encode() if c.isdigit() or not c else b'{"v":1,"cursor":' + _json(c)
        if self.done:
            head += b',"done":' + _json(self.done)
        return head + _record_tail(self.stream, self.owner)

    @classmethod
    def decode(cls, raw: bytes | None) -> CursorRecord:
        """The record in ``raw``; a value that is neither form is kept as the cursor (``run`` then
        raises :class:`rjet.InvalidCursor` naming the consumer)."""
        if not raw or raw.isdigit():
            return cls((raw or b"").decode())
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("v") != 1 or not isinstance(body.get("cursor"), str):
            return cls(raw.decode("utf-8", "replace"))
        stream, owner, done = body.get("stream"), body.get("owner"), body.get("done")
        return cls(
            body["cursor"],
            stream if isinstance(stream, str) else None,
            owner if isinstance(owner, str) else None,
            done if isinstance(done, str) and done else None,
        )


def _json(value: str) -> bytes:
    return json.dumps(value).encode()


@functools.lru_cache(maxsize=1024)
def _record_tail(stream: str | None, owner: str | None) -> bytes:
    return (
        (f',"stream":{json.dumps(stream)}' if stream else "").encode()
        + (f',"owner":{json.dumps(owner)}' if owner else "").encode()
        + b"}"
    )
