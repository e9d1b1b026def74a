"""Hostile HTTP on raw sockets: request smuggling and malformed framing.

Every probe is written byte for byte to a real gateway (in-process) in front of
a raw upstream that parses what it receives with a strict HTTP/1.1 parser
(httptools/llhttp) and records every request and every byte. Each probe is
either rejected (400 JSON, connection closed, the upstream saw nothing) or
normalised: the upstream sees exactly one request with one framing header and
the expected body, and a request hidden in the probe never reaches it.
After an accepted probe a sentinel request on the same connection proves the
gateway and the upstream still agree where requests begin and end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httptools
import orjson
import pytest

from fuzz.targets import fuzz_headers, fuzz_response_headers
from tests.support.gateway import RunningGateway, StartGateway

__all__ = ["RawRequest", "RawUpstream", "read_responses"]


@dataclass
class RawRequest:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header_all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class RawUpstream:
    """A bare asyncio server: strict parser, records requests and raw bytes."""

    port: int = 0
    requests: list[RawRequest] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    parse_errors: list[str] = field(default_factory=list)
    connections: int = 0
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        for w in self._writers:
            w.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        upstream = self

        class Callbacks:
            current: RawRequest | None = None

            def on_message_begin(self) -> None:
                self.current = RawRequest(b"", b"", [])

            def on_url(self, url: bytes) -> None:
                assert self.current is not None
                self.current.url += url

            def on_header(self, name: bytes, value: bytes) -> None:
                assert self.current is not None
                self.current.headers.append((name, value))

            def on_body(self, body: bytes) -> None:
                assert self.current is not None
                self.current.body += body

            def on_message_complete(self) -> None:
                assert self.current is not None
                self.current.method = parser.get_method()
                upstream.requests.append(self.current)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        parser = httptools.HttpRequestParser(Callbacks())
        try:
            while data := await reader.read(65536):
                self.raw += data
                parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.parse_errors.append(repr(exc))
        except ConnectionError:
            pass
        finally:
            writer.transport.abort()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    up = await RawUpstream().start()
    yield up
    await up.close()


def gateway_config(upstream_url: str) -> str:
    return f"""
[server]
access_log = false

[upstreams.svc]
url = "{upstream_url}"
read_timeout = 5

