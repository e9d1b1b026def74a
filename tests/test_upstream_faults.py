"""Upstream faults through a real gateway: real servers misbehaving, nothing mocked.

One raw asyncio upstream picks its misbehaviour from the request path
(``/v1/ok`` answers normally, ``/v1/silent`` never answers, ...). After each
fault the gateway must have answered the client sensibly (502/504 JSON, or a
cut stream once the head is gone), serve the next request, and be back to its
baseline: no pooled connection left active, no leaked file descriptor
(psutil on this process, which hosts the gateway) and no leaked task.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import psutil
import pytest
from aiohttp import web

from aiogateway.proxy import FIRST_CHUNK_GRACE
from aiogateway.upstream import UpstreamPool
from tests.support.gateway import RunningGateway, StartGateway, free_port

READ_TIMEOUT = 0.5
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def head(status: bytes = b"200 OK", length: int = 100_000) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % length


async def until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(OK)
    return True  # keep the connection


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await until_eof(reader)
    return False


async def stall_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(head() + b"x" * 1000)
    await until_eof(reader)
    return False


async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(head() + b"x" * 1000)
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)
    return False


async def reset_after_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(head())
    await writer.drain()
    # Within the gateway's grace for the first body bytes (later, the head is gone).
    await asyncio.sleep(FIRST_CHUNK_GRACE / 5)
    reset(writer)
    return False


async def close_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(head() + b"x" * 1000)
    return False


def answer(data: bytes, keep: bool = False) -> Behaviour:
    async def behave(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        if not keep:
            await writer.drain()
            await asyncio.sleep(0.05)
        return keep

    return behave


async def ok_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """A keep-alive answer (no Connection: close), then the idle connection is closed."""
    writer.write(OK)
    await writer.drain()
    return False


BEHAVIOURS: dict[bytes, Behaviour] = {
    b"/v1/ok": ok,
    b"/v1/silent": silent,
    b"/v1/stall": stall_mid_body,
    b"/v1/reset": reset_mid_body,
    b"/v1/short": close_mid_body,
    b"/v1/reset-after-head": reset_after_head,
    b"/v1/garbage": answer(b"HTTP/1.1 abc\r\n\r\n"),
    b"/v1/not-http": answer(b"SSH-2.0-OpenSSH_9.6\r\n"),
    b"/v1/bad-status": answer(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
    b"/v1/cl-and-te": answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        keep=True,
    ),
    b"/v1/two-cl": answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", keep=True
    ),
    b"/v1/bad-chunk": answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
    ),
    b"/v1/header-crlf": answer(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n"),
    b"/v1/nothing": answer(b""),
    # One answer, then a second, unrequested one on the same connection.
    b"/v1/extra": answer(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON", keep=True),
    b"/v1/close-idle": ok_then_close,
    b"/v1/own-request-id": answer(
        b"HTTP/1.1 200 OK\r\nX-Request-ID: upstream-id\r\nContent-Length: 2\r\n\r\nok", keep=True
    ),
    b"/v1/connection-request-id": answer(
        b"HTTP/1.1 200 OK\r\nConnection: X-Request-ID\r\nContent-Length: 2\r\n\r\nok",
        keep=True,
    ),
}


class FaultyUpstream:
    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.requests: list[bytes] = []
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> FaultyUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                request_head = await reader.readuntil(b"\r\n\r\n")
                method, target = request_head.split(b" ", 2)[:2]
                self.requests.append(target)
                behave = BEHAVIOURS.get(target, ok)
                if method == b"HEAD" and target == b"/v1/head-with-body":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON")
                    continue
                if not await behave(reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.transport.abort()
            self._tasks.discard(task)
            self._writers.discard(writer)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # handlers see EOF and end on their own
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        await self.server.wait_closed()


@pytest.fixture
async def upstream() -> AsyncIterator[FaultyUpstream]:
    up = await FaultyUpstream().start()
    yield up
    await up.close()


def config(url: str, **upstream: float) -> str:
    opts = {"read_timeout": READ_TIMEOUT, "connect_timeout": 1, "keepalive_timeout": 0.2}
    opts.update(upstream)
    lines = "".join(f"{k} = {v}\n" for k, v in opts.items())
    return f"""
[server]
access_log = false

