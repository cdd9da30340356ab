"""A JetStream stream of reflex events: create or bind it, insert events, and open stream clients.

::

    stream = await Stream.create(js, "orders")
    seq = await stream.insert("order-17", 1, b'{"total": 12}')
    async with await stream.stream(after="") as client:
        async for event in client:
            ...
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import nats.errors
import nats.js.errors
from nats.js import api

from rjet import otel as _otel
from rjet._nats.client import api_prefix, api_timeout, connection
from rjet._nats.denials import denials, starts
from rjet._nats.frames import encode_header_block, encode_headers
from rjet._nats.publish import Outgoing, ack_error, ack_seq, publish_many
from rjet.errors import (
    ConfigError,
    InsertError,
    InvalidCursor,
    InvalidEvent,
    StreamConfigMismatch,
    StreamError,
    StreamNotFound,
)
from rjet.partitions import DEFAULT_PARTITIONS, METADATA_KEY, Partitions
from rjet.reader import ReadConfig, StreamClient

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

__all__ = ["ReadConfig", "Stream", "parse_cursor"]

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_DEFAULT_DUPLICATE_WINDOW: Final = 120.0
_INSERT_WINDOW: Final = 4096  # publishes in flight at once in insert_many


def parse_cursor(cursor: str, where: str) -> int:
    """The stream sequence a cursor names (0 for ""); :class:`InvalidCursor` otherwise."""
    if cursor == "":
        return 0
    if not isinstance(cursor, str) or not cursor.isascii() or not cursor.isdigit():
        raise InvalidCursor(str(cursor), where)
    return int(cursor)


class Stream:
    """A JetStream stream that holds reflex events.

    ``Stream(js, name)`` binds an existing stream (checked on first use: :class:`StreamNotFound`);
    :meth:`create` creates it with rjet's defaults or binds a compatible existing one.

    ``subject`` is where :meth:`insert` publishes (default: derived from the stream's first subject,
    ``<name>.events`` for streams rjet created). ``filter_subjects`` restricts what :meth:`stream`
    reads to those subjects (a subject-filtered stream). ``read`` tunes the reader.
    """

    def __init__(
        self,
        js: JetStreamContext,
        name: str,
        *,
        subject: str | None = None,
        filter_subjects: Sequence[str] | None = None,
        read: ReadConfig | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"stream name {name!r} is invalid: use letters, digits, '_' and '-' only")
        if isinstance(filter_subjects, str):
            raise ConfigError("filter_subjects is a list of subjects, not one string")
        self.js = js
        self.name = name
        self._subject = subject
        self.filter_subjects: tuple[str, ...] = tuple(filter_subjects or ())
        self.read = read or ReadConfig()
        self._bound = False
        self._partitions: Partitions | None = None

    @classmethod
    async def create(
        cls,
        js: JetStreamContext,
        name: str,
        subjects: Sequence[str] | None = None,
        *,
        subject: str | None = None,
        filter_subjects: Sequence[str] | None = None,
        read: ReadConfig | None = None,
        partitions: int | None = None,
        **overrides: Any,
    ) -> Stream:
        """Create the stream with rjet's defaults, or bind it when it exists with a compatible config.

        Defaults: subjects ``[name + ".>"]``, limits retention, file storage, a 2-minute duplicate
        window. ``overrides`` are :class:`nats.js.api.StreamConfig` fields (``max_age``,
        ``num_replicas``, ...). An existing stream whose subjects, partitions or overridden fields
        differ raises :class:`StreamConfigMismatch` naming each difference.

        ``partitions=P`` makes a partitioned stream (see :mod:`rjet.partitions`): each event is stored
        on a subject that carries its partition, so :mod:`rjet.parallel` workers read only their own
        events (server-side filtering). ``partitions=True`` picks :data:`DEFAULT_PARTITIONS` (720).
        """
        stream = cls(js, name, subject=subject, filter_subjects=filter_subjects, read=read)
        subjects = list(subjects) if subjects is not None else [f"{name}.>"]
        if isinstance(subjects, str) or not subjects:
            raise ConfigError("subjects is a non-empty list of subjects")
        if partitions is True:
            partitions = DEFAULT_PARTITIONS
        layout = Partitions(partitions) if partitions else None
        if layout is not None:
            overrides["metadata"] = {**overrides.get("metadata", {}), METADATA_KEY: str(layout.count)}
        # The server refuses a duplicate window longer than max_age.
        window = min(_DEFAULT_DUPLICATE_WINDOW, overrides.get("max_age") or _DEFAULT_DUPLICATE_WINDOW)
        wanted: dict[str, Any] = {
            "subjects": subjects,
            "retention": api.RetentionPolicy.LIMITS,
            "storage": api.StorageType.FILE,
            "duplicate_window": window,
            **overrides,
        }
        try:
            config = api.StreamConfig(name=name, **wanted)
        except TypeError as e:
            raise ConfigError(f"stream {name!r}: unknown stream option: {e}") from None
        jsapi = api_prefix(js)
        guard, info_match = denials(connection(js)).guard, starts(f"{jsapi}.STREAM.INFO.{name}")
        try:
            info = await guard(info_match, js.stream_info(name))
        except nats.js.errors.NotFoundError:
            try:
                info = await guard(starts(f"{jsapi}.STREAM.CREATE.{name}"), js.add_stream(config))
            except nats.js.errors.APIError as e:
                # Lost a race with another creator: fall through to the compatibility check.
                if e.err_code != 10058:  # stream name already in use
                    raise StreamError(
                        f"stream {name!r}: the server refused to create it: {e.description} (error {e.err_code})",
                        stream=name,
                    ) from e
                info = await guard(info_match, js.stream_info(name))
            else:
                stream._bind(info)
                return stream
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            raise StreamError(
                f"stream {name!r}: JetStream is not enabled on the server (start nats-server with -js)",
                stream=name,
            ) from None
        fields = ["subjects", "retention", "storage", *(k for k in overrides if k != "metadata")]
        diffs = _config_differences(info.config, config, fields)
        have = _partitions_of(info)
        if have != layout:
            diffs.append(f"partitions are {have.count if have else None}, not {layout.count if layout else None}")
        if diffs:
            raise StreamConfigMismatch(
                f"stream {name!r} exists with a different config: " + "; ".join(diffs), stream=name
            )
        stream._bind(info)
        return stream

    @property
    def subject(self) -> str:
        """The subject :meth:`insert` publishes to."""
        if self._subject is None:
            raise ConfigError(
                f"stream {self.name!r}: the insert subject is not known yet; pass subject=... or call"
                " `await stream.info()` first"
            )
        return self._subject

    @property
    def partitions(self) -> Partitions | None:
        """The stream's partition layout (None when it is not partitioned); known once bound."""
        return self._partitions

    def _bind(self, info: api.StreamInfo) -> None:
        self._partitions = _partitions_of(info)
        self._bound = True
        if self._subject is not None:
            return
        subjects = info.config.subjects or []
        if not subjects:
            raise ConfigError(f"stream {self.name!r} has no subjects; pass subject=... to insert into it")
        tokens = ["events" if t in ("*", ">") else t for t in subjects[0].split(".")]
        if self._partitions is not None and tokens[-1] == "events" and subjects[0].endswith(">"):
            tokens = [*tokens[:-1], "p"]  # <name>.p.<digits>: partition subjects under the stream's '>'
        self._subject = ".".join(tokens)

    async def shard(self, m: int, n: int) -> Stream | None:
        """A view of this stream that reads only shard ``m`` of ``n``'s events, filtered by the server.

        None when the stream is not partitioned or ``n`` does not divide its partition count (read
        everything and filter by key then). Every event of a partitioned stream stored by rjet is in
        exactly one shard's view.
        """
        if not self._bound:
            await self.info()
        layout = self._partitions
        if layout is None or not layout.divides(n):
            return None
        if n == 1:
            return Stream(self.js, self.name, subject=self._subject, read=self.read)
        view = Stream(
            self.js,
            self.name,
            subject=self._subject,
            filter_subjects=[layout.filter_subject(self.subject, m, n)],
            read=self.read,
        )
        view._bound, view._partitions = True, layout
        return view

    async def info(self) -> api.StreamInfo:
        """The stream's current info (config and state); :class:`StreamNotFound` when it is gone."""
        try:
            info = await denials(self._nc).guard(
                starts(f"{api_prefix(self.js)}.STREAM.INFO.{self.name}"), self.js.stream_info(self.name)
            )
        except nats.js.errors.NotFoundError:
            raise StreamNotFound(self.name) from None
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            raise StreamNotFound(self.name, "JetStream is not enabled on the server") from None
        self._bind(info)
        return info

    async def _insert_subject(self) -> str:
        if not self._bound:
            await self.info()
        return self.subject

    async def insert(self, foreign_id: str, type: int, data: bytes = b"", *, msg_id: str | None = None) -> int:
        """Publish one event and return its stream sequence (its event ID as an int).

        ``msg_id`` makes the insert idempotent within the stream's duplicate window: inserting the
        same ``msg_id`` again stores nothing and returns the first insert's sequence.
        """
        return (await self._insert(foreign_id, type, data, msg_id))[0]

    async def insert_once(self, foreign_id: str, type: int, data: bytes = b"", *, msg_id: str) -> tuple[int, bool]:
        """:meth:`insert` with a ``msg_id``, saying whether this call stored the event: ``(sequence,
        True)``, or ``(the first insert's sequence, False)`` when the ``msg_id`` was inserted within
        the stream's duplicate window already (nothing was stored).

        >>> seq, stored = await stream.insert_once("order-17", 1, b"{}", msg_id="order-17:created")  # doctest: +SKIP
        """
        return await self._insert(foreign_id, type, data, msg_id)

    async def _insert(self, foreign_id: str, type: int, data: bytes, msg_id: str | None) -> tuple[int, bool]:
        tracing = _otel.sending(self.name, 1)
        if tracing is None:
            return await self._insert_traced(foreign_id, type, data, msg_id, None)
        with tracing as carrier:
            return await self._insert_traced(foreign_id, type, data, msg_id, carrier)

    async def _insert_traced(
        self, foreign_id: str, type: int, data: bytes, msg_id: str | None, trace: dict[str, str] | None
    ) -> tuple[int, bool]:
        headers = encode_headers(foreign_id, type, msg_id)
        if trace:  # first: the layout rjet's readers take in bulk (rjet/_nats/frames.py's frame_pattern)
            headers = {**trace, **headers}
        data = _as_bytes(data)
        # Headers count against max_payload too; a frame over it makes the server close the connection.
        extra = len(_otel.header_lines(trace)) if trace else 0
        if len(data) + len(encode_header_block(foreign_id, type, msg_id)) + extra > self._nc.max_payload:
            raise self._too_large(0, foreign_id, data)
        subject = await self._insert_subject()
        if self._partitions is not None:
            subject = self._partitions.subject(subject, foreign_id)
        try:
            msg = await denials(self._nc).guard(
                starts(subject), self._nc.request(subject, data, timeout=api_timeout(self.js), headers=headers)
            )
        except nats.errors.MaxPayloadError:
            raise self._too_large(0, foreign_id, data) from None
        except nats.errors.NoRespondersError:
            raise self._no_stream(subject) from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise InsertError(
                self.name,
                0,
                foreign_id,
                "no acknowledgement in time: it may or may not be stored; insert again with the same msg_id to be sure",
            ) from None
        seq = self._ack_seq(msg.data, 0, foreign_id, stored=0)
        # The ack of a de-duplicated insert says so: {"stream":"s","seq":1,"duplicate": true}.
        return seq, b'"duplicate"' not in msg.data or not json.loads(msg.data).get("duplicate")

    async def insert_many(
        self, events: Iterable[tuple[str, int, bytes] | tuple[str, int, bytes, str]], *, timeout: float | None = None
    ) -> list[int]:
        """Publish events in order, pipelined, and return their stream sequences.

        Each item is ``(foreign_id, type, data)``, or ``(foreign_id, type, data, msg_id)`` to make a
        retry of the batch idempotent. Every event is checked before the first is sent. On the
        first failure raises :class:`InsertError` with the failing index and how many events
        before it are stored (later ones may be stored too: retry with msg_ids to be exact).
        """
        items = []
        msg_ids: list[str | None] = []
        for item in events:
            items.append((item[0], item[1], _as_bytes(item[2])))
            msg_ids.append(item[3] if len(item) > 3 else None)
        prefix = await self._insert_subject()
        tracing = _otel.sending(self.name, len(items)) if items else None
        if tracing is None:
            return await self._insert_many(items, msg_ids, prefix, timeout, b"")
        with tracing as carrier:
            return await self._insert_many(items, msg_ids, prefix, timeout, _otel.header_lines(carrier))

    async def _insert_many(
        self,
        items: list[tuple[str, int, bytes]],
        msg_ids: list[str | None],
        prefix: str,
        timeout: float | None,
        trace: bytes,
    ) -> list[int]:
        layout = self._partitions
        limit = self._nc.max_payload
        outgoing: list[Outgoing] = []
        for i, (fid, typ, data) in enumerate(items):
            try:
                hdr = encode_header_block(fid, typ, msg_ids[i])
            except InvalidEvent as e:
                raise InvalidEvent(f"stream {self.name!r}: event #{i}: {e}") from None
            if trace:  # first, as in insert
                hdr = hdr[:10] + trace + hdr[10:]
            if len(hdr) + len(data) > limit:
                raise self._too_large(i, fid, data)
            outgoing.append((layout.subject(prefix, fid) if layout else prefix, hdr, data))
        if not items:
            return []
        try:
            fids = [fid for fid, _, _ in items]
            publishing = publish_many(self._nc, self.name, outgoing, fids, timeout or api_timeout(self.js))
            return await denials(self._nc).guard(starts(prefix), publishing)
        except nats.errors.ConnectionClosedError:
            raise InsertError(self.name, 0, items[0][0], "the NATS connection is closed") from None

    async def stream(
        self,
        after: str = "",
        *,
        from_head: bool = False,
        to_head: bool = False,
        stream_id: str | None = None,
        key_filter: Callable[[str], bool] | None = None,
    ) -> StreamClient:
        """Open a stream client that delivers events with sequence > ``after`` in stream order.

        ``after=""`` reads from the beginning. ``from_head`` ignores ``after`` and delivers only
        events inserted from now on. ``to_head`` makes ``recv()`` raise :class:`rjet.HeadReached`
        (and ``async for`` end) once every event present at open has been delivered.

        ``key_filter(foreign_id)`` passes over the events it rejects before decoding them (sharding):
        ``recv`` never returns them. A :class:`rjet.reader.ShardFilter` (what :mod:`rjet.parallel`
        workers use) is recognised, and hashed on the raw header bytes.

        ``stream_id`` is the identity of the stream ``after`` was recorded in (``StreamClient.stream_id``
        of an earlier client; ``run`` passes what the cursor store recorded): a stream deleted and
        created again under the same name raises :class:`rjet.StreamRecreated` instead of being read as
        the old one.

        Raises :class:`rjet.CursorExpired` when events after ``after`` are gone from the stream,
        :class:`rjet.CursorAhead` when ``after`` is past the stream's end. While reading,
        :class:`rjet.EventsRemoved` when events are removed (retention, a purge) before it gets to them.
        """
        return await StreamClient.open(
            self.js,
            self.name,
            after=parse_cursor(after, f"stream {self.name!r}"),
            from_head=from_head,
            to_head=to_head,
            filter_subjects=self.filter_subjects,
            config=self.read,
            stream_id=stream_id,
            key_filter=key_filter,
        )

    @property
    def _nc(self) -> Client:
        return connection(self.js)

    def _too_large(self, index: int, foreign_id: str, data: bytes) -> InvalidEvent:
        return InvalidEvent(
            f"stream {self.name!r}: event #{index} (foreign id {foreign_id!r}) has {len(data)} bytes of"
            f" data, more than the server's max payload of {self._nc.max_payload} bytes with headers"
        )

    def _no_stream(self, subject: str) -> StreamError:
        return StreamNotFound(
            self.name,
            f"no stream answers on subject {subject!r} (does stream {self.name!r} exist and take that subject?)",
        )

    def _ack_seq(self, data: bytes, index: int, foreign_id: str, stored: int) -> int:
        seq = ack_seq(data)
        if seq is None:
            raise ack_error(data, self.name, index, foreign_id, stored=stored)
        return seq


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise InvalidEvent(f"event data must be bytes, not {type(data).__name__}")


def _partitions_of(info: api.StreamInfo) -> Partitions | None:
    raw = (info.config.metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        return Partitions(int(raw))
    except (ValueError, ConfigError):
        raise StreamConfigMismatch(
            f"stream {info.config.name!r}: metadata {METADATA_KEY}={raw!r} is not a partition count",
            stream=info.config.name or "",
        ) from None


def _config_differences(have: api.StreamConfig, want: api.StreamConfig, fields: Iterable[str]) -> list[str]:
    diffs = []
    for field in dict.fromkeys(fields):
        if not hasattr(want, field):
            continue
        a, b = getattr(have, field), getattr(want, field)
        if field == "subjects":
            a, b = sorted(a or []), sorted(b or [])
        if a != b:
            diffs.append(f"{field} is {a!r}, not {b!r}")
    return diffs
