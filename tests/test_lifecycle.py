"""The gateway's life: SIGHUP reload, SIGTERM drain, /healthz and /readyz,
plugin hooks that fail. Signals go to a real ``python -m aiogateway`` process;
what needs the gateway's internals runs in-process."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from aiogateway.exchange import Exchange
from aiogateway.plugin import GatewayApp, Plugin, PluginConfig
from tests.support.gateway import StartGateway, StartGatewayProcess
from tests.support.upstreams import RunningUpstream, StartUpstream

# Test plugins, loaded by config.toml as "tests.test_lifecycle:<Class>" -------


class NotReady(Plugin[PluginConfig]):
    """Reports a dependency that is down."""

    type_name = "not-ready"

    async def startup(self, app: GatewayApp) -> None:
        app.set_ready("dep", False, "down")


class Degraded(Plugin[PluginConfig]):
    """Reports a dependency whose absence only degrades the gateway (work spools)."""

    type_name = "degraded"

    async def startup(self, app: GatewayApp) -> None:
        app.set_ready("spool", False, "spooling", critical=False)


class ReadyDep(Plugin[PluginConfig]):
    """Reports the same dependency as NotReady, as up."""

    type_name = "ready-dep"

    async def startup(self, app: GatewayApp) -> None:
        app.set_ready("dep", True, "up")


class FailingStart(Plugin[PluginConfig]):
    """Cannot start (its database is unreachable, say)."""

    type_name = "failing-start"

    async def startup(self, app: GatewayApp) -> None:
        raise ConnectionRefusedError("dependency unreachable")


class FailureSink:
    """A telemetry sink that records plugin failures (and ignores the rest)."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, str]] = []

    def upstream_error(self, upstream: str, kind: str) -> None:
        pass

    def plugin_rejection(self, plugin: str, route: str, status: int) -> None:
        pass

    def plugin_failure(self, plugin: str, hook: str) -> None:
        self.failures.append((plugin, hook))

    def event_outcome(self, topic: str, outcome: str, count: int) -> None:
        pass

    def audit_outcome(self, outcome: str, count: int) -> None:
        pass

    def queue_depth(self, queue: str, depth: int) -> None:
        pass


class ExplodingComplete(Plugin[PluginConfig]):
    """on_complete always raises; startup registers a sink to observe the count."""

    type_name = "exploding-complete"

    def __init__(self, name: str, config: PluginConfig) -> None:
        super().__init__(name, config)
        self.sink = FailureSink()
        self.completed = 0

    async def startup(self, app: GatewayApp) -> None:
        app.telemetry.add_sink(self.sink)

    async def shutdown(self, app: GatewayApp) -> None:
        app.telemetry.remove_sink(self.sink)

    async def on_complete(self, exchange: Exchange) -> None:
        self.completed += 1
        raise RuntimeError(f"boom on {exchange.request_id}")


class MarkerConfig(PluginConfig):
    file: str


class Marker(Plugin[MarkerConfig]):
    """Appends 'startup'/'shutdown' lines to a file: shows which hooks ran in a process."""

    type_name = "marker"
    Config = MarkerConfig

    def _mark(self, what: str) -> None:
        with open(self.config.file, "a") as f:
            f.write(f"{what} {os.getpid()}\n")

    async def startup(self, app: GatewayApp) -> None:
        self._mark("startup")

    async def shutdown(self, app: GatewayApp) -> None:
        self._mark("shutdown")


# Helpers ----------------------------------------------------------------------


def make_config(
    upstream: str,
    *,
    routes: tuple[str, ...] = ("/a",),
    shutdown_timeout: float = 10,
    read_timeout: float = 30,
    extra: str = "",
    chain: str = "[]",
) -> str:
    text = f"""
[server]
shutdown_timeout = {shutdown_timeout}
access_log = false

[upstreams.svc]
url = "{upstream}"
read_timeout = {read_timeout}
{extra}
"""
    for path in ("/slow", *routes):
        text += f"""
[[routes]]
path = "{path}"
upstream = "svc"
chain = {chain}
"""
    return text


