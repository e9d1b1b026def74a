"""The two body streams of an upstream request, and its errors.

:class:`UpstreamResponse` holds at most ``HIGH_WATER`` body bytes (its
connection, :mod:`aiogateway.upstream_protocol`, pauses reading above that);
:func:`send_body` streams a request body no faster than the upstream reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING

from .headers import RESPONSE_DROP, connection_listed

if TYPE_CHECKING:
    from .upstream_protocol import Connection

__all__ = [
    "BUSY",
    "CLOSED",
    "DONE",
    "HIGH_WATER",
    "IDLE",
    "JOIN_BELOW",
    "HeadScan",
    "StaleConnection",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamResponse",
    "UpstreamTimeout",
    "head_fields",
    "scan_head",
    "send_body",
    "status_reason",
]

# Response flow control: above this many buffered body bytes the socket stops
# being read, so a slow client holds bounded memory per response.
HIGH_WATER = 256 * 1024

# read() returns a buffered chunk this big on its own rather than join it with
# the ones behind it (a copy); smaller ones are joined into one write.
JOIN_BELOW = 16 * 1024

# For upstreams that send "HTTP/1.1 200" with no reason phrase.
_PHRASES = {s.value: s.phrase for s in http.HTTPStatus}

# Connection states (of upstream_protocol.Connection), here to avoid an import cycle.
IDLE, BUSY, DONE, CLOSED = 0, 1, 2, 3


class UpstreamError(Exception):
    kind = "error"


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamReset(UpstreamError):
    kind = "reset"


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"


class StaleConnection(UpstreamReset):
    """A reused keep-alive connection died before any response byte arrived:
    the upstream closed it while idle (the stale-connection race)."""

    def __init__(self, consumed: bool) -> None:
        super().__init__("upstream closed a reused keep-alive connection")
        self.consumed = consumed  # chunks of an async-iterable body were taken


# What one pass over a head's lines finds: Content-Length (None if absent);
# whether the body is chunked; the status line and the header lines the client
# may get, joined by CRLF (no CRLF at the end); where the status line ends;
# which defaulted headers (Content-Type 1, Date 2, Server 4) are there; whether
# a Connection header names other headers (then the multidict path answers).
HeadScan = tuple[int | None, bool, bytes, int, int, bool]

# Header name as the upstream spelled it -> what scan_head does with its line:
# >= 0 keep (a _DEFAULTED bit or 0), < 0 drop (and maybe read it for framing).
_DROP, _CONNECTION, _CONTENT_LENGTH, _TRANSFER_ENCODING = -1, -2, -3, -4
_DEFAULTED = {b"content-type": 1, b"date": 2, b"server": 4}
_KINDS: dict[bytes, int] = {}
_MAX_KINDS = 1024  # spellings remembered (an upstream could invent endless ones)
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


def _kind(name: bytes) -> int:
    lname = name.lower()
    if lname == b"content-length":
        kind = _CONTENT_LENGTH
    elif lname == b"transfer-encoding":
        kind = _TRANSFER_ENCODING
    elif lname == b"connection":
        kind = _CONNECTION
    elif lname in RESPONSE_DROP:
        kind = _DROP
    else:
        kind = _DEFAULTED.get(lname, 0)
    if len(_KINDS) < _MAX_KINDS:
        _KINDS[name] = kind
    return kind


def scan_head(head: bytes) -> HeadScan:
    """One pass over the lines of a response head llhttp accepted (CRLF line
    ends, no obs-fold, no space before a colon, at most one Content-Length,
    never both it and Transfer-Encoding): framing and the client's lines.

    A dict lookup per line by the name as spelled: cheaper than lower() plus
    searches or a regex scan (bytes.find parses its arguments the slow way,
    ~1 k instructions a call, and sre tries every alternative at each line).
    """
    lines = head.split(b"\r\n")
    del lines[-2:]  # the blank line's two empty pieces
    kept = [lines[0]]
    length: int | None = None
    chunked = False
    defaulted = 0
    listed = False
    kinds = _KINDS
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        kind = kinds.get(name)
        if kind is None:
            kind = _kind(name)
        if kind >= 0:
            defaulted |= kind
            kept.append(line)
        elif kind == _CONTENT_LENGTH:
            length = int(value)  # llhttp accepted it: digits and whitespace
        elif kind == _TRANSFER_ENCODING:
            # The last coding decides (RFC 9112 §6.3): chunked or read-until-close.
            chunked = value.rstrip().lower().endswith(b"chunked")
        elif kind == _CONNECTION:
            value = value.strip()
            if value not in _PLAIN_CONNECTION and connection_listed(value):
                listed = True
    if length is not None:
        chunked = False
    return length, chunked, b"\r\n".join(kept), len(lines[0]), defaulted, listed


def status_reason(head: bytes, status: int) -> str:
    """The reason phrase of a head's status line ("HTTP/1.1 200 OK": what follows
    the second space), or the standard phrase when it has none."""
    reason = head[: head.find(b"\r\n")].split(b" ", 2)[2:]
    return reason[0].decode("latin-1") if reason and reason[0] else _PHRASES.get(status, "")


def head_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of a response head llhttp accepted (CRLF lines, no
    obs-fold, no space before a colon), as llhttp reports them: the value's
    leading whitespace dropped, its trailing whitespace kept."""
    fields = []
    for line in head.split(b"\r\n")[1:-2]:
        name, _, value = line.partition(b":")
        fields.append((name, value.lstrip(b" \t")))
    return fields


