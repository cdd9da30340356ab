"""The embedded server: a real nats-server on loopback, restartable on the same port and store."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import nats
import pytest

import rjet
from rjet.server import EmbeddedServer, ServerError, find_nats_server


def test_binary_is_found() -> None:
    assert find_nats_server().endswith("nats-server")


def test_non_loopback_hosts_are_refused() -> None:
    with pytest.raises(rjet.ConfigError, match="loopback"):
        EmbeddedServer(host="0.0.0.0")


def test_url_before_start_is_a_clear_error() -> None:
    srv = EmbeddedServer()
    try:
        with pytest.raises(ServerError, match="not been started"):
            _ = srv.url
    finally:
        srv.close()


def test_restart_keeps_port_and_data(own_server: EmbeddedServer) -> None:
    port = own_server.port
    assert own_server.url.startswith("nats://127.0.0.1:")

    async def insert() -> int:
        nc = await nats.connect(own_server.url)
        stream = await rjet.Stream.create(nc.jetstream(), "keep")
        seq = await stream.insert("k", 1)
        await nc.close()
        return seq

    async def last_seq() -> int:
        nc = await nats.connect(own_server.url)
        info = await nc.jetstream().stream_info("keep")
        await nc.close()
        return info.state.last_seq

    assert asyncio.run(insert()) == 1
    own_server.kill()
    assert not own_server.running
    own_server.start()
    assert own_server.port == port
    assert asyncio.run(last_seq()) == 1
    own_server.restart()
    assert asyncio.run(last_seq()) == 1


async def test_connect_to_a_dead_server_fails_clearly_within_the_timeout() -> None:
    srv = EmbeddedServer().start()
    url = srv.url
    srv.close()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(rjet.ConnectError, match=r"cannot connect to NATS at nats://127\.0\.0\.1:\d+ within 1s"):
        await rjet.connect(url, connect_timeout=1)
    assert loop.time() - t0 < 5


async def test_wrong_credentials_are_reported_as_such() -> None:
    with EmbeddedServer(extra_args=["--user", "u", "--pass", "right"]) as srv:
        with pytest.raises(rjet.ConnectError, match=r"(?i)authorization"):
            await rjet.connect(srv.url, user="u", password="wrong", connect_timeout=1)
        nc = await rjet.connect(srv.url, user="u", password="right")
        await nc.close()


def test_a_store_directory_is_created_and_reused_with_the_real_port(tmp_path: Path) -> None:
    store = tmp_path / "not" / "yet"  # was: an empty reason, because the directory did not exist
    with EmbeddedServer(store_dir=store):
        pass
    assert (store / "jetstream").is_dir()
    assert not list(store.glob("*.log"))  # logs are kept outside the user's store
    second = EmbeddedServer(store_dir=store)  # was: the previous run's port, read from its old log
    with second, socket.create_connection(("127.0.0.1", second.start().port), timeout=2) as conn:
        assert conn.recv(4).startswith(b"INFO")  # the port this run listens on


def test_a_store_directory_that_cannot_be_made_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ServerError, match="cannot use store directory"):
        EmbeddedServer(store_dir=blocker / "store").start()
