"""Load generation: wrk when installed, else a built-in keep-alive client.

``run_load()`` runs one fixed-concurrency load against a URL in its own
process (wrk, or this module as a script) and returns a :class:`LoadResult`.
The built-in client is a raw asyncio protocol per connection with httptools'
response parser (uvloop when available): closed loop, keep-alive, exact
latency percentiles. It is slower than wrk: figures it produces are marked.

    python bench/loadgen.py URL [-c 64] [-d 5] [-H 'Name: value' ...]
    python bench/loadgen.py URL -n 2000 [-c 16]   # exactly 2000 requests, all answered

With ``-n`` (:func:`run_count`) no request is left in flight: every connection
waits for its last response before closing, so the server saw exactly
``requests`` requests (when ``errors`` is 0) -- what delivery checks compare to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import cast
from urllib.parse import urlsplit

__all__ = ["LoadResult", "have_wrk", "run_count", "run_load"]


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_us: float
    p99_us: float
    non_2xx: int
    errors: int
    tool: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run_load(
    url: str,
    connections: int,
    seconds: float,
    headers: Sequence[str] = (),
    cpus: set[int] | None = None,
    use_wrk: bool = True,
) -> LoadResult:
    """One load run in a separate process pinned to ``cpus``."""
    preexec: Callable[[], None] | None = None
    if cpus:
        pinned = set(cpus)

        def preexec() -> None:
            os.sched_setaffinity(0, pinned)

    if use_wrk and have_wrk():
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
        for h in headers:
            cmd += ["-H", h]
        cmd.append(url)
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, preexec_fn=preexec, timeout=300
        )
        return parse_wrk(out.stdout)
    cmd = [sys.executable, __file__, url, "-c", str(connections), "-d", str(seconds)]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, preexec_fn=preexec, timeout=300
    )
    return LoadResult(**json.loads(out.stdout))


def run_count(
    url: str,
    requests: int,
    connections: int = 16,
    headers: Sequence[str] = (),
    cpus: set[int] | None = None,
) -> LoadResult:
    """Exactly ``requests`` requests with the built-in client, none left in flight."""
    preexec: Callable[[], None] | None = None
    if cpus:
        pinned = set(cpus)

        def preexec() -> None:
            os.sched_setaffinity(0, pinned)

    cmd = [sys.executable, __file__, url, "-c", str(connections), "-n", str(requests)]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, preexec_fn=preexec, timeout=300
    )
    return LoadResult(**json.loads(out.stdout))


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _duration_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> LoadResult:
    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+(\S+)", text, re.M)
        return _duration_us(m.group(1)) if m else float("nan")

    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"cannot parse wrk output:\n{text}")
    requests = int(m.group(1))
    seconds = _duration_us(m.group(2) + m.group(3)) / 1e6
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = sum(int(x) for x in sock.groups()) if sock else 0
    return LoadResult(
        requests=requests,
        seconds=seconds,
        p50_us=pct("50"),
        p99_us=pct("99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        errors=errors,
        tool="wrk",
    )


# -- the built-in client ------------------------------------------------------


class _Conn(asyncio.Protocol):
    def __init__(self, request: bytes, stats: _Stats) -> None:
        import httptools

        self.request = request
        self.stats = stats
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sent_at = 0.0
        self.done = False  # closed by us, nothing in flight
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        stats = self.stats
        if time.perf_counter() >= stats.stop_at or stats.budget == 0:
            self.done = True
            self.transport.close()
            return
        if stats.budget is not None:
            stats.budget -= 1
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:
            self.stats.errors += 1
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        now = time.perf_counter()
        stats = self.stats
        if now <= stats.stop_at:
            stats.latencies.append(now - self.sent_at)
            if not 200 <= self.parser.get_status_code() < 400:
                stats.non_2xx += 1
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done and time.perf_counter() < self.stats.stop_at:
            self.stats.errors += 1
        if not self.closed.done():
            self.closed.set_result(None)


class _Stats:
    def __init__(self, stop_at: float, budget: int | None = None) -> None:
        self.stop_at = stop_at
        self.budget = budget  # requests left to send (count mode), else None
        self.latencies: list[float] = []
        self.non_2xx = 0
        self.errors = 0


async def _client(
    url: str, connections: int, seconds: float, headers: list[str], count: int | None = None
) -> LoadResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}", *headers]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    stats = _Stats(started + seconds if count is None else float("inf"), count)
    conns = []
    for _ in range(connections):
        _, proto = await loop.create_connection(lambda: _Conn(request, stats), host, port)
        conns.append(proto)
    await asyncio.gather(*(c.closed for c in conns))
    elapsed = min(time.perf_counter(), stats.stop_at) - started
    lat = sorted(stats.latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p))] * 1e6 if lat else float("nan")

    return LoadResult(len(lat), elapsed, pct(0.50), pct(0.99), stats.non_2xx, stats.errors, "py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("-c", "--connections", type=int, default=64)
    parser.add_argument("-d", "--seconds", type=float, default=5.0)
    parser.add_argument("-H", "--header", action="append", default=[])
    parser.add_argument("-n", "--requests", type=int, default=None, help="exactly N, not -d")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(
        _client(args.url, args.connections, args.seconds, args.header, args.requests)
    )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
