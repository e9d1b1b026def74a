"""Large and slow streams through the gateway to real upstreams.

Bytes are generated on the fly on the sending side and checked (count and
CRC-32) on the receiving side; nothing holds a whole body. The gateway's
memory is watched from outside (psutil RSS of the gateway process, sampled
every 50 ms) while 1 GiB goes through it each way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import psutil
import pytest
from aiohttp import web

from tests.support.gateway import StartGateway, StartGatewayProcess
from tests.support.upstreams import RunningUpstream, StartUpstream

MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = 256 * 1024
# Random bytes; chunk i starts at a varying offset so the stream never repeats
# with a period a CRC could miss by reordering.
_BLOCK = os.urandom(CHUNK + 4096)


def payload_chunks(total: int) -> Iterator[bytes]:
    sent, i = 0, 0
    while sent < total:
        n = min(CHUNK, total - sent)
        offset = (i * 7919) % 4096
        yield _BLOCK[offset : offset + n]
        sent += n
        i += 1


def expected_crc(total: int) -> int:
    crc = 0
    for chunk in payload_chunks(total):
        crc = zlib.crc32(chunk, crc)
    return crc


async def body_stream(total: int, sent: list[int] | None = None) -> AsyncIterator[bytes]:
    for chunk in payload_chunks(total):
        if sent is not None:
            sent[0] += len(chunk)
        yield chunk


@dataclass
class Received:
    """What one side received: byte count and running CRC-32."""

    size: int = 0
    crc: int = 0

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)


@dataclass
class Outcome:
    """How an upstream handler ended."""

    done: asyncio.Event = field(default_factory=asyncio.Event)
    bytes: int = 0
    error: BaseException | None = None
    headers: dict[str, str] = field(default_factory=dict)
    completed: bool = False


class StreamUpstream:
    """POST /upload counts and checksums the body; GET /download?size=N streams N bytes
    (``&chunked=1``: without Content-Length); GET /two-chunks sends one chunk, waits for
    ``release``, then the second."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def handler(self, request: web.BaseRequest) -> web.StreamResponse:
        outcome = Outcome(headers={k.lower(): v for k, v in request.headers.items()})
        self.outcomes.append(outcome)
        self.started.set()
        try:
            if request.path == "/upload":
                return await self._upload(request, outcome)
            if request.path == "/download":
                return await self._download(request, outcome)
            if request.path == "/truncated":
                return await self._truncated(request, outcome)
            if request.path == "/two-chunks":
                return await self._two_chunks(request, outcome)
            return web.Response(status=404)
        except BaseException as exc:
            outcome.error = exc
            raise
        finally:
            outcome.done.set()

    async def _upload(self, request: web.BaseRequest, outcome: Outcome) -> web.StreamResponse:
        received = Received()
        if request.query.get("early"):
            # Answer at once without reading the body (as a 413 from the service would).
            return web.json_response({"error": "too big"}, status=413)
        slow_until = time.monotonic() + float(request.query.get("slow", "0"))
        while time.monotonic() < slow_until:  # ~2.5 MiB/s at first
            data = await request.content.read(256 * 1024)
            if not data:
                break
            received.feed(data)
            outcome.bytes = received.size
            await asyncio.sleep(0.1)
        async for data in request.content.iter_any():
            received.feed(data)
            outcome.bytes = received.size
        outcome.completed = True
        return web.json_response({"size": received.size, "crc": received.crc})

    async def _download(self, request: web.BaseRequest, outcome: Outcome) -> web.StreamResponse:
        size = int(request.query["size"])
        response = web.StreamResponse()
        if request.query.get("chunked"):
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        await response.prepare(request)
        for chunk in payload_chunks(size):
            await response.write(chunk)
            outcome.bytes += len(chunk)
        await response.write_eof()
        outcome.completed = True
        return response

    async def _truncated(self, request: web.BaseRequest, outcome: Outcome) -> web.StreamResponse:
        """Promise ``size`` bytes (or chunked), send ``cut``, then drop the connection."""
        size, cut = int(request.query["size"]), int(request.query["cut"])
        response = web.StreamResponse()
        if request.query.get("chunked"):
            response.enable_chunked_encoding()
        else:
            response.content_length = size
        await response.prepare(request)
        for chunk in payload_chunks(cut):
            await response.write(chunk)
            outcome.bytes += len(chunk)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _two_chunks(self, request: web.BaseRequest, outcome: Outcome) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"first chunk;")
        outcome.bytes = 1
        await asyncio.wait_for(self.release.wait(), 10)
        await response.write(b"last chunk")
        await response.write_eof()
        outcome.completed = True
        return response


