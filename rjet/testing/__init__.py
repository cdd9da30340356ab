"""Helpers for testing code built on rjet, and for testing what rjet lets users plug in.

- :class:`MemoryStream`: a stream in memory for handler tests without a nats-server, held to the real
  :class:`rjet.Stream` by :func:`check_stream`; with :meth:`~MemoryStream.remove_through` (retention,
  a purge) and :meth:`~MemoryStream.recreate` (a stream deleted and created again).
  :class:`MemoryDeadLetterStream` records dead letters into one. (``rjet.MemCursorStore`` is its
  cursor store: it records the stream each cursor counts in, as ``JetStreamCursorStore`` does.)
- :class:`FakeClock`: virtual time on the running event loop, so ``lag``, backoff and timeouts take no
  real time (``async with FakeClock() as clock:``).
- :func:`check_stream`: the conformance suite that compares a stream (a MemoryStream, a real one)
  with what a real :class:`rjet.Stream` does.
- :func:`wait_until`: wait for a condition with a deadline, instead of sleeping a guessed time.
- :class:`KeyOrder`: the per-key order check of at-least-once handling (what ``rjet demo`` checks):
  feed it every handled ``(sequence, key)``; it counts duplicates (redeliveries) and order violations.
- :func:`check_cursor_store`: the conformance check of the cursor-store contract (get/set/flush, and
  for a :class:`rjet.cursors.ClaimingCursorStore` its claims, by the capabilities it declares:
  fencing, exact progress, the stream identity); run it over your own store
  (``await check_cursor_store(make_store)``) in your tests.

::

    from rjet.testing import KeyOrder, MemoryStream, wait_until

    ms = MemoryStream()
    await ms.insert_many([("order-1", 1, b"{}"), ("order-2", 1, b"{}")])
    order = KeyOrder()
    consumer = rjet.Consumer("c", lambda fate, e: order.record(e.id_int, e.foreign_id))
    with pytest.raises(rjet.HeadReached):
        await rjet.run(rjet.Spec(ms.stream, rjet.MemCursorStore(), consumer, to_head=True))
    order.check([1, 2])  # AssertionError naming the first violation, or an event never handled
"""

from rjet.testing._clock import FakeClock
from rjet.testing._conformance import ConformingClient, ConformingStream, StreamFactory, check_stream
from rjet.testing._cursor_store import check_cursor_store
from rjet.testing._helpers import KeyOrder, wait_until
from rjet.testing._memory import MemoryDeadLetterStream, MemoryStream, MemoryStreamClient

__all__ = [
    "ConformingClient",
    "ConformingStream",
    "FakeClock",
    "KeyOrder",
    "MemoryDeadLetterStream",
    "MemoryStream",
    "MemoryStreamClient",
    "StreamFactory",
    "check_cursor_store",
    "check_stream",
    "wait_until",
]