class SlowUpstream:
    """GET /slow answers after ``delay`` seconds (``?hold=1``: only when released)."""

    def __init__(self, delay: float = 1.5) -> None:
        self.delay = delay
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.count = 0

    async def handler(self, request: web.BaseRequest) -> web.StreamResponse:
        self.count += 1
        if request.path == "/slow":
            self.started.set()
            if request.query.get("hold"):
                # Bounded so the upstream's own shutdown never waits long.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), 15)
            else:
                await asyncio.sleep(self.delay)
            return web.Response(text="slow done")
        return web.Response(text=f"ok {request.path}")


@pytest.fixture
async def slow_upstream(
    start_upstream: StartUpstream,
) -> AsyncIterator[tuple[SlowUpstream, RunningUpstream]]:
    slow = SlowUpstream()
    running = await start_upstream(slow.handler)
    yield slow, running
    slow.release.set()


async def get_status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return True  # it was in the backlog of a listener closing just then
    writer.close()
    return False


def log_entries(text: str) -> list[dict[str, object]]:
    entries = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(orjson.JSONDecodeError):
                entries.append(orjson.loads(line))
    return entries


# SIGHUP -------------------------------------------------------------------------


async def test_sighup_adds_a_route(
    gateway_process: StartGatewayProcess,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
    tmp_path: Path,
) -> None:
    marks = tmp_path / "marks"
    marker = f'\n[plugins.mark]\ntype = "tests.test_lifecycle:Marker"\nfile = "{marks}"\n'
    _, up = slow_upstream
    gp = await gateway_process(make_config(up.url, extra=marker, chain='["mark"]'))
    async with aiohttp.ClientSession() as s:
        assert await get_status(s, f"{gp.url}/a") == 200
        assert await get_status(s, f"{gp.url}/b") == 404

        gp.config_path.write_text(
            make_config(up.url, routes=("/a", "/b"), extra=marker, chain='["mark"]')
        )
        gp.send_signal(signal.SIGHUP)

        async def b_served() -> bool:
            return await get_status(s, f"{gp.url}/b") == 200

        await wait_for(b_served, what="/b after SIGHUP")
        assert await get_status(s, f"{gp.url}/a") == 200
    # The old table's plugin instance was shut down after the swap, the new one started.
    await wait_for(lambda: marks.read_text().count("shutdown") == 1, what="old plugin shutdown")
    assert marks.read_text().count("startup") == 2
    assert await gp.stop() == 0
    # (Info lines are buffered for up to 100 ms; stopping flushes them.)
    assert any(e.get("msg") == "config reloaded" for e in log_entries(gp.log))
    lines = marks.read_text().splitlines()
    assert [line.split()[0] for line in lines].count("shutdown") == 2
    assert {line.split()[1] for line in lines} == {str(gp.proc.pid)}


async def test_sighup_with_broken_config_keeps_old_table(
    gateway_process: StartGatewayProcess,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
) -> None:
    _, up = slow_upstream
    gp = await gateway_process(make_config(up.url))
    broken = make_config(up.url, routes=("/a", "/b")).replace(
        "read_timeout = 30", "read_timeout = 30\nreed_timeout = 5"
    )
    gp.config_path.write_text(broken)
    gp.send_signal(signal.SIGHUP)

    def rejected() -> list[dict[str, object]]:
        return [e for e in log_entries(gp.log) if e.get("level") == "error"]

    await wait_for(rejected, what="an error logged for the broken reload")
    message = str(rejected()[0]["msg"])
    assert "reload rejected" in message
    assert str(gp.config_path) in message
    assert "upstreams.svc.reed_timeout" in message
    async with aiohttp.ClientSession() as s:
        assert await get_status(s, f"{gp.url}/a") == 200
        assert await get_status(s, f"{gp.url}/b") == 404  # the new table never went live
    assert gp.proc.returncode is None
    assert await gp.stop() == 0


