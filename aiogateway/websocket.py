"""WebSocket upgrades proxied frame by frame, both ways.

WebSockets are long-lived and rare next to plain requests, so the upstream
side uses aiohttp's ClientSession.ws_connect (handshake, masking, control
frames) rather than the lean pool. Pings are answered per hop; data frames
and the close code pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from . import errors
from .headers import REQUEST_DROP, upstream_request_headers

if TYPE_CHECKING:
    from .exchange import Exchange
    from .routes import Route
    from .server import Gateway

__all__ = ["is_websocket_upgrade", "proxy_websocket"]

# The client's handshake headers: aiohttp's client writes its own.
_WEBSOCKET_DROP = REQUEST_DROP | {
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
}


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get("Upgrade")
    return upgrade is not None and upgrade.lower() == "websocket"


async def proxy_websocket(
    gateway: Gateway, exchange: Exchange, route: Route, target: bytes
) -> web.StreamResponse:
    request = exchange.request
    pool = route.upstream
    drop = _WEBSOCKET_DROP | gateway.table.identity_headers_b | route.chain.strip_headers
    # The same rewriting as plain requests (hop-by-hop, identity, X-Forwarded-*).
    headers = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in upstream_request_headers(
            request.raw_headers,
            drop,
            client_ip=exchange.client_ip,
            proto=request.scheme,
            request_id=exchange.request_id,
            extra=exchange.extra_upstream_headers,
        )
    ]
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    url = URL(pool.settings.url)
    ws_url = url.with_scheme("wss" if url.scheme == "https" else "ws")
    target_url = f"{ws_url.origin()}{url.raw_path.rstrip('/')}{target.decode('latin-1')}"
    settings = pool.settings
    try:
        upstream = await gateway.ws_session().ws_connect(
            target_url,
            headers=headers,
            protocols=protocols,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=settings.read_timeout),
            max_msg_size=0,
            autoclose=False,
        )
    except aiohttp.WSServerHandshakeError as exc:
        exchange.error = "websocket_handshake"
        exchange.status = 502
        return errors.error_response(
            502,
            errors.BAD_GATEWAY,
            f"upstream refused the WebSocket upgrade ({exc.status})",
            exchange.request_id,
        )
    except (aiohttp.ClientError, OSError):
        exchange.error = "connect"
        gateway.telemetry.upstream_error(pool.name, "connect")
        exchange.status = 502
        return errors.error_response(
            502, errors.BAD_GATEWAY, "upstream unreachable", exchange.request_id
        )
    except TimeoutError:
        exchange.error = "timeout"
        gateway.telemetry.upstream_error(pool.name, "timeout")
        exchange.status = 504
        return errors.error_response(
            504, errors.GATEWAY_TIMEOUT, "upstream timed out", exchange.request_id
        )
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        max_msg_size=0,
        autoclose=False,
    )
    client.headers["X-Request-ID"] = exchange.request_id
    await client.prepare(request)
    exchange.upstream_status = exchange.status = 101
    try:
        await _pump_both(exchange, client, upstream)
    finally:
        await upstream.close()
        with contextlib.suppress(Exception):
            await client.close()
    return client


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    count: Callable[[int], None],
) -> None:
    """Forward data frames from ``src`` to ``dst`` until ``src`` closes; pass its close code."""
    async for msg in src:
        if msg.type is WSMsgType.TEXT:
            count(len(msg.data))
            await dst.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            count(len(msg.data))
            await dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            break
    await dst.close(code=src.close_code or 1000)


async def _pump_both(
    exchange: Exchange, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    def count_in(n: int) -> None:
        exchange.bytes_in += n

    def count_out(n: int) -> None:
        exchange.bytes_out += n

    tasks = [
        asyncio.ensure_future(_pump(client, upstream, count_in)),
        asyncio.ensure_future(_pump(upstream, client, count_out)),
    ]
    try:
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # Give the other direction a moment to forward the close frame.
        if pending:
            await asyncio.wait(pending, timeout=1.0)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
