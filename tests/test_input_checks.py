"""Bad input is refused at the door: handler signatures when a consumer is built, and event types
outside 0..2**63-1 on every way in (``insert``, ``insert_many``, ``rjet insert``), by one check."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

import rjet
from rjet.server import EmbeddedServer

# ----------------------------------------------------------------- handler signatures


class _Handler:
    def __call__(self, fate: rjet.Fate, event: rjet.Event) -> None:
        pass

    def method(self, fate: rjet.Fate, event: rjet.Event) -> None:
        pass

    async def one(self, event: rjet.Event) -> None:
        pass


def _three(a: object, b: object, c: object = None) -> None:
    pass


def _one(event: rjet.Event) -> None:
    pass


async def _async_one(event: rjet.Event) -> None:
    pass


ACCEPTED: list[tuple[str, Callable[..., Any]]] = [
    ("lambda", lambda fate, event: None),
    ("*args", lambda *args: None),
    ("a default", _three),
    ("partial", functools.partial(lambda x, fate, event: None, 1)),
    ("bound method", _Handler().method),
    ("callable object", _Handler()),
    ("signature unreadable", dict.get),  # a C method descriptor: taken on trust
    ("optional keyword", lambda fate, event, *, retries=3: None),
]

REFUSED: list[tuple[str, Callable[..., Any]]] = [
    ("one argument", _one),
    ("async, one argument", _async_one),
    ("lambda e", lambda e: None),
    ("no arguments", lambda: None),
    ("three required", lambda a, b, c: None),
    ("partial binding both", functools.partial(lambda fate, event: None, 1)),
    ("bound async method of one", _Handler().one),
    ("required keyword", lambda fate, event, *, retries: None),
]


@pytest.mark.parametrize(("what", "fn"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_handlers_callable_as_fn_fate_event_are_accepted(what: str, fn: Callable[..., Any]) -> None:
    rjet.Consumer("c", fn)
    rjet.Consumer("c", fn, batch=rjet.Batch())
    rjet.Consumer("c", fn, concurrency=4)


@pytest.mark.parametrize(("what", "fn"), REFUSED, ids=[r[0] for r in REFUSED])
def test_handlers_of_another_shape_are_refused_with_the_expected_signature(what: str, fn: Callable[..., Any]) -> None:
    with pytest.raises(rjet.ConfigError, match=r"consumer 'c': handler .* cannot be called as fn\(fate, event\)") as e:
        rjet.Consumer("c", fn)
    assert "define [async] def fn(fate, event)" in str(e.value)
    with pytest.raises(rjet.ConfigError, match=r"cannot be called as fn\(fate, events\)") as e:
        rjet.Consumer("c", fn, batch=rjet.Batch())
    assert "define [async] def fn(fate, events)" in str(e.value)


def test_the_error_shows_the_handlers_signature() -> None:
    with pytest.raises(rjet.ConfigError, match=r"handler _one\(event: 'rjet.Event'\) cannot be called"):
        rjet.Consumer("c", _one)  # type: ignore[arg-type]


def test_rjet_worker_refuses_a_one_argument_handler_before_starting(tmp_path: Path) -> None:
    (tmp_path / "one_arg.py").write_text("def handle(event):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "rjet", "worker", "orders", "one_arg:handle", "--name", "g", "-n", "1",
         "--namespace", "ns", "--to-head", "-s", "nats://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # no traceback, no retries
    assert lines[0].startswith("rjet: error: one_arg:handle: handler handle(event) cannot be called as fn(fate, event)")


# ----------------------------------------------------------------- event types


BAD_TYPES: list[object] = [-1, 2**63, True, 1.0, "1"]


@pytest.mark.parametrize("bad", BAD_TYPES)
async def test_insert_refuses_types_outside_int64s_non_negative_range(
    js: JetStreamContext, stream: rjet.Stream, bad: object
) -> None:
    with pytest.raises(rjet.InvalidEvent, match=rf"event type must be an integer from 0 to 2\*\*63-1, not {bad!r}"):
        await stream.insert("k", bad)  # type: ignore[arg-type]
    with pytest.raises(rjet.InvalidEvent, match=rf"event #1: event type must be .*, not {bad!r}"):
        await stream.insert_many([("k", 1, b""), ("k", bad, b"")])  # type: ignore[list-item]
    with pytest.raises(rjet.InvalidEvent, match="event type"):
        await stream.insert_once("k", bad, msg_id="m")  # type: ignore[arg-type]
    assert (await js.stream_info(stream.name)).state.messages == 0  # nothing was stored


async def test_the_whole_range_is_stored(stream: rjet.Stream) -> None:
    await stream.insert("k", 0)
    await stream.insert_many([("k", 2**63 - 1, b"")])
    async with await stream.stream(to_head=True) as client:
        assert [e.type async for e in client] == [0, 2**63 - 1]


def _insert(*args: str, input: str | None = None, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["XDG_CONFIG_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "rjet", "insert", *args], input=input, capture_output=True, text=True, timeout=60,
        env=env,
    )  # fmt: skip


@pytest.mark.parametrize("bad", ["-1", str(2**63), "x"])
async def test_rjet_insert_refuses_a_type_option_outside_the_range(
    server: EmbeddedServer, js: JetStreamContext, stream: rjet.Stream, bad: str, tmp_path: Path
) -> None:
    proc = _insert(stream.name, "k", "--type", bad, "-s", server.url, home=tmp_path)
    assert proc.returncode == 2, proc.stderr
    want = f"not {bad}" if bad != "x" else "'x' is not an integer"
    assert proc.stderr.strip().startswith("rjet: error: --type: "), proc.stderr
    assert want in proc.stderr, proc.stderr
    # The default type of JSON lines is checked the same way, as is a line's own "type".
    proc = _insert(stream.name, "-s", server.url, input='{"foreign_id": "k", "type": 18446744073709551616}\n',
                   home=tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert '"type" must be an integer from 0 to 2**63-1, not 18446744073709551616' in proc.stderr
    assert (await js.stream_info(stream.name)).state.messages == 0
