"""The error tree: every exported error survives pickling with its message, fields and notes; cursor
errors say what to do in words and carry the data, and the command line renders the hint from it."""

from __future__ import annotations

import pickle
import threading

import click
import pytest
from click.testing import CliRunner

import rjet
import rjet.parallel
from rjet.cli._app import _Group
from rjet.cli._common import CliError, cursor_hint, error_hints
from rjet.parallel import ShardsFailed, Summary
from rjet.parallel._messages import pack_error, unpack_error

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


# Every error that says how to move a cursor on purpose, as raised with nothing known of the consumer,
# and as ``run`` raises it (named) for a store with a namespace, and for one without.
Movable = rjet.CursorExpired | rjet.StreamRecreated | rjet.CursorAhead
MOVES: list[tuple[Movable, str, str | None]] = [
    (rjet.CursorExpired("orders", 2, 10), "first", "orders"),
    (rjet.EventsRemoved("orders", 3, 9, certain=False), "9", "orders"),
    (rjet.StreamRecreated("orders", 4, "orders@a", "orders@b"), "beginning", None),
    (rjet.CursorAhead("orders", 12, 3), "beginning", None),
]


def _named(err: Movable, consumer: str, namespace: str | None) -> Movable:
    return err.named(consumer, namespace)


@pytest.mark.parametrize(("err", "move", "stream"), MOVES, ids=lambda e: type(e).__name__)
def test_cursor_errors_say_the_move_in_words_and_carry_it_as_data(err: Movable, move: str, stream: str | None) -> None:
    for e in (err, _named(err, "billing", "shop"), _named(err, "billing", None)):
        text = str(e)
        assert "rjet cursor" not in text
        assert "--set" not in text
        assert "--namespace" not in text
        assert "on purpose to go on: to " in text
        assert e.move == move
        assert e.stream == "orders"
        back = pickle.loads(pickle.dumps(e))
        assert vars(back) == vars(e)
        assert (back.consumer, back.namespace, back.move) == (e.consumer, e.namespace, move)
    assert (err.consumer, err.namespace) == (None, None)
    named = _named(err, "billing", "shop")
    assert type(named) is type(err)
    assert (named.consumer, named.namespace) == ("billing", "shop")
    assert "of consumer 'billing' (cursor namespace 'shop')" in str(named)
    where = f" --stream {stream}" if stream else ""
    assert cursor_hint(named) == f"rjet cursor billing --namespace shop --set {move}{where}"
    assert cursor_hint(err) == f"rjet cursor NAME --namespace NS --set {move}{where}"
    assert cursor_hint(_named(err, "billing", None)) is None  # a store rjet cursor cannot address


def test_the_fields_of_each_cursor_error() -> None:
    expired = rjet.CursorExpired("orders", 2, 10)
    assert (expired.stream, expired.cursor, expired.first_seq) == ("orders", 2, 10)
    assert str(expired).endswith("on purpose to go on: to the first retained event, sequence 10")
    removed = rjet.EventsRemoved("orders", 3, 9)
    assert (removed.first, removed.last, removed.cursor, removed.first_seq, removed.certain) == (3, 9, 2, 10, True)
    assert str(removed).endswith("on purpose to go on: to sequence 9, past the removed events")
    recreated = rjet.StreamRecreated("orders", 4, "orders@a", "orders@b", hint="more advice")
    assert (recreated.cursor, recreated.recorded, recreated.current) == (4, "orders@a", "orders@b")
    assert str(recreated).endswith("to the beginning (no cursor: the new stream from its first event) (more advice)")
    ahead = rjet.CursorAhead("orders", 12, 3).named("Billing", "shop")
    assert (ahead.cursor, ahead.last_seq) == (12, 3)
    assert "Move the cursor of consumer 'Billing' (cursor namespace 'shop') on purpose" in str(ahead)


def test_a_vanished_cursor_bucket_says_where_the_runner_was_and_the_command_line_renders_it() -> None:
    gone = rjet.CursorBucketGone(
        "cursor bucket 'rjet_cursors_shop': cursor 'c' vanished",
        name="c",
        bucket="rjet_cursors_shop",
        namespace="shop",
        cursor="19",
        stream="orders@2024",
    )
    assert "rjet cursor" not in str(gone)
    assert str(gone).endswith(
        "move the cursor of consumer 'c' (cursor namespace 'shop') on purpose to go on:"
        " to sequence 19 of stream 'orders', where this runner was"
    )
    assert (gone.name, gone.bucket, gone.namespace, gone.cursor, gone.stream, gone.move) == (
        "c", "rjet_cursors_shop", "shop", "19", "orders@2024", "19",
    )  # fmt: skip
    back = pickle.loads(pickle.dumps(gone))
    assert (str(back), vars(back)) == (str(gone), vars(gone))
    assert cursor_hint(gone) == "rjet cursor c --namespace shop --set 19 --stream orders"
    unknown = rjet.CursorBucketGone("gone", name="c", namespace="shop")
    assert unknown.move == ""
    assert str(unknown).endswith("to the last event this runner handled")
    assert cursor_hint(unknown) == "rjet cursor c --namespace shop --set SEQ --stream STREAM"
    assert cursor_hint(rjet.CursorBucketGone("gone", name="c", bucket="sqlite at x.db")) is None  # no namespace
    assert cursor_hint(rjet.CursorBucketGone("gone")) is None
    assert cursor_hint(rjet.CursorConflict("c", "another runner")) is None
    assert cursor_hint(ValueError("x")) is None