async def test_no_request_fails_during_reloads_under_load(
    gateway_process: StartGatewayProcess,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
) -> None:
    slow, up = slow_upstream
    gp = await gateway_process(make_config(up.url))
    # Alternate two configs: the route table changes every time, and the
    # upstream's settings too, so each reload also retires the old pool.
    configs = [
        make_config(up.url, routes=("/a", "/b"), read_timeout=20),
        make_config(up.url, routes=("/a", "/c"), read_timeout=30),
    ]
    minimum, concurrency, reloads = 400, 16, 10
    statuses: list[int] = []
    errors: list[BaseException] = []
    done = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        # Keep the load on until every reload was sent and enough requests went through.
        while not done.is_set() or len(statuses) + len(errors) < minimum:
            try:
                statuses.append(await get_status(session, f"{gp.url}/a"))
            except aiohttp.ClientError as exc:
                errors.append(exc)

    async def reloader() -> None:
        for i in range(reloads):
            await asyncio.sleep(0.1)
            gp.config_path.write_text(configs[i % 2])
            gp.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.2)
        done.set()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(reloader(), *(client(session) for _ in range(concurrency)))
    assert errors == []
    assert len(statuses) >= minimum
    assert set(statuses) == {200}
    assert slow.count == len(statuses)
    assert await gp.stop() == 0
    entries = log_entries(gp.log)
    assert sum(e.get("msg") == "config reloaded" for e in entries) >= 3
    assert not [e for e in entries if e.get("level") == "error"]


# SIGTERM ----------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_drains_in_flight_request(
    gateway_process: StartGatewayProcess,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    marks = tmp_path / "marks"
    marker = f'\n[plugins.mark]\ntype = "tests.test_lifecycle:Marker"\nfile = "{marks}"\n'
    slow, up = slow_upstream
    gp = await gateway_process(
        make_config(up.url, shutdown_timeout=10, extra=marker, chain='["mark"]')
    )
    async with aiohttp.ClientSession() as s:

        async def slow_request() -> tuple[int, str]:
            async with s.get(f"{gp.url}/a") as warm:  # keep-alive conn exists before SIGTERM
                await warm.read()
            async with s.get(f"{gp.url}/slow") as resp:
                return resp.status, await resp.text()

        request = asyncio.create_task(slow_request())
        await asyncio.wait_for(slow.started.wait(), 10)
        sent = time.monotonic()
        gp.send_signal(sig)
        # The listener closes promptly, while the slow request is still running.
        await wait_for(lambda: refuses_connections(gp.port), timeout=1.0, what="listener closed")
        assert not request.done()
        assert await asyncio.wait_for(request, 10) == (200, "slow done")
        code = await gp.stop(timeout=15)
        elapsed = time.monotonic() - sent
    assert code == 0
    assert elapsed < 10, f"exit took {elapsed:.1f}s"
    # The upstream answers after 1.5 s: the drain waited for it, not much longer.
    assert 1.0 < elapsed < 5.0
    assert "shutdown" in marks.read_text()  # plugins were shut down (flush point)


async def test_sigterm_cuts_request_past_shutdown_timeout(
    gateway_process: StartGatewayProcess,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
) -> None:
    slow, up = slow_upstream
    gp = await gateway_process(make_config(up.url, shutdown_timeout=1))
    async with aiohttp.ClientSession() as s:

        async def held_request() -> int:
            async with s.get(f"{gp.url}/slow?hold=1") as resp:
                await resp.read()
                return resp.status

        request = asyncio.create_task(held_request())
        await asyncio.wait_for(slow.started.wait(), 10)
        sent = time.monotonic()
        gp.send_signal(signal.SIGTERM)
        code = await gp.stop(timeout=15)
        elapsed = time.monotonic() - sent
        outcome = await asyncio.gather(request, return_exceptions=True)
    assert code == 0
    # shutdown_timeout (1 s, aiohttp rounds it up) then the handler is cancelled.
    assert elapsed < 4.0, f"exit took {elapsed:.1f}s"
    result = outcome[0]
    # The client never gets the upstream's 200: its request is cut or answered with an error.
    assert isinstance(result, aiohttp.ClientError) or (isinstance(result, int) and result >= 500)


# /healthz and /readyz ---------------------------------------------------------


