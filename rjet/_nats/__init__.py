"""rjet's boundary with nats-py: the only package in rjet that touches nats-py's private internals.

rjet keeps nats-py's connection (auth, TLS, reconnects, cluster URLs) and talks JetStream over it;
where nats-py's public API costs a reader or a batch publish most of its time, rjet reaches past it.
Ruff's SLF001 (private member access) is allowed in this package only (``pyproject.toml``).

- :mod:`.client`: the seam: every read or write of a nats-py private attribute outside the parser,
  behind accessors, and :func:`~.client.fast_paths`, the probe of whether the fast paths may be used.
- :mod:`.parser`: :class:`~.parser.FastParser`, nats-py's protocol parser with a bulk lane that
  hands a subscription's frames over as raw bytes; and the raw header block kept with each message.
- :mod:`.frames`: the wire codec: JetStream reply subjects and acks, rjet's headers in raw frames,
  the frame pattern the bulk scanner matches (pure functions, no nats-py).
- :mod:`.publish`: pipelined raw ``HPUB`` publishes with their acks matched back (``insert_many``).
- :mod:`.denials`: ``-ERR`` permission violations told at once to the call that caused them.
- :mod:`.connect`: ``nats.connect`` with rjet's defaults and a clear error when no server answers.

The internals, and why: the connection's outgoing buffer (``_send_command``, ``_flush_pending``:
raw publishes and atomic cursor batches, one write for a window of frames); its parser object
(``_ps``, swapped for ``FastParser``, a subclass of nats-py's ``Parser`` that takes over its state
and calls the connection's ``_process_*`` handlers for every frame that is not its own: reads
without a ``Msg``, header dict or task switch per message); its
``_process_headers`` (wrapped to keep the raw block, so repeated and non-UTF-8 headers decode the
same on every path); its error callback (``_error_cb``, chained to see permission violations); a
subscription's ID (``_id``, the ``sid`` of its frames); a JetStream context's API prefix, timeout
and connection (``_prefix``, ``_timeout``, ``_nc``); a KV bucket's names (``_name``, ``_stream``,
``_pre``, ``_js``: raw cursor writes); and the request inbox (``_resp_sub_prefix``, ``_resp_map``,
``_subs``: requests failed at once when the server refuses to subscribe to it). rjet also keeps
its own per-connection state in the connection's ``__dict__`` (``_rjet_*``, :func:`~.client.attachment`).

:func:`~.client.fast_paths` says, once per connection, whether the fast paths may be used: nats-py
is a minor version rjet was tested against (``client.TESTED``) and has what they need.
``RJET_FAST_PATHS=0`` in the environment makes it say no (CI runs the suite both ways): the reader
uses an ordinary subscription, ``insert_many`` publishes through ``nc.publish`` and cursor flushes
write one key at a time; slower, same results. The raw-header wrap is not a fast path and stays on.

Nothing is re-exported here: import from the module that does the job.
"""
