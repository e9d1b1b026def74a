"""Typed models of config.toml's tables, validated once at load.

These are the declarative schema (field, type, default, description) of
everything the core reads. Plugin configs extend :class:`ConfigModel` the same
way (see :mod:`aiogateway.plugin`). Loading, ``${VAR}`` interpolation and error
formatting live in :mod:`aiogateway.config`.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import ConfigError

__all__ = [
    "ConfigModel",
    "DocsSettings",
    "EventSpec",
    "GatewaySettings",
    "RouteSettings",
    "ServerSettings",
    "UpstreamSettings",
]

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


class ConfigModel(BaseModel):
    """Base of every config table: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ServerSettings(ConfigModel):
    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8002, ge=0, le=65535, description="Port to listen on (0: any free port).")
    workers: int = Field(1, ge=1, le=256, description=">1: processes sharing the port.")
    shutdown_timeout: float = Field(30.0, ge=0, description="Seconds to drain on SIGTERM.")
    max_body_bytes: int = Field(0, ge=0, description="Request body limit; 0 = unlimited.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Level of the gateway's logs."
    )
    access_log: bool = Field(True, description="One JSON access-log line per request.")
    keepalive_timeout: float = Field(75.0, ge=0, description="Idle client keep-alive, seconds.")
    client_header_timeout: float = Field(
        30.0, gt=0, description="Seconds a client may take to send its request head."
    )
    client_body_timeout: float = Field(
        60.0, gt=0, description="Longest gap between request body bytes (408 past it)."
    )
    max_line_size: int = Field(8190, ge=256, description="Longest request line (414 past it).")
    max_field_size: int = Field(8190, ge=256, description="Longest header (431 past it).")
    state_dir: str = Field(
        ".run/state", description="Writable directory for local state (spools), per gateway."
    )
    unmatched_chain: str | list[str] | None = Field(
        None,
        description=(
            "Chain whose on_complete hooks see requests that match no route "
            "(default: plugins that observe every request, such as metrics)."
        ),
    )


class UpstreamSettings(ConfigModel):
    url: str = Field(description="Base URL, http://host:port (https supported).")
    connect_timeout: float = Field(2.0, gt=0, description="Seconds to connect.")
    read_timeout: float = Field(30.0, gt=0, description="Longest gap between bytes, seconds.")
    pool_size: int = Field(256, ge=1, description="Most connections (kept alive) at once.")
    keepalive_timeout: float = Field(
        30.0, ge=0, description="Seconds an idle pooled connection is kept."
    )
    openapi: str | None = Field(None, description="Path of the service's OpenAPI document.")

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:
            parts = urlsplit(v)
            port = parts.port  # raises on a port that is not a number in 0..65535
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from None
        if not parts.hostname:
            raise ValueError("needs a host, e.g. http://billing:8003")
        try:
            parts.hostname.encode("idna")
        except UnicodeError:
            raise ValueError(f"{parts.hostname!r} is not a valid host name") from None
        if port == 0:
            raise ValueError("port 0 is not a port to connect to")
        if not parts.path.isascii():
            raise ValueError("the path must be ASCII (percent-encode other characters)")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return v


class EventSpec(ConfigModel):
    topic: str = Field(min_length=1, description="Kafka topic.")
    type: str = Field(min_length=1, description="CloudEvents type.")
    on: Literal["success", "always"] = Field(
        "success", description="success: 2xx only; always: every request."
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="Extra static CloudEvents attributes."
    )


