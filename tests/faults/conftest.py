"""Fault fixtures: a 3-node cluster and a TCP proxy that cuts connections on demand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from rjet.server import EmbeddedServer, ServerError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster() -> Iterator[list[EmbeddedServer]]:
    """Three clustered JetStream servers on loopback.

    A JetStream cluster needs every node's routes configured before it starts, so the route ports
    are picked first; another process may take one meanwhile, and then the cluster is formed again
    on new ports (client ports are the servers' own choice).
    """
    for attempt in range(5):
        ports = [_free_port() for _ in range(3)]
        routes = [f"nats://127.0.0.1:{p}" for p in ports]
        nodes = [
            EmbeddedServer(name=f"n{i}", cluster_name="rjet", cluster_port=ports[i], routes=routes) for i in range(3)
        ]
        try:
            for node in nodes:
                node.start()
        except ServerError as e:
            for node in nodes:
                node.close()
            if "address already in use" not in str(e) or attempt == 4:
                raise
            continue
        try:
            yield nodes
        finally:
            for node in nodes:
                node.close()
        return


class _Pair:
    """One proxied connection: the client's side and the server's."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client, self.server = client, server
        self.muted = False

    def cut(self) -> None:
        self.client.transport.abort()
        self.server.transport.abort()


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to a server; :meth:`cut` drops every open connection at once.

    :meth:`lose_answer_to` makes a lost answer on purpose: the next client frame that contains a
    marker reaches the server (which applies it), and nothing the server sends comes back for a
    while (so that a read-back fails too), as when a leader steps down after applying a write.
    :meth:`cut_at` cuts the one connection that sends a marker, with the frame delivered or not:
    either way the client never hears the answer, as when a network drops mid-request.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self.lost_answers = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._marker: bytes | None = None
        self._outage = 0.0
        self._mute_until = 0.0
        self._cut_at: tuple[bytes, bool] | None = None
        self.cut_at_marker = {True: 0, False: 0}  # connections cut at the marker, by whether it was delivered

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def lose_answer_to(self, marker: bytes, outage: float) -> None:
        """Lose the answer to the next client frame containing ``marker``, and every other answer for
        ``outage`` seconds."""
        self._marker, self._outage = marker, outage

    def cut_at(self, marker: bytes, *, deliver: bool) -> None:
        """Cut the connection that next sends a frame containing ``marker``: after the server had
        that frame and time to act on it (``deliver``), or before it reached the server. Nothing the
        server sends on that connection from then on reaches the client."""
        self._cut_at = (marker, deliver)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool, pair: _Pair
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if not upstream and (pair.muted or loop.time() < self._mute_until):
                    continue  # the answer is lost
                if upstream and self._cut_at is not None and self._cut_at[0] in data:
                    deliver = self._cut_at[1]
                    self._cut_at, pair.muted = None, True
                    if deliver:
                        writer.write(data)
                        await writer.drain()
                        await asyncio.sleep(0.3)  # the server acts on it; its answer is dropped
                    self.cut_at_marker[deliver] += 1
                    pair.cut()
                    break
                writer.write(data)
                await writer.drain()
                if upstream and self._marker is not None and self._marker in data:
                    self._marker, self._mute_until = None, loop.time() + self._outage
                    self.lost_answers += 1
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        pair = _Pair(writer, up_writer)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, True, pair), self._pipe(up_reader, writer, False, pair))
        finally:
            self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.cuts += 1
        for w in list(self._writers):
            w.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(own_server: EmbeddedServer) -> AsyncIterator[CuttingProxy]:
    p = CuttingProxy(own_server.port)
    await p.start()
    yield p
    await p.close()
