"""Client-side timeouts: a request head or body that dribbles in is cut."""

from __future__ import annotations

import asyncio

from tests.support.gateway import StartGateway
from tests.support.upstreams import RecordingUpstream


def config(upstream_url: str) -> str:
    return f"""
[server]
client_header_timeout = 0.5
client_body_timeout = 0.5

[upstreams.svc]
url = "{upstream_url}"

[[routes]]
prefix = "/v1"
upstream = "svc"
"""


async def test_slow_request_head_is_cut(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config(recording_upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    closed_after = None
    for byte in b"GET /v1/slow HTTP/1.1\r\nHost: x\r\n":
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        if reader.at_eof() or await _closed(reader):
            closed_after = loop.time() - started
            break
        await asyncio.sleep(0.1)
    writer.close()
    assert closed_after is not None, "the gateway kept a dribbling request head open"
    assert 0.4 < closed_after < 3.0
    assert recording_upstream.requests == []


async def test_idle_keepalive_then_full_head_is_not_cut(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    """Between requests, the head deadline starts with the next head's first byte."""
    gw = await start_gateway(config(recording_upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /v1/first?status=204 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # 204: no body
    assert head.startswith(b"HTTP/1.1 204")
    await asyncio.sleep(0.8)  # idle keep-alive longer than the head timeout: still fine
    writer.write(b"GET /v1/ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")


async def test_silent_new_connection_is_closed_after_the_head_timeout(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    """The first head is due within client_header_timeout of the connect (as nginx)."""
    gw = await start_gateway(config(recording_upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    took = asyncio.get_running_loop().time() - started
    writer.close()
    assert 0.4 < took < 3.0


async def test_slow_body_gets_408(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config(recording_upstream.url))
    for head in (
        b"POST /v1/up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n",  # small: read whole
        b"POST /v1/up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",  # streamed
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(head + b"x" * 10)
        # Read the response only: aiohttp then lingers (bounded) for the unread body.
        status = await asyncio.wait_for(reader.readline(), 5)
        head_and_body = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        writer.close()
        assert status.startswith(b"HTTP/1.1 408"), status
        assert b"Connection: close" in head_and_body
        assert b'"error":"request_timeout"' in head_and_body


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), 0.01)
    except TimeoutError:
        return False
    return data == b""