@pytest.fixture
async def stream_upstream(
    start_upstream: StartUpstream,
) -> AsyncIterator[tuple[StreamUpstream, RunningUpstream]]:
    upstream = StreamUpstream()
    running = await start_upstream(upstream.handler)
    yield upstream, running
    upstream.release.set()


def config(upstream_url: str, read_timeout: float = 30) -> str:
    return f"""
[server]
access_log = false
shutdown_timeout = 5

[upstreams.svc]
url = "{upstream_url}"
read_timeout = {read_timeout}

[[routes]]
prefix = "/"
upstream = "svc"
"""


class RssSampler:
    """Samples a process's RSS every ``interval`` s in a thread (the event loop is busy)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.NoSuchProcess):
                self.peak = max(self.peak, self.rss())
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.baseline = self.rss()
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


async def upload(
    session: aiohttp.ClientSession, url: str, size: int, *, chunked: bool = False
) -> dict[str, int]:
    headers = {} if chunked else {"Content-Length": str(size)}
    async with session.post(url, data=body_stream(size), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, int] = await resp.json()
        return result


async def download(
    session: aiohttp.ClientSession, url: str
) -> tuple[Received, aiohttp.ClientResponse]:
    received = Received()
    async with session.get(url) as resp:
        assert resp.status == 200
        async for data in resp.content.iter_any():
            received.feed(data)
    return received, resp


async def warm_up(session: aiohttp.ClientSession, base: str) -> None:
    """Let the gateway's buffers and allocator reach their steady state first."""
    assert (await upload(session, f"{base}/upload", 32 * MiB))["size"] == 32 * MiB
    received, _ = await download(session, f"{base}/download?size={32 * MiB}")
    assert received.size == 32 * MiB


# 1 GiB each way, memory bounded --------------------------------------------------


