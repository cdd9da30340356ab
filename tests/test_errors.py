"""The error tree: every exported error survives pickling with its message, fields and notes."""

from __future__ import annotations

import pickle

import pytest

import rjet
import rjet.parallel
from rjet.parallel import Summary

SAMPLES: list[Exception] = [
    rjet.RjetError("root"),
    rjet.HeadReached("s", 9),
    rjet.Stopped("stopped"),
    rjet.Tempted("tempted"),
    rjet.ConfigError("bad"),
    rjet.InvalidEvent("too large"),
    rjet.ConnectError("no server"),
    rjet.PermissionDenied("publish", "$KV.b.k"),
    rjet.StreamError("broken", stream="s"),
    rjet.StreamNotFound("s", "detail"),
    rjet.StreamConfigMismatch("differs", stream="s"),
    rjet.DecodeError("s", 7, "bad header"),
    rjet.InsertError("s", 3, "fid", "refused", stored=2),
    rjet.ConsumerLost("lost", stream="s"),
    rjet.CursorError("cursor"),
    rjet.InvalidCursor("x", "consumer 'c'"),
    rjet.CursorExpired("s", 2, 10, hint="h"),
    rjet.EventsRemoved("s", 3, 9, certain=False, hint="h"),
    rjet.CursorAhead("s", 12, 3),
    rjet.StreamRecreated("s", 4, "s@a", "s@b"),
    rjet.CursorConflict("c", "another runner"),
    rjet.CursorStoreError("store"),
    rjet.CursorBucketGone("gone"),
    rjet.CursorBucketUnusable("ttl"),
    rjet.parallel.ParallelError("group"),
    rjet.parallel.ReshardRefused("refused", {"g_1_of_2": "host pid 1"}),
    rjet.parallel.ShardsFailed({0: "fenced: x"}, frozenset({0}), Summary("g", 2, ())),
]


def test_the_samples_cover_every_exported_error() -> None:
    exported = {
        obj
        for mod in (rjet, rjet.parallel)
        for obj in (getattr(mod, n) for n in mod.__all__)
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    assert exported == {type(e) for e in SAMPLES}


@pytest.mark.parametrize("err", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_error_round_trips_through_pickle(err: Exception) -> None:
    err.add_note("rjet: a note added on the way")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.args == err.args
    assert vars(back) == vars(err)  # every field, and the notes
    assert back.__notes__ == ["rjet: a note added on the way"]
