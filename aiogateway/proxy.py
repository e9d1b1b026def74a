"""The request handler: route, run the chain, stream to the upstream and back.

One error boundary (``__call__``) turns failures into the gateway's JSON
errors: upstream connect/reset 502, timeout 504, body too large 413, bad path
400, anything unexpected 500 (logged, never shown). ``CancelledError`` (the
client went away: aiohttp cancels the handler) is re-raised after cleanup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.streams import EmptyStreamReader

from . import errors
from .accesslog import log_access
from .chain import EMPTY_CHAIN
from .exchange import Exchange
from .headers import (
    REQUEST_DROP,
    new_request_id,
    request_id_from,
    upstream_request_headers,
)
from .pathnorm import BadPath, encode_path, normalize_path
from .response_writer import can_send_complete, send_complete
from .upstream import UpstreamError, UpstreamResponse
from .websocket import is_websocket_upgrade, proxy_websocket

if TYPE_CHECKING:
    from .chain import Chain
    from .plugin import Endpoint
    from .routes import Route, RouteTable
    from .server import Gateway

__all__ = ["ProxyHandler"]

log = logging.getLogger("aiogateway.proxy")

# Bodies up to this size are read whole and sent with the request head in one write.
SMALL_BODY = 64 * 1024
# How long the response head waits for the first body bytes (to go out in one
# write, and so that a body failing at once can still become a 502).
FIRST_CHUNK_GRACE = 0.05

_STATUS_FOR_UPSTREAM_ERROR = {"connect": 502, "reset": 502, "protocol": 502, "timeout": 504}
_CODE_FOR_STATUS = {502: errors.BAD_GATEWAY, 504: errors.GATEWAY_TIMEOUT}
_MESSAGE_FOR_KIND = {
    "connect": "upstream unreachable",
    "reset": "upstream connection reset",
    "protocol": "upstream sent an invalid response",
    "timeout": "upstream timed out",
}


class BodyTooLarge(Exception):
    """The request body crossed the route's max_body_bytes mid-stream."""


class ClientGone(Exception):
    """The client closed its connection while sending the body."""


class ProxyResponse(web.StreamResponse):
    # Coalesce the response head with the first body chunk into one write.
    _send_headers_immediately = False