class UpstreamResponse:
    """An upstream response whose head is parsed; the body streams via read()."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_exc",
        "_headers",
        "_reason",
        "_released",
        "_size",
        "_until_close",
        "_waiter",
        "chunked",
        "content_length",
        "head",
        "keep_alive",
        "scan",
        "status",
    )

    def __init__(
        self,
        status: int,
        head: bytes,
        scan: HeadScan,
        keep_alive: bool,
        conn: Connection,
    ) -> None:
        self.status = status
        self.head = head  # status line, header lines and the blank line, as received
        self.scan = scan
        self.content_length = scan[0]
        self.chunked = scan[1]
        self._reason: str | None = None
        self._headers: list[tuple[bytes, bytes]] | None = None
        self.keep_alive = keep_alive
        self._conn: Connection | None = conn
        self._chunks: list[bytes | memoryview] = []
        self._size = 0
        self._done = False
        self._until_close = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    @property
    def reason(self) -> str:
        """The reason phrase (the standard one when the upstream sent none)."""
        reason = self._reason
        if reason is None:
            reason = self._reason = status_reason(self.head, self.status)
        return reason

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """(name, value) pairs as received, made from ``head`` on first use."""
        headers = self._headers
        if headers is None:
            headers = self._headers = head_fields(self.head)
        return headers

    @property
    def buffered(self) -> int:
        """Body bytes received but not yet returned by read()."""
        return self._size

    def whole_body(self) -> bytes | memoryview | None:
        """The entire Content-Length body if it all came in one buffer and none of
        it was read yet (the common small response: no await needed); else None."""
        chunks = self._chunks
        if self._done and len(chunks) == 1 and self._size == self.content_length:
            self._chunks = []
            self._size = 0
            return chunks[0]
        return None

    async def read(self) -> bytes | memoryview:
        """Next body bytes (de-chunked, never decompressed); b"" at the end.

        A Content-Length body comes as the very buffers the socket delivered
        (a memoryview where a head or excess bytes were cut off): no copy.

        Raises UpstreamReset on a truncated body, UpstreamTimeout when the
        upstream is silent for read_timeout; bytes received before either are
        returned first.
        """
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0]
                if len(chunks) == 1:
                    chunks.clear()
                    self._size = 0
                elif len(data) >= JOIN_BELOW:
                    del chunks[0]  # a big buffer goes alone: copying it costs more than a round
                    self._size -= len(data)
                else:
                    data = b"".join(chunks)  # small pieces (chunked bodies): one write
                    chunks.clear()
                    self._size = 0
                conn = self._conn
                if conn is not None and conn._reading_paused and self._size <= HIGH_WATER // 2:
                    conn._resume_reading()
                return data
            if self._exc is not None:
                raise self._exc
            if self._done:
                return b""
            conn = self._conn
            if conn is None:
                raise UpstreamReset("response already released")
            waiter = self._waiter = conn._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def release(self) -> None:
        """Give the connection back (if the body was fully received and the
        upstream keeps it alive) or close it. Idempotent."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._release(self)

    def close(self) -> None:
        """Abort: close the connection (the client went away)."""
        self._released = True
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._abort(UpstreamReset("response closed"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def send_body(
    conn: Connection, body: AsyncIterable[bytes], chunked: bool, length: int | None
) -> None:
    """Stream a request body to ``conn`` with backpressure (a task of its own)."""
    # Runs beside the wait for the head: an upstream may answer (413...)
    # before the body is sent, which cancels this task.
    transport = conn._transport
    assert transport is not None
    loop = conn._loop
    it = aiter(body)
    sent = 0
    try:
        while True:
            conn._src_wait = True  # the client is slow, not the upstream
            try:
                chunk = await anext(it)
            except StopAsyncIteration:
                break
            finally:
                conn._src_wait = False
            conn._consumed = True
            if conn._state != BUSY:
                return
            if not chunk:
                continue  # an empty chunk would end a chunked body
            n = len(chunk)
            sent += n
            if length is not None and sent > length:
                raise ValueError(f"request body longer than content_length={length}")
            if chunked:
                transport.write(b"".join((b"%x\r\n" % n, chunk, b"\r\n")))
            else:
                transport.write(chunk)
            conn._last = loop.time()
            while conn._write_paused and conn._state == BUSY:
                drain = conn._drain_fut = loop.create_future()
                await drain
            if conn._state != BUSY:
                return
            if sent == length:
                # All promised bytes are out: do not wait for the source
                # to say so, or a prompt response would find us "still
                # sending" and the connection would not be reused.
                break
        if length is not None and sent != length:
            raise ValueError(f"request body shorter than content_length={length}")
        if chunked and conn._state == BUSY:
            transport.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # The body source failed (client went away) or mis-sized: the
        # request cannot complete; the caller sees this very exception.
        conn._abort(exc)
    finally:
        # Stopped early (early response, error): finalize the source now
        # rather than leave an async generator to the garbage collector.
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