[upstreams.svc]
url = "{url}"
{lines}
[[routes]]
prefix = "/v1"
upstream = "svc"
"""


@pytest.fixture
async def gw(start_gateway: StartGateway, upstream: FaultyUpstream) -> RunningGateway:
    return await start_gateway(config(f"http://127.0.0.1:{upstream.port}"))


def pool(gw: RunningGateway) -> UpstreamPool:
    return gw.gateway.table.pools["svc"]


class Baseline:
    """File descriptors and tasks of this process (the gateway's), before a fault."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.fds = self.proc.num_fds()
        self.tasks = len(asyncio.all_tasks())

    async def assert_back(self, gw: RunningGateway, timeout: float = 3.0) -> None:
        """Pool idle and empty (keep-alive expired), fds and tasks back to the baseline."""
        deadline = time.monotonic() + timeout
        while True:
            stats = pool(gw).stats()
            fds = self.proc.num_fds()
            tasks = len(asyncio.all_tasks())
            if stats.active == 0 and stats.idle == 0 and fds <= self.fds and tasks <= self.tasks:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not back to baseline: {stats}, fds {fds} (was {self.fds}), "
                    f"tasks {tasks} (was {self.tasks}): "
                    f"{[t.get_coro() for t in asyncio.all_tasks()]}"
                )
            await asyncio.sleep(0.05)