async def test_healthz_and_readyz(
    start_gateway: StartGateway, slow_upstream: tuple[SlowUpstream, RunningUpstream]
) -> None:
    _, up = slow_upstream
    gw = await start_gateway(make_config(up.url))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            assert await resp.json() == {"status": "ok"}
        async with s.get(f"{gw.url}/readyz") as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            body = await resp.json()
    assert body["status"] == "ready"
    assert body["pid"] == os.getpid()
    assert body["routes"] == 2
    assert body["components"]["config"]["ready"] is True
    assert body["components"]["config"]["detail"] == str(gw.config_path)


async def test_readyz_503_when_a_component_is_down(
    start_gateway: StartGateway, slow_upstream: tuple[SlowUpstream, RunningUpstream]
) -> None:
    _, up = slow_upstream
    extra = '\n[plugins.dep]\ntype = "tests.test_lifecycle:NotReady"\n'
    gw = await start_gateway(make_config(up.url, extra=extra, chain='["dep"]'))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/readyz") as resp:
            assert resp.status == 503
            assert resp.content_type == "application/json"
            body = await resp.json()
        # Alive all the same, and still proxying.
        assert await get_status(s, f"{gw.url}/healthz") == 200
        assert await get_status(s, f"{gw.url}/a") == 200
    assert body["status"] == "not_ready"
    assert body["components"]["dep"] == {"ready": False, "detail": "down", "critical": True}
    assert body["components"]["config"]["ready"] is True


async def test_readyz_degraded_but_200_when_a_non_critical_component_is_down(
    start_gateway: StartGateway, slow_upstream: tuple[SlowUpstream, RunningUpstream]
) -> None:
    _, up = slow_upstream
    extra = '\n[plugins.dep]\ntype = "tests.test_lifecycle:Degraded"\n'
    gw = await start_gateway(make_config(up.url, extra=extra, chain='["dep"]'))
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/readyz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "degraded"
    assert body["components"]["spool"] == {"ready": False, "detail": "spooling", "critical": False}


# Plugin failures ----------------------------------------------------------------


