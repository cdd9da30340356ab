"""Key-ordered concurrency: many handler calls in flight, one at a time per foreign ID.

``run`` hands a consumer with ``concurrency`` > 1, a :class:`rjet.Batch` or ``on_error="retry"``
to :class:`KeyedRun`. One reader (the caller's task) takes events from the stream client in order
and queues each behind the earlier events of its foreign ID; ``concurrency`` worker tasks take work,
handle it, and mark it done in a :class:`rjet._progress.Progress`, whose watermark is the cursor and
whose done set above it is stored with it (exact progress).

A key is in ``KeyedRun._queues`` while it has events waiting, in flight or waiting to be tried
again. It is *ready* (may start) while it has events waiting and none in flight or waiting to retry:
in ``KeyedRun._ready`` (a FIFO of keys) without batches; with batches, in ``Batches.heap`` (keys by
their oldest waiting event) and not in ``Batches.held``. Those are the whole per-key ordering rule.

Work whose call fails is *parked*: it gets a due time (the consumer's :class:`rjet.RetryPolicy`) and
a timer that hands it back to the workers in ``Failures.due`` then; its keys stay held, no worker
waits for it, and the cursor never passes it. Workers take due work first, then ready keys.

Batches are assembled per key, oldest events first: a batch takes the oldest waiting event of the
ready keys, again and again (a merge by stream sequence), up to ``max_len``; every key it took an
event of is held until it is done, the others form other batches, up to ``concurrency`` in flight.
A batch goes as soon as ``max_len`` events are ready, or ``max_wait`` after the oldest ready key's
first event was read (or its key's last batch finished), or at once once a ``to_head`` run has
read everything.

One signal ends it: a stop request, a lost claim, a failure (``KeyedRun._gated``). Every worker
looks at it right before it starts a call (or hands a batch over; a thread of the pool looks again
before it calls a sync handler): after it is set, no call starts. Calls in flight finish, the
progress is flushed, and ``run`` raises why.

Bounds: at most ``concurrency`` calls in flight; at most ``max_waiting`` events (and
``max_waiting_bytes``) read and not started; and the encoded done set that reading adds at most
:data:`rjet._keyed._run.PROGRESS_LIMIT` bytes (the restored entries not reached yet are left out:
they never block the reader, and shrink as it goes). Reading pauses at any of them (a hot key fills
the queue and so slows reading; a stuck key at the watermark makes the done set grow until reading
pauses; the events of keys waiting to retry count as waiting): back-pressure, never loss.

The parts, one module each, owned by :class:`KeyedRun`:

- ``_run.py``: :class:`KeyedRun`: the reader, the workers (the hot path), the saver, the end;
- ``_batches.py``: ``Batches``: the ready keys of a batched run and the batches taken of them;
- ``_failures.py``: ``Failures``: failed work parked until its due time, dead letters, ``Abort``;
- ``_calls.py``: ``Calls``: one handler call, on the loop or in a thread of the run's pool.
"""

from rjet._keyed._failures import Abort
from rjet._keyed._run import KeyedRun

__all__ = ["Abort", "KeyedRun"]
