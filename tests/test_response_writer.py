"""The one-write response path (aiogateway/response_writer.py) against aiohttp's own.

A raw upstream answers the same response either whole (head and body in one
write: the gateway's one-write path) or split (the body's second half 100 ms
later: aiohttp's StreamResponse path). For each client flavour the client must
see the same status line, headers (Date aside: it is the time) and body, and
the same keep-alive behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aiogateway import response_writer
from tests.support.gateway import StartGateway

BODY = b"0123456789" * 10


class RawUpstream:
    """Answers every request with ``head`` + BODY; ``split`` sends the body in two parts."""

    def __init__(self) -> None:
        self.head = b""
        self.split = False
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await reader.readuntil(b"\r\n\r\n")
                if not request:
                    return
                if self.split:
                    writer.write(self.head + BODY[:40])
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    writer.write(BODY[40:])
                else:
                    writer.write(self.head + BODY)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client or the test went away (server.close cancels handlers)
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[RawUpstream, int]]:
    up = RawUpstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield up, port
    server.close()
    await server.wait_closed()


async def _exchange(port: int, request: bytes) -> tuple[bytes, list[tuple[str, str]], bytes, bool]:
    """Status line, headers, body, and whether the gateway kept the connection open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        length = int(next(v for k, v in headers if k.lower() == "content-length"))
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
        return lines[0].encode(), headers, body, not closed
    finally:
        writer.close()


