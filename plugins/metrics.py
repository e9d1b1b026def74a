"""metrics: Prometheus metrics of every request, served at ``/metrics``.

Families and label names are the design contract (DESIGN.md, Metrics), plus
``gateway_plugin_failures_total{plugin,hook}``. Labels carry route names, never
raw paths; requests matching no route share ``route="unmatched"``; methods
outside the standard nine are ``OTHER``; ``status`` is the numeric code sent to
the client (``0``: the client left before any response was sent).

``gateway_requests_in_flight`` is raised in ``on_request`` and lowered in
``on_complete``. ``on_request`` runs only for matched routes and only up to the
plugin that stops the chain, so the gauge counts proxied requests of routes
whose chain includes metrics (put metrics first in the chain).

Example::

    [plugins.metrics]
    path = "/metrics"
    admin_port = 9102          # serve it on 127.0.0.1:9102 instead of the gateway's port

    [plugins.metrics-internal]
    type = "metrics"
    chain = ["internal"]       # or: guard /metrics on the gateway's port with service-key
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from pydantic import Field, field_validator, model_validator

from aiogateway.plugin import Endpoint, GatewayApp, Plugin, PluginConfig

from .metrics_registry import MetricFamilies, families_for
from .metrics_series import DEFAULT_BUCKETS, valid_buckets

if TYPE_CHECKING:
    from aiogateway.exchange import Exchange

__all__ = ["Metrics", "MetricsConfig"]

log = logging.getLogger("aiogateway.plugins.metrics")


class MetricsConfig(PluginConfig):
    path: str = Field("/metrics", description="Path the metrics are served at.")
    buckets: tuple[float, ...] = Field(
        DEFAULT_BUCKETS, description="gateway_request_duration_seconds buckets, seconds."
    )
    upstream_buckets: tuple[float, ...] = Field(
        DEFAULT_BUCKETS, description="gateway_upstream_duration_seconds buckets, seconds."
    )
    admin_host: str = Field(
        "127.0.0.1", description="Address of the separate metrics listener (with admin_port)."
    )
    admin_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve metrics on admin_host:admin_port instead of the gateway's port.",
    )
    chain: str | list[str] | None = Field(
        None, description="Chain guarding the endpoint on the gateway's port (e.g. service-key)."
    )
    openmetrics: bool = Field(
        True, description="Answer Accept: application/openmetrics-text in OpenMetrics format."
    )

    @field_validator("path")
    @classmethod
    def _path_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @field_validator("buckets", "upstream_buckets")
    @classmethod
    def _buckets_valid(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        return valid_buckets(v)

    @model_validator(mode="after")
    def _chain_needs_gateway_port(self) -> MetricsConfig:
        if self.chain is not None and self.admin_port is not None:
            # The admin listener is outside the gateway: no chain could guard it.
            raise ValueError(
                "'chain' guards the endpoint on the gateway's port; with 'admin_port' "
                "the metrics are served elsewhere (restrict admin_host instead)"
            )
        return self


class Metrics(Plugin[MetricsConfig]):
    """Counts every request of its chains (and unmatched ones) and serves the numbers."""

    type_name = "metrics"
    Config = MetricsConfig
    observes_unmatched = True

    def __init__(self, name: str, config: MetricsConfig) -> None:
        super().__init__(name, config)
        self._families: MetricFamilies | None = None
        self._admin: web.ServerRunner | None = None
        # exchange.state key marking "this instance raised the in-flight gauge".
        self._flight_key = f"metrics:{name}"

    # Load time -------------------------------------------------------------------

    def endpoints(self) -> Sequence[Endpoint]:
        if self.config.admin_port is not None:
            return ()
        return (Endpoint(path=self.config.path, handler=self.serve, chain=self.config.chain),)

    # Lifecycle -----------------------------------------------------------------------

    async def startup(self, app: GatewayApp) -> None:
        families = families_for(app, self.name, self.config.buckets, self.config.upstream_buckets)
        families.acquire(app.telemetry)
        self._families = families
        if self.config.admin_port is not None:
            try:
                await self._start_admin(self.config.admin_host, self.config.admin_port)
            except BaseException:
                # The gateway only shuts down plugins whose startup succeeded.
                await families.release(app.telemetry)
                raise

    async def shutdown(self, app: GatewayApp) -> None:
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        if self._families is not None:
            await self._families.release(app.telemetry)
            # _families stays set: requests still finishing on this instance after a
            # reload must lower the in-flight gauge they raised.

    @property
    def admin_port(self) -> int | None:
        """The port the admin listener is bound to (useful with admin_port = 0)."""
        if self._admin is None or not self._admin.addresses:
            return None
        port: int = self._admin.addresses[0][1]
        return port

    async def _start_admin(self, host: str, port: int) -> None:
        runner = web.ServerRunner(web.Server(self._serve_admin), access_log=None)
        await runner.setup()
        # reuse_port: every worker of a multi-process gateway binds the same admin
        # port (each answers with all workers' totals), and a reload's new instance
        # binds it before the old one lets go.
        site = web.TCPSite(runner, host, port, reuse_port=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._admin = runner
        log.info("metrics: serving %s on http://%s:%s", self.config.path, host, self.admin_port)

    # Request hooks -------------------------------------------------------------------

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        families = self._families
        if families is not None:
            families.in_flight += 1
            # Remember which store was raised: on_complete lowers exactly that one,
            # and only when on_request ran (not for unmatched or earlier-rejected ones).
            exchange.state[self._flight_key] = families
        return None

    async def on_complete(self, exchange: Exchange) -> None:
        raised: MetricFamilies | None = exchange.state.pop(self._flight_key, None)
        if raised is not None:
            raised.in_flight -= 1
        families = self._families
        if families is not None:
            families.complete(exchange)

    # Exposition ------------------------------------------------------------------------

    async def serve(self, request: web.BaseRequest) -> web.StreamResponse:
        """The scrape handler (GET and HEAD)."""
        families = self._families
        if families is None:
            return web.Response(status=503, text="metrics not started\n")
        accept = request.headers.get("Accept", "")
        families.flush()  # on the loop: pending numbers are only touched here
        # Off the event loop: rendering many series (and, with workers, reading every
        # worker's files) would otherwise stall the proxied requests for that long.
        body, content_type = await asyncio.to_thread(
            families.render, accept, self.config.openmetrics
        )
        return web.Response(
            body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"}
        )

    async def _serve_admin(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != self.config.path:
            return web.Response(status=404, text="not found\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(
                status=405, text="method not allowed\n", headers={"Allow": "GET, HEAD"}
            )
        return await self.serve(request)
