"""Runtime route objects: what config.toml compiles to, swapped whole on reload."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .chain import Chain

if TYPE_CHECKING:
    from .plugin import Endpoint, Plugin, PluginConfig
    from .router import Router
    from .settings import EventSpec, GatewaySettings, RouteSettings
    from .upstream import UpstreamPool

__all__ = ["Route", "RouteTable"]


@dataclass(frozen=True, slots=True, eq=False)
class Route:
    """One compiled route. Everything the hot path needs is a direct attribute."""

    name: str
    methods: frozenset[str] | None  # None: any method
    path: str | None  # exact path template, e.g. /v1/org/{id}
    prefix: str | None  # or a prefix (normalised, no trailing slash except "/")
    upstream: UpstreamPool
    chain: Chain
    strip_prefix: bool
    upstream_path: str | None  # template using the route's params
    max_body_bytes: int  # 0: unlimited (already resolved from server.max_body_bytes)
    websocket: bool
    event: EventSpec | None
    settings: RouteSettings
    index: int  # position in config.toml's [[routes]]

    @property
    def pattern(self) -> str:
        if self.path is not None:
            return self.path
        return f"{(self.prefix or '').rstrip('/')}/**"  # prefix "/" reads "/**", not "//**"


@dataclass(eq=False)
class RouteTable:
    """Everything one load of config.toml produced; replaced atomically on reload."""

    settings: GatewaySettings
    routes: tuple[Route, ...]
    router: Router
    plugins: dict[str, Plugin[PluginConfig]]  # instance name -> instance
    chains: dict[str, Chain]  # named chains
    pools: dict[str, UpstreamPool]  # upstream name -> pool
    # Lower-case header names stripped from every incoming request (jwt forward targets).
    identity_headers: frozenset[str]
    # (endpoint, its guarding chain) for paths the gateway answers itself.
    endpoints: dict[str, tuple[Endpoint, Chain]] = field(default_factory=dict)
    # on_complete hooks for requests that match no route.
    unmatched_chain: Chain = field(default_factory=lambda: Chain("unmatched", ()))
    # Requests being served with this table; a replaced table's plugins shut down at 0.
    in_flight: int = 0
    # Per chain: every request header name the proxy drops (filled lazily, hot path).
    request_drop: dict[Chain, frozenset[bytes]] = field(default_factory=dict)
    # Pools of the previous table not reused by this one: close them after the swap.
    retired_pools: list[UpstreamPool] = field(default_factory=list)

    @property
    def identity_headers_b(self) -> frozenset[bytes]:
        return frozenset(h.lower().encode("latin-1") for h in self.identity_headers)
