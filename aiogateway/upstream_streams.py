"""The two body streams of an upstream request, and its errors.

:class:`UpstreamResponse` holds at most ``HIGH_WATER`` body bytes (its
connection, :mod:`aiogateway.upstream_protocol`, pauses reading above that);
:func:`send_body` streams a request body no faster than the upstream reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .upstream_protocol import Connection

__all__ = [
    "BUSY",
    "CLOSED",
    "DONE",
    "HIGH_WATER",
    "IDLE",
    "JOIN_BELOW",
    "StaleConnection",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamReset",
    "UpstreamResponse",
    "UpstreamTimeout",
    "head_fields",
    "send_body",
]

# Response flow control: above this many buffered body bytes the socket stops
# being read, so a slow client holds bounded memory per response.
HIGH_WATER = 256 * 1024

# read() returns a buffered chunk this big on its own rather than join it with
# the ones behind it (a copy); smaller ones are joined into one write.
JOIN_BELOW = 16 * 1024

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
        "_released",
        "_size",
        "_until_close",
        "_waiter",
        "chunked",
        "content_length",
        "head",
        "keep_alive",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        head: bytes,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        conn: Connection,
    ) -> None:
        self.status = status
        self.reason = reason
        self.head = head  # status line, header lines and the blank line, as received
        self._headers: list[tuple[bytes, bytes]] | None = None
        self.content_length = content_length
        self.chunked = chunked
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