class ProxyHandler:
    """The ``aiohttp.web.Server`` handler for every request."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.telemetry = gateway.telemetry
        self.special = gateway.special  # /healthz, /readyz: path -> handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        # The parsed message's fields, not the request's properties: each of
        # those costs a Python call (~1 k instructions on first use), and the hot
        # path reads many. (request.message itself warns "deprecated": _message;
        # tests/test_aiohttp_internals.py holds aiohttp to these names.)
        message = request._message
        if message.version.major != 1:
            # HTTP/0.9 or an "HTTP/2.0" text request line: not HTTP/1.x framing.
            return errors.error_response(
                505, errors.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.0 and 1.1", new_request_id()
            )
        target = message.path
        if target[:1] != "/":
            # Absolute-form (RFC 9112 §3.2.2): route on its path. Anything else
            # (asterisk-form "*", authority-form) names no resource here.
            if target[:7].lower() == "http://" or target[:8].lower() == "https://":
                target = request.rel_url.raw_path_qs
            else:
                target = ""
        raw_path, _, query = target.partition("?")
        request_id = request_id_from(message.headers.get("X-Request-ID"))
        # request.remote, worked out once per connection.
        protocol = request._protocol
        client_ip: str | None = getattr(protocol, "client_ip", None)
        if client_ip is None:
            client_ip = protocol.client_ip = request.remote or ""  # type: ignore[attr-defined]
        table = self.gateway.table
        exchange = Exchange(
            request, request_id, message.method, raw_path, query, client_ip, started
        )
        table.in_flight += 1
        chain: Chain = table.unmatched_chain
        try:
            try:
                if not raw_path:
                    raise BadPath("the request target must be a path")
                exchange.path = path = normalize_path(raw_path)
            except BadPath as exc:
                exchange.error = "bad_request"
                return self._error(exchange, 400, errors.BAD_REQUEST, str(exc))
            special = self.special.get(path)
            if special is not None:
                chain = EMPTY_CHAIN  # health probes are not traffic
                response = await special(request)
                exchange.status = response.status
                return response
            endpoint = table.endpoints.get(path)
            if endpoint is not None:
                chain = endpoint[1]
                return await self._endpoint(exchange, *endpoint)
            match = table.router.match(exchange.method, path)
            if match is None:
                return self._error(exchange, 404, errors.NOT_FOUND, "no route for this path")
            if isinstance(match, frozenset):
                allow = ", ".join(sorted(match))
                return self._error(
                    exchange,
                    405,
                    errors.METHOD_NOT_ALLOWED,
                    "method not allowed",
                    {"Allow": allow},
                )
            route, exchange.params = match
            exchange.route = route
            chain = route.chain
            return await self._proxy(exchange, route, table)
        except asyncio.CancelledError:
            if exchange.error is None:
                exchange.error = "client_abort"
            raise
        except Exception:
            log.exception("internal error on request %s", request_id)
            exchange.error = "internal"
            return self._error(exchange, 500, errors.INTERNAL_ERROR, "internal error")
        finally:
            table.in_flight -= 1
            exchange.finished = time.perf_counter()
            if self.gateway.access_log:
                log_access(exchange)
            if chain.on_complete:
                await self._complete(chain, exchange)

    async def _complete(self, chain: Chain, exchange: Exchange) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # A cancelled task cannot await safely: finish the hooks in their own task.
            self.gateway.spawn(chain.run_on_complete(exchange, self.telemetry))
        else:
            await chain.run_on_complete(exchange, self.telemetry)

    def _error(
        self,
        exchange: Exchange,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        exchange.status = status
        response = errors.error_response(status, code, message, exchange.request_id, headers)
        exchange.bytes_out = response.content_length or 0
        return response

    async def _endpoint(
        self, exchange: Exchange, endpoint: Endpoint, chain: Chain
    ) -> web.StreamResponse:
        if exchange.method not in endpoint.methods:
            allow = ", ".join(sorted(endpoint.methods))
            return self._error(
                exchange, 405, errors.METHOD_NOT_ALLOWED, "method not allowed", {"Allow": allow}
            )
        rejection = await chain.run_on_request(exchange)
        if rejection is not None:
            return self._rejected(exchange, rejection)
        response = await endpoint.handler(exchange.request)
        exchange.status = response.status
        exchange.bytes_out = response.content_length or 0
        if not response.prepared:
            response.headers["X-Request-ID"] = exchange.request_id
        return response

    def _rejected(self, exchange: Exchange, response: web.StreamResponse) -> web.StreamResponse:
        exchange.status = response.status
        exchange.bytes_out = response.content_length or 0
        response.headers["X-Request-ID"] = exchange.request_id
        self.telemetry.plugin_rejection(
            exchange.rejected_by or "", exchange.route_name, response.status
        )
        return response

    async def _proxy(
        self, exchange: Exchange, route: Route, table: RouteTable
    ) -> web.StreamResponse:
        request = exchange.request
        message = request._message
        limit = route.max_body_bytes
        length: int | None = None
        content_length = message.headers.get("Content-Length")
        if content_length is not None:
            length = int(content_length)  # llhttp accepted it: digits only
        if limit and length is not None and length > limit:
            exchange.error = "body_too_large"
            return self._error(
                exchange, 413, errors.PAYLOAD_TOO_LARGE, f"request body over {limit} bytes"
            )
        transfer_encoding = message.headers.get("Transfer-Encoding")
        if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
            # RFC 9112 §6.1: a transfer coding we cannot decode is answered 501,
            # never forwarded as if the body were plain.
            exchange.error = "bad_request"
            response = self._error(
                exchange, 501, errors.NOT_IMPLEMENTED, "unsupported transfer coding"
            )
            response.force_close()
            return response
        chain = route.chain
        if chain.on_request:
            rejection = await chain.run_on_request(exchange)
            if rejection is not None:
                return self._rejected(exchange, rejection)
        expect = message.headers.get("Expect")
        if (
            expect is not None
            and expect.lower() == "100-continue"
            and request.content.total_bytes == 0
            and message.version.minor == 1
        ):
            # Only now (route, size and auth passed) invite the client to send
            # its body; aiohttp's low-level server does not do it for us. A client
            # that sent body bytes already needs no invitation (RFC 9110 §10.1.1).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        if route.websocket and message.upgrade and is_websocket_upgrade(request):
            return await proxy_websocket(
                self.gateway, exchange, route, self._upstream_target(exchange, route)
            )

        drop = table.request_drop.get(chain)
        if drop is None:
            drop = table.request_drop[chain] = (
                REQUEST_DROP | table.identity_headers_b | chain.strip_headers
            )
        headers = upstream_request_headers(
            message.raw_headers,
            drop,
            client_ip=exchange.client_ip,
            proto=_scheme(request),
            request_id=exchange.request_id,
            extra=exchange.extra_upstream_headers,
        )
        body: AsyncIterator[bytes] | bytes | None
        if type(request._payload) is EmptyStreamReader:  # not request.body_exists
            body = None
        elif length is not None and length <= SMALL_BODY:
            try:
                if request.content.is_eof():  # all here already: no timer needed
                    body = await request.content.readexactly(length)
                else:
                    body = await _read_small_body(
                        request, length, table.settings.server.client_body_timeout
                    )
            except (asyncio.IncompleteReadError, ConnectionError):
                exchange.error = "client_abort"
                return self._error(exchange, 400, errors.BAD_REQUEST, "incomplete request body")
            except TimeoutError:
                return await self._client_timeout(exchange)
            exchange.bytes_in = length
        else:
            body = self._stream_body(exchange, limit, table.settings.server.client_body_timeout)

        pool = route.upstream
        exchange.upstream_started = time.perf_counter()
        try:
            upstream = await pool.request(
                exchange.method, self._upstream_target(exchange, route), headers, body, length
            )
        except UpstreamError as exc:
            return await self._upstream_failed(exchange, pool.name, exc)
        except (BodyTooLarge, ClientGone):
            pass  # handled below from exchange.error
        else:
            return await self._relay(exchange, upstream)
        return await self._body_failed(exchange, limit)

    async def _client_timeout(self, exchange: Exchange) -> web.StreamResponse:
        """408, then close at once: aiohttp would otherwise keep reading (lingering)
        the rest of a body that is dribbling in."""
        exchange.error = "client_timeout"
        response = self._error(
            exchange, 408, errors.REQUEST_TIMEOUT, "request body not received in time"
        )
        response.force_close()
        request = exchange.request
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()  # transport.close() flushes the 408 first
        return response

    async def _body_failed(self, exchange: Exchange, limit: int) -> web.StreamResponse:
        if exchange.error == "body_too_large":
            return self._error(
                exchange, 413, errors.PAYLOAD_TOO_LARGE, f"request body over {limit} bytes"
            )
        if exchange.error == "client_timeout":
            return await self._client_timeout(exchange)
        exchange.error = exchange.error or "client_abort"
        return self._error(exchange, 400, errors.BAD_REQUEST, "request body not received")

    async def _upstream_failed(
        self, exchange: Exchange, upstream: str, exc: UpstreamError
    ) -> web.StreamResponse:
        if exchange.error in ("body_too_large", "client_abort", "client_timeout"):
            # The pool saw our body iterator fail; that is the real cause.
            return await self._body_failed(
                exchange, exchange.route.max_body_bytes if exchange.route else 0
            )
        kind = exc.kind
        exchange.error = kind
        self.telemetry.upstream_error(upstream, kind)
        status = _STATUS_FOR_UPSTREAM_ERROR.get(kind, 502)
        return self._error(
            exchange,
            status,
            _CODE_FOR_STATUS[status],
            _MESSAGE_FOR_KIND.get(kind, "upstream error"),
        )

    def _upstream_target(self, exchange: Exchange, route: Route) -> bytes:
        path = exchange.path
        if route.upstream_path is not None:
            path = route.upstream_path.format_map(exchange.params)
        elif route.strip_prefix and route.prefix is not None:
            path = path[len(route.prefix.rstrip("/")) :] or "/"
            if not path.startswith("/"):
                path = "/" + path
        target = encode_path(path)
        if exchange.query:
            target = f"{target}?{exchange.query}"
        return target.encode("latin-1")

    async def _stream_body(
        self, exchange: Exchange, limit: int, gap: float
    ) -> AsyncIterator[bytes]:
        """The client's body, chunk by chunk; iterated by the pool's sender task."""
        content = exchange.request.content
        loop = asyncio.get_running_loop()
        received = 0
        # The deadline covers only the wait for the client, never the time the
        # consumer spends pushing a chunk upstream (it is lifted around yield).
        # asyncio.timeout raises its TimeoutError at the block's exit.
        try:
            async with asyncio.timeout(None) as deadline:
                while True:
                    deadline.reschedule(loop.time() + gap)
                    try:
                        # readchunk(): one buffered chunk as it came, no join of all of them.
                        chunk, _ = await content.readchunk()
                    except (ConnectionError, asyncio.IncompleteReadError) as exc:
                        exchange.error = "client_abort"
                        raise ClientGone from exc
                    deadline.reschedule(None)
                    if not chunk:
                        return
                    received += len(chunk)
                    exchange.bytes_in = received
                    if limit and received > limit:
                        exchange.error = "body_too_large"
                        raise BodyTooLarge
                    yield chunk
        except TimeoutError as exc:
            exchange.error = "client_timeout"
            raise ClientGone from exc

    async def _relay(self, exchange: Exchange, upstream: UpstreamResponse) -> web.StreamResponse:
        """Stream the upstream's response to the client with backpressure."""
        exchange.upstream_headers_at = time.perf_counter()
        first = upstream.whole_body()
        if first is None:
            try:
                first = await _first_chunk(upstream)
            except UpstreamError as exc:
                # Nothing went to the client yet: a clean 502/504 is still possible.
                upstream.close()
                return await self._upstream_failed(exchange, upstream_name(exchange), exc)
        exchange.upstream_status = exchange.status = upstream.status
        exchange.set_upstream_response(upstream)
        response: web.StreamResponse | None = None  # made only if aiohttp writes it
        route = exchange.route
        assert route is not None
        request = exchange.request
        try:
            for hook in route.chain.on_response:
                await hook(exchange)
            if (
                first is not None
                and len(first) == upstream.content_length
                and can_send_complete(exchange.method, upstream.status)
            ):
                # The whole body is here: head and body in one write, without
                # aiohttp's response machinery (aiogateway/response_writer.py).
                exchange.bytes_out = len(first)
                written = await send_complete(request, first, exchange, upstream)
                upstream.release()
                return written
            # _real_headers: aiohttp's own no-copy path (the dict is fresh and ours).
            response = ProxyResponse(
                status=upstream.status,
                reason=upstream.reason,
                _real_headers=exchange.response_headers,
            )
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if first is None:
                # A slow stream (SSE, long poll): the client gets the head now.
                request.writer.send_headers()
                chunk = await upstream.read()
            elif len(first) == upstream.content_length:
                # All here, but a response that must carry no body (HEAD, 204,
                # 304): aiohttp's framing rules apply; head and end in one write.
                exchange.bytes_out = len(first)
                # Typed bytes, but takes any buffer (it asserts bytes, bytearray or
                # memoryview): a Content-Length body comes as a memoryview, uncopied.
                await response.write_eof(first)  # type: ignore[arg-type]
                upstream.release()
                return response
            else:
                chunk = first  # sent together with the head in one write
            sent = 0
            while chunk:
                await response.write(chunk)
                sent += len(chunk)
                exchange.bytes_out = sent
                chunk = await upstream.read()
            await response.write_eof()
        except UpstreamError as exc:
            # Mid-body failure: the head is gone, so cut the client's stream short.
            exchange.error = exc.kind
            self.telemetry.upstream_error(upstream_name(exchange), exc.kind)
            upstream.close()
            if response is None:
                response = ProxyResponse(status=upstream.status, reason=upstream.reason)
            response.force_close()
            if request.transport is not None:
                request.transport.abort()
            return response
        except ConnectionError:
            exchange.error = "client_abort"
            upstream.close()
            if response is None:
                response = ProxyResponse(status=upstream.status, reason=upstream.reason)
            return response
        except BaseException:
            upstream.close()
            raise
        upstream.release()
        return response