def test_the_command_line_shows_the_error_then_the_hint() -> None:
    group = _Group()

    @group.command()
    def boom() -> None:
        raise rjet.CursorExpired("orders", 2, 10).named("billing", "shop")

    @group.command()
    def other() -> None:
        raise rjet.CursorConflict("c", "another runner")

    result = CliRunner().invoke(group, ["boom"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "rjet: error: " + str(rjet.CursorExpired("orders", 2, 10).named("billing", "shop")),
        "rjet: hint: rjet cursor billing --namespace shop --set first --stream orders",
    ]
    result = CliRunner().invoke(group, ["other"])
    assert result.stderr.splitlines() == ["rjet: error: cursor 'c': another runner"]  # no hint
    assert isinstance(CliError("x"), click.ClickException)
    assert CliError("x").hints == ()


def _failed_shards() -> ShardsFailed:
    """Shards 1 and 3 of g (n=3) failed on cursor errors, shard 2 fenced; shard 3's error first, as
    errors may arrive in any order."""
    expired = rjet.CursorExpired("orders", 2, 10).named("g_3_of_3", "shop")
    gone = rjet.CursorBucketGone("gone", name="g_1_of_3", namespace="shop", cursor="19", stream="orders@2024")
    conflict = rjet.CursorConflict("g_2_of_3", "another runner")
    errors: dict[int, BaseException] = {2: expired, 0: gone, 1: conflict}
    failures = {m: f"failed: {e}" for m, e in errors.items()}
    return ShardsFailed(failures, frozenset({1}), Summary("g", 3, ()), errors=errors)


def test_shards_failed_carries_each_shard_s_error_through_pickle() -> None:
    failed = _failed_shards()
    back = pickle.loads(pickle.dumps(failed))
    assert (str(back), back.failures, back.fenced, back.summary) == (
        str(failed), failed.failures, failed.fenced, failed.summary,
    )  # fmt: skip
    assert sorted(back.errors) == [0, 1, 2]
    for m, err in failed.errors.items():  # errors compare by identity: compare what they carry
        assert (type(back.errors[m]), str(back.errors[m]), vars(back.errors[m])) == (type(err), str(err), vars(err))
    # Without errors (a shard whose error could not travel), the text is all there is.
    assert ShardsFailed({0: "failed: x"}, frozenset(), Summary("g", 1, ())).errors == {}


def test_an_error_that_cannot_travel_leaves_its_text_only() -> None:
    gone = rjet.CursorBucketGone("gone", name="c", namespace="shop", cursor="19")
    back = unpack_error(pack_error(gone))
    assert isinstance(back, rjet.CursorBucketGone)
    assert vars(back) == vars(gone)
    assert pack_error(None) == b""
    assert unpack_error(b"") is None
    unpicklable = rjet.ConfigError("holds a lock")
    unpicklable.lock = threading.Lock()  # type: ignore[attr-defined]
    assert pack_error(unpicklable) == b""
    # Pickled in the worker, but not to be rebuilt in the parent (a class it cannot import, say).
    assert unpack_error(pickle.dumps(_Unloadable())) is None
    assert unpack_error(pickle.dumps("not an error")) is None


class _Unloadable(Exception):
    def __reduce__(self) -> tuple[object, ...]:
        return (_refuse, ())


def _refuse() -> None:
    raise ImportError("no such module here")


def test_the_command_line_shows_one_hint_per_failed_shard_from_its_error() -> None:
    failed = _failed_shards()
    assert error_hints(failed) == (  # in shard order; none for the fenced shard (no move goes on)
        "rjet cursor g_1_of_3 --namespace shop --set 19 --stream orders",
        "rjet cursor g_3_of_3 --namespace shop --set first --stream orders",
    )
    assert error_hints(ShardsFailed({0: "failed: x"}, frozenset(), Summary("g", 1, ()))) == ()
    assert error_hints(rjet.CursorAhead("s", 9, 3)) == ("rjet cursor NAME --namespace NS --set beginning",)
    assert error_hints(ValueError("x")) == ()

    group = _Group()

    @group.command()
    def shards() -> None:
        raise failed

    result = CliRunner().invoke(group, ["shards"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"rjet: error: {failed}",
        "rjet: hint: rjet cursor g_1_of_3 --namespace shop --set 19 --stream orders",
        "rjet: hint: rjet cursor g_3_of_3 --namespace shop --set first --stream orders",
    ]
