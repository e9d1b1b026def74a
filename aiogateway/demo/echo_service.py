"""One echo service standing in for billing, chat, tpl and user (demo, not product).

Every HTTP request is answered with a JSON description of what arrived: the
service (from the path, ``/v1/<service>/...``), method, path, query, the
identity headers the gateway forwarded and the body's size. A WebSocket
upgrade (the chat route) echoes every text and binary message back.

It listens on several ports at once (``--port`` repeated), so one process can
be billing on 8003, chat on 8004, tpl on 8005 and user on 8006.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from aiohttp import WSMsgType, web

__all__ = ["DEFAULT_PORTS", "handle", "main", "make_app"]

DEFAULT_PORTS = (8003, 8004, 8005, 8006)
IDENTITY = ("X-User-Id", "X-Org-Id", "X-User-Role", "X-Request-ID")


async def _websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def handle(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _websocket(request)
    if request.path == "/healthz":
        return web.json_response({"status": "ok"})
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    parts = request.path.split("/")
    service = parts[2] if len(parts) > 2 and parts[1] == "v1" else "echo"
    return web.json_response(
        {
            "service": service,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": {h: request.headers[h] for h in IDENTITY if h in request.headers},
            "body_bytes": size,
        }
    )


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _serve(host: str, ports: list[int]) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="demo echo service (billing/chat/tpl/user)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, action="append", help="repeatable; default 8003-8006")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port or list(DEFAULT_PORTS)))


if __name__ == "__main__":
    main()
