# ruff: noqa: E501
"""What a real :class:`rjet.Stream` on a nats-server (2.15.1) does in each scenario of
``rjet/testing/_conformance.py``: the transcripts :func:`rjet.testing.check_stream` compares with.

Written down from a run on a real server (``tests/test_stream_conformance.py`` checks that it still
is what a real server does); change a scenario and its transcript together.
"""

from typing import Final


def _lines(text: str) -> list[str]:
    return text.strip("\n").split("\n")


EXPECTED: Final[dict[str, list[str]]] = {
    "inserts": _lines(
        r"""
insert a/1 -> 1
insert_many 3 -> [2, 3, 4]
insert_once m -> (5, True)
insert_once m again -> (5, False)
insert m again, padded -> 5
insert_many with m and n -> [5, 6, 7]
insert_many [] -> []
insert_many from a generator -> [8, 9]
insert empty foreign id -> InvalidEvent: foreign id is empty: every rjet event names the entity it is about
insert type -1 -> InvalidEvent: event type must be an integer from 0 to 2**63-1, not -1
insert type True -> InvalidEvent: event type must be an integer from 0 to 2**63-1, not True
insert type 2**63 -> InvalidEvent: event type must be an integer from 0 to 2**63-1, not 9223372036854775808
insert foreign id 7 -> InvalidEvent: foreign id must be a str, not int: 7
insert str data -> InvalidEvent: event data must be bytes, not str
insert blank msg_id -> InvalidEvent: msg_id ' ' must be non-empty text on one line
insert msg_id with a newline -> InvalidEvent: msg_id 'a\nb' must be non-empty text on one line
insert surrogate foreign id -> InvalidEvent: foreign id '\udc80' is not valid Unicode text: surrogates not allowed
insert 1 MiB -> InvalidEvent: stream '<stream>': event #0 (foreign id 'a') has 1048576 bytes of data, more than the server's max payload of 1048576 bytes with headers
insert_many bad #1 -> InvalidEvent: stream '<stream>': event #1: foreign id is empty: every rjet event names the entity it is about
insert_many bad type #2 -> InvalidEvent: stream '<stream>': event #2: event type must be an integer from 0 to 2**63-1, not -5
insert_many str data #1 -> InvalidEvent: event data must be bytes, not str
insert_many too large #1 -> InvalidEvent: stream '<stream>': event #1 (foreign id 'a') has 1048576 bytes of data, more than the server's max payload of 1048576 bytes with headers
insert after the refusals -> 10
open to_head -> open, head 11
  event 1 type=1 fid='a' data=b'x'
  event 2 type=0 fid='ü/ key*' data=b''
  event 3 type=9223372036854775807 fid='b' data=b'\x00\xff'
  event 4 type=3 fid=' spaced ' data=b'{}'
  event 5 type=1 fid='a' data=b''
  event 6 type=1 fid='a' data=b''
  event 7 type=1 fid='a' data=b''
  event 8 type=0 fid='g0' data=b''
  event 9 type=1 fid='g1' data=b''
  event 10 type=9 fid='z' data=b''
  event 11 type=1 fid='t' data=b''
  last timestamp within its insert: True
  timestamps in order: True
"""
    ),
    "reading": _lines(
        r"""
empty: open to_head -> open, head 0
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 0 delivered)
empty: open after 1 -> CursorAhead: stream '<stream>': cursor 1 is past the stream's last sequence 0; was the stream recreated? Move the cursor on purpose to go on: to the beginning (no cursor: the stream from its first event)
open after '' to_head -> open, head 5
  event 1 type=1 fid='a' data=b'1'
  event 2 type=1 fid='b' data=b'2'
  event 3 type=2 fid='a' data=b'3'
  event 4 type=2 fid='b' data=b'4'
  event 5 type=1 fid='c' data=b'5'
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 5 delivered)
open after 2 to_head -> open, head 5
  event 3 type=2 fid='a' data=b'3'
  event 4 type=2 fid='b' data=b'4'
  event 5 type=1 fid='c' data=b'5'
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 5 delivered)
open after 5 to_head -> open, head 5
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 5 delivered)
open after 6 -> CursorAhead: stream '<stream>': cursor 6 is past the stream's last sequence 5; was the stream recreated? Move the cursor on purpose to go on: to the beginning (no cursor: the stream from its first event)
open after x -> InvalidCursor: stream '<stream>': cursor 'x' is not a stream sequence (a decimal integer >= 0)
open after -1 -> InvalidCursor: stream '<stream>': cursor '-1' is not a stream sequence (a decimal integer >= 0)
open after 1.0 -> InvalidCursor: stream '<stream>': cursor '1.0' is not a stream sequence (a decimal integer >= 0)
open from_head to_head -> open, head 5
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 5 delivered)
open key a to_head -> open, head 5
  event 1 type=1 fid='a' data=b'1'
  event 3 type=2 fid='a' data=b'3'
  passed over other keys through 5
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 5 delivered)
open from_head -> open, head 5
  waits (nothing within 0.3s)
insert while it waits -> 6
  event 6 type=1 fid='d' data=b'6'
  num_pending 0, last_sequence 6
  recv -> Stopped: stream '<stream>': the stream client is closed
open after 3 (no to_head) -> open, head 6
  event 4 type=2 fid='b' data=b'4'
  event 5 type=1 fid='c' data=b'5'
  event 6 type=1 fid='d' data=b'6'
  waits (nothing within 0.3s)
insert 7 -> 7
  event 7 type=1 fid='e' data=b'7'
  waits (nothing within 0.3s)
"""
    ),
    "removal": _lines(
        r"""
removed through 3
open after '' to_head -> open, head 10
  event 4 type=1 fid='k' data=b''
  event 5 type=1 fid='k' data=b''
open after 2 -> CursorExpired: stream '<stream>': cursor 2 has expired: the stream's first retained sequence is 4, so events 3..3 are gone; move the cursor on purpose to go on: to the first retained event, sequence 4
open after 1 -> CursorExpired: stream '<stream>': cursor 1 has expired: the stream's first retained sequence is 4, so events 2..3 are gone; move the cursor on purpose to go on: to the first retained event, sequence 4
open after 3 to_head -> open, head 10
  event 4 type=1 fid='k' data=b''
removed through 2 (again: nothing)
open after 2 -> CursorExpired: stream '<stream>': cursor 2 has expired: the stream's first retained sequence is 4, so events 3..3 are gone; move the cursor on purpose to go on: to the first retained event, sequence 4
removed through 10 (all)
open after '' to_head -> open, head 10
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 10 delivered)
open after 9 -> CursorExpired: stream '<stream>': cursor 9 has expired: the stream's first retained sequence is 11, so events 10..10 are gone; move the cursor on purpose to go on: to the first retained event, sequence 11
open after 10 to_head -> open, head 10
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 10 delivered)
insert -> 11
removed through 20 (past the end)
open after 11 -> CursorExpired: stream '<stream>': cursor 11 has expired: the stream's first retained sequence is 21, so events 12..20 are gone; move the cursor on purpose to go on: to the first retained event, sequence 21
open after 20 -> open, head 20
open after 21 -> CursorAhead: stream '<stream>': cursor 21 is past the stream's last sequence 20; was the stream recreated? Move the cursor on purpose to go on: to the beginning (no cursor: the stream from its first event)
insert -> 21
insert_once d -> (22, True)
removed through 22
insert_once d again (the window outlives a removal) -> (22, False)
empty stream: removed through 4
insert -> 5
"""
    ),
    "removed_while_reading": _lines(
        r"""
batch 2, max_buffered 2, on_removed=raise
open after '' -> open, head 10
  event 1 type=1 fid='k' data=b''
removed through 6
  event 2 type=1 fid='k' data=b''
  event 3 type=1 fid='k' data=b''
  recv -> EventsRemoved: stream '<stream>': events 4..6 were removed (retention limits, a purge or a delete) before this reader got to them; every event before 4 was delivered, none after 6; move the cursor on purpose to go on: to sequence 6, past the removed events
  recv -> EventsRemoved: stream '<stream>': events 4..6 were removed (retention limits, a purge or a delete) before this reader got to them; every event before 4 was delivered, none after 6; move the cursor on purpose to go on: to sequence 6, past the removed events
open after 3 -> CursorExpired: stream '<stream>': cursor 3 has expired: the stream's first retained sequence is 7, so events 4..6 are gone; move the cursor on purpose to go on: to the first retained event, sequence 7
open after 6 to_head -> open, head 10
  event 7 type=1 fid='k' data=b''
  event 8 type=1 fid='k' data=b''
  event 9 type=1 fid='k' data=b''
  event 10 type=1 fid='k' data=b''
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 10 delivered)
batch 2, max_buffered 2, on_removed=skip
open after '' -> open, head 10
  event 1 type=1 fid='k' data=b''
removed through 6
  event 2 type=1 fid='k' data=b''
  event 3 type=1 fid='k' data=b''
  skipped removed 4..6 (certain=True)
  event 7 type=1 fid='k' data=b''
  event 8 type=1 fid='k' data=b''
  event 9 type=1 fid='k' data=b''
  event 10 type=1 fid='k' data=b''
open after 3 -> CursorExpired: stream '<stream>': cursor 3 has expired: the stream's first retained sequence is 7, so events 4..6 are gone; move the cursor on purpose to go on: to the first retained event, sequence 7
open after 6 to_head -> open, head 10
  event 7 type=1 fid='k' data=b''
  event 8 type=1 fid='k' data=b''
  event 9 type=1 fid='k' data=b''
  event 10 type=1 fid='k' data=b''
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 10 delivered)
batch 2, max_buffered 2: what a reader fetched before a removal it still delivers
open after '' -> open, head 6
  event 1 type=1 fid='k' data=b''
removed through 3
  event 2 type=1 fid='k' data=b''
  event 3 type=1 fid='k' data=b''
  event 4 type=1 fid='k' data=b''
  event 5 type=1 fid='k' data=b''
  event 6 type=1 fid='k' data=b''
  waits (nothing within 0.3s)
batch 1, max_buffered 1: a to_head reader whose remaining events are removed
open to_head -> open, head 10
  event 1 type=1 fid='k' data=b''
removed through 10
  event 2 type=1 fid='k' data=b''
  waits (nothing within 0.3s)
insert -> 11
  recv -> EventsRemoved: stream '<stream>': events 3..10 were removed (retention limits, a purge or a delete) before this reader got to them; every event before 3 was delivered, none after 10; move the cursor on purpose to go on: to sequence 10, past the removed events
"""
    ),
    "recreate": _lines(
        r"""
insert_once r -> (4, True)
open to_head -> open, head 4
  stream_id <id1>
recreated
open after 4 -> CursorAhead: stream '<stream>': cursor 4 is past the stream's last sequence 0; was the stream recreated? Move the cursor on purpose to go on: to the beginning (no cursor: the stream from its first event)
open after 4 in the old stream -> StreamRecreated: stream '<stream>': cursor 4 was recorded in stream <id1>, but the stream now is <id2> (deleted and created again): its sequences are not the old ones; move the cursor on purpose to go on: to the beginning (no cursor: the new stream from its first event)
insert_once r (a new stream forgets) -> (1, True)
open after 4 in the old stream -> StreamRecreated: stream '<stream>': cursor 4 was recorded in stream <id1>, but the stream now is <id2> (deleted and created again): its sequences are not the old ones; move the cursor on purpose to go on: to the beginning (no cursor: the new stream from its first event)
open after 4 (no stream_id: no check) -> open, head 6
  stream_id <id2>
  event 5 type=2 fid='k' data=b'new'
  event 6 type=2 fid='k' data=b'new'
  waits (nothing within 0.3s)
open after '' in the old stream -> open, head 6
  event 1 type=1 fid='k' data=b''
open from_head -> open, head 6
  recv -> HeadReached: stream '<stream>': head reached (every event up to sequence 6 delivered)
"""
    ),
    "runs": _lines(
        r"""
run plain -> HeadReached: stream '<stream>': head reached (every event up to sequence 6 delivered)
  handled ['1', '2', '3', '4', '5', '6'], cursor '6'
run types -> HeadReached: stream '<stream>': head reached (every event up to sequence 6 delivered)
  handled ['2', '4', '6'], cursor '6'
run key -> HeadReached: stream '<stream>': head reached (every event up to sequence 6 delivered)
  handled ['1', '4'], cursor '6'
run key_c -> HeadReached: stream '<stream>': head reached (every event up to sequence 6 delivered)
  handled ['3', '6'], cursor '6'
run conc -> HeadReached: stream '<stream>': head reached (every event up to sequence 6 delivered)
  handled ['1', '2', '3', '4', '5', '6'], cursor '6'
run batch -> HeadReached: stream '<stream>': head reached (every event up to sequence 6 delivered)
  handled ['1', '2', '3', '4', '5', '6'], cursor '6'
removed through 3
run late -> CursorExpired: stream '<stream>': cursor 1 has expired: the stream's first retained sequence is 4, so events 2..3 are gone; move the cursor of consumer 'late' on purpose to go on: to the first retained event, sequence 4
  handled [], cursor '1'
run ahead -> CursorAhead: stream '<stream>': cursor 9 is past the stream's last sequence 6; was the stream recreated? Move the cursor of consumer 'ahead' on purpose to go on: to the beginning (no cursor: the stream from its first event)
  handled [], cursor '9'
run again -> HeadReached: stream '<other>': head reached (every event up to sequence 3 delivered)
  handled ['1', '2', '3'], cursor '3'
recreated
run again -> StreamRecreated: stream '<other>': cursor 3 was recorded in stream <id1>, but the stream now is <id2> (deleted and created again): its sequences are not the old ones; move the cursor of consumer 'again' on purpose to go on: to the beginning (no cursor: the new stream from its first event)
  handled [], cursor '3'
run again -> HeadReached: stream '<other>': head reached (every event up to sequence 5 delivered)
  handled ['1', '2', '3', '4', '5'], cursor '5'
"""
    ),
    "failures": _lines(
        r"""
run_forever with a tempted event: handled ['1', '2', '2', '3', '4'], cursor '4'
run dl -> HeadReached: stream '<stream>': head reached (every event up to sequence 4 delivered)
  handled ['1', '2', '2', '3', '4'], cursor '4'
run dl_conc -> HeadReached: stream '<stream>': head reached (every event up to sequence 4 delivered)
  handled ['1', '2', '2', '2', '3', '4'], cursor '4'
run without a dead letter: handled ['1', '2'], cursor '1'
dead letter 1 fid='b' type=2 {"consumer": "dl", "stream": "<stream>", "event_id": "2", "type": 2, "foreign_id": "b", "error": "ValueError: cannot handle 2", "attempts": 2, "metadata": "2"}
dead letter 2 fid='b' type=2 {"consumer": "dl_conc", "stream": "<stream>", "event_id": "2", "type": 2, "foreign_id": "b", "error": "ValueError: cannot handle 2", "attempts": 3, "metadata": "2"}
"""
    ),
}
