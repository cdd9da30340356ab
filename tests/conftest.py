"""Fixtures: real nats-server processes on free loopback ports, with temporary storage."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

import rjet
from rjet.server import EmbeddedServer

_names = itertools.count(1)


# Whole files of process, fault and benchmark tests: `pytest -m "not slow"` is the quick loop (about
# four minutes on 2 cores); `pytest -n 2` (the README's, and CI's) runs everything.
_SLOW_FILES = (
    "faults/", "test_parallel.py", "test_cli.py", "test_benchmarks.py", "test_deploy.py", "test_kill.py",
    "test_elastic.py::test_a", "test_elastic.py::test_three",
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(part in item.nodeid for part in _SLOW_FILES):
            item.add_marker(pytest.mark.slow)
    # RJET_FAST_PATHS=0 runs the suite on nats-py's plain paths (rjet/_nats/client.py); the tests of a
    # fast path itself do not apply there.
    if os.environ.get("RJET_FAST_PATHS", "1") == "0":
        skip = pytest.mark.skip(reason="checks a fast path; RJET_FAST_PATHS=0")
        for item in items:
            if "fast_paths" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def server() -> Iterator[EmbeddedServer]:
    """One nats-server for the whole session; tests isolate themselves by stream name."""
    with EmbeddedServer() as srv:
        yield srv


@pytest.fixture
def own_server() -> Iterator[EmbeddedServer]:
    """A nats-server of this test's own, free to be stopped, killed and restarted."""
    with EmbeddedServer() as srv:
        yield srv


@pytest.fixture
async def nc(server: EmbeddedServer) -> AsyncIterator[Client]:
    conn = await nats.connect(server.url)
    yield conn
    await conn.close()


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A stream name unique to this test."""
    base = "".join(c if c.isalnum() else "_" for c in request.node.name)[:40]
    return f"t{next(_names)}_{base}"


@pytest.fixture
async def stream(js: JetStreamContext, name: str) -> rjet.Stream:
    return await rjet.Stream.create(js, name)


@pytest.fixture(scope="module")
def loop_stream(
    server: EmbeddedServer, request: pytest.FixtureRequest
) -> Iterator[tuple[asyncio.AbstractEventLoop, rjet.Stream]]:
    """A loop of the module's own and a stream on it, for hypothesis tests (which drive the loop)."""
    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(rjet.connect(server.url))
    name = request.module.__name__.rsplit(".", 1)[-1]
    stream = loop.run_until_complete(rjet.Stream.create(nc.jetstream(), name))
    yield loop, stream
    loop.run_until_complete(nc.close())
    loop.close()
