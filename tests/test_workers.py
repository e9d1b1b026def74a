"""``workers = 2``: a supervisor and two worker processes sharing the port.

Each worker answers /readyz with its pid and route count, so fresh connections
tell which process served them (SO_REUSEPORT spreads connections over workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import aiohttp
import psutil
import pytest
from aiohttp import web

from tests.support.gateway import GatewayProcess, StartGatewayProcess
from tests.support.upstreams import RunningUpstream, StartUpstream


def config(upstream: str, routes: tuple[str, ...] = ("/a",)) -> str:
    text = f"""
[server]
shutdown_timeout = 5
access_log = false

[upstreams.svc]
url = "{upstream}"
"""
    for path in routes:
        text += f'\n[[routes]]\npath = "{path}"\nupstream = "svc"\n'
    return text


@pytest.fixture
async def upstream(start_upstream: StartUpstream) -> RunningUpstream:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text=f"ok {request.path}")

    return await start_upstream(handler)


async def readyz(url: str) -> dict[str, int]:
    """/readyz on a fresh connection (so the kernel picks a worker for it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
        return {"pid": body["pid"], "routes": body["routes"]}


async def serving_pids(gp: GatewayProcess, want: int, timeout: float = 20.0) -> set[int]:
    """Pids seen answering on fresh connections, until ``want`` distinct ones."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        for _ in range(10):
            with contextlib.suppress(aiohttp.ClientError):  # a worker still starting
                seen.add((await readyz(gp.url))["pid"])
        if time.monotonic() > deadline:
            raise AssertionError(f"only pids {seen} answered within {timeout}s:\n{gp.log}")
        await asyncio.sleep(0.05)
    return seen


def worker_pids(gp: GatewayProcess) -> set[int]:
    children = psutil.Process(gp.proc.pid).children()
    return {c.pid for c in children if c.status() != psutil.STATUS_ZOMBIE}


async def wait_workers(gp: GatewayProcess, n: int = 2) -> set[int]:
    """Both workers started and serving; returns their pids."""
    pids = await serving_pids(gp, n)
    assert pids == worker_pids(gp)
    assert gp.proc.pid not in pids  # the supervisor itself does not serve
    return pids


async def test_killed_worker_is_restarted_while_others_serve(
    gateway_process: StartGatewayProcess, upstream: RunningUpstream
) -> None:
    gp = await gateway_process(config(upstream.url), workers=2)
    pids = await wait_workers(gp)
    victim, survivor = sorted(pids)
    os.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(psutil.Process(victim).wait, 5)  # reaped by the supervisor
    # The survivor answers every fresh connection meanwhile.
    answered = {(await readyz(gp.url))["pid"] for _ in range(20)}
    assert answered <= {survivor} | (worker_pids(gp) - pids)
    # The supervisor starts a replacement that serves too.
    new = await serving_pids(gp, 2)
    assert survivor in new
    assert victim not in new
    assert len(worker_pids(gp)) == 2
    assert "worker exited" in gp.log
    assert await gp.stop() == 0


async def test_sigterm_to_supervisor_stops_all_workers(
    gateway_process: StartGatewayProcess, upstream: RunningUpstream
) -> None:
    gp = await gateway_process(config(upstream.url), workers=2)
    pids = await wait_workers(gp)
    started = time.monotonic()
    assert await gp.stop(signal.SIGTERM, timeout=20) == 0
    assert time.monotonic() - started < 10
    for pid in pids:
        assert not psutil.pid_exists(pid), f"worker {pid} outlived the supervisor"
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.get(f"{gp.url}/healthz")


async def test_both_workers_serve_and_sighup_reloads_each(
    gateway_process: StartGatewayProcess, upstream: RunningUpstream
) -> None:
    # Worker processes start slowly on a busy machine: one gateway for both checks.
    gp = await gateway_process(config(upstream.url), workers=2)
    pids = await wait_workers(gp)
    assert len(pids) == 2
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        for _ in range(20):  # they proxy, not only answer /readyz
            async with s.get(f"{gp.url}/a") as resp:
                assert resp.status == 200
                assert await resp.text() == "ok /a"
            async with s.get(f"{gp.url}/c") as resp:
                assert resp.status == 404

    gp.config_path.write_text(config(upstream.url, routes=("/a", "/b", "/c")))
    gp.send_signal(signal.SIGHUP)
    routes: dict[int, int] = {}
    deadline = time.monotonic() + 20
    while not (routes.keys() == pids and set(routes.values()) == {3}):
        seen = await readyz(gp.url)
        routes[seen["pid"]] = seen["routes"]
        assert time.monotonic() < deadline, f"route counts per worker: {routes}\n{gp.log}"
    assert worker_pids(gp) == pids  # reloaded in place, not restarted
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:
        for _ in range(10):
            async with s.get(f"{gp.url}/c") as resp:
                assert resp.status == 200
    assert await gp.stop() == 0


async def test_workers_stop_when_the_supervisor_is_killed(
    gateway_process: StartGatewayProcess, upstream: RunningUpstream
) -> None:
    # SIGKILL/OOM gives the supervisor no chance to stop its workers: they must
    # notice and stop themselves, not keep serving and hold the port.
    gp = await gateway_process(config(upstream.url), workers=2)
    pids = await wait_workers(gp)
    gp.proc.kill()
    await gp.proc.wait()
    workers = [psutil.Process(pid) for pid in pids]
    _, alive = await asyncio.to_thread(psutil.wait_procs, workers, 10)
    assert not alive, f"workers {[p.pid for p in alive]} outlived their supervisor"
    assert "supervisor (pid" in gp.log
    assert await refuses(gp.port)


async def refuses(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False
