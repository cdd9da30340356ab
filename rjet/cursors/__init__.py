"""Cursor stores: where a consumer's progress (the ID of the last event it handled) is kept.

:class:`CursorStore` is reflex's interface (get, set, flush); :class:`ClaimingCursorStore` adds
claims and declares its :class:`Capabilities` (fencing, exact progress); ``run``, the keyed scheduler
and ``Parallel`` use only these protocols. Two stores implement the whole contract:
:class:`MemCursorStore` (in memory: tests, throwaway consumers) and :class:`JetStreamCursorStore`
(a JetStream KV bucket, buffered). ``rjet.testing.check_cursor_store`` checks any store against it.

::

    rjet/cursors/
        _protocol.py           CursorStore, ClaimingCursorStore, Claim, Capabilities, runner_id
        _record.py             CursorRecord (what a cursor's key holds), cursor names as KV keys
        _memory.py             MemCursorStore
        _bucket.py             the cursor bucket: opening or creating it, what makes it unusable
        _jetstream.py          JetStreamCursorStore
        _jetstream_claim.py    its claims
        _jetstream_records.py  its reads and writes of the bucket, and what a failed one means
        _jetstream_batch.py    a flush of many cursors as one atomic batch
"""

from rjet.cursors._jetstream import JetStreamCursorStore, kv_keys
from rjet.cursors._jetstream_claim import JetStreamClaim
from rjet.cursors._memory import MemCursorStore
from rjet.cursors._protocol import (
    Capabilities,
    Claim,
    ClaimingCursorStore,
    CursorStore,
    FailingCursorStore,
    ProgressSource,
    TransactionalClaim,
    capabilities,
    claim_cursor,
    runner_id,
)
from rjet.cursors._record import RESERVED_PREFIX, CursorRecord, decode_key, encode_key

__all__ = [
    "RESERVED_PREFIX",
    "Capabilities",
    "Claim",
    "ClaimingCursorStore",
    "CursorRecord",
    "CursorStore",
    "FailingCursorStore",
    "JetStreamClaim",
    "JetStreamCursorStore",
    "MemCursorStore",
    "ProgressSource",
    "TransactionalClaim",
    "capabilities",
    "claim_cursor",
    "decode_key",
    "encode_key",
    "kv_keys",
    "runner_id",
]
