"""The plugin contract: a typed Config, and any of five async hooks.

A plugin is one class with a ``type_name``, a frozen pydantic ``Config``
validated when config.toml loads (unknown keys rejected), resources opened in
``startup`` and closed in ``shutdown``, and any of the request hooks. Hooks a
class does not override are skipped by the chain at no cost per request.

``on_request`` returns a response to stop the chain, or ``None`` to go on: one
meaning. ``on_complete`` runs after the last byte went out (or the exchange
failed) for every plugin of the chain, including after a rejection; it must
only enqueue work, never wait on I/O, and its failures are logged and counted,
never shown to the client.

Example::

    class Config(PluginConfig):
        header: str = "X-Hello"

    class Hello(Plugin[Config]):
        type_name = "hello"
        Config = Config

        async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
            exchange.add_upstream_header(self.config.header, "world")
            return None
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

from aiohttp import web

from .settings import ConfigModel

if TYPE_CHECKING:
    from .exchange import Exchange
    from .settings import GatewaySettings, RouteSettings
    from .telemetry import Telemetry

__all__ = [
    "HOOKS",
    "Endpoint",
    "GatewayApp",
    "Plugin",
    "PluginConfig",
    "implements",
]

HOOKS = ("on_request", "on_response", "on_complete")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class PluginConfig(ConfigModel):
    """Base of a plugin's Config. ``type`` is consumed by the loader, not passed here."""


ConfigT = TypeVar("ConfigT", bound=PluginConfig)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A path the gateway answers itself on a plugin's behalf (e.g. /metrics).

    ``chain`` optionally guards it with a chain's ``on_request`` hooks
    (e.g. a service-key instance), like any route.
    """

    path: str
    handler: Handler
    methods: frozenset[str] = frozenset({"GET", "HEAD"})
    chain: str | Sequence[str] | None = None


class GatewayApp(Protocol):
    """What ``startup``/``shutdown`` receive: the running gateway's shared parts."""

    @property
    def settings(self) -> GatewaySettings: ...
    @property
    def config_path(self) -> Path: ...
    @property
    def telemetry(self) -> Telemetry: ...
    @property
    def state_dir(self) -> Path:
        """A writable directory for this gateway's local state (spools)."""
        ...

    @property
    def worker_id(self) -> int:
        """0..workers-1; 0 when running a single process."""
        ...

    def set_ready(
        self, component: str, ready: bool, detail: str = "", *, critical: bool = True
    ) -> None:
        """Report a dependency's state; /readyz shows it.

        ``critical=False``: the gateway still serves correctly without it (work
        spools), so /readyz stays 200 with status "degraded" instead of 503.
        """
        ...


class Plugin(Generic[ConfigT]):
    """Base class of every plugin; override only the hooks you need."""

    type_name: ClassVar[str] = ""
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: True: this plugin's on_complete also sees requests that match no route.
    observes_unmatched: ClassVar[bool] = False

    def __init__(self, name: str, config: ConfigT) -> None:
        self.name = name
        self.config = config

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # Load-time declarations -------------------------------------------------

    def identity_headers(self) -> Iterable[str]:
        """Headers this plugin sets from identity; stripped from every request."""
        return ()

    def strip_request_headers(self) -> Iterable[str]:
        """Lower-case headers removed from requests on routes whose chain has this plugin.

        For credentials the upstream must not see (service-key's key header,
        jwt-check's Authorization with ``forward_authorization = false``).
        """
        return ()

    def endpoints(self) -> Sequence[Endpoint]:
        """Paths the gateway answers on this plugin's behalf."""
        return ()

    def check_route(self, route: RouteSettings, location: str) -> None:
        """Cross-check a route that uses this plugin; raise ConfigError(location=...)."""

    # Lifecycle ---------------------------------------------------------------

    async def startup(self, app: GatewayApp) -> None:
        """Open pools, producers, background tasks."""

    async def shutdown(self, app: GatewayApp) -> None:
        """Flush and close what startup opened."""

    # Request hooks (skipped unless overridden) -------------------------------

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        return None

    async def on_response(self, exchange: Exchange) -> None:
        return None

    async def on_complete(self, exchange: Exchange) -> None:
        return None


def implements(plugin: Plugin[PluginConfig], hook: str) -> bool:
    """Whether ``plugin``'s class overrides ``hook`` (so the chain must call it)."""
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)
