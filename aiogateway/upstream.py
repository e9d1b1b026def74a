"""A lean keep-alive HTTP/1.1 client pool per upstream.

Built on asyncio protocols and httptools' C response parser
(:mod:`aiogateway.upstream_protocol`): aiohttp's ClientSession costs ~280 µs
per proxied request, which is where a Python proxy loses most.

The pool writes the request framing itself (Host, Content-Length or chunked)
in one ``transport.write`` with the head and a bytes body, keeps at most
``pool_size`` connections (LIFO reuse, idle expiry after
``keepalive_timeout``) and retries once, on a fresh connection, a request whose
reused connection turned out stale before any response byte came back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from .settings import UpstreamSettings
from .upstream_protocol import Connection
from .upstream_streams import (
    CLOSED,
    StaleConnection,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamResponse,
    UpstreamTimeout,
)

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

# Methods whose requests normally carry a body: without one they still say
# "Content-Length: 0" so the upstream does not wait for a body.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# Above this, a bytes body is written separately instead of copied into the head.
_COALESCE_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class PoolStats:
    idle: int
    active: int
    opened: int
    closed: int


class UpstreamPool:
    """Connections to one upstream. No I/O until the first request."""

    def __init__(self, name: str, settings: UpstreamSettings) -> None:
        self.name = name
        self.settings = settings
        url = urlsplit(settings.url)
        self.scheme = url.scheme
        if self.scheme not in ("http", "https"):
            raise ValueError(f"upstream {name!r}: unsupported scheme in {settings.url!r}")
        if not url.hostname:
            raise ValueError(f"upstream {name!r}: no host in {settings.url!r}")
        self.host = url.hostname
        default_port = 443 if self.scheme == "https" else 80
        self.port = url.port or default_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        if url.port is not None and url.port != default_port:
            host = f"{host}:{url.port}"
        self.host_header = host.encode("idna")
        self.base_path = url.path.rstrip("/").encode("ascii")
        # Everything between the target and the first header, precomputed.
        self._after_target = b" HTTP/1.1\r\nHost: " + self.host_header + b"\r\n"
        self._prefixes: dict[str, bytes] = {}
        self._ssl: ssl.SSLContext | None = None  # built on first connect (reads CA files)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[Connection] = []
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self._slots = 0  # connections open or being opened
        self._open = 0
        self._opened = 0
        self._closed = 0
        self._closing = False

    # -- public API -----------------------------------------------------------

    async def request(
        self,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | bytes | None,
        content_length: int | None,
    ) -> UpstreamResponse:
        """Send a request; return when the final response head is parsed.

        ``headers`` are end-to-end headers only: the pool writes Host and the
        body framing. Raises an :class:`UpstreamError` subclass, or the body
        iterable's own exception if it fails while being sent.
        """
        if self._closing:
            raise UpstreamConnectError(f"upstream pool {self.name!r} is closed")
        prefix = self._prefixes.get(method)
        if prefix is None:
            prefix = self._prefixes[method] = method.encode("ascii") + b" " + self.base_path
        parts = [prefix, target, self._after_target]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        lines = len(headers) + 3  # request line, Host, headers, blank line
        stream: AsyncIterable[bytes] | None = None
        chunked = False
        payload = b""
        if body is None:
            if content_length:
                raise ValueError("content_length given without a body")
        elif isinstance(body, bytes | bytearray | memoryview):
            payload = bytes(body)
            content_length = len(payload)
        else:
            stream = body
            chunked = content_length is None
        if chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
            lines += 1
        elif content_length is not None and (content_length or method in _BODY_METHODS):
            parts.append(b"Content-Length: %d\r\n" % content_length)
            lines += 1
        elif method in _BODY_METHODS:
            parts.append(b"Content-Length: 0\r\n")
            lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        # SECURITY: a CR or LF inside a target or header value (e.g. a forged
        # JWT claim forwarded as a header) would split the request. One C scan
        # of the head instead of a check per value.
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("CR or LF in the request target or a header")
        if payload:
            if len(payload) <= _COALESCE_LIMIT:
                head += payload
            else:
                stream = _once(payload)  # big: no copy into the head
        is_head = method == "HEAD"

        fresh = False
        while True:
            idle = self._idle
            if idle and not fresh:
                conn = idle.pop()  # LIFO: the warmest connection, least likely stale
            else:
                conn = await self._acquire(fresh)
            try:
                return await conn.send(head, is_head, stream, chunked, content_length)
            except StaleConnection as exc:
                # The upstream closed an idle connection as we reused it; the
                # request never reached it. Replay once, on a fresh connection,
                # unless chunks of a streamed body were already taken.
                if fresh or (exc.consumed and not isinstance(stream, _once)):
                    raise UpstreamReset(str(exc)) from None
                if isinstance(stream, _once):
                    stream = _once(payload)
                fresh = True
            except asyncio.CancelledError:
                conn._abort(UpstreamReset("request cancelled"))
                raise

    def stats(self) -> PoolStats:
        idle = len(self._idle)
        return PoolStats(
            idle=idle, active=self._open - idle, opened=self._opened, closed=self._closed
        )

    async def close(self) -> None:
        """Close idle connections now and active ones once released."""
        self._closing = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamConnectError(f"upstream pool {self.name!r} is closed"))
        for conn in list(self._idle):
            conn._abort(UpstreamReset("pool closed"))

    # -- connections ----------------------------------------------------------

    async def _acquire(self, fresh: bool) -> Connection:
        idle = self._idle
        if idle and not (fresh and self._slots < self.settings.pool_size):
            return idle.pop()
        if self._slots < self.settings.pool_size:
            self._slots += 1
            return await self._connect()
        return await self._wait()

    async def _wait(self) -> Connection:
        loop = self._loop or asyncio.get_running_loop()
        waiter: asyncio.Future[Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        timeout = self.settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                got = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection or slot just as we gave up: pass it on.
                given = waiter.result()
                if given is None:
                    self._slot_freed()
                else:
                    self._put_idle(given)
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectError(
                    f"no free connection to upstream {self.name!r} within {timeout}s"
                ) from None
            raise
        if got is None:  # a slot was freed for us: open a connection in it
            return await self._connect()
        return got

    async def _connect(self) -> Connection:
        """Open a connection in an already reserved slot."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        settings = self.settings
        conn = Connection(self, loop, settings.read_timeout, settings.keepalive_timeout)
        ssl_ctx: ssl.SSLContext | None = None
        if self.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ssl_ctx = self._ssl
        try:
            async with asyncio.timeout(settings.connect_timeout):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=ssl_ctx,
                    server_hostname=self.host if ssl_ctx is not None else None,
                )
        except (OSError, TimeoutError) as exc:
            self._slot_freed()
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            raise UpstreamConnectError(
                f"cannot connect to upstream {self.name!r} ({self.host}:{self.port}): {reason}"
            ) from exc
        except BaseException:
            self._slot_freed()
            raise
        self._opened += 1
        self._open += 1
        conn.registered = True
        if conn._state == CLOSED:  # closed by the upstream before we got here
            self._conn_closed(conn, False)
            raise UpstreamReset(f"upstream {self.name!r} closed the connection at once")
        return conn

    def _put_idle(self, conn: Connection) -> None:
        if self._closing or self.settings.keepalive_timeout <= 0:
            conn._abort(UpstreamReset("not kept alive"))
            return
        # Idle since the upstream sent its last byte (no clock read needed):
        # that is when the upstream's own keep-alive timer started too.
        conn.go_idle(conn._last)
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)  # handed over, not listed as idle
                return
        self._idle.append(conn)

    def _conn_closed(self, conn: Connection, was_idle: bool) -> None:
        self._closed += 1
        self._open -= 1
        if was_idle:
            # Not in the list when it had been handed to a waiter.
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)
        self._slot_freed()

    def _slot_freed(self) -> None:
        # Hand the slot straight to a waiter (it opens a connection in it)
        # so a newcomer cannot overtake those already waiting.
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._slots -= 1


class _once(AsyncIterable[bytes]):  # lowercase: reads as a function at call sites
    """A large bytes body streamed through the sender (no copy into the head)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data
