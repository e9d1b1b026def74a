"""INTERFACE STUB — being implemented by a helper. Keep the names and signatures.

A lean keep-alive HTTP/1.1 client pool per upstream, built on asyncio
protocols and httptools' C response parser (the aiohttp ClientSession costs
~280 µs per proxied request; this is where a Python proxy loses most).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass

from .settings import UpstreamSettings

__all__ = [
    "PoolStats",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamResponse",
    "UpstreamTimeout",
]


class UpstreamError(Exception):
    kind = "error"


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamReset(UpstreamError):
    kind = "reset"


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"


@dataclass(frozen=True, slots=True)
class PoolStats:
    idle: int
    active: int
    opened: int
    closed: int


class UpstreamResponse:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    content_length: int | None

    async def read(self) -> bytes:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class UpstreamPool:
    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        self.name = name
        self.settings = settings
        self.host_header = b""

    async def request(
        self,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | bytes | None,
        content_length: int | None,
    ) -> UpstreamResponse:
        raise NotImplementedError

    def stats(self) -> PoolStats:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
