"""Real gateways for tests: in-process (same event loop) or as a subprocess.

``start_gateway(text)`` runs ``aiogateway.server.Gateway`` in the test's loop
on 127.0.0.1 and a free port, state under the test's tmp dir.
``gateway_process(text, workers=N)`` runs ``python -m aiogateway serve`` for
tests of signals, workers and crash recovery.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from aiogateway.server import Gateway

__all__ = ["GatewayProcess", "RunningGateway", "free_port"]

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    port: int
    config_path: Path

    async def reload(self, text: str | None = None) -> bool:
        """Rewrite config.toml (when text is given) and reload it like SIGHUP does."""
        if text is not None:
            self.config_path.write_text(text)
        return await self.gateway.reload()


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    running: list[Gateway] = []

    async def start(
        config_text: str, env: Mapping[str, str] | None = None, name: str = "config.toml"
    ) -> RunningGateway:
        path = tmp_path / name
        path.write_text(config_text)
        gw = Gateway(
            path,
            env={**os.environ, **(env or {})},
            host="127.0.0.1",
            port=0,
            state_dir=tmp_path / "state",
        )
        await gw.start()
        running.append(gw)
        return RunningGateway(gw, f"http://127.0.0.1:{gw.port}", gw.port, path)

    yield start
    for gw in reversed(running):
        await gw.stop()


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    url: str
    port: int
    config_path: Path
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log}")
                try:
                    async with session.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"gateway not up after {timeout}s:\n{self.log}")
                await asyncio.sleep(0.1)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout)


StartGatewayProcess = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[StartGatewayProcess]:
    procs: list[GatewayProcess] = []

    async def start(
        config_text: str,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        name: str = "config.toml",
        wait: bool = True,
    ) -> GatewayProcess:
        path = tmp_path / name
        path.write_text(config_text)
        port = port or free_port()
        log_path = tmp_path / f"gateway-{len(procs)}.log"
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p
        )
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aiogateway",
                "serve",
                "--config",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                env=full_env,
                cwd=tmp_path,
                stdout=log,
                stderr=log,
            )
        gp = GatewayProcess(proc, f"http://127.0.0.1:{port}", port, path, log_path)
        procs.append(gp)
        if wait:
            await gp.wait_ready()
        return gp

    yield start
    for gp in procs:
        if gp.proc.returncode is None:
            gp.proc.kill()
            await gp.proc.wait()