async def get(gw: RunningGateway, path: str, method: str = "GET") -> tuple[int, bytes]:
    """One request on its own connection (closed after): status and body."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.request(method, gw.url + path) as resp,
    ):
        return resp.status, await resp.read()


async def drain(resp: aiohttp.ClientResponse, timeout: float) -> int:
    received = 0
    async with asyncio.timeout(timeout):
        async for chunk in resp.content.iter_any():
            received += len(chunk)
    return received


async def assert_serving(gw: RunningGateway) -> None:
    assert await get(gw, "/v1/ok") == (200, b"ok")


async def test_refused_is_502_and_leaks_nothing(start_gateway: StartGateway) -> None:
    gw = await start_gateway(config(f"http://127.0.0.1:{free_port()}"))
    base = Baseline()
    for _ in range(5):
        status, body = await get(gw, "/v1/x")
        assert status == 502
        assert orjson.loads(body)["error"] == "bad_gateway"
    await base.assert_back(gw)
    assert pool(gw).stats().opened == 0


async def test_silent_upstream_is_504_after_read_timeout(
    gw: RunningGateway, upstream: FaultyUpstream
) -> None:
    base = Baseline()
    started = time.monotonic()
    status, body = await get(gw, "/v1/silent")
    took = time.monotonic() - started
    assert status == 504
    assert orjson.loads(body)["error"] == "gateway_timeout"
    assert READ_TIMEOUT * 0.9 <= took < READ_TIMEOUT + 1.5
    await assert_serving(gw)
    await base.assert_back(gw)


@pytest.mark.parametrize("path", ["/v1/stall", "/v1/reset", "/v1/short"])
async def test_failure_mid_body_cuts_the_client_stream(
    gw: RunningGateway, upstream: FaultyUpstream, path: str
) -> None:
    base = Baseline()
    started = time.monotonic()
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
        session.get(gw.url + path) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "100000"
        with pytest.raises(aiohttp.ClientPayloadError):
            await drain(resp, READ_TIMEOUT + 3)
    took = time.monotonic() - started
    assert resp.content.total_bytes == 1000  # what the upstream sent, never more
    assert took < READ_TIMEOUT + 2
    await assert_serving(gw)
    await base.assert_back(gw)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/garbage",
        "/v1/not-http",
        "/v1/bad-status",
        "/v1/cl-and-te",
        "/v1/two-cl",
        "/v1/header-crlf",
        "/v1/nothing",
    ],
)
async def test_malformed_response_is_502(
    gw: RunningGateway, upstream: FaultyUpstream, path: str
) -> None:
    base = Baseline()
    status, body = await get(gw, path)
    assert status == 502, body
    assert orjson.loads(body)["error"] == "bad_gateway"
    await assert_serving(gw)
    await base.assert_back(gw)


async def test_malformed_chunked_body_ends_the_exchange(
    gw: RunningGateway, upstream: FaultyUpstream
) -> None:
    base = Baseline()
    try:
        status, _ = await asyncio.wait_for(get(gw, "/v1/bad-chunk"), READ_TIMEOUT + 2)
    except aiohttp.ClientError:
        status = -1  # cut
    assert status in (502, -1)
    await assert_serving(gw)
    await base.assert_back(gw)


@pytest.mark.parametrize("path", ["/v1/bad-chunk", "/v1/reset-after-head"])
async def test_body_failure_before_the_first_byte_is_502(
    gw: RunningGateway, upstream: FaultyUpstream, path: str
) -> None:
    status, body = await get(gw, path)
    assert status == 502
    assert orjson.loads(body)["error"] == "bad_gateway"


async def test_unrequested_extra_response_never_reaches_the_next_client(
    gw: RunningGateway, upstream: FaultyUpstream
) -> None:
    """Response desync: bytes after a complete response must not be the next answer."""
    base = Baseline()
    assert await get(gw, "/v1/extra") == (200, b"ok")
    for _ in range(3):
        assert await get(gw, "/v1/ok") == (200, b"ok")
    await base.assert_back(gw)


async def test_head_answered_with_a_body_does_not_poison_the_pool(
    gw: RunningGateway, upstream: FaultyUpstream
) -> None:
    base = Baseline()
    status, body = await get(gw, "/v1/head-with-body", method="HEAD")
    assert (status, body) == (200, b"")
    for _ in range(3):
        assert await get(gw, "/v1/ok") == (200, b"ok")
    await base.assert_back(gw)


async def test_upstream_closing_pooled_connections_fails_no_request(
    start_gateway: StartGateway, upstream: FaultyUpstream
) -> None:
    # Long keep-alive on our side: every reuse finds a connection the upstream closed.
    gw = await start_gateway(config(f"http://127.0.0.1:{upstream.port}", keepalive_timeout=30))
    results = []
    async with aiohttp.ClientSession() as session:
        for i in range(20):
            method = "POST" if i % 2 else "GET"
            async with session.request(method, gw.url + "/v1/close-idle", data=b"b" * i) as r:
                results.append((r.status, await r.read()))
            await asyncio.sleep(0.01)  # let the upstream's FIN arrive first, sometimes
    assert results == [(200, b"ok")] * 20
    assert pool(gw).stats().active == 0
    assert upstream.connections == 20


async def test_upstream_restarted_under_load(start_gateway: StartGateway) -> None:
    port = free_port()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(0.005)
        return web.Response(body=b"ok")

    async def serve() -> web.ServerRunner:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = await serve()
    gw = await start_gateway(config(f"http://127.0.0.1:{port}", keepalive_timeout=0.2))
    base = Baseline()
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.post(gw.url + "/v1/load", data=b"x" * 100) as r:
                    await r.read()
                    statuses.append(r.status)

    clients = [asyncio.ensure_future(client()) for _ in range(6)]
    try:
        await asyncio.sleep(0.5)
        before_restart = len(statuses)
        await runner.cleanup()  # in-flight requests are cut, new ones refused
        await asyncio.sleep(0.3)
        runner = await serve()
        await asyncio.sleep(0.7)
    finally:
        stop.set()
        await asyncio.gather(*clients)
        served_after = len(statuses)
    try:
        assert before_restart > 20
        assert set(statuses) <= {200, 502}, set(statuses)
        assert statuses[-20:] == [200] * 20  # recovered
        assert served_after - before_restart > 20
        await assert_serving(gw)
        await base.assert_back(gw)
    finally:
        await runner.cleanup()


async def test_many_faults_in_parallel_leave_nothing_behind(
    gw: RunningGateway, upstream: FaultyUpstream
) -> None:
    base = Baseline()
    paths = ["/v1/silent", "/v1/stall", "/v1/reset", "/v1/garbage", "/v1/extra", "/v1/ok"] * 5

    async def one(path: str) -> int:
        with contextlib.suppress(aiohttp.ClientPayloadError):
            status, _ = await get(gw, path)
            return status
        return -1  # cut mid-body

    statuses = await asyncio.gather(*(one(p) for p in paths))
    assert set(statuses) <= {200, 502, 504, -1}
    assert statuses.count(504) == 5
    await assert_serving(gw)
    await base.assert_back(gw)


@pytest.mark.parametrize("path", ["/v1/own-request-id", "/v1/connection-request-id"])
async def test_client_gets_exactly_the_gateways_request_id(
    gw: RunningGateway, upstream: FaultyUpstream, path: str
) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + path, headers={"X-Request-ID": "client-id-1"}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers.getall("X-Request-ID", []) == ["client-id-1"]
