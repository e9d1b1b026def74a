"""A TCP relay on loopback that tests can cut and restore: a network partition.

Put it between the gateway and a dependency (PostgreSQL, the Kafka broker, an
upstream): ``relay.cut()`` closes every relayed connection and refuses new
ones (the dependency looks down), ``relay.restore()`` accepts again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

__all__ = ["Relay"]


class Relay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections = 0  # accepted while open, for tests to assert on

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> Relay:
        self._server = await asyncio.start_server(self._accept, self.host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        """Drop every relayed connection and refuse (close at once) new ones."""
        self._open = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self._open = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        a = asyncio.ensure_future(self._pipe(reader, up_writer))
        b = asyncio.ensure_future(self._pipe(up_reader, writer))
        self._tasks.update((a, b))
        a.add_done_callback(self._tasks.discard)
        b.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


StartRelay = Callable[[str, int], Awaitable[Relay]]


@pytest.fixture
async def start_relay() -> AsyncIterator[StartRelay]:
    """start_relay(host, port) -> a started Relay to host:port; closed at teardown."""
    relays: list[Relay] = []

    async def start(host: str, port: int) -> Relay:
        relay = await Relay(host, port).start()
        relays.append(relay)
        return relay

    yield start
    for r in relays:
        await r.close()
