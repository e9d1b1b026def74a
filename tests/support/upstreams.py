"""Real upstream HTTP servers on loopback, started per test.

``recording_upstream`` answers every request with a JSON echo of what it
received and keeps each request (method, path, query, headers, body) so tests
assert on what really reached the upstream. ``start_upstream`` serves any
aiohttp handler or Application.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web

__all__ = ["RecordedRequest", "RecordingUpstream", "RunningUpstream"]


@dataclass
class RecordedRequest:
    method: str
    path: str  # raw path as received, without the query
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


@dataclass
class RunningUpstream:
    url: str
    port: int
    runner: web.BaseRunner


@dataclass
class RecordingUpstream(RunningUpstream):
    requests: list[RecordedRequest] = field(default_factory=list)

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]


StartUpstream = Callable[..., Awaitable[RunningUpstream]]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    """start_upstream(handler_or_app) -> RunningUpstream on 127.0.0.1, random port."""
    runners: list[web.BaseRunner] = []

    async def start(
        target: web.Application | Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> RunningUpstream:
        runner: web.BaseRunner
        if isinstance(target, web.Application):
            runner = web.AppRunner(target, access_log=None, auto_decompress=False)
        else:
            # auto_decompress off: tests assert on the bytes that really arrived.
            runner = web.ServerRunner(web.Server(target, auto_decompress=False), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return RunningUpstream(url=f"http://127.0.0.1:{port}", port=port, runner=runner)

    yield start
    for r in reversed(runners):
        await r.cleanup()


@pytest.fixture
async def recording_upstream(start_upstream: StartUpstream) -> RecordingUpstream:
    """An upstream that records every request and echoes it as JSON.

    ``?status=N`` answers with status N.
    """
    requests: list[RecordedRequest] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        raw_path = request.raw_path
        path, _, query = raw_path.partition("?")
        rec = RecordedRequest(
            method=request.method,
            path=path,
            query=query,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            body=body,
        )
        requests.append(rec)
        status = int(request.query.get("status", "200"))
        payload = {
            "method": rec.method,
            "path": rec.path,
            "query": rec.query,
            "headers": dict(rec.headers),
            "body_len": len(body),
        }
        return web.Response(
            status=status, body=orjson.dumps(payload), content_type="application/json"
        )

    running = await start_upstream(handler)
    return RecordingUpstream(
        url=running.url, port=running.port, runner=running.runner, requests=requests
    )
