"""ip-allow: an example plugin. Only clients from the listed networks get through.

Use it from config.toml without installing anything (the module must be
importable, e.g. run the gateway from the repository root)::

    [plugins.office]
    type = "examples.ip_allow:IpAllow"
    allow = ["10.0.0.0/8", "127.0.0.1/32"]

    [[routes]]
    prefix = "/v1/admin"
    upstream = "admin"
    chain = ["metrics", "office", "audit"]
"""

from __future__ import annotations

import ipaddress

from aiohttp import web
from pydantic import Field, IPvAnyNetwork

from aiogateway import errors
from aiogateway.exchange import Exchange
from aiogateway.plugin import Plugin, PluginConfig

__all__ = ["IpAllow", "IpAllowConfig"]


class IpAllowConfig(PluginConfig):
    """Validated when config.toml loads: a bad network is an error there, not per request."""

    allow: list[IPvAnyNetwork] = Field(min_length=1, description="Networks let in.")
    header: str = Field("X-Allowed-Network", description="Response header naming the network.")


class IpAllow(Plugin[IpAllowConfig]):
    type_name = "ip-allow"
    Config = IpAllowConfig

    def __init__(self, name: str, config: IpAllowConfig) -> None:
        super().__init__(name, config)
        self.rejected = 0  # shared by every request: only touched in on_complete

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        try:
            ip = ipaddress.ip_address(exchange.client_ip)
        except ValueError:
            ip = None
        for network in self.config.allow:
            if ip is not None and ip in network:
                exchange.state[self.name] = str(network)  # per-request state lives here
                return None  # go on: next plugin, then the upstream
        return errors.error_response(
            403, errors.FORBIDDEN, "client address not allowed", exchange.request_id
        )

    async def on_response(self, exchange: Exchange) -> None:
        network = exchange.state.get(self.name)
        if network is not None:
            exchange.response_headers[self.config.header] = network

    async def on_complete(self, exchange: Exchange) -> None:
        # Runs after the response went out, also for requests this plugin rejected.
        if exchange.rejected_by == self.name:
            self.rejected += 1