async def test_1gib_upload_streams_with_bounded_memory(
    gateway_process: StartGatewayProcess,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    upstream, up = stream_upstream
    gp = await gateway_process(config(up.url))
    async with aiohttp.ClientSession() as session:
        await warm_up(session, gp.url)
        with RssSampler(gp.proc.pid) as rss:
            started = time.monotonic()
            result = await upload(session, f"{gp.url}/upload", GiB)
            elapsed = time.monotonic() - started
    print(f"1 GiB upload: {GiB / MiB / elapsed:.0f} MiB/s, RSS +{rss.growth / MiB:.1f} MiB")
    assert result == {"size": GiB, "crc": expected_crc(GiB)}
    # Sent with its length, not re-framed.
    assert upstream.outcomes[-1].headers["content-length"] == str(GiB)
    assert "transfer-encoding" not in upstream.outcomes[-1].headers
    assert rss.samples > 10
    assert rss.growth < 64 * MiB, f"RSS grew {rss.growth / MiB:.1f} MiB ({elapsed:.1f}s)"


async def test_1gib_download_streams_with_bounded_memory(
    gateway_process: StartGatewayProcess,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    _, up = stream_upstream
    gp = await gateway_process(config(up.url))
    async with aiohttp.ClientSession() as session:
        await warm_up(session, gp.url)
        with RssSampler(gp.proc.pid) as rss:
            started = time.monotonic()
            received, resp = await download(session, f"{gp.url}/download?size={GiB}")
            elapsed = time.monotonic() - started
    print(f"1 GiB download: {GiB / MiB / elapsed:.0f} MiB/s, RSS +{rss.growth / MiB:.1f} MiB")
    assert resp.headers["Content-Length"] == str(GiB)
    assert received.size == GiB
    assert received.crc == expected_crc(GiB)
    assert rss.samples > 10
    assert rss.growth < 64 * MiB, f"RSS grew {rss.growth / MiB:.1f} MiB"


async def test_chunked_upload_and_download(
    gateway_process: StartGatewayProcess,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    upstream, up = stream_upstream
    size = 64 * MiB + 12345  # not a multiple of the chunk size
    gp = await gateway_process(config(up.url))
    async with aiohttp.ClientSession() as session:
        await warm_up(session, gp.url)
        with RssSampler(gp.proc.pid) as rss:
            result = await upload(session, f"{gp.url}/upload", size, chunked=True)
            received, resp = await download(session, f"{gp.url}/download?size={size}&chunked=1")
    crc = expected_crc(size)
    assert result == {"size": size, "crc": crc}
    # No length known: chunked on to the upstream.
    assert upstream.outcomes[-2].headers["transfer-encoding"] == "chunked"
    assert "content-length" not in upstream.outcomes[-2].headers
    assert "Content-Length" not in resp.headers
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert (received.size, received.crc) == (size, crc)
    assert rss.growth < 64 * MiB, f"RSS grew {rss.growth / MiB:.1f} MiB"


# Latency: nothing waits for the whole body ----------------------------------------


async def test_first_chunk_reaches_client_before_upstream_sends_the_last(
    start_gateway: StartGateway,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    upstream, up = stream_upstream
    gw = await start_gateway(config(up.url))
    async with aiohttp.ClientSession() as session, session.get(f"{gw.url}/two-chunks") as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readany(), 5)
        assert first == b"first chunk;"
        assert not upstream.outcomes[-1].completed  # the upstream is still waiting
        upstream.release.set()
        rest = await asyncio.wait_for(resp.content.read(), 5)
    assert rest == b"last chunk"


# Client aborts: the upstream side is cancelled, nothing leaks ---------------------


async def wait_for(
    predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_client_abort_mid_upload_closes_upstream_connection(
    start_gateway: StartGateway,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    upstream, up = stream_upstream
    gw = await start_gateway(config(up.url))
    pool = gw.gateway.table.pools["svc"]
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    total = 256 * MiB
    writer.write(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % total)
    chunks = payload_chunks(total)
    for _ in range(16):  # 4 MiB of 256
        writer.write(next(chunks))
        await writer.drain()
    await asyncio.wait_for(upstream.started.wait(), 5)
    outcome = upstream.outcomes[-1]
    await wait_for(lambda: outcome.bytes >= MiB, what="upstream receiving the body")
    assert pool.stats().active == 1
    writer.transport.abort()

    await asyncio.wait_for(outcome.done.wait(), 5)
    assert not outcome.completed
    assert outcome.error is not None  # its read failed: the connection was closed
    assert outcome.bytes < total
    await wait_for(lambda: pool.stats().active == 0, what="pool connection released")
    assert pool.stats().idle == 0  # aborted, not put back half-used
    # And the gateway serves the next request normally.
    async with aiohttp.ClientSession() as session:
        assert (await upload(session, f"{gw.url}/upload", MiB))["size"] == MiB


async def test_client_abort_mid_download_cancels_upstream(
    start_gateway: StartGateway,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    upstream, up = stream_upstream
    gw = await start_gateway(config(up.url))
    pool = gw.gateway.table.pools["svc"]
    total = GiB
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /download?size=%d HTTP/1.1\r\nHost: gw\r\n\r\n" % total)
    got = 0
    while got < 8 * MiB:
        data = await asyncio.wait_for(reader.read(MiB), 5)
        assert data
        got += len(data)
    outcome = upstream.outcomes[-1]
    assert pool.stats().active == 1
    writer.transport.abort()

    # The upstream's next writes fail and its handler ends.
    await asyncio.wait_for(outcome.done.wait(), 5)
    assert not outcome.completed
    assert outcome.error is not None
    assert outcome.bytes < total
    await wait_for(lambda: pool.stats().active == 0, what="pool connection released")
    assert pool.stats().idle == 0
    async with aiohttp.ClientSession() as session:
        received, _ = await download(session, f"{gw.url}/download?size={MiB}")
    assert received.size == MiB


# Backpressure ----------------------------------------------------------------------


async def test_slow_client_keeps_gateway_memory_flat(
    gateway_process: StartGatewayProcess,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    upstream, up = stream_upstream
    gp = await gateway_process(config(up.url))
    total = 200 * MiB
    async with aiohttp.ClientSession() as session:
        await warm_up(session, gp.url)
        reader, writer = await asyncio.open_connection("127.0.0.1", gp.port)
        writer.write(b"GET /download?size=%d HTTP/1.1\r\nHost: gw\r\n\r\n" % total)
        got = 0
        with RssSampler(gp.proc.pid) as rss:
            # About 1 MiB/s for 4 s from an upstream that could send 200 MiB at once.
            for _ in range(16):
                data = await asyncio.wait_for(reader.read(256 * 1024), 5)
                assert data
                got += len(data)
                await asyncio.sleep(0.25)
        outcome = upstream.outcomes[-1]
        sent_by_upstream = outcome.bytes
        writer.transport.abort()
        await asyncio.wait_for(outcome.done.wait(), 5)
    print(
        f"slow client: read {got / MiB:.1f} MiB, upstream sent {sent_by_upstream / MiB:.1f} MiB,"
        f" RSS +{rss.growth / MiB:.1f} MiB"
    )
    assert got >= 2 * MiB
    assert rss.samples > 40
    assert rss.growth < 16 * MiB, f"RSS grew {rss.growth / MiB:.1f} MiB"
    # The upstream was held back too: only what fits in socket buffers and the
    # gateway's bounded window got ahead of the client.
    assert sent_by_upstream < 64 * MiB, f"upstream sent {sent_by_upstream / MiB:.0f} MiB"
    assert not outcome.completed


async def test_slow_upstream_reader_keeps_gateway_memory_flat(
    gateway_process: StartGatewayProcess,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    upstream, up = stream_upstream
    gp = await gateway_process(config(up.url))
    total = 128 * MiB
    sent = [0]
    async with aiohttp.ClientSession() as session:
        await warm_up(session, gp.url)
        with RssSampler(gp.proc.pid) as rss:
            request = asyncio.create_task(
                session.post(
                    f"{gp.url}/upload?slow=3",
                    data=body_stream(total, sent),
                    headers={"Content-Length": str(total)},
                )
            )
            await asyncio.sleep(2.5)  # the upstream reads slowly for 3 s
            outcome = upstream.outcomes[-1]
            upstream_got = outcome.bytes
            ahead = sent[0] - upstream_got
            async with await request as resp:
                result = await resp.json()
    print(
        f"slow upstream: client {ahead / MiB:.1f} MiB ahead of it after 2.5 s,"
        f" RSS +{rss.growth / MiB:.1f} MiB"
    )
    assert result == {"size": total, "crc": expected_crc(total)}
    assert upstream_got < 16 * MiB  # the upstream really was slow then
    assert ahead < 48 * MiB, f"client got {ahead / MiB:.0f} MiB ahead of the upstream"
    assert rss.growth < 16 * MiB, f"RSS grew {rss.growth / MiB:.1f} MiB"


async def consume(resp: aiohttp.ClientResponse, received: Received) -> None:
    async for data in resp.content.iter_any():
        received.feed(data)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_upstream_dying_mid_body_cuts_the_client_stream(
    start_gateway: StartGateway,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
    chunked: bool,
) -> None:
    # A truncated body must never look complete to the client.
    _, up = stream_upstream
    gw = await start_gateway(config(up.url))
    pool = gw.gateway.table.pools["svc"]
    query = f"size={8 * MiB}&cut={2 * MiB}" + ("&chunked=1" if chunked else "")
    received = Received()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/truncated?{query}") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await consume(resp, received)
        assert received.size <= 2 * MiB
        await wait_for(lambda: pool.stats().active == 0, what="pool connection closed")
        # The gateway is fine afterwards.
        got, _ = await download(session, f"{gw.url}/download?size={MiB}")
    assert got.size == MiB


async def test_upstream_answering_before_reading_the_upload(
    start_gateway: StartGateway,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    _, up = stream_upstream
    gw = await start_gateway(config(up.url))
    pool = gw.gateway.table.pools["svc"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    total = 256 * MiB
    writer.write(b"POST /upload?early=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % total)
    chunks = payload_chunks(total)
    for _ in range(8):  # 2 MiB, then wait for the answer
        writer.write(next(chunks))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.transport.abort()
    assert head.startswith(b"HTTP/1.1 413 ")
    # The upstream connection that carried a half-sent body is not reused.
    await wait_for(lambda: pool.stats().active == 0, what="pool connection closed")
    assert pool.stats().idle == 0


async def test_expect_100_continue_gets_an_interim_response(
    start_gateway: StartGateway,
    stream_upstream: tuple[StreamUpstream, RunningUpstream],
) -> None:
    _, up = stream_upstream
    gw = await start_gateway(config(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.9)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"hello")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.transport.abort()


async def test_read_until_close_upstream_body_is_streamed_whole(
    start_gateway: StartGateway,
) -> None:
    # An HTTP/1.0-style upstream: no Content-Length, no chunking, the end is EOF.
    total = 8 * MiB + 7

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        for chunk in payload_chunks(total):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        gw = await start_gateway(config(f"http://127.0.0.1:{port}"))
        async with aiohttp.ClientSession() as session:
            received, resp = await download(session, f"{gw.url}/anything")
            assert "Content-Length" not in resp.headers
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert (received.size, received.crc) == (total, expected_crc(total))
            # The gateway's client connection stays usable after it.
            again, _ = await download(session, f"{gw.url}/anything")
            assert again.size == total
    finally:
        server.close()
        await server.wait_closed()


async def test_upstream_dropping_an_upload_midway_gives_502(
    start_gateway: StartGateway,
) -> None:
    total = 64 * MiB
    dropped = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(MiB)
        writer.transport.abort()  # reset while the body is still coming
        dropped.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        gw = await start_gateway(config(f"http://127.0.0.1:{port}"))
        pool = gw.gateway.table.pools["svc"]
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{gw.url}/upload",
                data=body_stream(total),
                headers={"Content-Length": str(total)},
            ) as resp:
                assert resp.status == 502
                body = await resp.json()
            assert body["error"] == "bad_gateway"
            assert body["request_id"] == resp.headers["X-Request-ID"]
        assert dropped.is_set()
        await wait_for(lambda: pool.stats().active == 0, what="pool connection closed")
    finally:
        server.close()
        await server.wait_closed()
