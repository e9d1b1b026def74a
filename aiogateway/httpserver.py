"""aiohttp's low-level server with the gateway's JSON errors for malformed HTTP.

aiohttp answers requests its parser rejects (bad request line, oversized
headers, broken chunking) before any handler runs, in plain text. Here those
answers use the gateway's JSON error shape, and oversized request lines and
header fields get 414 and 431 instead of a generic 400. A request head must
arrive within ``server.client_header_timeout`` (slowloris).

Each request runs in the connection's own task: aiohttp's ``start()`` loop,
copied with one change, awaits the handler directly instead of creating a
task per request (on Python 3.11 that task, its registration in asyncio's
task WeakSet and its extra wake-ups cost ~8 k instructions per request, ~3%
of the whole). The copy is used only with the aiohttp ``start()`` it was made
from (checked by source hash at import); any other aiohttp keeps its own.
One consequence: a context variable a hook sets stays set for the next
requests on the same connection; per-request state belongs in
``exchange.state``.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from typing import Any

from aiohttp import web
from aiohttp.helpers import ceil_timeout
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import (
    _PAYLOAD_ACCESS_ERROR,
    ERROR,
    RequestHandler,
    _ErrInfo,
)

from . import errors
from .headers import new_request_id

__all__ = ["GatewayServer"]

log = logging.getLogger("aiogateway.http")


# sha256 of inspect.getsource(RequestHandler.start) for the aiohttp releases
# whose start() _GatewayRequestHandler._start_inline copies.
_KNOWN_START = frozenset({"2e565fd40c8e04fb3afb481d5ba52691a61d28396573b4b8a4cf3b168782288e"})


def _start_source_hash() -> str | None:
    try:
        source = inspect.getsource(RequestHandler.start)
    except (OSError, TypeError):
        return None  # no source (a frozen or stripped install)
    return hashlib.sha256(source.encode()).hexdigest()


INLINE_START = _start_source_hash() in _KNOWN_START


class _GatewayRequestHandler(RequestHandler):
    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._max_line = int(kwargs.get("max_line_size", 8190))
        self._max_field = int(kwargs.get("max_field_size", 8190))
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None

    async def _start_inline(self) -> None:
        """aiohttp 3.14's ``RequestHandler.start``, awaiting the handler in this
        task: the lines from "coro = ..." to "await coro" are the only change."""
        loop = self._loop
        manager = self._manager
        assert manager is not None
        keepalive_timeout = self._keepalive_timeout
        resp = None
        assert self._request_factory is not None
        assert self._request_handler is not None

        while not self._force_close:
            if not self._messages:
                try:
                    # wait for next request
                    self._waiter = loop.create_future()
                    await self._waiter
                finally:
                    self._waiter = None

            message, payload = self._messages.popleft()

            if self._parser is not None:  # pragma: no branch
                self._parser.message_consumed()
            if self._buffer_paused and len(self._messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()

            start = loop.time() if self._logging_enabled else None

            manager.requests_count += 1
            writer = StreamWriter(self, loop)
            if isinstance(message, _ErrInfo):
                # make request_factory work
                request_handler = self._make_error_handler(message)
                message = ERROR
            else:
                request_handler = self._request_handler

            request = self._request_factory(
                message,
                payload,
                self,
                writer,
                self._task_handler or asyncio.current_task(loop),  # type: ignore[arg-type]
            )
            try:
                coro = self._handle_request(request, start, request_handler)
                try:
                    resp, reset = await coro
                except ConnectionError:
                    self.log_debug("Ignored premature client disconnection")
                    break

                if reset:
                    self.log_debug("Ignored premature client disconnection 2")
                    break

                # notify server about keep-alive
                self._keepalive = bool(resp.keep_alive)

                # check payload
                if not payload.is_eof():
                    lingering_time = self._lingering_time
                    if not self._force_close and lingering_time:
                        self.log_debug("Start lingering close timer for %s sec.", lingering_time)

                        now = loop.time()
                        end_t = now + lingering_time

                        try:
                            while not payload.is_eof() and now < end_t:
                                async with ceil_timeout(end_t - now):
                                    # read and ignore
                                    await payload.readany()
                                now = loop.time()
                        except (asyncio.CancelledError, TimeoutError):
                            if (t := asyncio.current_task()) and t.cancelling():
                                raise

                    # if payload still uncompleted
                    if not payload.is_eof() and not self._force_close:
                        self.log_debug("Uncompleted request.")
                        self.close()

                payload.set_exception(_PAYLOAD_ACCESS_ERROR)

            except asyncio.CancelledError:
                self.log_debug("Ignored premature client disconnection")
                self.force_close()
                raise
            except Exception as exc:
                self.log_exception("Unhandled exception", exc_info=exc)
                self.force_close()
            except BaseException:
                self.force_close()
                raise
            finally:
                request._task = None  # type: ignore[assignment]
                if self.transport is None and resp is not None:
                    self.log_debug("Ignored premature client disconnection.")

            if self._keepalive and not self._close and not self._force_close:
                # start keep-alive timer
                close_time = loop.time() + keepalive_timeout
                self._next_keepalive_close_time = close_time
                if self._keepalive_handle is None:
                    self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
            else:
                break

        # remove handler, close transport if no handlers left
        if not self._force_close:
            self._task_handler = None
            if self.transport is not None:
                self.transport.close()

    if INLINE_START:
        start = _start_inline  # aiohttp 3.14's loop without a task per request

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # A response written whole (aiogateway/response_writer.py) leaves aiohttp
        # nothing to do: its prepare() and write_eof() would return at once, and
        # only a declined upgrade has a tail to re-parse. Skip the two awaits.
        if getattr(resp, "_eof_sent", False) and not self._upgraded:
            request._finish()
            self.log_access(request, resp, start_time)
            return resp, False
        return await super().finish_response(request, resp, start_time)

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
