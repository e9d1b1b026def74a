"""The private aiohttp attributes the hot path reads, held to their public meaning.

proxy.py and response_writer.py read ``request._message`` and
``request._protocol`` instead of the public properties (each of those is a
Python call per use, and ``request.message`` warns that it is deprecated).
If an aiohttp release renames or re-purposes them, this fails, not the proxy.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.support.gateway import StartGateway

# One route to an upstream no test request reaches (the probes are special paths).
CONFIG = """
[upstreams.up]
url = "http://127.0.0.1:9"

[[routes]]
name = "r"
prefix = "/"
upstream = "up"
chain = []
"""


async def test_request_private_fields_match_the_public_ones(start_gateway: StartGateway) -> None:
    gw = await start_gateway(CONFIG)
    seen: list[tuple[object, ...]] = []

    async def probe(request: web.BaseRequest) -> web.StreamResponse:
        message = request._message
        seen.append(
            (
                message.method == request.method,
                message.path == request.raw_path,
                message.version == request.version,
                message.headers is request.headers,
                message.raw_headers == request.raw_headers,
                (not message.should_close) == request.keep_alive,
                request._protocol is request.protocol,
                request._protocol.transport is request.transport,
            )
        )
        return web.Response(text="ok")

    gw.gateway.special["/probe"] = probe
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /probe?x=1 HTTP/1.0\r\nHost: a\r\nX-A: b\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    assert answer.startswith(b"HTTP/1.0 200"), answer
    writer.close()
    assert seen == [(True,) * 8]


async def test_requests_on_a_connection_run_in_its_task(start_gateway: StartGateway) -> None:
    """With the aiohttp release whose start() httpserver copies, a connection's
    requests run in the connection's own task (no task per request)."""
    import aiohttp

    from aiogateway import httpserver

    if aiohttp.__version__ == "3.14.5":
        assert httpserver.INLINE_START, "the copied start() should match this aiohttp"
    gw = await start_gateway(CONFIG)
    tasks: list[asyncio.Task[object] | None] = []

    async def probe(request: web.BaseRequest) -> web.StreamResponse:
        tasks.append(asyncio.current_task())
        return web.Response(text="ok")

    gw.gateway.special["/probe"] = probe
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    for _ in range(2):
        writer.write(b"GET /probe HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(2) == b"ok"
    writer.close()
    assert len(tasks) == 2
    assert (tasks[0] is tasks[1]) == httpserver.INLINE_START
