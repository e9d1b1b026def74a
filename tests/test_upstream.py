"""UpstreamPool against real loopback servers: aiohttp upstreams for the normal
cases, raw asyncio servers for the misbehaving ones."""

from __future__ import annotations

import asyncio
import gzip
import os
import random
import socket
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from aiohttp import web

from aiogateway.settings import UpstreamSettings
from aiogateway.upstream import (
    UpstreamConnectError,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamResponse,
    UpstreamTimeout,
)
from aiogateway.upstream_streams import HIGH_WATER
from tests.support.upstreams import StartUpstream

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """raw_server(handler) -> "http://127.0.0.1:PORT" served by a bare asyncio server."""
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: RawHandler) -> str:
        async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            writers.append(w)
            try:
                await handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for w in writers:
        w.close()
    for s in servers:
        s.close()
        await s.wait_closed()


def make_pool(url: str, **kw: float) -> UpstreamPool:
    return UpstreamPool("svc", UpstreamSettings(url=url, **kw))


async def read_all(resp: UpstreamResponse) -> bytes:
    out = []
    while chunk := await resp.read():
        out.append(chunk)
    return b"".join(out)


async def fetch(
    pool: UpstreamPool,
    method: str = "GET",
    target: bytes = b"/",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: AsyncIterable[bytes] | bytes | None = None,
    content_length: int | None = None,
) -> tuple[UpstreamResponse, bytes]:
    resp = await pool.request(method, target, headers, body, content_length)
    body = await read_all(resp)
    resp.release()
    return resp, body


async def read_head(r: asyncio.StreamReader) -> bytes:
    return await r.readuntil(b"\r\n\r\n")


# -- normal traffic ---------------------------------------------------------


async def test_get_binary_body_exact_and_headers_raw(start_upstream: StartUpstream) -> None:
    payload = os.urandom(5000)
    seen: list[web.BaseRequest] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(request)
        return web.Response(body=payload, headers={"X-Custom": "Va lue"})

    up = await start_upstream(handler)
    pool = make_pool(up.url + "/base/")
    assert pool.host_header == f"127.0.0.1:{up.port}".encode()
    resp, body = await fetch(pool, target=b"/a%20b?x=1", headers=[(b"X-Req", b"1")])
    assert resp.status == 200
    assert resp.reason == "OK"
    assert body == payload
    assert resp.content_length == 5000
    assert not resp.chunked
    assert resp.keep_alive
    assert (b"X-Custom", b"Va lue") in resp.headers
    req = seen[0]
    assert req.raw_path == "/base/a%20b?x=1"
    assert req.headers["Host"] == f"127.0.0.1:{up.port}"
    assert req.headers["X-Req"] == "1"
    assert "Content-Length" not in req.headers
    assert "Transfer-Encoding" not in req.headers
    await pool.close()


async def test_post_bytes_and_gzip_body_not_decompressed(start_upstream: StartUpstream) -> None:
    compressed = gzip.compress(b"hello " * 1000)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        got = await request.read()
        assert request.headers["Content-Length"] == str(len(got))
        return web.Response(body=compressed + got, headers={"Content-Encoding": "gzip"})

    up = await start_upstream(handler)
    pool = make_pool(up.url)
    sent = os.urandom(3000)
    resp, body = await fetch(pool, "POST", body=sent)
    assert body == compressed + sent
    assert (b"Content-Encoding", b"gzip") in resp.headers
    # POST without body still says Content-Length: 0; GET says nothing.
    _, body = await fetch(pool, "POST")
    assert body == compressed
    await pool.close()


async def test_chunked_request_body_from_async_generator(start_upstream: StartUpstream) -> None:
    got: list[tuple[str | None, bytes]] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        got.append((request.headers.get("Transfer-Encoding"), await request.read()))
        return web.Response(text="ok")

    async def gen() -> AsyncIterator[bytes]:
        for i in range(50):
            yield bytes([i]) * (i * 100)  # includes an empty chunk (i=0)
            await asyncio.sleep(0)

    up = await start_upstream(handler)
    pool = make_pool(up.url)
    _, body = await fetch(pool, "PUT", body=gen())
    assert body == b"ok"
    assert got[0][0] == "chunked"
    assert got[0][1] == b"".join(bytes([i]) * (i * 100) for i in range(50))
    # Known length: streamed with Content-Length, connection reused.
    _resp, body = await fetch(
        pool, "PUT", body=gen(), content_length=sum(i * 100 for i in range(50))
    )
    assert got[1][0] is None
    assert len(got[1][1]) == sum(i * 100 for i in range(50))
    assert pool.stats().opened == 1
    await pool.close()


