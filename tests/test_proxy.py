"""End-to-end proxy behaviour: a real gateway in front of real upstream servers."""

from __future__ import annotations

import asyncio
import gzip
import os

import aiohttp
import pytest
from aiohttp import web

from tests.support.gateway import RunningGateway, StartGateway
from tests.support.upstreams import RecordingUpstream, StartUpstream


def config(upstream_url: str, extra: str = "", **upstream: object) -> str:
    opts = "".join(f"{k} = {v!r}\n" for k, v in upstream.items())
    return f"""
[upstreams.svc]
url = "{upstream_url}"
{opts}
{extra}

[[routes]]
prefix = "/v1"
upstream = "svc"
"""


@pytest.fixture
async def gw(start_gateway: StartGateway, recording_upstream: RecordingUpstream) -> RunningGateway:
    return await start_gateway(config(recording_upstream.url))


async def test_binary_body_byte_exact_both_ways(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    payload = os.urandom(300_000) + bytes(range(256))

    async def echo(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=await request.read(), content_type="application/octet-stream")

    up = await start_upstream(echo)
    gw = await start_gateway(config(up.url))
    async with aiohttp.ClientSession() as s, s.put(f"{gw.url}/v1/blob", data=payload) as r:
        assert r.status == 200
        assert await r.read() == payload
        assert r.headers["Content-Length"] == str(len(payload))


async def test_gzip_body_is_not_decompressed(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    compressed = gzip.compress(b"hello " * 1000)
    seen: list[bytes] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(await request.read())
        return web.Response(body=compressed, headers={"Content-Encoding": "gzip"})

    up = await start_upstream(handler)
    gw = await start_gateway(config(up.url))
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.post(f"{gw.url}/v1/z", data=compressed, headers={"Content-Encoding": "gzip"}) as r,
    ):
        assert r.headers["Content-Encoding"] == "gzip"
        assert await r.read() == compressed
    assert seen == [compressed]


async def test_chunked_request_body_streams(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    async def body():  # type: ignore[no-untyped-def]
        for i in range(50):
            yield bytes([i]) * 10_000

    async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/up", data=body()) as r:
        assert r.status == 200
    rec = recording_upstream.last
    assert rec.body == b"".join(bytes([i]) * 10_000 for i in range(50))
    assert rec.header("Transfer-Encoding") == "chunked"


async def test_path_query_and_method_forwarded(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    async with aiohttp.ClientSession() as s, s.delete(f"{gw.url}/v1/a/b?x=1&y=%20z") as r:
        assert r.status == 200
    rec = recording_upstream.last
    assert (rec.method, rec.path, rec.query) == ("DELETE", "/v1/a/b", "x=1&y=%20z")


async def test_normalised_path_reaches_upstream(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gw.url}/v1//x/../%79", skip_auto_headers=(), allow_redirects=False) as r,
    ):
        assert r.status == 200
    assert recording_upstream.last.path == "/v1/y"


async def test_hop_by_hop_request_headers_dropped(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "Trailer": "X-T",
        "X-End-To-End": "kept",
    }
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/h", headers=headers) as r:
        assert r.status == 200
    rec = recording_upstream.last
    for name in (
        "Connection",
        "X-Secret-Hop",
        "Keep-Alive",
        "TE",
        "Proxy-Authorization",
        "Trailer",
    ):
        assert rec.header(name) is None, name
    assert rec.header("X-End-To-End") == "kept"


async def test_hop_by_hop_response_headers_dropped(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(
            text="ok",
            headers={
                "Connection": "X-Hop",
                "X-Hop": "1",
                "Keep-Alive": "timeout=1",
                "X-Kept": "yes",
                "Proxy-Authenticate": "Basic",
            },
        )

    up = await start_upstream(handler)
    gw = await start_gateway(config(up.url))
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/r") as r:
        assert r.headers.get("X-Kept") == "yes"
        for name in ("X-Hop", "Keep-Alive", "Proxy-Authenticate"):
            assert name not in r.headers, name


async def test_forwarded_headers(gw: RunningGateway, recording_upstream: RecordingUpstream) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"{gw.url}/v1/f",
            headers={
                "X-Forwarded-For": "203.0.113.9",
                "X-Forwarded-Proto": "evil",
                "Host": "api.example",
            },
        ) as r,
    ):
        assert r.status == 200
    rec = recording_upstream.last
    assert rec.header("X-Forwarded-For") == "203.0.113.9, 127.0.0.1"
    assert rec.header("X-Forwarded-Proto") == "http"
    assert rec.header("X-Forwarded-Host") == "api.example"
    assert rec.header("Host") == f"127.0.0.1:{recording_upstream.port}"


async def test_request_id_kept_generated_and_replaced(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/v1/i", headers={"X-Request-ID": "abc-123"}) as r:
            assert r.headers["X-Request-ID"] == "abc-123"
        assert recording_upstream.last.header_all("X-Request-ID") == ["abc-123"]
        async with s.get(f"{gw.url}/v1/i") as r:
            generated = r.headers["X-Request-ID"]
        assert len(generated) == 32
        assert recording_upstream.last.header("X-Request-ID") == generated
        async with s.get(f"{gw.url}/v1/i", headers={"X-Request-ID": "x" * 129}) as r:
            assert r.headers["X-Request-ID"] != "x" * 129


async def test_404_and_405_are_json(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(f"""
[upstreams.svc]
url = "{recording_upstream.url}"

[[routes]]
methods = ["GET", "POST"]
path = "/v1/items/{{id}}"
upstream = "svc"
""")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/nothing") as r:
            assert r.status == 404
            body = await r.json()
            assert body["error"] == "not_found"
            assert body["request_id"] == r.headers["X-Request-ID"]
        async with s.delete(f"{gw.url}/v1/items/7") as r:
            assert r.status == 405
            assert r.headers["Allow"] == "GET, POST"
            assert (await r.json())["error"] == "method_not_allowed"
    assert recording_upstream.requests == []


async def test_413_on_content_length_and_mid_stream(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config(recording_upstream.url, "[server]\nmax_body_bytes = 100000\n"))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/big", data=b"x" * 100_001) as r:
            assert r.status == 413
            assert (await r.json())["error"] == "payload_too_large"

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(20):
                yield b"y" * 10_000

        async with s.post(f"{gw.url}/v1/big", data=chunks()) as r:
            assert r.status == 413
        async with s.post(f"{gw.url}/v1/ok", data=b"x" * 100_000) as r:
            assert r.status == 200


async def test_502_when_upstream_refuses(start_gateway: StartGateway) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gw = await start_gateway(config(f"http://127.0.0.1:{port}"))
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/x") as r:
        assert r.status == 502
        assert (await r.json())["error"] == "bad_gateway"


async def test_504_when_upstream_is_silent(start_gateway: StartGateway) -> None:
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(65536)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gw = await start_gateway(config(f"http://127.0.0.1:{port}", read_timeout=0.3))
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/x") as r:
        assert r.status == 504
        assert (await r.json())["error"] == "gateway_timeout"
    for w in writers:
        w.close()
    server.close()
    await server.wait_closed()


async def test_redirects_returned_not_followed(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    up = await start_upstream(handler)
    gw = await start_gateway(config(up.url))
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/r", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == "/elsewhere"


async def test_head_and_204(start_gateway: StartGateway, start_upstream: StartUpstream) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path.endswith("/empty"):
            return web.Response(status=204)
        return web.Response(body=b"x" * 1234)

    up = await start_upstream(handler)
    gw = await start_gateway(config(up.url))
    async with aiohttp.ClientSession() as s:
        async with s.head(f"{gw.url}/v1/h") as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == "1234"
            assert await r.read() == b""
        async with s.get(f"{gw.url}/v1/empty") as r:
            assert r.status == 204
        async with s.get(f"{gw.url}/v1/h") as r:  # connection still usable after HEAD
            assert len(await r.read()) == 1234


async def test_strip_prefix_and_upstream_path(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(f"""
[upstreams.svc]
url = "{recording_upstream.url}"

[[routes]]
prefix = "/api/billing"
strip_prefix = true
upstream = "svc"

[[routes]]
methods = ["GET"]
path = "/v1/users/{{id}}/profile"
upstream_path = "/internal/profile/{{id}}"
upstream = "svc"
""")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/api/billing/invoices/9?a=b") as r:
            assert r.status == 200
        assert (recording_upstream.last.path, recording_upstream.last.query) == (
            "/invoices/9",
            "a=b",
        )
        async with s.get(f"{gw.url}/api/billing") as r:
            assert r.status == 200
        assert recording_upstream.last.path == "/"
        async with s.get(f"{gw.url}/v1/users/a%20b/profile") as r:
            assert r.status == 200
        assert recording_upstream.last.path == "/internal/profile/a%20b"


async def test_websocket_echo_through_gateway(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    async def ws_echo(request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    up = await start_upstream(ws_echo)
    gw = await start_gateway(config(up.url))
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{gw.url}/v1/chat/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive_str(timeout=5)) == "echo:hi"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive_bytes(timeout=5)) == b"\x03\x02\x01"
        await ws.close()


async def test_bad_percent_encoding_is_400_json(gw: RunningGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /v1/%zz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 400")
    assert b'"error":"bad_request"' in data


async def test_absolute_form_target_routes_on_its_path(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"GET http://example.com/v1/abs?q=1 HTTP/1.1\r\nHost: example.com\r\n"
        b"Connection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert (recording_upstream.last.path, recording_upstream.last.query) == ("/v1/abs", "q=1")


async def test_asterisk_form_is_400(gw: RunningGateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 400")
    assert b'"error":"bad_request"' in data


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_long_request_target_is_414_json(gw: RunningGateway) -> None:
    data = await raw_exchange(gw.port, b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.split(b" ", 2)[1] == b"414"
    assert b'"error":"bad_request"' in data


async def test_long_header_is_431_json(gw: RunningGateway) -> None:
    data = await raw_exchange(
        gw.port, b"GET /v1/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n"
    )
    assert data.split(b" ", 2)[1] == b"431"
    assert b'"request_id"' in data


async def test_garbage_request_is_400_json(gw: RunningGateway) -> None:
    data = await raw_exchange(gw.port, b"\x16\x03\x01 not http\r\n\r\n")
    assert data.split(b" ", 2)[1] == b"400"
    assert b'"error":"bad_request"' in data


async def test_websocket_upgrade_forwards_headers_like_plain_requests(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    seen: list[web.BaseRequest] = []

    async def ws_handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    up = await start_upstream(ws_handler)
    gw = await start_gateway(
        config(
            up.url,
            '[plugins.who]\ntype = "tests.sample_plugins:HeaderPlugin"\n'
            'header = "X-User-Id"\nidentity = true\n',
        )
    )
    headers = {"X-Forwarded-For": "203.0.113.9", "X-User-Id": "spoofed", "X_User_Id": "x"}
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{gw.url}/v1/ws", headers=headers):
        pass
    got = seen[0].headers
    assert got["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert "X-User-Id" not in got
    assert "X_User_Id" not in got
    assert len(got["X-Request-ID"]) == 32
