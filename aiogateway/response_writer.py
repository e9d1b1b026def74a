"""A proxied response whose body is all here, written in one transport write.

The common proxied response (its whole Content-Length body arrived with its
head) skips aiohttp's response machinery: ``StreamResponse.prepare``, header
preparation, the payload writer and ``write_eof`` cost more Python per request
than the rest of the relay. :func:`send_complete` builds the head by the same
rules as aiohttp's ``StreamResponse._prepare_headers`` (Content-Type default,
Date, Server, the Connection header the client's version and keep-alive call
for), writes head and body at once, and marks the response sent, so aiohttp's
own ``finish_response`` has nothing left to do. Responses that must not carry
a body (HEAD, 1xx, 204, 304, 2xx to CONNECT) keep aiohttp's path.

When no ``on_response`` hook read ``exchange.response_headers``, the head is
built from the upstream head's bytes (:func:`raw_response_head`): its header
lines minus the dropped ones, by a few regex passes instead of a Python loop
per header, without the round trip through str and a multidict. The headers
kept and their order are those of :func:`~aiogateway.headers.response_headers`;
llhttp has refused CR and LF inside them. A head with obs-text bytes, or whose
Connection header names other headers, takes the multidict path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import HttpVersion, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

from .upstream_streams import HeadScan, status_reason

if TYPE_CHECKING:
    from .exchange import Exchange
    from .upstream_streams import UpstreamResponse

__all__ = ["can_send_complete", "raw_response_head", "response_head", "send_complete"]

_NO_BODY_STATUS = frozenset({204, 304})
_NO_BODY_METHODS = frozenset({"HEAD", "CONNECT"})
# Bodies up to this size are copied into the head's buffer (one write of one
# object); larger ones go as a second buffer of the same writelines call.
_COALESCE = 16 * 1024
_SERVER = SERVER_SOFTWARE.encode()


def can_send_complete(method: str, status: int) -> bool:
    """Whether ``send_complete`` may answer (the response has a body to frame)."""
    return method not in _NO_BODY_METHODS and status >= 200 and status not in _NO_BODY_STATUS


def response_head(
    version: HttpVersion,
    status: int,
    reason: str,
    headers: CIMultiDict[str],
    length: int,
    keep_alive: bool,
) -> bytes:
    """Status line and headers, as aiohttp's ``_prepare_headers`` would send them."""
    headers["Content-Length"] = str(length)
    if length and "Content-Type" not in headers:
        headers["Content-Type"] = "application/octet-stream"
    if "Date" not in headers:
        headers["Date"] = rfc822_formatted_time()
    if "Server" not in headers:
        headers["Server"] = SERVER_SOFTWARE
    if "Connection" not in headers:
        if keep_alive:
            if version.minor == 0:
                headers["Connection"] = "keep-alive"
        elif version.minor == 1:
            headers["Connection"] = "close"
    lines = [f"HTTP/{version.major}.{version.minor} {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += ("", "")
    text = "\r\n".join(lines)
    # SECURITY: a CR or LF in a value (say, one a plugin added) would split the
    # response; one C scan of the whole head instead of a check per value.
    n = len(lines) - 1
    if text.count("\n") != n or text.count("\r") != n:
        raise ValueError("CR or LF in the response status line or a header")
    return text.encode("utf-8")


def raw_response_head(
    version: HttpVersion,
    status: int,
    upstream_head: bytes,
    scan: HeadScan,
    request_id: str,
    length: int,
    keep_alive: bool,
) -> bytes | None:
    """``response_head(response_headers(fields, request_id), ...)`` made from the
    upstream head's bytes (status line to blank line, as llhttp accepted it) and
    its ``scan_head``; None when it holds obs-text or its Connection header
    names other headers (both rare: the multidict path handles them)."""
    _, _, lines, status_end, seen, listed = scan
    if listed or not upstream_head.isascii():
        return None  # (obs-text: the multidict path re-encodes it as aiohttp does)
    if version.minor == 1 and status_end > 13 and upstream_head.startswith(b"HTTP/1.1 "):
        # An HTTP/1.1 status line with a reason phrase: the client's as it is.
        parts = [lines]
    else:
        reason = status_reason(upstream_head, status)
        status_line = b"HTTP/%d.%d %d %s" % (version.major, version.minor, status, reason.encode())
        parts = [status_line, lines[status_end:]]
    parts += (b"\r\nX-Request-ID: ", request_id.encode(), b"\r\nContent-Length: %d\r\n" % length)
    if length and not seen & 1:
        parts.append(b"Content-Type: application/octet-stream\r\n")
    if not seen & 2:
        parts += (b"Date: ", rfc822_formatted_time().encode(), b"\r\n")
    if not seen & 4:
        parts += (b"Server: ", _SERVER, b"\r\n")
    if keep_alive:
        if version.minor == 0:
            parts.append(b"Connection: keep-alive\r\n")
    elif version.minor == 1:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _sent(keep_alive: bool) -> web.StreamResponse:
    response = web.StreamResponse()
    # Private attributes: tests/test_response_writer.py checks this contract
    # against the installed aiohttp.
    response._keep_alive = keep_alive
    response._eof_sent = True
    return response


# What the handler returns for a response send_complete wrote: aiohttp reads
# only its keep-alive decision, and its prepare() and write_eof() return at once
# for a sent response. Shared, so no StreamResponse (~6 k instructions) is made
# per request; aiohttp changes neither (GatewayServer runs no access logger).
_SENT_CLOSE, _SENT_KEEP_ALIVE = _sent(False), _sent(True)


async def send_complete(
    request: web.BaseRequest,
    body: bytes | memoryview,
    exchange: Exchange,
    upstream: UpstreamResponse,
) -> web.StreamResponse:
    """Write ``upstream``'s status, ``exchange``'s headers and ``body`` to the
    client; return the response to hand back to aiohttp (a shared one, marked sent).

    The head comes from the upstream head's bytes unless a hook read (and so
    may have edited) ``exchange.response_headers``.
    Raises ``ConnectionResetError`` when the client has gone (as aiohttp's
    writer would); waits for the transport to drain past its high-water mark,
    so a client that does not read holds back its own connection only.
    """
    message = request._message  # (see proxy.py: the fields without property calls)
    keep_alive = not message.should_close  # request.keep_alive
    length = len(body)
    version = message.version
    status = upstream.status
    head = None
    if not exchange.response_headers_built:
        head = raw_response_head(
            version,
            status,
            upstream.head,
            upstream.scan,
            exchange.request_id,
            length,
            keep_alive,
        )
    if head is None:
        head = response_head(
            version, status, upstream.reason, exchange.response_headers, length, keep_alive
        )
    protocol = request._protocol
    transport = protocol.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client connection closed")
    if len(body) <= _COALESCE:
        transport.write(head + body)
    else:
        transport.writelines((head, body))
    if protocol.writing_paused:
        await request.writer.drain()
    return _SENT_KEEP_ALIVE if keep_alive else _SENT_CLOSE