async def test_chunked_response_dechunked(start_upstream: StartUpstream) -> None:
    parts = [os.urandom(n) for n in (1, 100, 70000, 3)]

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for p in parts:
            await resp.write(p)
        await resp.write_eof()
        return resp

    up = await start_upstream(handler)
    pool = make_pool(up.url)
    for _ in range(3):
        resp, body = await fetch(pool)
        assert resp.chunked
        assert resp.content_length is None
        assert body == b"".join(parts)
    assert pool.stats().opened == 1
    await pool.close()


async def test_head_204_304_have_no_body_and_reuse(start_upstream: StartUpstream) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/204":
            return web.Response(status=204)
        if request.path == "/304":
            return web.Response(status=304)
        return web.Response(body=b"x" * 1234)

    up = await start_upstream(handler)
    pool = make_pool(up.url)
    resp, body = await fetch(pool, "HEAD")
    assert resp.status == 200
    assert resp.content_length == 1234
    assert body == b""
    for path in (b"/204", b"/304", b"/"):
        resp, body = await fetch(pool, "GET", target=path)
        assert body == (b"x" * 1234 if path == b"/" else b"")
    resp, body = await fetch(pool, "HEAD")
    assert body == b""
    _, body = await fetch(pool)
    assert body == b"x" * 1234
    assert pool.stats() == type(pool.stats())(idle=1, active=0, opened=1, closed=0)
    await pool.close()


async def test_read_until_close_http10(raw_server: Callable[[RawHandler], Awaitable[str]]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.0 200 OK\r\nX: y\r\n\r\nfirst ")
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"second")
        await w.drain()

    pool = make_pool(await raw_server(handler))
    resp, body = await fetch(pool)
    assert body == b"first second"
    assert not resp.keep_alive
    assert pool.stats().active == 0
    assert pool.stats().closed == 1
    await pool.close()


