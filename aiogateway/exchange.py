"""The per-request object every plugin hook sees.

One ``Exchange`` is made per request and lives until its ``on_complete`` hooks
have run. Per-request state belongs here (``state``), never on a plugin
instance, since one plugin instance serves every request concurrently.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from .headers import response_headers

if TYPE_CHECKING:
    from collections.abc import Sequence

    from aiohttp import web

    from .routes import Route
    from .upstream_streams import UpstreamResponse

__all__ = ["Exchange"]


class Exchange:
    """A request in flight, from arrival to the last byte out (or failure).

    Request side (set by the core before ``on_request``):
      request      the aiohttp request (headers; do not read its body in a hook)
      route        the matched route, or None when no route matched
      params       ``{param}`` values from the route's path
      request_id   X-Request-ID kept from the client or generated
      method, path the method and normalised path (no query); ``query`` raw query
      client_ip    the client's address (the TCP peer)
      started      ``time.perf_counter()`` at arrival; ``started_at`` the wall clock

    Identity (set by auth plugins in ``on_request``):
      claims       verified JWT claims, user_id / org_id, principal (service name)

    Upstream and response (set by the core):
      status           status sent to the client (0 until known)
      upstream_status  the upstream's status, None if it never answered
      response_headers headers going to the client; ``on_response`` may edit them
      bytes_in / bytes_out  body bytes received from the client / sent to it
      upstream_started / upstream_headers_at  perf_counter marks
      finished         perf_counter when the exchange ended
      error            None, or a short kind: connect, timeout, reset,
                       client_abort, body_too_large, bad_request, internal
      rejected_by      the plugin instance that answered instead of the upstream
    """

    __slots__ = (
        "_response_headers",
        "_upstream_response",
        "bytes_in",
        "bytes_out",
        "claims",
        "client_ip",
        "error",
        "extra_upstream_headers",
        "finished",
        "method",
        "org_id",
        "params",
        "path",
        "principal",
        "query",
        "rejected_by",
        "request",
        "request_id",
        "route",
        "started",
        "started_at",
        "state",
        "status",
        "upstream_headers_at",
        "upstream_started",
        "upstream_status",
        "user_id",
    )

    def __init__(
        self,
        request: web.BaseRequest,
        request_id: str,
        method: str,
        path: str,
        query: str,
        client_ip: str,
        started: float,
    ) -> None:
        self.request = request
        self.request_id = request_id
        self.method = method
        self.path = path
        self.query = query
        self.client_ip = client_ip
        self.started = started
        self.started_at = time.time()
        self.route: Route | None = None
        self.params: dict[str, str] = {}
        self.claims: dict[str, Any] | None = None
        self.user_id: str | None = None
        self.org_id: str | None = None
        self.principal: str | None = None
        self.extra_upstream_headers: list[tuple[str, str]] = []
        self._response_headers: CIMultiDict[str] | None = None
        self._upstream_response: UpstreamResponse | None = None
        self.status = 0
        self.upstream_status: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_started: float | None = None
        self.upstream_headers_at: float | None = None
        self.finished: float | None = None
        self.error: str | None = None
        self.rejected_by: str | None = None
        self.state: dict[str, Any] = {}

    @property
    def response_headers(self) -> CIMultiDict[str]:
        """The headers going to the client (built on first use from the upstream's)."""
        headers = self._response_headers
        if headers is None:
            upstream = self._upstream_response
            headers = (
                CIMultiDict()
                if upstream is None
                else response_headers(upstream.headers, self.request_id)
            )
            self._response_headers = headers
        return headers

    @response_headers.setter
    def response_headers(self, headers: CIMultiDict[str]) -> None:
        self._response_headers = headers

    def set_upstream_response(self, upstream: UpstreamResponse) -> None:
        """The upstream's response head arrived; ``response_headers`` is derived from
        it only when something reads it (the common response is written from the
        head's bytes directly: aiogateway/response_writer.py)."""
        self._upstream_response = upstream
        self._response_headers = None

    @property
    def raw_response_headers(self) -> Sequence[tuple[bytes, bytes]] | None:
        """The upstream's response headers as received, None before they came."""
        upstream = self._upstream_response
        return None if upstream is None else upstream.headers

    @property
    def response_headers_built(self) -> bool:
        """Whether ``response_headers`` was read (and so may have been edited)."""
        return self._response_headers is not None

    def add_upstream_header(self, name: str, value: str) -> None:
        """From ``on_request``: send this header to the upstream."""
        self.extra_upstream_headers.append((name, value))

    @property
    def route_name(self) -> str:
        """The route's name, or ``unmatched`` (the label metrics and audit use)."""
        return self.route.name if self.route is not None else "unmatched"

    @property
    def duration(self) -> float:
        """Seconds from arrival to the end (or to now, while in flight)."""
        end = self.finished if self.finished is not None else time.perf_counter()
        return end - self.started

    @property
    def upstream_duration(self) -> float | None:
        """Seconds from calling the upstream to its response headers."""
        if self.upstream_started is None or self.upstream_headers_at is None:
            return None
        return self.upstream_headers_at - self.upstream_started
