"""One keep-alive HTTP/1.1 connection to an upstream: an asyncio Protocol fed
into httptools' C response parser.

The hot path (idle connection -> one write -> head parsed -> body buffered) is
kept to a handful of Python calls: no per-request timers, no per-chunk tasks,
only the callbacks httptools needs. httptools sees only response heads and
chunked or read-until-close bodies: a Content-Length body is counted here and
queued as the received buffers themselves (its on_body would copy each byte).
httptools validates each head (no per-header callback); the head's bytes are
kept whole, and one pass over its lines (``scan_head``) gives the framing and
the lines the client's head is written from (:mod:`aiogateway.response_writer`).
:mod:`aiogateway.upstream` owns the pool; :mod:`aiogateway.upstream_streams`
the body streams and the errors.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterable
from typing import Protocol, cast

import httptools

from .upstream_streams import (
    BUSY,
    CLOSED,
    DONE,
    HIGH_WATER,
    IDLE,
    StaleConnection,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamResponse,
    UpstreamTimeout,
    scan_head,
    send_body,
)

# Largest response head (status line + headers, interim responses included).
MAX_HEAD_BYTES = 64 * 1024


__all__ = ["Connection", "Owner"]


class Owner(Protocol):
    """What a connection needs from its pool."""

    def _put_idle(self, conn: Connection) -> None: ...
    def _conn_closed(self, conn: Connection, was_idle: bool) -> None: ...


class Connection(asyncio.Protocol):
    __slots__ = (
        "_consumed",
        "_drain_fut",
        "_got_bytes",
        "_head",
        "_head_fut",
        "_head_parts",
        "_head_size",
        "_idle_since",
        "_interim",
        "_is_head",
        "_keepalive_timeout",
        "_last",
        "_loop",
        "_owner",
        "_parser",
        "_read_timeout",
        "_reading_paused",
        "_remaining",
        "_resp",
        "_reusable",
        "_sender",
        "_src_wait",
        "_state",
        "_tail",
        "_timer",
        "_timer_at",
        "_transport",
        "_write_paused",
        "registered",
        "served",
    )

    def __init__(
        self,
        owner: Owner,
        loop: asyncio.AbstractEventLoop,
        read_timeout: float,
        keepalive_timeout: float,
    ) -> None:
        self._owner = owner
        self._loop = loop
        self._read_timeout = read_timeout
        self._keepalive_timeout = keepalive_timeout
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._state = IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._last = 0.0
        self._idle_since = 0.0
        self._head_fut: asyncio.Future[UpstreamResponse] | None = None
        self._resp: UpstreamResponse | None = None
        self._head = b""  # the head being parsed, whole (set before httptools sees its end)
        self._head_parts: list[bytes] = []  # a head's earlier reads, when it spans several
        self._interim = False
        self._is_head = False
        self._reusable = True
        self._remaining = 0  # Content-Length body bytes still to come, counted here
        self._tail = b""  # the last bytes of an unfinished head
        self._got_bytes = False
        self._head_size = 0
        self._consumed = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_fut: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._src_wait = False
        self.registered = False  # counted by the pool (set once connected)
        self.served = 0  # requests started on this connection

    # -- request ------------------------------------------------------------

    def send(
        self,
        head: bytes,
        is_head: bool,
        body: AsyncIterable[bytes] | None,
        chunked: bool,
        length: int | None,
    ) -> asyncio.Future[UpstreamResponse]:
        """Send one request; the future resolves to the final response head.

        Not a coroutine: the pool awaits the future itself, one frame less on
        the hot path. The awaiting caller must _abort() on cancellation.
        """
        if self._state == CLOSED:
            # Closed between being handed out and now: as good as stale.
            raise StaleConnection(False)
        self._state = BUSY
        self.served += 1
        self._is_head = is_head
        self._got_bytes = False
        self._head_size = 0
        self._tail = b""
        self._head_parts.clear()
        self._consumed = False
        loop = self._loop
        self._last = now = loop.time()
        deadline = now + self._read_timeout
        if self._timer is None or self._timer_at > deadline:
            self._arm(deadline)
        fut: asyncio.Future[UpstreamResponse] = loop.create_future()
        self._head_fut = fut
        assert self._transport is not None
        self._transport.write(head)
        if body is not None:
            self._sender = loop.create_task(send_body(self, body, chunked, length))
        return fut

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small heads must not wait for Nagle + delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._state != BUSY:
            # Bytes nobody asked for: the connection's framing is unknown now.
            self._reusable = False
            if self._state == IDLE:
                self._abort(UpstreamProtocolError("unexpected data on idle connection"))
            return
        self._last = self._loop.time()
        self._got_bytes = True
        if self._remaining:
            self._body_bytes(data)  # Content-Length body: counted here, not parsed
        elif self._head_fut is None:
            self._feed(data)  # chunked or read-until-close body: httptools de-frames it
        else:
            self._head_bytes(data)

    def _feed(self, data: bytes | memoryview) -> bool:
        """httptools parses ``data``; False if that closed the connection."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reusable = False  # 101: bytes after the head are not HTTP
        except httptools.HttpParserError as exc:
            self._abort(UpstreamProtocolError(f"malformed upstream response: {exc}"))
            return False
        return True

    def _head_bytes(self, data: bytes) -> None:
        """Feed httptools exactly the response head(s), nothing past the final one.

        llhttp insists on CRLF line ends, so a head ends at the first blank
        line; cutting there lets a Content-Length body bypass the parser, whose
        on_body would copy every body byte into a new bytes object.
        """
        n = len(data)
        start = 0
        end = -1
        tail = self._tail
        if tail:  # a blank line may straddle the previous read and this one
            self._tail = b""
            i = (tail + data[:3]).find(b"\r\n\r\n")
            if i >= 0:
                end = i + 4 - len(tail)
        while True:
            if end < 0:
                end = data.find(b"\r\n\r\n", start)
                if end < 0:  # the head goes on in the next read
                    piece = data if start == 0 else data[start:]
                    if not self._feed(piece):
                        return
                    if self._head_fut is None:
                        return  # (cannot happen with CRLF-strict llhttp) the parser has it
                    self._head_parts.append(piece)
                    self._tail = (tail + data[start:])[-3:] if n - start < 3 else data[-3:]
                    self._count_head(n - start)
                    return
                end += 4
            piece = data if start == 0 and end == n else data[start:end]
            parts = self._head_parts
            if parts:
                parts.append(piece)
                self._head = b"".join(parts)
                parts.clear()
            else:
                self._head = piece
            if not self._feed(piece):
                return
            if self._head_fut is None:
                break  # the final head: its body (if any) follows
            if self._state != BUSY or not self._count_head(end - start):
                return
            start, end, tail = end, -1, b""  # an interim (1xx) head: the next one follows
            if start == n:
                return
        if end == n:
            return
        if self._remaining:
            self._body_bytes(memoryview(data)[end:])
        elif self._state == BUSY:
            self._feed(memoryview(data)[end:])
        else:
            # Past a complete response (HEAD, 204, 304, no body): a response
            # nobody asked for. Never forwarded; the connection is done.
            self._reusable = False

    def _count_head(self, size: int) -> bool:
        # llhttp sets no size limit: an endless head (or 1xx flood) would grow unbounded.
        self._head_size += size
        if self._head_size > MAX_HEAD_BYTES:
            self._abort(UpstreamProtocolError("upstream response head too large"))
            return False
        return True

    def _body_bytes(self, data: bytes | memoryview) -> None:
        """Content-Length body bytes, queued as received (slices, never copies)."""
        resp = self._resp
        assert resp is not None
        n = len(data)
        remaining = self._remaining - n
        if remaining > 0:
            self._remaining = remaining
        else:
            self._remaining = 0
            if remaining < 0:
                # Bytes past Content-Length (a response nobody asked for, or
                # a lying length): never forwarded, and the framing is lost.
                self._reusable = False
                n += remaining
                data = memoryview(data)[:n]
            resp._done = True
            self._state = DONE
            # The old parser still waits for this body: the next response gets a fresh one.
            self._parser = httptools.HttpResponseParser(self)
        resp._chunks.append(data)
        resp._size += n
        if resp._size > HIGH_WATER and not self._reading_paused and not resp._done:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        if resp._waiter is not None:
            resp._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost sorts out the rest

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        if state == CLOSED:
            return
        resp = self._resp
        if resp is not None and resp._until_close and not resp._done:
            resp._done = True  # read-until-close body: EOF is its end
            resp._wake()
            state = DONE
        if state == BUSY and self._head_fut is not None and self.served > 1 and not self._got_bytes:
            err: UpstreamError = StaleConnection(self._consumed)
        elif state == BUSY and self._head_fut is not None:
            err = UpstreamReset("upstream closed the connection before responding")
        else:
            err = UpstreamReset("upstream closed the connection mid-body")
        self._closed(err, state == IDLE)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    # -- httptools callbacks ------------------------------------------------

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        head = self._head
        self._head = b""
        fut = self._head_fut
        if fut is None:  # a second response nobody asked for
            self._reusable = False
            return
        if status < 200 and status != 101:
            self._interim = True  # 100/102/103: skip, wait for the final head
            return
        scan = scan_head(head)
        length, chunked = scan[0], scan[1]
        resp = UpstreamResponse(status, head, scan, parser.should_keep_alive(), self)
        self._resp = resp
        if self._is_head or status == 101:
            # llhttp cannot be told "HEAD": it would wait for Content-Length
            # bytes. The head is the whole response; the next one gets a
            # fresh parser.
            resp._done = True
            self._state = DONE
            self._parser = httptools.HttpResponseParser(self)
            if status == 101:
                self._reusable = False
        elif not chunked and length is None and status not in (204, 304):
            resp._until_close = True
        elif length and not chunked and status not in (204, 304):
            self._remaining = length  # data_received takes the body from here
        sender = self._sender
        if sender is not None and not sender.done():
            # Early response: stop sending; the connection is not reusable.
            self._reusable = False
            sender.cancel()
        self._head_fut = None
        fut.set_result(resp)

    def on_body(self, body: bytes) -> None:
        self._remaining = 0  # the parser has the body after all: leave it to it
        resp = self._resp
        if resp is None or resp._done:
            self._reusable = False
            return
        resp._chunks.append(body)
        resp._size += len(body)
        if resp._size > HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        if resp._waiter is not None:
            resp._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        resp = self._resp
        if resp is None or resp._done:
            return
        resp._done = True
        self._state = DONE
        if resp._waiter is not None:
            resp._wake()

    # -- lifecycle ----------------------------------------------------------

    def _resume_reading(self) -> None:
        self._reading_paused = False
        self._last = self._loop.time()
        if self._transport is not None and self._state != CLOSED:
            self._transport.resume_reading()

    def _release(self, resp: UpstreamResponse) -> None:
        self._resp = None
        if (
            self._state == DONE
            and self._reusable
            and resp.keep_alive
            and resp._exc is None
            and not resp._until_close
        ):
            if self._reading_paused:
                self._resume_reading()
            self._sender = None
            self._owner._put_idle(self)
        else:
            self._abort(UpstreamReset("connection released mid-response"))

    def go_idle(self, now: float) -> None:
        self._state = IDLE
        self._idle_since = now
        deadline = now + self._keepalive_timeout
        if self._timer is None or self._timer_at > deadline:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        # One lazily re-armed timer per connection serves both the read gap
        # timeout and the idle keep-alive expiry: activity only stamps _last.
        self._timer = None
        state = self._state
        now = self._loop.time()
        if state == BUSY:
            if self._reading_paused or self._src_wait:
                self._last = now  # waiting on our side, not the upstream's
            deadline = self._last + self._read_timeout
            if deadline <= now:
                self._abort(UpstreamTimeout(f"no data from upstream for {self._read_timeout}s"))
                return
            self._arm(deadline)
        elif state == IDLE:
            deadline = self._idle_since + self._keepalive_timeout
            if deadline <= now:
                self._abort(UpstreamReset("keep-alive expired"))
                return
            self._arm(deadline)

    def _abort(self, err: BaseException) -> None:
        """Close the connection now; whoever waits on it gets ``err``."""
        state = self._state
        if state == CLOSED:
            return
        if self._transport is not None:
            self._transport.abort()
        self._closed(err, state == IDLE)

    def _closed(self, err: BaseException, was_idle: bool) -> None:
        self._state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        fut = self._head_fut
        if fut is not None:
            self._head_fut = None
            if not fut.done():
                fut.set_exception(err)
        resp = self._resp
        if resp is not None and not resp._done and resp._exc is None:
            resp._exc = err
            resp._wake()
        self._wake_drain()
        sender = self._sender
        if sender is not None and not sender.done() and sender is not asyncio.current_task():
            sender.cancel()
        if self.registered:
            self._owner._conn_closed(self, was_idle)

    def _wake_drain(self) -> None:
        drain = self._drain_fut
        if drain is not None:
            self._drain_fut = None
            if not drain.done():
                drain.set_result(None)