async def test_response_trickled_byte_by_byte(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    response = (
        b"HTTP/1.1 200 Fine\r\nX-Long-Header: " + b"v" * 40 + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_head(r)
            for i in range(len(response)):
                w.write(response[i : i + 1])
                await w.drain()
                await asyncio.sleep(0.0005)

    pool = make_pool(await raw_server(handler))
    for _ in range(2):
        resp, body = await fetch(pool)
        assert resp.reason == "Fine"
        assert resp.headers[0] == (b"X-Long-Header", b"v" * 40)
        assert body == b"hello world"
    assert pool.stats().opened == 1
    await pool.close()


async def test_interim_100_skipped(raw_server: Callable[[RawHandler], Awaitable[str]]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_head(r)
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await w.drain()
            w.write(b"HTTP/1.1 201\r\nContent-Length: 2\r\n\r\nhi")  # no reason phrase

    pool = make_pool(await raw_server(handler))
    for _ in range(2):
        resp, body = await fetch(pool)
        assert resp.status == 201
        assert resp.reason == "Created"
        assert body == b"hi"
    assert pool.stats().opened == 1
    await pool.close()


async def test_keepalive_reuse_and_expiry(start_upstream: StartUpstream) -> None:
    up = await start_upstream(lambda r: _ok())
    pool = make_pool(up.url, keepalive_timeout=0.5)
    for _ in range(20):
        await fetch(pool)
    assert pool.stats().opened == 1
    assert pool.stats().idle == 1
    await asyncio.sleep(1.2)
    assert pool.stats().idle == 0
    assert pool.stats().closed == 1
    await fetch(pool)
    assert pool.stats().opened == 2
    await pool.close()
    assert pool.stats().idle == 0
    assert pool.stats().closed == 2


async def _ok() -> web.Response:
    return web.Response(text="ok")


async def test_pool_size_limit_waits(start_upstream: StartUpstream) -> None:
    in_flight = 0
    peak = 0

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return web.Response(text="ok")

    up = await start_upstream(handler)
    pool = make_pool(up.url, pool_size=3)
    results = await asyncio.gather(*(fetch(pool) for _ in range(20)))
    assert all(body == b"ok" for _, body in results)
    assert peak <= 3
    assert pool.stats().opened == 3
    await pool.close()


async def test_full_pool_wait_times_out(start_upstream: StartUpstream) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await asyncio.sleep(1)
        return web.Response(text="ok")

    up = await start_upstream(handler)
    pool = make_pool(up.url, pool_size=1, connect_timeout=0.2)
    slow = asyncio.ensure_future(fetch(pool))
    await asyncio.sleep(0.05)
    with pytest.raises(UpstreamConnectError, match="no free connection"):
        await fetch(pool)
    await slow
    await pool.close()


async def test_crlf_injection_rejected(start_upstream: StartUpstream) -> None:
    up = await start_upstream(lambda r: _ok())
    pool = make_pool(up.url)
    with pytest.raises(ValueError, match="CR or LF"):
        await pool.request("GET", b"/", [(b"X-User", b"a\r\nX-Admin: 1")], None, None)
    assert pool.stats().opened == 0
    await pool.close()


# -- failures ---------------------------------------------------------------


async def test_connect_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pool = make_pool(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamConnectError):
        await fetch(pool)
    assert pool.stats() == type(pool.stats())(idle=0, active=0, opened=0, closed=0)
    await pool.close()


async def test_never_answering_times_out(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    pool = make_pool(await raw_server(handler), read_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await fetch(pool)
    assert 0.25 < time.monotonic() - t0 < 1.0
    assert pool.stats().active == 0
    await pool.close()


async def test_stall_mid_body_times_out(raw_server: Callable[[RawHandler], Awaitable[str]]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        for _ in range(3):  # bytes within the gap keep it alive
            await asyncio.sleep(0.15)
            w.write(b"x")
        await asyncio.sleep(10)

    pool = make_pool(await raw_server(handler), read_timeout=0.3)
    resp = await pool.request("GET", b"/", [], None, None)
    assert await resp.read() == b"0123456789"
    got = [await resp.read() for _ in range(3)]
    assert got == [b"x", b"x", b"x"]
    with pytest.raises(UpstreamTimeout):
        await resp.read()
    resp.release()
    assert pool.stats().active == 0
    await pool.close()


async def test_reset_mid_body(raw_server: Callable[[RawHandler], Awaitable[str]]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        await asyncio.sleep(0.05)
        w.transport.abort()

    pool = make_pool(await raw_server(handler))
    resp = await pool.request("GET", b"/", [], None, None)
    with pytest.raises(UpstreamReset):
        await read_all(resp)
    resp.release()
    assert pool.stats().active == 0
    await pool.close()


async def test_truncated_content_length(raw_server: Callable[[RawHandler], Awaitable[str]]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")

    pool = make_pool(await raw_server(handler))
    resp = await pool.request("GET", b"/", [], None, None)
    assert await resp.read() == b"short"
    with pytest.raises(UpstreamReset):
        await resp.read()
    await pool.close()


async def test_malformed_response(raw_server: Callable[[RawHandler], Awaitable[str]]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc")
        await asyncio.sleep(1)

    pool = make_pool(await raw_server(handler))
    with pytest.raises(UpstreamProtocolError):
        await fetch(pool)
    assert pool.stats().active == 0
    await pool.close()


async def test_endless_response_head_rejected(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(10_000):
            w.write(b"X-%d: %s\r\n" % (i, b"h" * 100))
            await w.drain()

    pool = make_pool(await raw_server(handler))
    with pytest.raises(UpstreamProtocolError, match="too large"):
        await fetch(pool)
    assert pool.stats().active == 0
    await pool.close()


async def test_idle_connection_closed_by_upstream(start_upstream: StartUpstream) -> None:
    up = await start_upstream(lambda r: _ok())
    pool = make_pool(up.url)
    await fetch(pool)
    # Upstream restarts its connections: idle one is closed, detected, dropped.
    await up.runner.server.shutdown(0.1)  # type: ignore[union-attr]
    await asyncio.sleep(0.05)
    assert pool.stats().idle == 0
    assert pool.stats().closed == 1
    _, body = await fetch(pool)
    assert body == b"ok"
    assert pool.stats().opened == 2
    await pool.close()


def _stale_race_server() -> RawHandler:
    """Answers one request per connection with keep-alive, then closes the
    connection on the next request without answering (the race an idle
    timeout on the upstream causes)."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await read_head(r)
        if b"content-length: 5" in head.lower():
            await r.readexactly(5)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await read_head(r)
        w.transport.abort()

    return handler


async def test_stale_keepalive_retried_when_replayable(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    pool = make_pool(await raw_server(_stale_race_server()))
    await fetch(pool)
    _, body = await fetch(pool)  # GET: retried on a fresh connection
    assert body == b"ok"
    assert pool.stats().opened == 2
    _, body = await fetch(pool, "POST", body=b"12345")  # bytes body: replayable
    assert body == b"ok"
    assert pool.stats().opened == 3
    await pool.close()


async def test_stale_keepalive_streamed_post_not_retried(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    pool = make_pool(await raw_server(_stale_race_server()))
    await fetch(pool)
    consumed = []

    async def gen() -> AsyncIterator[bytes]:
        consumed.append(1)
        yield b"data"

    with pytest.raises(UpstreamReset):
        await fetch(pool, "POST", body=gen())
    assert consumed == [1]
    assert pool.stats().opened == 1
    assert pool.stats().active == 0
    await pool.close()


async def test_early_response_stops_body(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await w.drain()
        while await r.read(65536):
            pass

    produced = 0
    closed = asyncio.Event()

    async def gen() -> AsyncIterator[bytes]:
        nonlocal produced
        try:
            while True:
                produced += 1
                yield b"z" * 1000
                await asyncio.sleep(0.005)
        finally:
            closed.set()

    pool = make_pool(await raw_server(handler))
    resp, body = await fetch(pool, "POST", body=gen())
    assert resp.status == 413
    assert body == b"big!"
    await asyncio.wait_for(closed.wait(), 1)
    n = produced
    await asyncio.sleep(0.05)
    assert produced == n  # no longer consumed
    assert pool.stats().idle == 0
    assert pool.stats().active == 0
    await pool.close()


async def test_body_source_error_propagates(start_upstream: StartUpstream) -> None:
    up = await start_upstream(lambda r: _ok())
    pool = make_pool(up.url)

    async def gen() -> AsyncIterator[bytes]:
        yield b"a"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError, match="client went away"):
        await fetch(pool, "POST", body=gen())
    assert pool.stats().active == 0
    await pool.close()


async def test_close_mid_body_leaves_nothing_active(start_upstream: StartUpstream) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b"x" * 1000)
            await asyncio.sleep(0.01)
        return resp

    up = await start_upstream(handler)
    pool = make_pool(up.url)
    resp = await pool.request("GET", b"/", [], None, None)
    assert await resp.read()
    resp.close()
    resp.release()
    assert pool.stats().active == 0
    assert pool.stats().closed == 1
    # Releasing before the end closes too (never reuses a half-read connection).
    resp = await pool.request("GET", b"/", [], None, None)
    resp.release()
    assert pool.stats().active == 0
    assert pool.stats().closed == 2
    await pool.close()


async def test_cancelled_request_leaves_nothing_active(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    pool = make_pool(await raw_server(handler))
    task = asyncio.ensure_future(fetch(pool))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.stats().active == 0
    assert pool.stats().opened == 1
    await pool.close()


# -- Content-Length bodies bypass the parser: framing done by the connection --


def _scripted(*replies: Sequence[bytes], pause: float = 0.002) -> RawHandler:
    """Answers the n-th request head on a connection with replies[n], writing
    its pieces separately (drained, paused) so they arrive as separate reads."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for pieces in replies:
            await read_head(r)
            for piece in pieces:
                w.write(piece)
                await w.drain()
                await asyncio.sleep(pause)
        await r.read()  # until the client closes

    return handler


async def test_content_length_body_split_anywhere(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    # Every split point of head + body, including inside the blank line that
    # ends the head; each response on the same connection.
    body = bytes(range(256)) * 3
    head = b"HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 768\r\n\r\n"
    response = head + body
    cuts = range(1, len(response))
    pool = make_pool(await raw_server(_scripted(*((response[:i], response[i:]) for i in cuts))))
    for i in cuts:
        resp = await pool.request("GET", b"/", [], None, None)
        chunks = []
        while chunk := await resp.read():
            chunks.append(chunk)
        resp.release()
        assert resp.headers == [(b"X-A", b"b"), (b"Content-Length", b"768")], i
        assert b"".join(chunks) == body, i
        if len(head) - 4 < i < len(head):
            # The blank line straddles two reads, and still the body is a
            # view of the received buffer: it bypassed the parser's copy.
            assert isinstance(chunks[0], memoryview), i
    assert pool.stats() == type(pool.stats())(idle=1, active=0, opened=1, closed=0)
    await pool.close()


async def test_content_length_body_in_many_packets(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    body = os.urandom(300_000)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n"
    pieces = [head + body[:1]] + [body[i : i + 7919] for i in range(1, len(body), 7919)]
    pool = make_pool(await raw_server(_scripted(pieces, [head, body], pause=0)))
    resp = await pool.request("GET", b"/", [], None, None)
    parts = []
    while chunk := await resp.read():
        parts.append(bytes(chunk))
    resp.release()
    assert b"".join(parts) == body
    assert len(parts) > 1  # it did stream in pieces
    _, got = await fetch(pool)
    assert got == body
    assert pool.stats().opened == 1
    await pool.close()


@pytest.mark.parametrize(
    ("together", "extra"),
    [
        (True, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"),
        (False, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"),
        # Half a head: httptools alone would keep it as the start of the
        # next response and reuse the connection.
        (True, b"HTTP/1.1 200 OK\r\nX-Smuggled: 1\r\n"),
    ],
    ids=["same-read", "later-read", "partial-head"],
)
async def test_bytes_past_content_length_never_forwarded(
    raw_server: Callable[[RawHandler], Awaitable[str]], together: bool, extra: bytes
) -> None:
    # A second response nobody asked for right behind the body: the body
    # ends at Content-Length, the extra bytes go nowhere and the connection
    # is not reused (its framing can no longer be trusted).
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    pieces = [reply + extra] if together else [reply, extra]
    good = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    pool = make_pool(await raw_server(_scripted(pieces, [good], pause=0.05)))
    resp = await pool.request("GET", b"/", [], None, None)
    got = await read_all(resp)
    await asyncio.sleep(0.1)  # let a separate extra packet arrive before release
    resp.release()
    assert got == b"hello"
    assert pool.stats() == type(pool.stats())(idle=0, active=0, opened=1, closed=1)
    _, got = await fetch(pool)  # a fresh connection; the next reply there is "hello" again
    assert got == b"hello"
    assert pool.stats().opened == 2
    await pool.close()


async def test_body_larger_than_one_read_with_garbage_in_last_read(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    body = os.urandom(200_000)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n"
    pieces = [head + body[:100_000], body[100_000:] + b"garbage"]
    pool = make_pool(await raw_server(_scripted(pieces)))
    _, got = await fetch(pool)
    assert got == body
    assert pool.stats().closed == 1
    await pool.close()


async def test_interim_final_head_and_body_in_one_read(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    reply = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    )
    split = [reply[:30], reply[30:-2], reply[-2:]]
    pool = make_pool(await raw_server(_scripted([reply], split, [reply])))
    for _ in range(3):
        resp, got = await fetch(pool)
        assert (resp.status, got) == (200, b"abc")
    assert pool.stats().opened == 1
    await pool.close()


async def test_head_and_empty_bodies_with_content_length(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    # HEAD answered with the Content-Length a GET would have, then 204/304
    # and an empty 200: none has a body, all keep the connection.
    replies = [
        [b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"],
        [b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
        [b"HTTP/1.1 204 No Content\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast"],
    ]
    pool = make_pool(await raw_server(_scripted(*replies)))
    resp, got = await fetch(pool, "HEAD")
    assert (resp.status, resp.content_length, got) == (200, 1234, b"")
    for status in (304, 200, 204):
        resp, got = await fetch(pool)
        assert (resp.status, got) == (status, b"")
    _, got = await fetch(pool)
    assert got == b"last"
    assert pool.stats() == type(pool.stats())(idle=1, active=0, opened=1, closed=0)
    await pool.close()


@pytest.mark.parametrize(
    ("method", "reply"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nbody"),
    ],
    ids=["HEAD", "zero-length"],
)
async def test_bytes_after_a_bodiless_response_not_reused(
    raw_server: Callable[[RawHandler], Awaitable[str]], method: str, reply: bytes
) -> None:
    pool = make_pool(await raw_server(_scripted([reply], [reply])))
    _, got = await fetch(pool, method)
    assert got == b""
    assert pool.stats().closed == 1
    _, got = await fetch(pool, method)
    assert got == b""
    assert pool.stats().opened == 2
    await pool.close()


async def test_read_gives_big_buffers_alone_and_joins_small_ones(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    # Buffered while nobody reads: big buffers come back one per read (no
    # copy into a joined one), small de-chunked pieces as one joined read.
    big = [os.urandom(20_000) for _ in range(3)]
    small = b"".join(b"a\r\n%s\r\n" % (b"%d" % i).ljust(10, b".") for i in range(50))
    replies = (
        [b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n", *big],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", small, b"0\r\n\r\n"],
    )
    pool = make_pool(await raw_server(_scripted(*replies, pause=0.02)))
    resp = await pool.request("GET", b"/", [], None, None)
    await asyncio.sleep(0.2)
    assert resp.buffered == 60_000
    got = [await resp.read() for _ in range(4)]
    assert got == [*big, b""]
    resp.release()
    resp = await pool.request("GET", b"/", [], None, None)
    await asyncio.sleep(0.2)
    first = await resp.read()
    assert len(first) == 500
    assert await resp.read() == b""
    resp.release()
    assert pool.stats().opened == 1
    await pool.close()


# -- large bodies, bounded buffering ----------------------------------------

BIG = 50 * 1024 * 1024


async def test_large_upload_has_backpressure(start_upstream: StartUpstream) -> None:
    produced = received = 0
    lead = 0

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal received
        async for chunk in request.content.iter_any():
            received += len(chunk)
            await asyncio.sleep(0)
        return web.Response(text=str(received))

    async def gen() -> AsyncIterator[bytes]:
        nonlocal produced, lead
        block = b"u" * 65536
        while produced < BIG:
            produced += len(block)
            lead = max(lead, produced - received)
            yield block

    up = await start_upstream(handler)
    pool = make_pool(up.url)
    _, body = await fetch(pool, "POST", body=gen())
    assert int(body) == BIG
    # Only socket buffers (kernel, transport high-water) sit between the two.
    assert lead < 16 * 1024 * 1024
    await pool.close()


async def test_large_download_bounded_buffer(start_upstream: StartUpstream) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(BIG)})
        await resp.prepare(request)
        block = b"d" * 262144
        for _ in range(BIG // len(block)):
            await resp.write(block)
        return resp

    up = await start_upstream(handler)
    pool = make_pool(up.url)
    resp = await pool.request("GET", b"/", [], None, None)
    total = peak = reads = 0
    while True:
        peak = max(peak, resp.buffered)
        chunk = await resp.read()
        if not chunk:
            break
        total += len(chunk)
        reads += 1
        if reads % 8 == 0:
            await asyncio.sleep(0.002)  # a slow client
    resp.release()
    assert total == BIG
    assert peak <= HIGH_WATER + 256 * 1024  # high water + at most one socket read
    assert pool.stats().idle == 1
    await pool.close()


# -- uvloop: its transports are not asyncio.Transport subclasses -------------


def test_core_paths_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(body)
            await resp.write(b"-end")
            await resp.write_eof()
            return resp
        return web.Response(body=body or b"empty")

    async def stall(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(0.5)
        w.close()

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"g" * 10000

    async def scenario() -> None:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        raw = await asyncio.start_server(stall, "127.0.0.1", 0)
        raw_port = raw.sockets[0].getsockname()[1]
        try:
            pool = make_pool(f"http://127.0.0.1:{port}")
            for _ in range(5):
                _, body = await fetch(pool)
                assert body == b"empty"
            _, body = await fetch(pool, "POST", body=b"bytes!")
            assert body == b"bytes!"
            resp, body = await fetch(pool, "POST", target=b"/chunked", body=gen())
            assert resp.chunked
            assert body == b"g" * 1_000_000 + b"-end"
            resp, body = await fetch(pool, "HEAD")
            assert body == b""
            assert pool.stats().opened == 1
            resp = await pool.request("POST", b"/", [], b"x" * 1_000_000, None)
            assert await resp.read()
            resp.close()
            assert pool.stats().active == 0
            await pool.close()

            stalled = make_pool(f"http://127.0.0.1:{raw_port}", read_timeout=0.2)
            resp = await stalled.request("GET", b"/", [], None, None)
            assert await resp.read() == b"abc"
            with pytest.raises(UpstreamTimeout):
                await resp.read()
            resp.release()
            reset = make_pool(f"http://127.0.0.1:{raw_port}", read_timeout=5)
            resp = await reset.request("GET", b"/", [], None, None)
            assert await resp.read() == b"abc"
            with pytest.raises(UpstreamReset):
                await resp.read()
            resp.release()
            assert stalled.stats().active == reset.stats().active == 0
        finally:
            raw.close()
            await raw.wait_closed()
            await runner.cleanup()

    uvloop.run(scenario())


# -- the gap timer blames only the upstream ---------------------------------


async def test_slow_client_does_not_trip_read_timeout(start_upstream: StartUpstream) -> None:
    big = os.urandom(3 * 1024 * 1024)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        got = await request.read()
        return web.Response(body=got or big)

    async def slow_body() -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i]) * 10
            await asyncio.sleep(0.4)  # the client uploads slowly

    up = await start_upstream(handler)
    pool = make_pool(up.url, read_timeout=0.25)
    # Slow download: reading is paused at the high-water mark, not a timeout.
    resp = await pool.request("GET", b"/", [], None, None)
    first = await resp.read()
    await asyncio.sleep(0.6)
    assert bytes(first) + await read_all(resp) == big
    resp.release()
    # Slow upload: waiting for the client is not the upstream's silence.
    _, body = await fetch(pool, "POST", body=slow_body())
    assert body == b"\x00" * 10 + b"\x01" * 10 + b"\x02" * 10
    assert pool.stats().opened == 1
    await pool.close()


async def test_upstream_not_reading_body_times_out(
    raw_server: Callable[[RawHandler], Awaitable[str]],
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        await asyncio.sleep(10)  # never reads the body, never answers

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"b" * 65536

    pool = make_pool(await raw_server(handler), read_timeout=0.3)
    with pytest.raises(UpstreamTimeout):
        await fetch(pool, "POST", body=endless())
    assert pool.stats().active == 0
    await pool.close()


# -- https -------------------------------------------------------------------


def _tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA and a certificate for 127.0.0.1: (server, client) contexts."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context()
    client.load_verify_locations(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


async def test_https_upstream(tmp_path: Path) -> None:
    server_ctx, client_ctx = _tls_contexts(tmp_path)
    payload = os.urandom(300_000)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=payload + await request.read())

    runner = web.ServerRunner(web.Server(handler), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        pool = make_pool(f"https://127.0.0.1:{port}")
        assert pool.host_header == f"127.0.0.1:{port}".encode()
        # Without our CA the default context must refuse the certificate.
        with pytest.raises(UpstreamConnectError):
            await fetch(pool)
        pool._ssl = client_ctx  # the default context plus the test CA
        for _ in range(3):
            _, body = await fetch(pool, "POST", body=b"tls")
            assert body == payload + b"tls"
        assert pool.stats().opened == 1
        await pool.close()
    finally:
        await runner.cleanup()


async def test_accounting_survives_random_cancellations(start_upstream: StartUpstream) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(int(request.query.get("n", "1"))):
            await resp.write(b"p" * 5000)
            await asyncio.sleep(0.001)
        return resp

    up = await start_upstream(handler)
    pool = make_pool(up.url, pool_size=4)
    rng = random.Random(7)

    async def one(i: int) -> None:
        body = None if i % 3 else b"b" * 100
        resp = await pool.request("POST" if body else "GET", b"/?n=%d" % (i % 5), [], body, None)
        try:
            await read_all(resp)
        finally:
            resp.release()

    tasks = [asyncio.ensure_future(one(i)) for i in range(60)]
    for t in rng.sample(tasks, 20):
        await asyncio.sleep(rng.random() * 0.01)
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
    stats = pool.stats()
    assert stats.active == 0
    assert stats.opened - stats.closed == stats.idle <= 4
    await pool.close()
    assert pool.stats().idle == 0
