"""Streaming throughput and memory: 1 GiB up and 1 GiB down, through a gateway
subprocess vs straight to the upstream.

    python bench/bench_streaming.py [--size-mib 1024] [--chunk-kib 256] [--tree DIR]

Three processes: the upstream (this script with ``--upstream``: POST /upload
counts the body, GET /download?size=N streams N bytes), ``python -m aiogateway
serve`` (workers = 1) and the client (this process). Bytes are generated on the
fly and only counted. The gateway's RSS is sampled every 50 ms from a thread;
growth = peak - RSS just before the transfer (after a 64 MiB warm-up each way).
The gateway's CPU time (user + system) per transfer is reported too, as CPU
seconds per GiB. ``--tree DIR`` runs the gateway from another tree holding
``aiogateway/`` (e.g. ``git archive HEAD aiogateway plugins | tar -x -C DIR``)
to compare before/after on the same machine.
uvloop is used by all three when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def use_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# The upstream process -------------------------------------------------------------


def serve_upstream(port: int, chunk: int) -> None:
    block = os.urandom(chunk)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/upload":
            size = 0
            async for data in request.content.iter_any():
                size += len(data)
            return web.json_response({"size": size})
        if request.path == "/download":
            size = int(request.query["size"])
            response = web.StreamResponse()
            response.content_length = size
            await response.prepare(request)
            sent = 0
            while sent < size:
                n = min(chunk, size - sent)
                await response.write(block if n == chunk else block[:n])
                sent += n
            await response.write_eof()
            return response
        return web.Response(text="ok")

    use_uvloop()

    async def run() -> None:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


# The client ----------------------------------------------------------------------


class RssSampler:
    def __init__(self, pid: int | None) -> None:
        self.process = psutil.Process(pid) if pid else None
        self.baseline = self.peak = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        assert self.process is not None
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.05)

    def _cpu_seconds(self) -> float:
        assert self.process is not None
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def __enter__(self) -> RssSampler:
        if self.process is not None:
            self.baseline = self.peak = self.process.memory_info().rss
            self.cpu = -self._cpu_seconds()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.cpu += self._cpu_seconds()
            self._stop.set()
            self._thread.join()

    @property
    def growth_mib(self) -> float | None:
        return (self.peak - self.baseline) / MiB if self.process is not None else None


def chunks(total: int, block: bytes) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(len(block), total - sent)
        yield block if n == len(block) else block[:n]
        sent += n


async def body(total: int, block: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks(total, block):
        yield chunk


async def upload(session: aiohttp.ClientSession, base: str, size: int, block: bytes) -> None:
    headers = {"Content-Length": str(size)}
    async with session.post(f"{base}/upload", data=body(size, block), headers=headers) as resp:
        got = (await resp.json())["size"]
    if got != size:
        raise RuntimeError(f"upstream received {got} bytes of {size}")


async def download(session: aiohttp.ClientSession, base: str, size: int) -> None:
    got = 0
    async with session.get(f"{base}/download?size={size}") as resp:
        async for data in resp.content.iter_any():
            got += len(data)
    if got != size:
        raise RuntimeError(f"received {got} bytes of {size}")


async def wait_up(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not up")
            await asyncio.sleep(0.1)


async def measure(
    base: str, pid: int | None, size: int, block: bytes
) -> list[tuple[str, float, float | None, float | None]]:
    rows = []
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        await upload(session, base, 64 * MiB, block)  # warm-up
        await download(session, base, 64 * MiB)
        for name in ("upload", "download"):
            with RssSampler(pid) as rss:
                started = time.perf_counter()
                if name == "upload":
                    await upload(session, base, size, block)
                else:
                    await download(session, base, size)
                elapsed = time.perf_counter() - started
            cpu = rss.cpu / (size / 2**30) if pid else None
            rows.append((name, size / 1e6 / elapsed, rss.growth_mib, cpu))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--chunk-kib", type=int, default=256)
    parser.add_argument("--tree", type=Path, default=REPO, help="run the gateway from here")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    chunk = args.chunk_kib * 1024
    if args.upstream:
        serve_upstream(args.upstream, chunk)
        return

    loop_name = use_uvloop()
    size = args.size_mib * MiB
    up_port, gw_port = free_port(), free_port()
    pythonpath = filter(None, (str(args.tree.resolve()), os.environ.get("PYTHONPATH")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[server]\naccess_log = false\n[upstreams.svc]\nurl = "http://127.0.0.1:{up_port}"\n'
            '[[routes]]\nprefix = "/"\nupstream = "svc"\n'
        )
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--upstream",
                    str(up_port),
                    "--chunk-kib",
                    str(args.chunk_kib),
                ],
                env=env,
            ),
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aiogateway",
                    "serve",
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(gw_port),
                ],
                env=env,
                cwd=tmp,
                stderr=subprocess.DEVNULL,
            ),
        ]
        try:
            block = os.urandom(chunk)

            async def run() -> list[tuple[str, str, float, float | None, float | None]]:
                await wait_up(f"http://127.0.0.1:{up_port}/")
                await wait_up(f"http://127.0.0.1:{gw_port}/healthz")
                rows: list[tuple[str, str, float, float | None, float | None]] = []
                for path, base, pid in (
                    ("direct", f"http://127.0.0.1:{up_port}", None),
                    ("gateway", f"http://127.0.0.1:{gw_port}", procs[1].pid),
                ):
                    for name, mbs, growth, cpu in await measure(base, pid, size, block):
                        rows.append((path, name, mbs, growth, cpu))
                return rows

            rows = asyncio.run(run())
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)

    print(
        f"{args.size_mib} MiB per transfer, {args.chunk_kib} KiB chunks, {loop_name}, "
        f"{os.cpu_count()} CPUs (load avg {os.getloadavg()[0]:.1f})"
    )
    print(f"gateway from {args.tree.resolve()}")
    print(f"{'path':<8} {'direction':<9} {'MB/s':>8} {'gw RSS growth':>14} {'gw CPU s/GiB':>13}")
    for path, name, mbs, growth, cpu in rows:
        g = "-" if growth is None else f"{growth:.1f} MiB"
        c = "-" if cpu is None else f"{cpu:.2f}"
        print(f"{path:<8} {name:<9} {mbs:>8.0f} {g:>14} {c:>13}")


if __name__ == "__main__":
    main()
