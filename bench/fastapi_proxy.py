"""The FastAPI + uvicorn + httpx design this project replaces (optional baseline).

A catch-all route forwarding through one shared ``httpx.AsyncClient``; needs
the ``bench`` extra (fastapi, uvicorn, httpx).

    python bench/fastapi_proxy.py --port P --upstream http://127.0.0.1:U
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response

__all__ = ["main"]

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"}
)


def make_app(upstream: str) -> FastAPI:
    client: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client["c"] = httpx.AsyncClient(base_url=upstream, limits=httpx.Limits(max_connections=256))
        yield
        await client["c"].aclose()

    app = FastAPI(lifespan=lifespan)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def proxy(path: str, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        resp = await client["c"].request(
            request.method,
            "/" + path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP}
        out.pop("content-length", None)
        return Response(content=resp.content, status_code=resp.status_code, headers=out)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
