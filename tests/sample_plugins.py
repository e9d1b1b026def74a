"""Third-party-style plugins for loader tests: ``type = "tests.sample_plugins:HeaderPlugin"``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aiohttp import web
from pydantic import Field

from aiogateway.errors import ConfigError
from aiogateway.exchange import Exchange
from aiogateway.plugin import Endpoint, Plugin, PluginConfig
from aiogateway.settings import RouteSettings

__all__ = ["HeaderConfig", "HeaderPlugin", "NotAPlugin", "ObserverPlugin"]


class HeaderConfig(PluginConfig):
    header: str = Field(description="Header added to upstream requests.")
    value: str = "on"
    count: int = Field(1, ge=1, le=10)
    identity: bool = Field(False, description="Declare 'header' as an identity header.")
    endpoint: str | None = Field(None, description="Serve this path on the plugin's behalf.")
    endpoint_chain: str | list[str] | None = None
    needs_event: bool = Field(False, description="Reject routes without 'event'.")


class HeaderPlugin(Plugin[HeaderConfig]):
    type_name = "header"
    Config = HeaderConfig

    def identity_headers(self) -> Iterable[str]:
        return (self.config.header,) if self.config.identity else ()

    def endpoints(self) -> Sequence[Endpoint]:
        if self.config.endpoint is None:
            return ()
        return (Endpoint(self.config.endpoint, self._serve, chain=self.config.endpoint_chain),)

    def check_route(self, route: RouteSettings, location: str) -> None:
        if self.config.needs_event and route.event is None:
            raise ConfigError(
                f"plugin {self.name!r} needs an 'event' on every route using it",
                location=f"{location}.event",
            )

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text=self.config.value)

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        exchange.add_upstream_header(self.config.header, self.config.value)
        return None


class ObserverPlugin(HeaderPlugin):
    """Sees requests that match no route, like the metrics plugin."""

    type_name = "observer"
    observes_unmatched = True

    async def on_complete(self, exchange: Exchange) -> None:
        exchange.state["observed"] = self.name


class NotAPlugin:
    Config = HeaderConfig
