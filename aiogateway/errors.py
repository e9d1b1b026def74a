"""Error types and the gateway's JSON error responses.

Every error a client sees has the same shape:
``{"error": CODE, "message": TEXT, "request_id": ID}``. Codes are constants so
plugins, tests and users' tooling agree on them.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

__all__ = [
    "BAD_GATEWAY",
    "BAD_REQUEST",
    "FORBIDDEN",
    "GATEWAY_TIMEOUT",
    "HTTP_VERSION_NOT_SUPPORTED",
    "INTERNAL_ERROR",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "NOT_IMPLEMENTED",
    "PAYLOAD_TOO_LARGE",
    "REQUEST_TIMEOUT",
    "SERVICE_UNAVAILABLE",
    "TOO_MANY_REQUESTS",
    "UNAUTHORIZED",
    "ConfigError",
    "error_response",
]

BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
REQUEST_TIMEOUT = "request_timeout"
PAYLOAD_TOO_LARGE = "payload_too_large"
TOO_MANY_REQUESTS = "too_many_requests"
INTERNAL_ERROR = "internal_error"
NOT_IMPLEMENTED = "not_implemented"
BAD_GATEWAY = "bad_gateway"
SERVICE_UNAVAILABLE = "service_unavailable"
GATEWAY_TIMEOUT = "gateway_timeout"
HTTP_VERSION_NOT_SUPPORTED = "http_version_not_supported"


class ConfigError(Exception):
    """A configuration problem, located precisely: file, table/route and key.

    ``location`` is a dotted path such as ``routes[3].event.topic`` or
    ``plugins.jwt.secret``; ``str()`` gives ``config.toml: routes[3].event.topic: <problem>``.
    """

    def __init__(self, message: str, *, file: str | None = None, location: str = "") -> None:
        self.file = file
        self.location = location
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.location) if p]
        parts.append(self.message)
        return ": ".join(parts)

    def in_file(self, file: str) -> ConfigError:
        """The same error, attributed to ``file`` (loaders add it once known)."""
        return ConfigError(self.message, file=file, location=self.location)


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON error response; never carries a stack trace."""
    body = orjson.dumps({"error": code, "message": message, "request_id": request_id})
    resp = web.Response(status=status, body=body, content_type="application/json")
    resp.headers["X-Request-ID"] = request_id
    if headers:
        resp.headers.update(headers)
    return resp
