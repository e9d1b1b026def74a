"""Client-side cost of one upstream request: UpstreamPool vs aiohttp ClientSession.

The upstream is a minimal raw asyncio server answering every request with a
100-byte body, in a separate process, so this process's CPU time is the
client's alone. Prints CPU µs per request and requests/s, sequential and with
32 concurrent requests.

    .venv/bin/python bench/bench_upstream.py [--seconds 2] [--no-uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

__all__ = ["main"]

BODY = b"x" * 100
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: 100\r\nServer: bench\r\n\r\n" + BODY
)


class _Upstream(asyncio.Protocol):
    """Answers each request head (GET, no body) with RESPONSE, keep-alive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop: no isinstance

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = buf.count(b"\r\n\r\n")
        if n:
            buf = buf[buf.rfind(b"\r\n\r\n") + 4 :]
            assert self.transport is not None
            self.transport.write(RESPONSE * n)
        self.buf = buf


class _Floor(asyncio.Protocol):
    waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.waiter is not None:
            self.waiter.set_result(None)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent exits


async def _run(
    one: Callable[[], Awaitable[None]], concurrency: int, seconds: float
) -> tuple[float, float]:
    """Return (CPU µs per request, requests/s)."""
    for _ in range(100):  # warm up: connections (all of them), caches
        await asyncio.gather(*(one() for _ in range(concurrency)))
    count = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await one()
            count += 1

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu / count * 1e6, count / wall


async def _bench(port: int, seconds: float) -> list[tuple[str, int, float, float]]:
    import aiohttp

    from aiogateway.settings import UpstreamSettings
    from aiogateway.upstream import UpstreamPool

    url = f"http://127.0.0.1:{port}"
    results = []
    # Floor: a bare Protocol, one fixed write, a future resolved by the first
    # read; no parsing, no pool. What the event loop and kernel cost alone.
    loop = asyncio.get_running_loop()
    transport, floor = await loop.create_connection(_Floor, "127.0.0.1", port)

    async def bare() -> None:
        floor.waiter = loop.create_future()
        transport.write(b"GET /item?id=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        await floor.waiter

    cpu, rps = await _run(bare, 1, seconds)
    results.append(("bare Protocol (floor)", 1, cpu, rps))
    transport.close()
    headers = [(b"User-Agent", b"bench"), (b"Accept", b"*/*"), (b"X-Request-ID", b"abc123")]
    for concurrency in (1, 32):
        pool = UpstreamPool("bench", UpstreamSettings(url=url, pool_size=64))

        async def via_pool(pool: UpstreamPool = pool) -> None:
            resp = await pool.request("GET", b"/item?id=1", headers, None, None)
            while await resp.read():
                pass
            resp.release()

        cpu, rps = await _run(via_pool, concurrency, seconds)
        results.append(("UpstreamPool", concurrency, cpu, rps))
        await pool.close()

        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            hdrs = {k.decode(): v.decode() for k, v in headers}

            async def via_aiohttp(
                session: aiohttp.ClientSession = session, h: dict[str, str] = hdrs
            ) -> None:
                async with session.get(url + "/item?id=1", headers=h) as r:
                    await r.read()

            cpu, rps = await _run(via_aiohttp, concurrency, seconds)
            results.append(("aiohttp ClientSession", concurrency, cpu, rps))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_uvloop = not args.no_uvloop
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            use_uvloop = False
    run = uvloop.run if use_uvloop else asyncio.run
    if args.serve:
        run(_serve())
        return
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--serve"] + (["--no-uvloop"] if not use_uvloop else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert upstream.stdout is not None
        port = int(upstream.stdout.readline())
        results = run(_bench(port, args.seconds))
    finally:
        assert upstream.stdin is not None
        upstream.stdin.close()
        upstream.wait(5)
    loop_name = "uvloop" if use_uvloop else "asyncio"
    print(f"client cost per GET of a 100-byte body ({loop_name}, {args.seconds:g}s each)")
    print(f"{'client':<24}{'concurrency':>12}{'CPU µs/req':>12}{'req/s':>10}")
    for name, conc, cpu, rps in results:
        print(f"{name:<24}{conc:>12}{cpu:>12.1f}{rps:>10.0f}")


if __name__ == "__main__":
    main()
