"""aiohttp's low-level server with the gateway's JSON errors for malformed HTTP.

aiohttp answers requests its parser rejects (bad request line, oversized
headers, broken chunking) before any handler runs, in plain text. Here those
answers use the gateway's JSON error shape, and oversized request lines and
header fields get 414 and 431 instead of a generic 400. A request head must
arrive within ``server.client_header_timeout`` (slowloris).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler

from . import errors
from .headers import new_request_id

__all__ = ["GatewayServer"]

log = logging.getLogger("aiogateway.http")


class _GatewayRequestHandler(RequestHandler):
    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._max_line = int(kwargs.get("max_line_size", 8190))
        self._max_field = int(kwargs.get("max_field_size", 8190))
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None

    # Slowloris guard: the first request head must be complete within
    # header_timeout of the connect (as nginx's client_header_timeout), and a
    # later head within header_timeout of its first byte. aiohttp itself only
    # bounds fully idle keep-alive connections.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        # Idle: between requests, or before the first one was even parsed.
        idle = self._request_count == 0 or (self._waiter is not None and not self._waiter.done())
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None
        elif idle and self._header_deadline is None and data:
            self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self._loop.call_later(
            self._header_timeout, self._header_timed_out, self._request_count
        )

    def _header_timed_out(self, count_when_armed: int) -> None:
        self._header_deadline = None
        if self._request_count == count_when_armed:  # still no complete head
            log.debug("closing a connection whose request head took too long")
            self.force_close()
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None
        super().connection_lost(exc)

    def _too_long(self, exc: LineTooLong) -> tuple[int, str]:
        # GatewayServer keeps the two limits distinct, so the limit names the part.
        if exc.args[1] == self._max_line:
            return 414, "request target too long"
        return 431, "request header field too large"

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        code = errors.BAD_REQUEST
        text = "malformed request"
        if isinstance(exc, LineTooLong):
            status, text = self._too_long(exc)
        elif isinstance(exc, BadHttpMethod):
            status, text = 400, "unknown HTTP method"
        elif isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
            status, text = 431, "too many request header fields"
        elif isinstance(exc, BadHttpMessage):
            status = 400
        elif status == 504:
            code, text = errors.GATEWAY_TIMEOUT, "timed out"
        elif status >= 500:
            code, text = errors.INTERNAL_ERROR, "internal error"
        if status >= 500:
            log.error("error handling request", exc_info=exc)
        else:
            log.debug("rejected malformed request from %s: %s", request.remote, exc)
        response = errors.error_response(status, code, text, new_request_id())
        response.force_close()
        return response


class GatewayServer(web.Server):
    """``web.Server`` whose connections use the JSON-error request handler."""

    def __init__(self, *args: Any, header_timeout: float = 30.0, **kwargs: Any) -> None:
        line, field = kwargs.get("max_line_size", 8190), kwargs.get("max_field_size", 8190)
        if line == field:
            # aiohttp's LineTooLong carries only the limit that was crossed: one
            # byte more for the request line tells it from a header field (414/431).
            kwargs["max_line_size"] = line + 1
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout

    def __call__(self) -> RequestHandler:
        return _GatewayRequestHandler(
            self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs
        )
