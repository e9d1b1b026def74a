"""Plugin chains: each route's ordered plugins, with per-hook tuples built once.

The hot path iterates ready-made tuples of bound methods: no lookups by name,
no checks for hooks a plugin does not implement.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from .plugin import Plugin, PluginConfig, implements

if TYPE_CHECKING:
    from .exchange import Exchange
    from .telemetry import Telemetry

__all__ = ["EMPTY_CHAIN", "Chain"]

log = logging.getLogger("aiogateway.chain")

AnyPlugin = Plugin[PluginConfig]


class Chain:
    """An ordered tuple of plugin instances and their bound hooks."""

    __slots__ = ("name", "on_complete", "on_request", "on_response", "plugins", "strip_headers")

    def __init__(self, name: str, plugins: tuple[AnyPlugin, ...]) -> None:
        self.name = name
        self.plugins = plugins
        self.on_request: tuple[
            tuple[AnyPlugin, Callable[[Exchange], Awaitable[web.StreamResponse | None]]], ...
        ] = tuple((p, p.on_request) for p in plugins if implements(p, "on_request"))
        self.on_response: tuple[Callable[[Exchange], Awaitable[None]], ...] = tuple(
            p.on_response for p in plugins if implements(p, "on_response")
        )
        # Lower-case request headers this chain's plugins consume (e.g. a service key).
        self.strip_headers: frozenset[bytes] = frozenset(
            h.lower().encode("latin-1") for p in plugins for h in p.strip_request_headers()
        )
        self.on_complete: tuple[tuple[AnyPlugin, Callable[[Exchange], Awaitable[None]]], ...] = (
            tuple((p, p.on_complete) for p in plugins if implements(p, "on_complete"))
        )

    def __repr__(self) -> str:
        return f"<Chain {self.name!r} {[p.name for p in self.plugins]}>"

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    async def run_on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        """Run on_request hooks in order; the first response stops the chain."""
        for plugin, hook in self.on_request:
            response = await hook(exchange)
            if response is not None:
                exchange.rejected_by = plugin.name
                return response
        return None

    async def run_on_complete(self, exchange: Exchange, telemetry: Telemetry) -> None:
        """Run every on_complete hook; a failure is logged and counted, never raised."""
        for plugin, hook in self.on_complete:
            try:
                await hook(exchange)
            except Exception:
                log.exception(
                    "plugin %s on_complete failed (request %s)", plugin.name, exchange.request_id
                )
                telemetry.plugin_failure(plugin.name, "on_complete")


EMPTY_CHAIN = Chain("", ())
