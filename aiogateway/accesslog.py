"""One structured access-log line per request, through the standard logging module."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .exchange import Exchange

__all__ = ["access_logger", "log_access"]

access_logger = logging.getLogger("aiogateway.access")


def log_access(exchange: Exchange) -> None:
    if not access_logger.isEnabledFor(logging.INFO):
        return
    route = exchange.route
    access_logger.info(
        "request",
        extra={
            "fields": {
                "request_id": exchange.request_id,
                "method": exchange.method,
                "path": exchange.path,
                "route": exchange.route_name,
                "upstream": route.upstream.name if route is not None else None,
                "status": exchange.status,
                "duration_ms": round(exchange.duration * 1000, 3),
                "bytes_in": exchange.bytes_in,
                "bytes_out": exchange.bytes_out,
                "client_ip": exchange.client_ip,
                "user_id": exchange.user_id,
                "error": exchange.error,
                "rejected_by": exchange.rejected_by,
            }
        },
    )