class RouteSettings(ConfigModel):
    name: str | None = Field(None, description="Defaults to 'METHOD path'.")
    methods: list[str] | None = Field(None, description="Allowed methods; none = any.")
    path: str | None = Field(None, description="Exact path with {param} segments.")
    prefix: str | None = Field(None, description="Everything below this path.")
    upstream: str = Field(description="Name of an [upstreams.*] table.")
    chain: str | list[str] = Field(
        default_factory=list, description="A [chains] name or a list of plugin instances."
    )
    strip_prefix: bool = Field(False, description="Prefix routes: forward only the rest.")
    upstream_path: str | None = Field(None, description="Template of the upstream path.")
    max_body_bytes: int | None = Field(None, ge=0, description="Overrides server.max_body_bytes.")
    websocket: bool = Field(True, description="Proxy WebSocket upgrades on this route.")
    event: EventSpec | None = Field(None, description="kafka-emit: the event this route emits.")

    @field_validator("methods")
    @classmethod
    def _methods_known(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = [m.upper() for m in v]
        bad = [m for m in out if m not in HTTP_METHODS]
        if bad:
            raise ValueError(f"unknown HTTP method(s) {bad}")
        if not out:
            raise ValueError("must not be empty (leave it out to allow every method)")
        return out

    @model_validator(mode="after")
    def _path_xor_prefix(self) -> RouteSettings:
        if (self.path is None) == (self.prefix is None):
            raise ValueError("a route needs exactly one of 'path' or 'prefix'")
        where = self.path if self.path is not None else self.prefix
        assert where is not None
        if not where.startswith("/"):
            raise ValueError("'path'/'prefix' must start with '/'")
        if self.strip_prefix and self.prefix is None:
            raise ValueError("'strip_prefix' applies to prefix routes only")
        if self.strip_prefix and self.upstream_path is not None:
            raise ValueError("set either 'strip_prefix' or 'upstream_path', not both")
        return self


class DocsSettings(ConfigModel):
    """[docs]: the OpenAPI document and Swagger UI the gateway serves itself."""

    enabled: bool = Field(True, description="Serve the OpenAPI document and Swagger UI.")
    path: str = Field("/docs", description="Swagger UI page (its assets live below it).")
    openapi_path: str = Field("/openapi.json", description="The generated OpenAPI document.")
    chain: str | list[str] | None = Field(
        None, description="A [chains] name or plugin instances guarding the docs paths."
    )
    title: str = Field("aiogateway", description="info.title of the document.")
    version: str = Field("1.0.0", description="info.version of the document.")
    description: str = Field("", description="info.description of the document.")
    fetch_timeout: float = Field(
        5.0, gt=0, description="Seconds to fetch an upstream's own OpenAPI document."
    )
    refresh_interval: float = Field(
        300.0, ge=0, description="Seconds between refetches of upstream documents (0: never)."
    )

    @field_validator("path", "openapi_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or v == "/" or v.endswith("/") or any(c in v for c in "?#{} "):
            raise ValueError("must be a path like /docs: a leading '/', no trailing '/'")
        return v


class GatewaySettings(ConfigModel):
    server: ServerSettings = Field(default_factory=ServerSettings)
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    # Plugin tables are validated by each plugin's own Config after `type` is resolved.
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)
    chains: dict[str, list[str]] = Field(default_factory=dict)
    routes: list[RouteSettings] = Field(default_factory=list)
    docs: DocsSettings = Field(default_factory=DocsSettings)

    @model_validator(mode="after")
    def _docs_references(self) -> GatewaySettings:
        """[docs] against the rest, at load: ``check``, ``serve`` and reloads all see it."""
        spec, where = self.docs.chain, "docs.chain"
        if isinstance(spec, str) and spec not in self.chains:
            known = ", ".join(self.chains) or "none"
            raise ConfigError(f"unknown chain {spec!r} (known: {known})", location=where)
        for i, name in enumerate(spec if isinstance(spec, list) else []):
            if name not in self.plugins:
                known = ", ".join(self.plugins) or "none"
                raise ConfigError(
                    f"unknown plugin instance {name!r} (known: {known})", location=f"{where}[{i}]"
                )
        if self.docs.path == self.docs.openapi_path:
            raise ConfigError("must differ from docs.path", location="docs.openapi_path")
        served = {self.docs.path: "docs.path", self.docs.openapi_path: "docs.openapi_path"}
        for i, route in enumerate(self.routes if self.docs.enabled else []):
            if route.path in served:
                raise ConfigError(
                    f"{route.path} is served by the gateway's docs: route routes[{i}] "
                    "cannot use it (move the docs, or set docs.enabled = false)",
                    location=served[route.path],
                )
        return self
