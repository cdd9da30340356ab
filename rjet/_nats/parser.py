"""A fast lane in nats-py's protocol parser for rjet's stream clients.

nats-py turns every delivered message into a ``Msg`` with a parsed header dict, queues it, and wakes
a task to run the subscription's callback: about 10 us a message, most of a reader's budget. rjet
keeps nats-py's connection (auth, TLS, reconnects, cluster URLs, every other subscription) and
replaces only its parser object with this subclass, which parses the same wire protocol but hands
MSG/HMSG frames of subscriptions registered in :attr:`FastParser.lanes` straight to a plain
function as raw bytes, in bulk, without a task switch. Every other frame goes to nats-py's own
``_process_*`` handlers exactly as its parser would send it.

A lane may also register a :data:`Scanner`: given the buffer at a frame of its subscription, it
takes as many complete frames as it recognises in one call (a stream client matches its consumer's
frames with one compiled pattern) and says where it stopped; frames it leaves go to the handler.

If the installed nats-py does not look like the one this was written against, :func:`fast_lanes`
returns None and stream clients use ordinary subscriptions (slower, equally correct).

Those ordinary subscriptions get nats-py's header dict, which keeps the last of a repeated header
and reads bytes that are not UTF-8 as U+FFFD. So that a message decodes the same way on every path
(the first ``reflex_type`` wins, as Go's ``Header.Get`` takes it; a foreign ID is exact UTF-8),
:func:`keep_raw_headers` makes nats-py's header dicts carry the raw block they were parsed from
(:class:`RawHeaders`), and the reader decodes that. It is not a fast path, so ``RJET_FAST_PATHS=0``
leaves it on; a nats-py without ``_process_headers`` gets the rebuilt dict (see ``StreamClient._on_msg``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from nats.errors import ProtocolError
from nats.protocol import parser as _nats_parser

from rjet._nats.client import attachment, fast_paths

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "FastParser", "FrameHandler", "RawHeaders", "Scanner", "fast_lanes", "fast_parser", "keep_raw_headers", "raw_block",
]  # fmt: skip

FrameHandler: TypeAlias = Callable[[bytes, bytes, bytes | None, bytes], None]
"""``handler(subject, reply, raw_headers_or_None, payload)``, called synchronously per frame."""

Scanner: TypeAlias = Callable[[bytes | bytearray, int, int], int]
"""``scan(buf, pos, size) -> pos'``: consume complete frames from ``buf[pos:size]``, which starts with a
complete frame of the scanner's subscription, and return where the first frame not taken begins
(``pos`` itself to leave that frame to the lane's handler). Called synchronously. The parser hands
it a copy of its buffer as ``bytes``, made once per read (see :meth:`FastParser.parse`)."""

_CONTROL: Final = _nats_parser.AWAITING_CONTROL_LINE
_PAYLOAD: Final = _nats_parser.AWAITING_MSG_PAYLOAD
_MAX_CONTROL_LINE: Final = _nats_parser.MAX_CONTROL_LINE_SIZE
_EXPECTED_STATE: Final = {"buf", "state", "needed", "header_needed", "msg_arg", "nc"}


class FastParser(_nats_parser.Parser):
    """nats-py's parser with a synchronous, bulk lane for registered subscription IDs."""

    def __init__(self, nc: Client) -> None:
        super().__init__(nc)
        self.lanes: dict[int, FrameHandler] = {}
        self.scanners: dict[int, Scanner] = {}

    async def parse(self, data: bytes = b"") -> None:  # noqa: C901 (the hot loop, kept in one piece)
        buf = self.buf
        buf.extend(data)
        lanes = self.lanes
        scanners = self.scanners
        pos = 0  # frames before pos are consumed; deleted in one go, and before every await
        size = len(buf)
        # buf as bytes, for the scanners, made when one first has a complete frame to take and again
        # after buf changes: a body sliced from bytes is one copy, where one from a bytearray takes
        # a memoryview's slice and its tobytes() (0.05-0.09 us more a frame than the copy of the buffer).
        snap: bytes | None = None
        try:
            while pos < size:
                if self.state == _PAYLOAD:
                    # A frame of a nats-py subscription whose payload had not fully arrived.
                    needed = self.needed
                    if size - pos < needed + 2:
                        return
                    hlen = self.header_needed
                    hdr = bytes(buf[pos : pos + hlen]) if hlen else None
                    payload = bytes(buf[pos + hlen : pos + needed])
                    del buf[: pos + needed + 2]
                    pos = 0
                    self.header_needed = 0
                    self.state = _CONTROL
                    arg = self.msg_arg
                    await self.nc._process_msg(arg["sid"], arg["subject"], arg["reply"], payload, hdr)
                    buf = self.buf  # a reconnect may have reset the parser meanwhile
                    size = len(buf)
                    snap = None
                    continue
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if size - pos > _MAX_CONTROL_LINE:
                        raise ProtocolError("nats: control line too long")
                    return
                c = buf[pos]
                if (c == 72 and buf.startswith(b"HMSG ", pos)) or (c == 77 and buf.startswith(b"MSG ", pos)):
                    hmsg = c == 72
                    # MSG <subject> <sid> [reply] <size>; HMSG <subject> <sid> [reply] <hdr size> <size>
                    args = bytes(buf[pos + 4 + hmsg : end]).split()
                    try:
                        sid = int(args[1])
                        total = int(args[-1])
                        hlen = int(args[-2]) if hmsg else 0
                    except (IndexError, ValueError):
                        raise ProtocolError("nats: malformed MSG") from None
                    reply = args[2] if len(args) == 4 + hmsg else b""
                    start = end + 2
                    stop = start + total
                    handler = lanes.get(sid)
                    if handler is not None:
                        if size < stop + 2:
                            return  # wait for the whole frame; its control line is parsed again then
                        scan = scanners.get(sid)
                        if scan is not None:
                            if snap is None:
                                snap = bytes(buf)
                            if (taken := scan(snap, pos, size)) != pos:
                                pos = taken
                                continue
                        handler(
                            args[0],
                            reply,
                            bytes(buf[start : start + hlen]) if hmsg else None,
                            bytes(buf[start + hlen : stop]),
                        )
                        pos = stop + 2
                        continue
                    self.msg_arg["subject"] = args[0]
                    self.msg_arg["sid"] = sid
                    self.msg_arg["reply"] = reply
                    self.needed = total
                    self.header_needed = hlen
                    self.state = _PAYLOAD
                    pos = start
                    continue
                line = bytes(buf[pos : end + 2])
                del buf[: end + 2]
                pos = 0
                if line.startswith(b"PING"):
                    await self.nc._process_ping()
                elif line.startswith(b"PONG"):
                    await self.nc._process_pong()
                elif line.startswith(b"+OK"):
                    pass
                elif m := _nats_parser.ERR_RE.match(line):
                    await self.nc._process_err((m.group(1) or b"").decode().lower())
                elif m := _nats_parser.INFO_RE.match(line):
                    await self.nc._process_info(json.loads(m.group(1).decode()))
                else:
                    raise ProtocolError("nats: unknown protocol")
                buf = self.buf
                size = len(buf)
                snap = None
        finally:
            if pos:
                del buf[:pos]


def fast_lanes(nc: Client) -> dict[int, FrameHandler] | None:
    """The fast-lane registry of ``nc``'s parser, installing :class:`FastParser` on first use.

    Returns None (use ordinary subscriptions) when nats-py's parser is not the one expected.
    """
    ps = fast_parser(nc)
    return None if ps is None else ps.lanes


def fast_parser(nc: Client) -> FastParser | None:
    """``nc``'s :class:`FastParser`, installed on first use; None when nats-py's parser is not the one expected."""
    ps = getattr(nc, "_ps", None)
    if isinstance(ps, FastParser):
        return ps
    if not fast_paths(nc):
        return None
    if type(ps) is not _nats_parser.Parser or not set(vars(ps)) >= _EXPECTED_STATE:
        return None
    fast = FastParser(nc)
    # Carry over a frame that may be half-parsed right now (we run between two parse() calls).
    fast.buf, fast.state, fast.needed = ps.buf, ps.state, ps.needed
    fast.header_needed, fast.msg_arg = ps.header_needed, ps.msg_arg
    nc._ps = fast
    return fast


class RawHeaders(dict[str, str]):
    """nats-py's header dict of a message, and (``raw``) the ``NATS/1.0`` block it was parsed from,
    with every repeated header and the exact bytes the dict loses."""

    __slots__ = ("raw",)
    raw: bytes


def keep_raw_headers(nc: Client) -> bool:
    """Make the header dicts of the messages nats-py delivers on ``nc`` :class:`RawHeaders` (once
    per connection); False when nats-py has no ``_process_headers`` to wrap."""
    return attachment(nc, "raw_headers", lambda: _wrap_process_headers(nc))


def _wrap_process_headers(nc: Client) -> bool:
    original = getattr(nc, "_process_headers", None)
    if original is None or not inspect.iscoroutinefunction(original):
        return False

    async def process_headers(headers: Any, *args: Any, **kwargs: Any) -> Any:
        hdr = await original(headers, *args, **kwargs)
        if type(hdr) is dict and isinstance(headers, bytes | bytearray | memoryview):
            kept = RawHeaders(hdr)
            kept.raw = bytes(headers)
            return kept
        return hdr

    nc._process_headers = process_headers  # type: ignore[method-assign]
    return True


def raw_block(headers: object) -> bytes | None:
    """The raw header block a message's header dict was parsed from, when it kept it."""
    return headers.raw if type(headers) is RawHeaders else None