async def _read_small_body(request: web.BaseRequest, length: int, gap: float) -> bytes:
    """A body of known, small length; ``gap`` bounds each wait, not the whole read."""
    content = request.content
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    received = 0
    async with asyncio.timeout(loop.time() + gap) as deadline:
        while received < length:
            chunk = await content.readany()
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(chunks), length)
            chunks.append(chunk)
            received += len(chunk)
            deadline.reschedule(loop.time() + gap)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _first_chunk(upstream: UpstreamResponse) -> bytes | memoryview | None:
    """The first body bytes if already here or arriving within a short grace; else None."""
    if upstream.buffered or upstream.content_length == 0:
        return await upstream.read()  # returns at once
    try:
        async with asyncio.timeout(FIRST_CHUNK_GRACE):
            return await upstream.read()
    except TimeoutError:
        return None  # read() is cancellation-safe: nothing is lost


def _scheme(request: web.BaseRequest) -> str:
    """``request.scheme``, worked out once per connection."""
    protocol = request._protocol
    scheme: str | None = getattr(protocol, "client_scheme", None)
    if scheme is None:
        scheme = protocol.client_scheme = request.scheme  # type: ignore[attr-defined]
    return scheme


def upstream_name(exchange: Exchange) -> str:
    return exchange.route.upstream.name if exchange.route is not None else ""
