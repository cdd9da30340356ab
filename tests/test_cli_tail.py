"""``rjet tail``'s filters, positions, subjects and headers, undecodable messages, and nats contexts:
the real command in a subprocess against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from test_cli import follow_then_insert

import rjet
from rjet.server import EmbeddedServer


def _env(config_home: Path) -> dict[str, str]:
    # No NATS_* settings of the caller's, and the nats CLI's files of this test only, never ~/.config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env["XDG_CONFIG_HOME"] = str(config_home)
    return env


def _rjet(*args: str, config_home: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**_env(config_home), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rjet", *args], capture_output=True, text=True, timeout=60, env=env
    )  # fmt: skip


def _ids(proc: subprocess.CompletedProcess[str]) -> list[int]:
    assert proc.returncode == 0, proc.stderr
    return [int(line.split("\t", 1)[0]) for line in proc.stdout.splitlines()]


async def test_tail_type_and_foreign_id_filters(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("a", 1, b""), ("b", 1, b""), ("a", 2, b""), ("c", 3, b""), ("b", 3, b""), ("a", 4, b"")])
    proc = _rjet("tail", name, "--to-head", "--type", "1", "--type", "3", "--foreign-id", "a", "--foreign-id", "b",
                 "-s", server.url, config_home=tmp_path)  # fmt: skip
    assert _ids(proc) == [1, 2, 5]  # (type 1 or 3) and (a or b)


async def test_tail_since_starts_at_the_first_event_stored_then(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("a", 1, b"")] * 3)
    await asyncio.sleep(0.02)
    midway = datetime.now(UTC)
    await asyncio.sleep(0.02)
    await stream.insert_many([("a", 1, b"")] * 2)
    proc = _rjet("tail", name, "--to-head", "--since", midway.isoformat(), "-s", server.url, config_home=tmp_path)
    assert _ids(proc) == [4, 5]
    proc = _rjet("tail", name, "--since", "2026-01-01T00:00", "-s", server.url, config_home=tmp_path)
    assert proc.returncode == 2
    assert "give a time zone" in proc.stderr


async def test_tail_last_n_then_follows(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([(f"k{i}", 1, b"") for i in range(5)])
    args = ["tail", name, "--last", "2", "--limit", "3", "-s", server.url]
    code, out, err = await follow_then_insert(js, stream, args, _env(tmp_path), ("new", 2, b""))
    assert code == 0, err
    assert [line.split("\t")[0] for line in out.decode().splitlines()] == ["4", "5", "6"]


async def test_tail_last_counts_events_and_passes_a_deleted_one(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("a", 1, b"")] * 6)
    await js.delete_msg(name, 5)
    proc = _rjet("tail", name, "--to-head", "--last", "3", "-s", server.url, config_home=tmp_path)
    assert _ids(proc) == [3, 4, 6]
    assert "skipping events 5..5" in proc.stderr


async def test_tail_last_with_filters_counts_matching_events(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    """--last 3 --type 1 shows the last three events of type 1 (was: it counted the stream's last three
    events, none of type 1, and printed nothing)."""
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("a", 1, b"")] * 5 + [("b", 2, b"")] * 40)  # type 1 at 1..5
    proc = _rjet("tail", name, "--to-head", "--last", "3", "--type", "1", "-s", server.url, config_home=tmp_path)
    assert _ids(proc) == [3, 4, 5]
    proc = _rjet("tail", name, "--to-head", "--last", "2", "--foreign-id", "a", "-s", server.url, config_home=tmp_path)
    assert _ids(proc) == [4, 5]
    proc = _rjet("tail", name, "--to-head", "--last", "9", "--type", "1", "-s", server.url, config_home=tmp_path)
    assert _ids(proc) == [1, 2, 3, 4, 5]  # fewer match than asked: all of them


def test_tail_conflicting_positions_are_a_usage_error(tmp_path: Path) -> None:
    proc = _rjet("tail", "s", "--last", "3", "--since", "2026-01-01T00:00:00Z", config_home=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: give at most one of --after, --from-head, --cursor, --since and --last"], proc.stderr


async def test_tail_shows_subjects_and_headers(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert("a", 7, b"x", msg_id="m-1")
    proc = _rjet("tail", name, "--to-head", "--subject", "--headers", "-s", server.url, config_home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fields = proc.stdout.rstrip("\n").split("\t")
    assert fields[0] == "1"
    assert fields[2:4] == ["7", "a"]
    assert fields[4] == f"{name}.events"
    assert json.loads(fields[5]) == {"reflex_type": "7", "rjet_foreign_id": "a", "Nats-Msg-Id": "m-1"}
    assert fields[6] == "x"
    proc = _rjet("tail", name, "--to-head", "--json", "--headers", "-s", server.url, config_home=tmp_path)
    (line,) = map(json.loads, proc.stdout.splitlines())
    assert line["headers"]["Nats-Msg-Id"] == "m-1"
    assert "subject" not in line


async def test_tail_reports_an_undecodable_message_and_goes_on(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert("a", 1, b"before")
    await js.publish(f"{name}.events", b"not \x00 an event", headers={"reflex_type": "created"})
    await stream.insert("b", 1, b"after")
    proc = _rjet("tail", name, "--to-head", "-s", server.url, config_home=tmp_path)
    assert _ids(proc) == [1, 3]
    (report,) = proc.stderr.splitlines()
    assert report.startswith(f"rjet: tail: message 2 on subject '{name}.events' is not an rjet event (")
    assert "header reflex_type 'created' is not an integer" in report
    assert "data (14 bytes): not \\x00 an event" in report


# ----------------------------------------------------------------- nats contexts


def _context(config_home: Path, name: str, **settings: object) -> None:
    directory = config_home / "nats" / "context"
    directory.mkdir(parents=True, exist_ok=True)
    # As the nats CLI writes them: every field, the unset ones empty.
    fields = dict.fromkeys(("description", "url", "token", "user", "password", "creds", "nkey", "cert", "key",
                            "ca", "nsc", "jetstream_domain", "jetstream_api_prefix", "inbox_prefix"), "")  # fmt: skip
    (directory / f"{name}.json").write_text(json.dumps({**fields, **settings}))


@pytest.fixture(scope="module")
def auth_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(extra_args=["--user", "app", "--pass", "s3cret"]) as srv:
        yield srv


def test_context_by_name_gives_url_and_credentials(auth_server: EmbeddedServer, tmp_path: Path) -> None:
    url = auth_server.url
    _context(tmp_path, "dev", url=url, user="app", password="s3cret")
    proc = _rjet("insert", "ctx_s", "a", "--create", "--context", "dev", config_home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = _rjet("tail", "ctx_s", "--to-head", config_home=tmp_path, extra_env={"NATS_CONTEXT": "dev"})
    assert _ids(proc) == [1]
    # Explicit credentials win over the context's, as a whole.
    proc = _rjet("tail", "ctx_s", "--to-head", "--context", "dev", "--user", "app", "--password", "wrong",
                 "--connect-timeout", "1", config_home=tmp_path)  # fmt: skip
    assert proc.returncode == 1
    assert "nats context 'dev'" in proc.stderr


async def test_selected_context_is_used_and_options_win(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    await rjet.Stream.create(js, name)
    _context(tmp_path, "local", url=server.url)
    (tmp_path / "nats" / "context.txt").write_text("local\n")
    assert _ids(_rjet("tail", name, "--to-head", config_home=tmp_path)) == []
    # A context naming a server that is not there: --server and $NATS_URL still win.
    _context(tmp_path, "local", url="nats://127.0.0.1:1")
    assert _ids(_rjet("tail", name, "--to-head", "-s", server.url, config_home=tmp_path)) == []
    assert _ids(_rjet("tail", name, "--to-head", config_home=tmp_path, extra_env={"NATS_URL": server.url})) == []


def test_unknown_context_is_a_one_line_error(tmp_path: Path) -> None:
    proc = _rjet("tail", "s", "--context", "nope", config_home=tmp_path)
    assert proc.returncode == 1
    directory = tmp_path / "nats" / "context"
    assert proc.stderr.strip() == f"rjet: error: unknown nats context 'nope': no nope.json in {directory}"
    (tmp_path / "nats").mkdir(exist_ok=True)
    (tmp_path / "nats" / "context.txt").write_text("gone")
    proc = _rjet("status", "s", config_home=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"rjet: error: unknown nats context 'gone' (selected in {tmp_path / 'nats' / 'context.txt'}):"
        f" no gone.json in {directory}"
    )


async def test_tail_after_an_expired_cursor_names_the_cursor_in_its_hint(
    server: EmbeddedServer, name: str, js: JetStreamContext, tmp_path: Path
) -> None:
    stream = await rjet.Stream.create(js, name)
    await stream.insert_many([("k", 1, b"")] * 4)
    ns = f"ns_{name}"[:60]
    async with await rjet.JetStreamCursorStore.create(js, ns) as store:
        await store.set_cursor("billing", "1")
    await js.purge_stream(name, keep=1)  # events 2 and 3 are gone before the cursor's reader saw them
    proc = _rjet("tail", name, "--cursor", "billing", "--namespace", ns, "--to-head", "-s", server.url,
                 config_home=tmp_path)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    error, hint = proc.stderr.splitlines()[-2:]
    assert error.startswith("rjet: error: stream "), proc.stderr
    assert "has expired" in error  # the library's message, in words
    assert "rjet cursor" not in error
    assert hint == f"rjet: hint: rjet cursor billing --namespace {ns} --set first --stream {name}"  # was NAME, NS
