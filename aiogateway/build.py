"""Compile validated settings into a RouteTable: plugins, chains, pools, routes.

Everything the hot path needs is resolved here, once per load: each route
holds its Chain (a tuple of plugin instances) and its UpstreamPool object, so
serving a request does no lookups by name. All problems found are reported
together, each located like load errors (``chains.protected[1]``,
``routes[3] (POST /v1/org).upstream``).

Route names default to ``METHODS pattern``: ``POST /v1/client/sign-up``,
``GET,HEAD /v1/org/{id}``, ``* /v1/billing/**`` (a prefix route, any method).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import ValidationError

from .chain import EMPTY_CHAIN, Chain
from .config import ConfigErrors, default_route_name, pydantic_errors, route_label
from .errors import ConfigError
from .interpolate import join_location
from .plugin import Endpoint, Plugin, PluginConfig
from .registry import resolve_plugin_class
from .router import Router
from .routes import Route, RouteTable
from .settings import GatewaySettings, RouteSettings
from .upstream import UpstreamPool

__all__ = ["RESERVED_PATHS", "build_table", "format_route_table"]

RESERVED_PATHS = frozenset({"/healthz", "/readyz"})

AnyPlugin = Plugin[PluginConfig]

_PARAM = re.compile(r"\{([^{}]*)\}")
_ROUTE_LOCATION = re.compile(r"^routes\[(\d+)\](?! \()")


def build_table(
    settings: GatewaySettings, file: str, previous: RouteTable | None = None
) -> RouteTable:
    """Build the table for ``settings`` loaded from ``file``.

    With ``previous`` (a reload), pools whose upstream settings did not change
    are reused (warm connections survive); the others are listed in
    ``retired_pools`` for the server to close once the new table is live.
    """
    b = _Builder(settings)
    b.build_plugins()
    b.build_chains()
    try:
        pools, retired = _pools(settings, previous)
    except ConfigError as exc:
        raise exc.in_file(file) from None
    routes = b.build_routes(pools)
    endpoints = b.build_endpoints(routes)
    unmatched = b.unmatched_chain()
    if not b.errors:
        try:
            router = Router(routes)
        except ConfigError as exc:
            b.errors.append(exc)
    if b.errors:
        errors = [_relabel(e, b.labels).in_file(file) for e in b.errors]
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    return RouteTable(
        settings=settings,
        routes=tuple(routes),
        router=router,
        plugins=b.plugins,
        chains=b.chains,
        pools=pools,
        identity_headers=frozenset(
            h.lower() for p in b.plugins.values() for h in p.identity_headers()
        ),
        endpoints=endpoints,
        unmatched_chain=unmatched,
        retired_pools=retired,
    )


def _pools(
    settings: GatewaySettings, previous: RouteTable | None
) -> tuple[dict[str, UpstreamPool], list[UpstreamPool]]:
    old = previous.pools if previous is not None else {}
    pools: dict[str, UpstreamPool] = {}
    for name, upstream in settings.upstreams.items():
        keep = old.get(name)
        reuse = keep is not None and keep.settings == upstream
        if keep is not None and reuse:
            pools[name] = keep
            continue
        try:
            pools[name] = UpstreamPool(name, upstream)
        except (ValueError, UnicodeError) as exc:  # a URL the settings check let through
            raise ConfigError(f"unusable url: {exc}", location=f"upstreams.{name}.url") from None
    kept = {id(p) for p in pools.values()}
    return pools, [p for p in old.values() if id(p) not in kept]


def _relabel(error: ConfigError, labels: Sequence[str]) -> ConfigError:
    """``routes[3].path`` (from the router) -> ``routes[3] (POST /v1/org).path``."""
    m = _ROUTE_LOCATION.match(error.location)
    if m is None or int(m.group(1)) >= len(labels):
        return error
    location = labels[int(m.group(1))] + error.location[m.end() :]
    return ConfigError(error.message, file=error.file, location=location)


class _Builder:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.errors: list[ConfigError] = []
        self.plugins: dict[str, AnyPlugin] = {}
        self.chains: dict[str, Chain] = {}
        self.labels: list[str] = []
        # Names whose own error is already reported: references to them stay quiet.
        self._broken_plugins: set[str] = set()
        self._broken_chains: set[str] = set()

    def fail(self, message: str, location: str) -> None:
        self.errors.append(ConfigError(message, location=location))

    # plugins and chains ---------------------------------------------------

    def build_plugins(self) -> None:
        for name, table in self.settings.plugins.items():
            where = join_location("plugins", name)
            options = dict(table)
            type_name = options.pop("type", name)
            try:
                if not isinstance(type_name, str) or not type_name:
                    raise ConfigError(
                        f"expected a plugin type name, got {type_name!r}", location=f"{where}.type"
                    )
                type_where = f"{where}.type" if "type" in table else where
                cls = resolve_plugin_class(type_name, location=type_where)
                try:
                    config = cls.Config.model_validate(options)
                except ValidationError as exc:
                    self.errors.extend(pydantic_errors(exc, cls.Config, where))
                    self._broken_plugins.add(name)
                    continue
                self.plugins[name] = cls(name, config)
            except ConfigError as exc:
                self.errors.append(exc)
                self._broken_plugins.add(name)
            except Exception as exc:  # a plugin's constructor failing is its config's fault
                self.fail(f"plugin {name!r} failed to load: {exc}", where)
                self._broken_plugins.add(name)

    def build_chains(self) -> None:
        for name, members in self.settings.chains.items():
            chain = self._chain(name, members, join_location("chains", name))
            if chain is None:
                self._broken_chains.add(name)
            else:
                self.chains[name] = chain

    def _chain(self, name: str, members: Sequence[str], where: str) -> Chain | None:
        """A Chain of the named instances, or None (errors recorded) if any is bad."""
        plugins: list[AnyPlugin] = []
        ok = True
        seen: dict[str, int] = {}
        for i, member in enumerate(members):
            if member in seen:
                self.fail(
                    f"plugin {member!r} is listed twice in this chain (also at [{seen[member]}])",
                    f"{where}[{i}]",
                )
                ok = False
                continue
            seen[member] = i
            plugin = self.plugins.get(member)
            if plugin is None:
                ok = False
                if member not in self._broken_plugins:
                    known = ", ".join(self.settings.plugins) or "none"
                    self.fail(
                        f"unknown plugin instance {member!r} (known: {known})", f"{where}[{i}]"
                    )
                continue
            plugins.append(plugin)
        if not ok:
            return None
        return Chain(name, tuple(plugins)) if plugins else EMPTY_CHAIN

    def _resolve(
        self, spec: str | Sequence[str] | None, inline_name: str, where: str
    ) -> Chain | None:
        """A chain reference (a [chains] name or an inline list) -> Chain."""
        if spec is None:
            return EMPTY_CHAIN
        if isinstance(spec, str):
            chain = self.chains.get(spec)
            if chain is None and spec not in self._broken_chains:
                known = ", ".join(self.settings.chains) or "none"
                self.fail(f"unknown chain {spec!r} (known: {known})", where)
            return chain
        return self._chain(inline_name, spec, where)

    def unmatched_chain(self) -> Chain:
        spec = self.settings.server.unmatched_chain
        if spec is None:
            observers = tuple(p for p in self.plugins.values() if type(p).observes_unmatched)
            return Chain("unmatched", observers)
        chain = self._resolve(spec, "unmatched", "server.unmatched_chain")
        return chain if chain is not None else EMPTY_CHAIN

    # routes and endpoints ------------------------------------------------------

    def build_routes(self, pools: dict[str, UpstreamPool]) -> list[Route]:
        routes: list[Route] = []
        names: dict[str, str] = {}
        server_limit = self.settings.server.max_body_bytes
        for i, rs in enumerate(self.settings.routes):
            prefix = None if rs.prefix is None else (rs.prefix.rstrip("/") or "/")
            label = route_label(
                i, {"name": rs.name, "methods": rs.methods, "path": rs.path, "prefix": prefix}
            )
            self.labels.append(label)
            name = rs.name or default_route_name(rs.methods, rs.path, prefix)
            before = len(self.errors)
            if name in names:
                self.fail(
                    f"duplicate route name {name!r} (also {names[name]}); names must be unique",
                    label,
                )
            names.setdefault(name, label)
            pool = pools.get(rs.upstream)
            if pool is None:
                known = ", ".join(pools) or "none"
                self.fail(f"unknown upstream {rs.upstream!r} (known: {known})", f"{label}.upstream")
            self._check_paths(rs, prefix, label)
            chain = self._resolve(rs.chain, name, f"{label}.chain")
            if pool is None or chain is None or len(self.errors) > before:
                continue
            for plugin in chain.plugins:
                self._check_route(plugin, rs, label)
            routes.append(
                Route(
                    name=name,
                    methods=frozenset(rs.methods) if rs.methods else None,
                    path=rs.path,
                    prefix=prefix,
                    upstream=pool,
                    chain=chain,
                    strip_prefix=rs.strip_prefix,
                    upstream_path=rs.upstream_path,
                    max_body_bytes=(
                        rs.max_body_bytes if rs.max_body_bytes is not None else server_limit
                    ),
                    websocket=rs.websocket,
                    event=rs.event,
                    settings=rs,
                    index=i,
                )
            )
        return routes

    def _check_route(self, plugin: AnyPlugin, rs: RouteSettings, label: str) -> None:
        try:
            plugin.check_route(rs, label)
        except ConfigError as exc:
            self.errors.append(exc)
        except Exception as exc:  # a plugin's check failing badly still names the route
            self.fail(f"plugin {plugin.name!r} rejected the route: {exc}", label)

    def _check_paths(self, rs: RouteSettings, prefix: str | None, label: str) -> None:
        params: list[str] = []
        if rs.path is not None:
            params = self._path_params(rs.path, f"{label}.path")
        where = rs.path if rs.path is not None else prefix
        if where in RESERVED_PATHS:
            key = "path" if rs.path is not None else "prefix"
            self.fail(
                f"{where} is answered by the gateway itself; routes cannot use it", f"{label}.{key}"
            )
        if rs.upstream_path is not None:
            self._check_upstream_path(rs.upstream_path, params, f"{label}.upstream_path")

    def _path_params(self, path: str, where: str) -> list[str]:
        params: list[str] = []
        for segment in path.split("/")[1:]:
            if "{" not in segment and "}" not in segment:
                continue
            m = _PARAM.fullmatch(segment)
            if m is None or not m.group(1).isidentifier():
                self.fail(
                    f"bad segment {segment!r}: a {{param}} must be a whole segment "
                    "named like an identifier, e.g. /v1/org/{org_id}",
                    where,
                )
            elif m.group(1) in params:
                self.fail(f"param {{{m.group(1)}}} appears twice", where)
            else:
                params.append(m.group(1))
        return params

    def _check_upstream_path(self, template: str, params: list[str], where: str) -> None:
        if not template.startswith("/"):
            self.fail("must start with '/'", where)
        if "{" in _PARAM.sub("", template) or "}" in _PARAM.sub("", template):
            self.fail(f"unbalanced braces in {template!r}", where)
        for used in _PARAM.findall(template):
            if used not in params:
                have = ", ".join(f"{{{p}}}" for p in params) or "none (it has no {params})"
                self.fail(
                    f"uses {{{used}}}, which is not a param of the route's path; "
                    f"the route's params: {have}",
                    where,
                )

    def build_endpoints(self, routes: Sequence[Route]) -> dict[str, tuple[Endpoint, Chain]]:
        endpoints: dict[str, tuple[Endpoint, Chain]] = {}
        owners: dict[str, str] = {}
        route_paths = {r.path: r for r in routes if r.path is not None}
        for name, plugin in self.plugins.items():
            where = join_location("plugins", name)
            for ep in plugin.endpoints():
                problem = None
                if not ep.path.startswith("/"):
                    problem = f"endpoint path {ep.path!r} must start with '/'"
                elif ep.path in RESERVED_PATHS:
                    problem = f"endpoint {ep.path} is answered by the gateway itself"
                elif ep.path in owners:
                    problem = f"endpoint {ep.path} is also served by plugin {owners[ep.path]!r}"
                elif ep.path in route_paths:
                    other = route_paths[ep.path]
                    problem = (
                        f"endpoint {ep.path} clashes with route {other.name!r} "
                        f"(routes[{other.index}]) of the same path"
                    )
                if problem is not None:
                    self.fail(problem, where)
                    continue
                chain = self._resolve(ep.chain, f"{name} {ep.path}", where)
                if chain is not None:
                    endpoints[ep.path] = (ep, chain)
                    owners[ep.path] = name
        return endpoints


def format_route_table(table: RouteTable) -> str:
    """What ``aiogateway check`` prints: one aligned line per route, then plugins."""
    header = ("NAME", "METHODS", "PATH", "UPSTREAM", "CHAIN", "EVENT")
    rows = [header]
    for r in table.routes:
        path = r.pattern
        if r.upstream_path is not None:
            path += f" -> {r.upstream_path}"
        elif r.strip_prefix:
            path += " (strip)"
        event = "-"
        if r.event is not None:
            event = f"{r.event.topic}:{r.event.type}"
            if r.event.on != "success":
                event += f" ({r.event.on})"
        rows.append(
            (
                r.name,
                ",".join(r.settings.methods) if r.settings.methods else "*",
                path,
                f"{r.upstream.name} ({r.upstream.settings.url})",
                ",".join(r.chain.names) or "-",
                event,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    types = [
        f"{name} ({table.settings.plugins.get(name, {}).get('type', name)})"
        for name in table.plugins
    ]
    lines.append("plugins: " + (", ".join(types) or "-"))
    if table.endpoints:
        served = [
            f"{path} [{','.join(chain.names) or '-'}]"
            for path, (_, chain) in table.endpoints.items()
        ]
        lines.append("endpoints: " + ", ".join(served))
    return "\n".join(lines)