UPSTREAM_HEADS = {
    "nginx-like": (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 20:00:00 GMT\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n"
        b'ETag: "x"\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n'
    ),
    "bare": b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n",
    "no-reason": b"HTTP/1.1 202\r\nContent-Length: 100\r\nX-Thing: 1\r\n\r\n",
    # Connection names another header hop-by-hop: both paths drop it.
    "connection-listed": (
        b"HTTP/1.1 200 OK\r\nX-Hop: secret\r\nConnection: keep-alive, X-Hop\r\n"
        b"Content-Length: 100\r\nDate: Sun, 29 Nov 2026 20:00:00 GMT\r\n\r\n"
    ),
    "obs-text": b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\nContent-Length: 100\r\n\r\n",
}
CLIENTS = {
    "1.1 keep-alive": b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
    "1.1 close": b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    "1.0 keep-alive": b"GET /x HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    "1.0": b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("upstream_head", list(UPSTREAM_HEADS))
@pytest.mark.parametrize("client", list(CLIENTS))
async def test_one_write_path_answers_like_aiohttp(
    start_gateway: StartGateway,
    raw_upstream: tuple[RawUpstream, int],
    upstream_head: str,
    client: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    up, port = raw_upstream
    gw = await start_gateway(
        f"""
[upstreams.up]
url = "http://127.0.0.1:{port}"

[[routes]]
name = "r"
prefix = "/"
upstream = "up"
chain = []
"""
    )
    up.head = UPSTREAM_HEADS[upstream_head]
    used: list[bool] = []
    real = response_writer.send_complete

    async def spy(*args: object) -> object:
        used.append(True)
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("aiogateway.proxy.send_complete", spy)
    raw_heads: list[bytes | None] = []
    real_raw = response_writer.raw_response_head

    def raw_spy(*args: object) -> bytes | None:
        raw_heads.append(head := real_raw(*args))  # type: ignore[arg-type]
        return head

    monkeypatch.setattr(response_writer, "raw_response_head", raw_spy)

    up.split = False
    fast = await _exchange(gw.port, CLIENTS[client])
    assert used == [True], "the whole body was there: the one-write path answers"
    # Untouched headers go from the upstream head's bytes, except when Connection
    # names headers to drop or a value holds obs-text (the multidict path does those).
    assert len(raw_heads) == 1
    assert (raw_heads[0] is None) == (upstream_head in ("connection-listed", "obs-text"))
    up.split = True
    slow = await _exchange(gw.port, CLIENTS[client])
    assert used == [True], "a split body goes through aiohttp's path"

    def comparable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        varying = ("date", "x-request-id")
        return [(k.lower(), "<varies>" if k.lower() in varying else v) for k, v in headers]

    assert fast[0] == slow[0]
    assert comparable(fast[1]) == comparable(slow[1]), "same headers, same order"
    assert fast[2] == slow[2] == BODY
    assert fast[3] == slow[3], "same keep-alive decision"
    assert sum(k.lower() == "x-request-id" for k, _ in fast[1]) == 1
    assert not any(k.lower() == "x-hop" for k, _ in fast[1])
    # The shared "sent" responses handed to aiohttp: still sent, decisions unchanged.
    for shared, keep_alive in (
        (response_writer._SENT_KEEP_ALIVE, True),
        (response_writer._SENT_CLOSE, False),
    ):
        assert shared.keep_alive is keep_alive
        assert shared._eof_sent
        assert await shared.prepare(make_mocked_request("GET", "/")) is None


def test_header_with_newline_is_refused() -> None:
    """A CR or LF in a header value (say, one a plugin added) never splits the response."""
    from multidict import CIMultiDict

    request = make_mocked_request("GET", "/")
    for bad in ("a\r\nX-Evil: 1", "a\nb", "a\rb"):
        with pytest.raises(ValueError, match="CR or LF"):
            response_writer.response_head(
                request.version, 200, "OK", CIMultiDict({"X-Plugin": bad}), 1, True
            )


# -- the head made from the upstream head's bytes, against the multidict path ----

_NAMES = [
    b"Server",
    b"date",
    b"Content-Type",
    b"CONTENT-LENGTH",
    b"Connection",
    b"keep-alive",
    b"TE",
    b"Tea",
    b"Trailer",
    b"Upgrade",
    b"Proxy-Authenticate",
    b"X-Request-ID",
    b"X-Request-Id-Extra",
    b"Set-Cookie",
    b"ETag",
    b"X-Content-Length",
]
_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(
    str.encode
)


def _llhttp_fields(head: bytes) -> list[tuple[bytes, bytes]] | None:
    """The fields llhttp reports for ``head``, or None if it rejects the head."""
    import httptools

    class Sink:
        def __init__(self) -> None:
            self.fields: list[tuple[bytes, bytes]] = []
            self.done = False

        def on_header(self, name: bytes, value: bytes) -> None:
            self.fields.append((name, value))

        def on_headers_complete(self) -> None:
            self.done = True

    sink = Sink()
    try:
        httptools.HttpResponseParser(sink).feed_data(head)
    except httptools.HttpParserError:
        return None
    return sink.fields if sink.done else None


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(
        st.tuples(st.sampled_from(_NAMES), st.sampled_from([b":", b": ", b":  "]), _VALUES),
        max_size=8,
    ),
    minor=st.sampled_from([0, 1]),
    keep_alive=st.booleans(),
    length=st.sampled_from([0, 7]),
)
def test_raw_head_keeps_what_the_multidict_path_keeps(
    fields: list[tuple[bytes, bytes, bytes]], minor: int, keep_alive: bool, length: int
) -> None:
    """Any head llhttp accepts: the same headers, in the same order, as
    response_head(response_headers(...)) sends, values equal up to the
    whitespace around them (the raw path keeps the upstream's spacing)."""
    from aiohttp import HttpVersion10, HttpVersion11

    from aiogateway.headers import response_headers
    from aiogateway.upstream_streams import head_fields, scan_head

    head = b"HTTP/1.1 200 OK\r\n" + b"".join(n + sep + v + b"\r\n" for n, sep, v in fields)
    head += b"\r\n"
    llhttp_fields = _llhttp_fields(head)
    assume(llhttp_fields is not None)
    assert head_fields(head) == llhttp_fields, "the fields as llhttp's on_header gave them"
    version = HttpVersion11 if minor else HttpVersion10
    fast = response_writer.raw_response_head(
        version, 200, head, scan_head(head), "rid", length, keep_alive
    )
    reference = response_writer.response_head(
        version, 200, "OK", response_headers(head_fields(head), "rid"), length, keep_alive
    )
    listed = any(
        n.lower() == b"connection" and v.strip().lower() not in (b"", b"keep-alive", b"close")
        for n, _, v in fields
    )
    if fast is None:
        assert listed, "only a Connection header naming other headers needs the multidict"
        return

    def parsed(raw: bytes) -> list[tuple[bytes, bytes]]:
        lines = raw.split(b"\r\n")
        assert lines[-2:] == [b"", b""]
        pairs = [line.partition(b":") for line in lines[1:-2]]
        return [(n.lower(), b"" if n.lower() == b"date" else v.strip()) for n, _, v in pairs]

    assert fast.split(b"\r\n", 1)[0] == reference.split(b"\r\n", 1)[0]
    assert parsed(fast) == parsed(reference)


def test_head_fields_and_framing_from_the_head_bytes() -> None:
    """Framing headers are found whatever their case, and only as whole header names."""
    from aiogateway.upstream_streams import head_fields, scan_head

    def framing(head: bytes) -> tuple[int | None, bool]:
        length, chunked, *_ = scan_head(head)
        return length, chunked

    head = (
        b"HTTP/1.1 200 OK\r\nX-Content-Length: 9\r\nX-Note: content-length: 8\r\n"
        b"content-LENGTH:  12\r\nX-Trail: a \t\r\nX-Empty:\r\n\r\n"
    )
    assert framing(head) == (12, False)
    assert head_fields(head) == [
        (b"X-Content-Length", b"9"),
        (b"X-Note", b"content-length: 8"),
        (b"content-LENGTH", b"12"),
        (b"X-Trail", b"a \t"),  # llhttp keeps trailing whitespace, drops leading
        (b"X-Empty", b""),
    ]
    te = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\ntransfer-encoding:CHUNKED \r\n\r\n"
    assert framing(te) == (None, True)  # the last coding decides
    both = te.replace(b"CHUNKED", b"gzip, chunked")
    assert framing(both) == (None, True)
    for plain in (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Transfer-Encoding: chunked\r\n\r\n",
    ):
        assert framing(plain) == (None, False)
