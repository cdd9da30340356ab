"""rjet on the wire, for tools of your own that talk to JetStream directly (the ``rjet`` command line
is one): rjet's header layout, and a JetStream API request that fails at once when refused.

``Stream.insert`` and the consumers do all of this for you; reach for it when a tool of yours
publishes with ``nc.publish``, reads a message back with ``js.get_msg``, or checks input before it
inserts. Every name here is the function rjet itself uses (re-exported from ``rjet._nats``), so a
tool decodes and encodes exactly as rjet and Go rjet do (``docs/interop.md``).

**The header layout.** An event is one JetStream message whose header block starts
``NATS/1.0``, then ``reflex_type: <type>`` (:data:`rjet.event.TYPE_HEADER`, a decimal integer),
``rjet_foreign_id: <foreign ID>`` (:data:`rjet.event.FOREIGN_ID_HEADER`, percent-encoded UTF-8), and
``Nats-Msg-Id: <id>`` when de-duplicated; the body is the event's metadata.

:func:`encode_header_block` writes that block (for a raw ``HPUB``, or to size a message before it is
sent); it checks what :func:`check_type` checks, and refuses an empty foreign ID:

>>> encode_header_block("café 1", 7)
b'NATS/1.0\\r\\nreflex_type: 7\\r\\nrjet_foreign_id: caf%C3%A9%201\\r\\n\\r\\n'
>>> len(encode_header_block("k", 1, "order-1"))  # + len(body): the message's size against max_payload
70

:func:`check_type` gives back an event type rjet may store (an int from 0 to 2**63-1), or raises
:class:`rjet.InvalidEvent` naming the value; its second argument names the value in the error:

>>> check_type(7)
7
>>> check_type(-1, '"type"')
Traceback (most recent call last):
...
rjet.errors.InvalidEvent: "type" must be an integer from 0 to 2**63-1, not -1

:func:`rjet_headers` takes a raw header block (``msg.hdrs`` of ``js.get_msg``, base64-decoded where
nats-py left it encoded) and gives back the raw values of the type and foreign-ID headers, ``None``
for one that is absent; the first of a repeated header wins, as Go's ``Header.Get``:

>>> rjet_headers(b"NATS/1.0\\r\\nreflex_type: 7\\r\\nrjet_foreign_id: caf%C3%A9\\r\\n\\r\\n")
(b'7', b'caf%C3%A9')
>>> rjet_headers(b"NATS/1.0\\r\\nX-Other: 1\\r\\nreflex_type: 5\\r\\nreflex_type: 6\\r\\n\\r\\n")
(b'5', None)

:func:`decode_type` and :func:`foreign_id_of` decode those values as Go rjet does, raising
:class:`rjet.DecodeError` that names the stream and sequence of a message they cannot decode. An
absent or empty type is 0; an absent foreign ID is the message's subject (the caller's part):

>>> decode_type(b"7", "orders", 12), decode_type(None, "orders", 12)
(7, 0)
>>> foreign_id_of(b"caf%C3%A9", "orders", 12)
'café'
>>> decode_type(b"created", "orders", 12)
Traceback (most recent call last):
...
rjet.errors.DecodeError: stream 'orders' sequence 12: header reflex_type 'created' is not an integer

**A guarded request.** nats-server answers a request the user may not make with a permissions
violation and nothing else, so nats-py's request waits out its whole timeout and ends as a bare
timeout. :func:`guard_api` awaits a JetStream API request about a stream (its info, a message get,
a consumer create or delete...) and raises :class:`rjet.PermissionDenied`, naming the refused
subject, as soon as the server refuses it (the request is then cancelled)::

    try:
        msg = await guard_api(js, "orders", js.get_msg("orders", 12))
    except rjet.PermissionDenied as e:
        print(f"not allowed: {e.subject}")
"""

from __future__ import annotations

from rjet._nats.denials import guard_api
from rjet._nats.frames import check_type, decode_type, encode_header_block, foreign_id_of, rjet_headers

__all__ = ["check_type", "decode_type", "encode_header_block", "foreign_id_of", "guard_api", "rjet_headers"]
