"""rjet: reflex-style ordered, at-least-once, resumable consumption of NATS JetStream streams.

::

    import rjet

    nc = await rjet.connect("nats://127.0.0.1:4222")
    stream = await rjet.Stream.create(nc.jetstream(), "orders")
    await stream.insert("order-17", 1, b"{}")

    async with await rjet.JetStreamCursorStore.create(nc.jetstream(), "shop") as cursors:
        consumer = rjet.Consumer("mailer", lambda fate, event: print(event))
        await rjet.run_forever(rjet.Spec(stream.stream, cursors, consumer))
"""

from rjet._nats.connect import connect
from rjet.consumer import Batch, BatchHandler, Consumer, Handler
from rjet.cursors import CursorRecord, CursorStore, FailingCursorStore, JetStreamCursorStore, MemCursorStore
from rjet.deadletter import DeadLetter, DeadLetterRecord, DeadLetterStream
from rjet.errors import (
    ConfigError,
    ConnectError,
    ConsumerLost,
    CursorAhead,
    CursorBucketGone,
    CursorBucketUnusable,
    CursorConflict,
    CursorError,
    CursorExpired,
    CursorStoreError,
    DecodeError,
    EventsRemoved,
    HeadReached,
    InsertError,
    InvalidCursor,
    InvalidEvent,
    PermissionDenied,
    RjetError,
    Stopped,
    StreamConfigMismatch,
    StreamError,
    StreamNotFound,
    StreamRecreated,
    Tempted,
    is_expected,
    is_permanent,
)
from rjet.event import Event
from rjet.fate import ALWAYS, NEVER, Fate, FixedFate, RandomFate
from rjet.otel import use_tracer_provider
from rjet.partitions import Partitions
from rjet.reader import ReadConfig, ShardFilter, StreamClient
from rjet.retry import RetryPolicy
from rjet.run import Spec, StreamClientLike, StreamFunc, run, run_forever
from rjet.stats import ConsumerStats, StatsSnapshot
from rjet.stream import Stream

__all__ = [
    "ALWAYS",
    "NEVER",
    "Batch",
    "BatchHandler",
    "ConfigError",
    "ConnectError",
    "Consumer",
    "ConsumerLost",
    "ConsumerStats",
    "CursorAhead",
    "CursorBucketGone",
    "CursorBucketUnusable",
    "CursorConflict",
    "CursorError",
    "CursorExpired",
    "CursorRecord",
    "CursorStore",
    "CursorStoreError",
    "DeadLetter",
    "DeadLetterRecord",
    "DeadLetterStream",
    "DecodeError",
    "Event",
    "EventsRemoved",
    "FailingCursorStore",
    "Fate",
    "FixedFate",
    "Handler",
    "HeadReached",
    "InsertError",
    "InvalidCursor",
    "InvalidEvent",
    "JetStreamCursorStore",
    "MemCursorStore",
    "Partitions",
    "PermissionDenied",
    "RandomFate",
    "ReadConfig",
    "RetryPolicy",
    "RjetError",
    "ShardFilter",
    "Spec",
    "StatsSnapshot",
    "Stopped",
    "Stream",
    "StreamClient",
    "StreamClientLike",
    "StreamConfigMismatch",
    "StreamError",
    "StreamFunc",
    "StreamNotFound",
    "StreamRecreated",
    "Tempted",
    "connect",
    "is_expected",
    "is_permanent",
    "run",
    "run_forever",
    "use_tracer_provider",
]

__version__ = "0.1.0"
