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
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

__all__ = ["can_send_complete", "send_complete"]

_NO_BODY_STATUS = frozenset({204, 304})
_NO_BODY_METHODS = frozenset({"HEAD", "CONNECT"})
# Bodies up to this size are copied into the head's buffer (one write of one
# object); larger ones go as a second buffer of the same writelines call.
_COALESCE = 16 * 1024


def can_send_complete(method: str, status: int) -> bool:
    """Whether ``send_complete`` may answer (the response has a body to frame)."""
    return method not in _NO_BODY_METHODS and status >= 200 and status not in _NO_BODY_STATUS


def response_head(
    request: web.BaseRequest,
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
    version = request.version
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


async def send_complete(
    request: web.BaseRequest,
    response: web.StreamResponse,
    body: bytes | memoryview,
) -> None:
    """Write ``response``'s head and ``body`` to the client and mark it sent.

    Raises ``ConnectionResetError`` when the client has gone (as aiohttp's
    writer would); waits for the transport to drain past its high-water mark,
    so a client that does not read holds back its own connection only.
    """
    keep_alive = response.keep_alive
    if keep_alive is None:
        keep_alive = request.keep_alive
    head = response_head(
        request, response.status, response.reason, response.headers, len(body), keep_alive
    )
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client connection closed")
    if len(body) <= _COALESCE:
        transport.write(head + body)
    else:
        transport.writelines((head, body))
    # aiohttp's finish_response sees a sent response; its keep-alive decision
    # reads keep_alive. (Private attributes: tests/test_response_writer.py
    # checks this contract against the installed aiohttp.)
    response._keep_alive = keep_alive
    response._eof_sent = True
    response._body_length = len(body)
    protocol = request.protocol
    if protocol.writing_paused:
        await request.writer.drain()
