"""The naive aiohttp proxy baseline: what most people write first.

``web.Application`` with one catch-all route and one shared
``ClientSession(auto_decompress=False)``, uvloop, response streamed back.

    python bench/naive_proxy.py --port P --upstream http://127.0.0.1:U
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

__all__ = ["main"]

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def on_startup(app: web.Application) -> None:
        app[session_key] = aiohttp.ClientSession(
            auto_decompress=False, connector=aiohttp.TCPConnector(limit=256)
        )

    async def on_cleanup(app: web.Application) -> None:
        await app[session_key].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read() if request.body_exists else None
        async with app[session_key].request(
            request.method,
            upstream + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as resp:
            out = web.StreamResponse(status=resp.status, reason=resp.reason)
            for k, v in resp.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    out.headers[k] = v
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    app.router.add_route("*", "/{tail:.*}", proxy)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(
        make_app(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
