"""Client-side cost of large upstream response bodies: UpstreamPool alone.

    python bench/bench_upstream_body.py [--size 65536] [--concurrency 16] [--seconds 3]
                                        [--tree DIR]

The upstream is a raw uvloop protocol in a separate process answering every
request with a ``--size`` body (Content-Length); this process only runs the
pool (request, read the body to the end, release), so its CPU time
(``time.process_time``) and minor page faults per request are the client's
alone, far steadier on a shared machine than a whole-gateway run. ``--tree``
imports ``aiogateway`` from another tree (e.g. ``git archive HEAD aiogateway |
tar -x -C DIR``) for a before/after comparison. Pin it (``taskset -c 0``) for
steadier figures. Minor faults per request show glibc's heap-top churn (a
64 KiB buffer freed, the top trimmed with brk, faulted in again): compare with
``GLIBC_TUNABLES=glibc.malloc.trim_threshold=67108864:glibc.malloc.mmap_threshold=4194304``.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]


class _Upstream(asyncio.Protocol):
    """One fixed response per request head (GET, no body), keep-alive."""

    response = b""

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
            for _ in range(n):
                self.transport.write(self.response)
        self.buf = buf


async def _serve(size: int) -> None:
    _Upstream.response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent exits


async def _bench(
    port: int, size: int, concurrency: int, seconds: float
) -> tuple[float, float, float]:
    """(CPU µs per request, minor faults per request, requests/s)."""
    from aiogateway.settings import UpstreamSettings
    from aiogateway.upstream import UpstreamPool

    pool = UpstreamPool("bench", UpstreamSettings(url=f"http://127.0.0.1:{port}", pool_size=64))
    headers = [(b"Accept", b"*/*")]

    async def one() -> None:
        resp = await pool.request("GET", b"/body", headers, None, None)
        got = 0
        while chunk := await resp.read():
            got += len(chunk)
        resp.release()
        if got != size:
            raise RuntimeError(f"got {got} of {size} bytes")

    for _ in range(50):  # warm up: connections, caches, the heap
        await asyncio.gather(*(one() for _ in range(concurrency)))
    count = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await one()
            count += 1

    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    await pool.close()
    return cpu / count * 1e6, faults / count, count / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=65536, help="response body bytes")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tree", type=Path, default=REPO, help="import aiogateway from here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    if args.serve:
        uvloop.run(_serve(args.size))
        return
    sys.path.insert(0, str(args.tree.resolve()))
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--size", str(args.size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert upstream.stdout is not None
        port = int(upstream.stdout.readline())
        cpu, faults, rps = uvloop.run(_bench(port, args.size, args.concurrency, args.seconds))
    finally:
        assert upstream.stdin is not None
        upstream.stdin.close()
        upstream.wait(5)
    print(
        f"{args.tree.resolve()}: {args.size} B bodies, c{args.concurrency}: "
        f"{cpu:.1f} µs CPU/req, {faults:.1f} minor faults/req, {rps:,.0f} req/s"
    )


if __name__ == "__main__":
    main()