async def test_on_complete_failure_is_logged_and_counted_not_shown(
    start_gateway: StartGateway,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, up = slow_upstream
    extra = '\n[plugins.boom]\ntype = "tests.test_lifecycle:ExplodingComplete"\n'
    gw = await start_gateway(make_config(up.url, extra=extra, chain='["boom"]'))
    plugin = gw.gateway.table.plugins["boom"]
    assert isinstance(plugin, ExplodingComplete)
    caplog.set_level(logging.ERROR, logger="aiogateway")
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(f"{gw.url}/a") as resp:
                assert resp.status == 200
                assert await resp.text() == "ok /a"
                request_id = resp.headers["X-Request-ID"]
    await wait_for(lambda: plugin.completed == 3, what="on_complete calls")
    assert plugin.sink.failures == [("boom", "on_complete")] * 3
    failures = [r for r in caplog.records if "on_complete failed" in r.getMessage()]
    assert len(failures) == 3
    assert request_id in failures[-1].getMessage()
    assert failures[-1].exc_info is not None


async def test_readyz_forgets_components_of_plugins_removed_by_reload(
    start_gateway: StartGateway, slow_upstream: tuple[SlowUpstream, RunningUpstream]
) -> None:
    _, up = slow_upstream
    extra = '\n[plugins.dep]\ntype = "tests.test_lifecycle:NotReady"\n'
    gw = await start_gateway(make_config(up.url, extra=extra, chain='["dep"]'))
    async with aiohttp.ClientSession() as s:
        assert await get_status(s, f"{gw.url}/readyz") == 503
        assert await gw.reload(make_config(up.url))

        async def ready() -> bool:
            return await get_status(s, f"{gw.url}/readyz") == 200

        # The plugin that reported "dep" is gone with the old table: so is "dep".
        await wait_for(ready, timeout=5, what="/readyz 200 after the reload")


async def test_sigterm_right_after_sighup_still_shuts_down_the_old_plugins(
    gateway_process: StartGatewayProcess,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
    tmp_path: Path,
) -> None:
    # The old table's plugins are shut down once its requests finish; a
    # SIGTERM arriving meanwhile must not skip that (their queues need flushing).
    marks = tmp_path / "marks"
    marker = f'\n[plugins.mark]\ntype = "tests.test_lifecycle:Marker"\nfile = "{marks}"\n'
    slow, up = slow_upstream
    gp = await gateway_process(make_config(up.url, extra=marker, chain='["mark"]'))
    async with aiohttp.ClientSession() as s:
        request = asyncio.create_task(get_status(s, f"{gp.url}/slow"))
        await asyncio.wait_for(slow.started.wait(), 10)
        gp.config_path.write_text(
            make_config(up.url, routes=("/a", "/b"), extra=marker, chain='["mark"]')
        )
        gp.send_signal(signal.SIGHUP)
        await wait_for(lambda: marks.read_text().count("startup") == 2, what="reload")
        gp.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(request, 10) == 200
    assert await gp.stop() == 0
    assert marks.read_text().count("shutdown") == 2, marks.read_text()


async def test_port_in_use_exits_with_message_and_plugins_shut_down(
    gateway_process: StartGatewayProcess,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
    tmp_path: Path,
) -> None:
    marks = tmp_path / "marks"
    marker = f'\n[plugins.mark]\ntype = "tests.test_lifecycle:Marker"\nfile = "{marks}"\n'
    _, up = slow_upstream
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gp = await gateway_process(
            make_config(up.url, extra=marker, chain='["mark"]'), port=port, wait=False
        )
        code = await asyncio.wait_for(gp.proc.wait(), 30)
    assert code == 1
    assert f"cannot start: [Errno {errno.EADDRINUSE}]" in gp.log
    assert str(port) in gp.log
    assert "Traceback" not in gp.log
    # Plugins had started before the listen failed: they were shut down again.
    assert [line.split()[0] for line in marks.read_text().splitlines()] == [
        "startup",
        "shutdown",
    ]


async def test_repeated_sigterm_still_drains_and_exits_0(
    gateway_process: StartGatewayProcess,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
) -> None:
    # Process managers and impatient operators signal again; that must neither
    # cut the drain short nor kill the process while it exits.
    slow, up = slow_upstream
    gp = await gateway_process(make_config(up.url, shutdown_timeout=10))
    async with aiohttp.ClientSession() as s:
        request = asyncio.create_task(get_status(s, f"{gp.url}/slow"))
        await asyncio.wait_for(slow.started.wait(), 10)
        deadline = time.monotonic() + 15
        signals = itertools.cycle([signal.SIGTERM, signal.SIGINT])
        while gp.proc.returncode is None:  # every 5 ms until it is gone
            with contextlib.suppress(ProcessLookupError):
                gp.send_signal(next(signals))
            await asyncio.sleep(0.005)
            assert time.monotonic() < deadline, gp.log
        assert await request == 200
    assert gp.proc.returncode == 0, gp.log


async def test_reload_whose_plugin_fails_to_start_keeps_old_table_and_readiness(
    start_gateway: StartGateway,
    slow_upstream: tuple[SlowUpstream, RunningUpstream],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, up = slow_upstream
    extra = '\n[plugins.dep]\ntype = "tests.test_lifecycle:NotReady"\n'
    gw = await start_gateway(make_config(up.url, extra=extra, chain='["dep"]'))
    old_table = gw.gateway.table
    # The new table's first plugin reports "dep" up, then the second cannot start.
    broken = (
        '\n[plugins.up]\ntype = "tests.test_lifecycle:ReadyDep"\n'
        '\n[plugins.bad]\ntype = "tests.test_lifecycle:FailingStart"\n'
    )
    assert not await gw.reload(
        make_config(up.url, routes=("/a", "/b"), extra=broken, chain='["up", "bad"]')
    )
    assert gw.gateway.table is old_table
    assert any("reload failed while starting plugins" in r.getMessage() for r in caplog.records)
    async with aiohttp.ClientSession() as s:
        assert await get_status(s, f"{gw.url}/a") == 200
        assert await get_status(s, f"{gw.url}/b") == 404
        async with s.get(f"{gw.url}/readyz") as resp:
            assert resp.status == 503  # what the live plugins said, not the failed ones
            assert (await resp.json())["components"]["dep"] == {
                "ready": False,
                "detail": "down",
                "critical": True,
            }
