"""The running gateway: load config, start plugins, serve, reload, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .config import load_table
from .docs import DocsService
from .errors import ConfigError
from .httpserver import GatewayServer
from .proxy import ProxyHandler
from .routes import RouteTable
from .settings import GatewaySettings
from .telemetry import Telemetry

__all__ = ["Gateway"]

log = logging.getLogger("aiogateway.server")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# The table whose plugins are running startup/shutdown (inherited by the tasks
# they create): lets set_ready() know which table's plugin reports a component.
_reporting_table: contextvars.ContextVar[RouteTable | None] = contextvars.ContextVar(
    "aiogateway_reporting_table", default=None
)


class Gateway:
    """One gateway process (or worker): implements the plugins' ``GatewayApp``."""

    def __init__(
        self,
        config_path: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        host: str | None = None,
        port: int | None = None,
        worker_id: int = 0,
        reuse_port: bool = False,
        state_dir: str | Path | None = None,
    ) -> None:
        self._config_path = Path(config_path)
        self._state_dir = Path(state_dir) if state_dir is not None else None
        self._env = env
        self._host = host
        self._port = port
        self._worker_id = worker_id
        self._reuse_port = reuse_port
        self.telemetry = Telemetry()
        # component -> (ready, detail); components in `degradable` do not fail /readyz.
        self.readiness: dict[str, tuple[bool, str]] = {}
        self.degradable: set[str] = set()
        # Component -> the table whose plugin reported it; tables replaced by a reload.
        self._ready_owner: dict[str, RouteTable] = {}
        self._retired: weakref.WeakSet[RouteTable] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retiring: set[asyncio.Task[None]] = set()  # _retire() of replaced tables
        self._runner: web.ServerRunner | None = None
        self._ws_session: aiohttp.ClientSession | None = None
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        # Paths the gateway answers itself, before any route: path -> handler.
        self.special: dict[str, Handler] = {"/healthz": self._healthz, "/readyz": self._readyz}
        self.docs = DocsService(self)  # /openapi.json and /docs, regenerated per table
        self.table: RouteTable
        self.port = 0
        self.access_log = True

    # GatewayApp --------------------------------------------------------------

    @property
    def settings(self) -> GatewaySettings:
        return self.table.settings

    @property
    def config_path(self) -> Path:
        return self._config_path

    @property
    def state_dir(self) -> Path:
        path = self._state_dir or Path(self.table.settings.server.state_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def worker_id(self) -> int:
        return self._worker_id

    def set_ready(
        self, component: str, ready: bool, detail: str = "", *, critical: bool = True
    ) -> None:
        table = _reporting_table.get()
        if table is not None:
            if table in self._retired:
                return  # a replaced table's plugins no longer speak for this gateway
            self._ready_owner[component] = table
        self.readiness[component] = (ready, detail)
        if critical:
            self.degradable.discard(component)
        else:
            self.degradable.add(component)

    def _forget_components(self, table: RouteTable) -> None:
        """Drop what ``table``'s plugins reported (they are gone): /readyz must not stay 503."""
        self._retired.add(table)
        for component, owner in list(self._ready_owner.items()):
            if owner is table:
                del self._ready_owner[component]
                self.readiness.pop(component, None)

    # Lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load config.toml, start every plugin, then listen."""
        self.table = load_table(self._config_path, self._env)
        self.docs.prepare(self.table)
        server_settings = self.table.settings.server
        self.access_log = server_settings.access_log
        await self._start_plugins(self.table)
        try:
            await self._listen()
        except BaseException:
            # Cannot listen (port taken...): undo what started, as stop() would.
            await self.stop()
            raise
        self.docs.activate(self.table)
        self.set_ready("config", True, str(self._config_path))

    async def _listen(self) -> None:
        server_settings = self.table.settings.server
        server = GatewayServer(
            ProxyHandler(self),
            handler_cancellation=True,
            access_log=None,
            auto_decompress=False,
            keepalive_timeout=server_settings.keepalive_timeout,
            max_line_size=server_settings.max_line_size,
            max_field_size=server_settings.max_field_size,
            header_timeout=server_settings.client_header_timeout,
        )
        self._runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=server_settings.shutdown_timeout
        )
        await self._runner.setup()
        host = self._host if self._host is not None else server_settings.host
        port = self._port if self._port is not None else server_settings.port
        site = web.TCPSite(
            self._runner, host, port, reuse_port=self._reuse_port or None, backlog=2048
        )
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info(
            "listening",
            extra={
                "fields": {
                    "host": host,
                    "port": self.port,
                    "worker": self._worker_id,
                    "routes": len(self.table.routes),
                }
            },
        )

    async def reload(self) -> bool:
        """Load config.toml again and swap the table atomically; False if rejected."""
        async with self._reload_lock:
            if self._stopping:
                return False
            old = self.table
            readiness = dict(self.readiness), dict(self._ready_owner)
            try:
                new = load_table(self._config_path, self._env, previous=old)
                self.docs.prepare(new)
            except ConfigError as exc:
                log.error("reload rejected, old config kept: %s", exc)
                return False
            try:
                await self._start_plugins(new)
            except Exception:
                log.exception("reload failed while starting plugins, old config kept")
                self._retired.add(new)
                self.readiness, self._ready_owner = readiness
                kept = set(map(id, old.pools.values()))
                for pool in new.pools.values():
                    if id(pool) not in kept:
                        await pool.close()
                return False
            self.table = new
            self.docs.activate(new)
            self._forget_components(old)
            self.access_log = new.settings.server.access_log
            log.info("config reloaded", extra={"fields": {"routes": len(new.routes)}})
            retire = asyncio.ensure_future(self._retire(old, new))
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)
            return True

    async def _retire(self, old: RouteTable, new: RouteTable) -> None:
        """After a swap: let the old table's requests finish, then stop its plugins."""
        deadline = asyncio.get_running_loop().time() + old.settings.server.shutdown_timeout
        # Polling is fine here: a reload is rare and the wait short.
        while old.in_flight and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self._stop_plugins(old)
        for pool in new.retired_pools:
            await pool.close()

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests (bounded), stop plugins, close pools."""
        self._stopping = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # A reload still starting plugins finishes first, so its table is the
        # one stopped below (later reloads see _stopping and do nothing).
        async with self._reload_lock:
            pass
        # Tables a reload replaced: their requests are over now; let their
        # plugins shut down (flush) too instead of cancelling that.
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)
        await self._stop_plugins(self.table)
        for pool in self.table.pools.values():
            await pool.close()
        if self._ws_session is not None:
            await self._ws_session.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _start_plugins(self, table: RouteTable) -> None:
        token = _reporting_table.set(table)
        try:
            await self._start_each(table)
        finally:
            _reporting_table.reset(token)

    async def _start_each(self, table: RouteTable) -> None:
        started = []
        try:
            for plugin in table.plugins.values():
                await plugin.startup(self)
                started.append(plugin)
        except BaseException:
            for plugin in reversed(started):
                with contextlib.suppress(Exception):
                    await plugin.shutdown(self)
            raise

    async def _stop_plugins(self, table: RouteTable) -> None:
        token = _reporting_table.set(table)
        try:
            for plugin in reversed(list(table.plugins.values())):
                try:
                    await plugin.shutdown(self)
                except Exception:
                    log.exception("plugin %s failed to shut down", plugin.name)
        finally:
            _reporting_table.reset(token)

    # Helpers for the proxy ---------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def ws_session(self) -> aiohttp.ClientSession:
        if self._ws_session is None or self._ws_session.closed:
            self._ws_session = aiohttp.ClientSession(auto_decompress=False)
        return self._ws_session

    async def _healthz(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def _readyz(self, request: web.BaseRequest) -> web.StreamResponse:
        """200 "ready"; 200 "degraded" when only non-critical dependencies are down
        (their work spools, requests still succeed); 503 "not_ready" otherwise."""
        components = {
            name: {"ready": ready, "detail": detail, "critical": name not in self.degradable}
            for name, (ready, detail) in sorted(self.readiness.items())
        }
        down = [name for name, (ready, _) in self.readiness.items() if not ready]
        critical_down = [name for name in down if name not in self.degradable]
        status = "not_ready" if critical_down else "degraded" if down else "ready"
        body = {
            "status": status,
            "pid": os.getpid(),
            "worker": self._worker_id,
            "routes": len(self.table.routes),
            "components": components,
        }
        return web.Response(
            status=503 if critical_down else 200,
            body=orjson.dumps(body),
            content_type="application/json",
        )