[[routes]]
prefix = "/v1"
upstream = "svc"
"""


@pytest.fixture
async def gw(start_gateway: StartGateway, raw_upstream: RawUpstream) -> RunningGateway:
    return await start_gateway(gateway_config(raw_upstream.url))


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


async def read_responses(
    reader: asyncio.StreamReader, count: int, timeout: float = 5.0
) -> tuple[list[Response], bool]:
    """Parse up to ``count`` responses; (responses, closed) where closed = EOF seen."""
    done: list[Response] = []
    current: dict[str, object] = {}

    class Callbacks:
        def on_message_begin(self) -> None:
            current.clear()
            current.update(headers={}, body=b"")

        def on_header(self, name: bytes, value: bytes) -> None:
            headers = current["headers"]
            assert isinstance(headers, dict)
            headers[name.lower()] = value

        def on_body(self, body: bytes) -> None:
            current["body"] = bytes(current["body"]) + body  # type: ignore[arg-type]

        def on_message_complete(self) -> None:
            headers = current["headers"]
            assert isinstance(headers, dict)
            done.append(Response(parser.get_status_code(), headers, bytes(current["body"])))  # type: ignore[arg-type]

    parser = httptools.HttpResponseParser(Callbacks())
    closed = False
    async with asyncio.timeout(timeout):
        while len(done) < count:
            data = await reader.read(65536)
            if not data:
                closed = True
                break
            parser.feed_data(data)
    if not closed and len(done) >= count:
        # A rejected request is followed by the connection's close: see it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                closed = await reader.read(1) == b""
    return done, closed


SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

# (id, bytes): the gateway must answer 400 and close; the upstream sees nothing.
REJECTED = [
    ("cl-and-te", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED),
    ("te-and-cl", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 40\r\n\r\n0\r\n\r\n" + SMUGGLED),
    ("cl-and-te-http10", b"POST /v1/a HTTP/1.0\r\nContent-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED),
    ("te-in-http10", b"POST /v1/a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED),
    ("two-content-lengths", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Content-Length: 40\r\n\r\nabc" + SMUGGLED),
    ("two-equal-content-lengths", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Content-Length: 3\r\n\r\nabc"),
    ("content-length-list", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 40\r\n\r\nabc"),
    ("content-length-plus", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc"),
    ("content-length-negative", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    ("content-length-hex", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x3\r\n\r\nabc"),
    ("te-chunked-identity", b"POST /v1/a HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + SMUGGLED),
    ("te-chunked-twice", b"POST /v1/a HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("te-two-fields", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + SMUGGLED),
    ("te-xchunked", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED),
    ("te-gzip-not-final", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc"),
    ("te-space-before-colon", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n"
     b"\r\n3\r\nabc\r\n0\r\n\r\n" + SMUGGLED),
    ("te-high-bit", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \xffchunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n"),
    ("te-obs-fold", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding:\r\n"
     b" chunked\r\n\r\nabc" + SMUGGLED),
    ("cl-and-te-identity", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: identity\r\n\r\nabc"),
    ("bare-lf-everywhere", b"POST /v1/a HTTP/1.1\nHost: x\nContent-Length: 3\n\nabc"),
    ("bare-lf-in-header", b"POST /v1/a HTTP/1.1\r\nHost: x\nContent-Length: 3\r\n\r\nabc"),
    ("bare-cr-in-header", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nX-A: a\rContent-Length: 30\r\n\r\n"),
    ("nul-in-header-value", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("del-in-header-value", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n"),
    ("vtab-in-header-value", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nX-A: a\x0bb\r\n\r\n"),
    ("obs-fold", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n"),
    ("space-in-header-name", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n"),
    ("space-before-colon", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n"),
    ("two-hosts", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
    ("no-host-http11", b"GET /v1/a HTTP/1.1\r\n\r\n"),
    ("lower-case-method", b"get /v1/a HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("http-1-2", b"GET /v1/a HTTP/1.2\r\nHost: x\r\n\r\n"),
    ("chunk-size-not-hex", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-0x", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0x3\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-negative", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"-3\r\nabc\r\n0\r\n\r\n"),
    ("chunk-size-overflow", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"1FFFFFFFFFFFFFFFF3\r\nabc\r\n0\r\n\r\n"),
    ("chunk-bare-lf", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\nabc\n0\n\n"),
    ("chunk-ext-bare-lf", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3;x\n" + SMUGGLED + b"abc\r\n0\r\n\r\n"),
    ("chunk-data-overrun", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabcXX\r\n0\r\n\r\n"),
    ("chunk-trailer-bare-lf", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n3\r\nabc\r\n0\r\n\n"),
    ("trailer-with-framing", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\nContent-Length: 50\r\n\r\n"),
]  # fmt: skip

# (id, bytes, upstream body): one request reaches the upstream, normalised.
ACCEPTED = [
    ("te-leading-space", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  chunked\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n", b"abc"),
    ("te-tab", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked \r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n", b"abc"),
    ("te-upper-case", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n"
     b"3\r\nabc\r\n0\r\n\r\n", b"abc"),
    ("te-chunked-with-extension-and-trailer", b"POST /v1/a HTTP/1.1\r\nHost: x\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n3;name=v\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", b"abc"),
    ("request-in-a-get-body", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 38\r\n\r\n"
     + SMUGGLED, SMUGGLED),
    ("request-in-a-chunked-body", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
     b"\r\n\r\n26\r\n" + SMUGGLED + b"\r\n0\r\n\r\n", SMUGGLED),
    ("connection-names-content-length", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
     b"Connection: content-length, transfer-encoding\r\n\r\nabc", b"abc"),
    ("obs-text-header-value", b"GET /v1/a HTTP/1.1\r\nHost: x\r\nX-A: caf\xc3\xa9\xff\r\n\r\n",
     b""),
    ("expect-100", b"POST /v1/a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
     b"Content-Length: 3\r\n\r\nabc", b"abc"),
]  # fmt: skip

SENTINEL = b"GET /v1/sentinel HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("probe", [p for _, p in REJECTED], ids=[i for i, _ in REJECTED])
async def test_smuggling_probe_is_rejected(
    gw: RunningGateway, raw_upstream: RawUpstream, probe: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(probe)
        responses, closed = await read_responses(reader, 2)
    finally:
        writer.close()
    assert [r.status for r in responses] == [400]
    assert orjson.loads(responses[0].body)["error"] == "bad_request"
    assert closed, "the connection must be closed after a framing error"
    await asyncio.sleep(0.05)  # a request the gateway forwarded would have arrived by now
    assert raw_upstream.requests == []
    assert b"smuggled" not in raw_upstream.raw


@pytest.mark.parametrize(
    ("probe", "body"), [(p, b) for _, p, b in ACCEPTED], ids=[i for i, _, _ in ACCEPTED]
)
async def test_ambiguous_but_valid_request_is_normalised(
    gw: RunningGateway, raw_upstream: RawUpstream, probe: bytes, body: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(probe)
        first, _ = await read_responses(reader, 1)
        writer.write(SENTINEL)
        second, _ = await read_responses(reader, 1)
    finally:
        writer.close()
    assert [r.status for r in first + second if r.status != 100] == [200, 200]
    assert raw_upstream.parse_errors == []
    assert [r.url for r in raw_upstream.requests] == [b"/v1/a", b"/v1/sentinel"]
    got = raw_upstream.requests[0]
    assert got.body == body
    framing = got.header_all(b"content-length") + got.header_all(b"transfer-encoding")
    assert len(framing) == (1 if body or got.method == b"POST" else 0), got.headers
    assert got.header_all(b"connection") == []
    assert raw_upstream.raw.count(b"HTTP/1.1\r\n") == 2 + body.count(b"HTTP/1.1\r\n")


async def test_pipelined_requests_reach_the_upstream_one_by_one(
    gw: RunningGateway, raw_upstream: RawUpstream
) -> None:
    """Three requests in one write, the middle one with a body that looks like a request."""
    burst = (
        b"GET /v1/one HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /v1/two HTTP/1.1\r\nHost: x\r\nContent-Length: 38\r\n\r\n" + SMUGGLED
        + b"GET /v1/three HTTP/1.1\r\nHost: x\r\n\r\n"
    )  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(burst)
        responses, _ = await read_responses(reader, 3)
    finally:
        writer.close()
    assert [r.status for r in responses] == [200, 200, 200]
    assert [(r.method, r.url) for r in raw_upstream.requests] == [
        (b"GET", b"/v1/one"),
        (b"POST", b"/v1/two"),
        (b"GET", b"/v1/three"),
    ]
    assert raw_upstream.requests[1].body == SMUGGLED


async def test_rejected_probe_leaves_the_gateway_serving(
    gw: RunningGateway, raw_upstream: RawUpstream
) -> None:
    """Many broken requests back to back, then a good one on a fresh connection."""
    for _, probe in REJECTED[:10]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(probe)
        await read_responses(reader, 1)
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(SENTINEL)
        responses, _ = await read_responses(reader, 1)
    finally:
        writer.close()
    assert [r.status for r in responses] == [200]
    assert [r.url for r in raw_upstream.requests] == [b"/v1/sentinel"]


@pytest.mark.parametrize(
    "probe",
    [b"GET /v1/a\r\n\r\n", b"GET /v1/a HTTP/2.0\r\nHost: x\r\n\r\n"],
    ids=["http-0.9", "http-2.0-text"],
)
async def test_unsupported_http_version_is_rejected(
    gw: RunningGateway, raw_upstream: RawUpstream, probe: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(probe)
        data = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                while chunk := await reader.read(65536):
                    data += chunk
                    if b"\r\n\r\n" in data:
                        break
    finally:
        writer.close()
    assert data.split(b" ", 2)[1] in (b"400", b"505"), data[:80]
    assert raw_upstream.requests == []


@pytest.mark.parametrize("coding", [b"gzip", b"deflate", b"compress"])
async def test_unknown_transfer_coding_is_not_silently_dropped(
    gw: RunningGateway, raw_upstream: RawUpstream, coding: bytes
) -> None:
    probe = (
        b"POST /v1/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b", chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(probe)
        responses, _ = await read_responses(reader, 1)
    finally:
        writer.close()
    assert [r.status for r in responses] in ([400], [501])
    assert raw_upstream.requests == []


# -- fuzz targets (fuzz/targets.py), a short run; `make fuzz` runs them for longer ----


def test_fuzz_smoke_request_headers() -> None:
    fuzz_headers()


def test_fuzz_smoke_response_headers() -> None:
    fuzz_response_headers()
