"""The stream reader: an ordered reader of a JetStream stream over an ephemeral pull consumer.

::

    async with await StreamClient.open(js, "orders", after=41, to_head=True) as client:
        async for event in client:
            ...

(:meth:`rjet.Stream.stream` opens one for a bound stream.) How it stays ordered and loses nothing:

- It creates an ephemeral consumer (AckPolicy NONE, memory storage) starting right after the last
  stream sequence it took, and feeds it explicit pull requests (``CONSUMER.MSG.NEXT``) into one
  subscription, keeping at most ``max_buffered`` messages, and about ``max_buffered_bytes`` bytes,
  requested or held (requests carry ``max_bytes``; one larger event is asked for alone).
- Duplicates are dropped by STREAM sequence (never by consumer sequence, which restarts at 1 with a
  new consumer). A consumer-sequence jump inside one consumer means a message was lost in transit:
  the client recovers, which is always the same move: a new consumer from ``last + 1``.
- Pull requests carry idle heartbeats; no traffic for three heartbeats while a pull is open (server
  restart, consumer deleted or reaped, connection cut), a 409/503 status (but the two that end a
  request with ``max_bytes``: full, or the next message too large), a gap, or a reconnect (what
  the server sent on the lost connection is gone, and a consumer that has sent everything shows no
  gap while its pull request's heartbeats go on) all trigger recovery.
  Recovery re-checks the stream first, so events that expired meanwhile raise :class:`rjet.CursorExpired`
  instead of being skipped, and a stream created again raises :class:`rjet.StreamRecreated`.
- Events removed ahead of the reader raise :class:`rjet.EventsRemoved` (or are skipped on purpose).

The jobs, one module each, over one shared :class:`~rjet.reader._state.ReadState`:

- ``_client.py``: :class:`StreamClient`, the client loop (open, ``next_or_skip``/``take``, close);
- ``_base.py``: what it shares with :class:`rjet.testing.MemoryStreamClient` (``recv``, iteration, ``async with``);
- ``_session.py``: the consumer's session: create, pull flow control, statuses, watchdog, recovery;
- ``_scan.py``: the intake: frames into the buffer, one by one or in bulk off the fast lane;
- ``_gaps.py``: gap verification (removed events, held frames of filtered readers, a to_head tail);
- ``_decode.py``: a buffered frame into an :class:`rjet.Event`.

Public here: :class:`ReadConfig`, :class:`StreamClient`, :class:`ShardFilter`.
"""

from rjet.reader._client import StreamClient
from rjet.reader._config import ReadConfig
from rjet.reader._filter import ShardFilter
from rjet.reader._session import identity as stream_identity

__all__ = ["ReadConfig", "ShardFilter", "StreamClient", "stream_identity"]
