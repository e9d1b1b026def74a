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
built from the upstream's raw header bytes (:func:`raw_response_head`): the
same headers as :func:`~aiogateway.headers.response_headers` would keep, in the
same order and encoding (obs-text bytes are sent as UTF-8 of their Latin-1
reading, as aiohttp sends the multidict), without the round trip through str
and a multidict; llhttp has refused CR and LF inside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

from .headers import RESPONSE_DROP, connection_listed

if TYPE_CHECKING:
    from .exchange import Exchange

__all__ = ["can_send_complete", "raw_response_head", "response_head", "send_complete"]

_NO_BODY_STATUS = frozenset({204, 304})
_NO_BODY_METHODS = frozenset({"HEAD", "CONNECT"})
# Bodies up to this size are copied into the head's buffer (one write of one
# object); larger ones go as a second buffer of the same writelines call.
_COALESCE = 16 * 1024
_SERVER = SERVER_SOFTWARE.encode()
# Headers whose absence the head makes up for (bit flags).
_DEFAULTED = {b"content-type": 1, b"date": 2, b"server": 4}
_DROP, _CONNECTION = -1, -2
# Header name as the upstream spelled it -> _DROP, _CONNECTION or its _DEFAULTED
# bit (0: none): one dict lookup per header instead of lower() and two lookups.
_NAMES: dict[bytes, int] = {}
_MAX_NAMES = 1024  # spellings remembered (an upstream could invent endless ones)


def _classify(name: bytes) -> int:
    lname = name.lower()
    if lname == b"connection":
        kind = _CONNECTION
    elif lname in RESPONSE_DROP:
        kind = _DROP
    else:
        kind = _DEFAULTED.get(lname, 0)
    if len(_NAMES) < _MAX_NAMES:
        _NAMES[name] = kind
    return kind


# Connection values that name no other header (what upstreams nearly always send).
_PLAIN = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


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


def raw_response_head(
    request: web.BaseRequest,
    status: int,
    reason: str,
    raw_headers: Sequence[tuple[bytes, bytes]],
    request_id: str,
    length: int,
    keep_alive: bool,
) -> bytes | None:
    """``response_head(response_headers(raw_headers, request_id), ...)`` from the raw
    bytes; None when the upstream's Connection header names other headers (rare:
    the multidict path handles it)."""
    version = request.version
    parts = [b"HTTP/%d.%d %d %s\r\n" % (version.major, version.minor, status, reason.encode())]
    seen = 0
    names = _NAMES
    for name, value in raw_headers:
        kind = names.get(name)
        if kind is None:
            kind = _classify(name)
        if kind < 0:
            if kind == _CONNECTION and value not in _PLAIN and connection_listed(value):
                return None
            continue
        seen |= kind
        # obs-text: sent as the multidict path sends it (UTF-8 of its Latin-1 reading).
        sent = value if value.isascii() else value.decode("latin-1").encode()
        parts += (name, b": ", sent, b"\r\n")
    parts += (b"X-Request-ID: ", request_id.encode(), b"\r\nContent-Length: %d\r\n" % length)
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


async def send_complete(
    request: web.BaseRequest,
    response: web.StreamResponse,
    body: bytes | memoryview,
    exchange: Exchange,
) -> None:
    """Write ``response``'s status, ``exchange``'s headers and ``body`` to the
    client and mark the response sent.

    The head comes from the upstream's raw headers unless a hook read (and so
    may have edited) ``exchange.response_headers``.
    Raises ``ConnectionResetError`` when the client has gone (as aiohttp's
    writer would); waits for the transport to drain past its high-water mark,
    so a client that does not read holds back its own connection only.
    """
    keep_alive = response.keep_alive
    if keep_alive is None:
        keep_alive = request.keep_alive
    status, reason, length = response.status, response.reason, len(body)
    head = None
    raw = exchange.raw_response_headers
    if raw is not None and not exchange.response_headers_built:
        head = raw_response_head(
            request, status, reason, raw, exchange.request_id, length, keep_alive
        )
    if head is None:
        head = response_head(request, status, reason, exchange.response_headers, length, keep_alive)
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
