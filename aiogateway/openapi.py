"""The OpenAPI 3.1 document of a route table, built once per config load.

Every route becomes operations: a ``path`` route its template (``{param}``
segments become path parameters), a ``prefix`` route the operations of its
upstream's own document that it reaches (see :mod:`aiogateway.openapi_merge`)
or else one ``{prefix}/{path}`` catch-all. Methods come from the route (the
common ones when it allows any), the tag is the upstream's name, the security
comes from the chain (bearer JWT for each jwt-check instance, an API key in
its header for each service-key instance), and every operation lists the
gateway's own JSON errors and its ``X-Request-ID`` header.

Nothing here runs per request: the server serializes the result once and
serves those bytes (:mod:`aiogateway.docs`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import __version__
from .openapi_merge import MergeContext, Operation, upstream_operations

if TYPE_CHECKING:
    from .plugin import Plugin, PluginConfig
    from .routes import Route, RouteTable
    from .settings import DocsSettings

__all__ = [
    "COMMON_METHODS",
    "ERROR_RESPONSES",
    "build_document",
    "component_name",
    "plugin_schemes",
    "security_schemes",
]

JsonDict = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
# Documented for a route that allows any method.
COMMON_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_OPENAPI_METHODS = ("GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_PARAM = re.compile(r"\{([^{}]*)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

REQUEST_ID = "X-Request-ID"
ERROR_SCHEMA = "GatewayError"
# status -> (components.responses name, description)
ERROR_RESPONSES: dict[int, tuple[str, str]] = {
    401: ("GatewayUnauthorized", "Missing or invalid credentials (rejected by the gateway)."),
    403: ("GatewayForbidden", "Credentials not accepted for this route (gateway)."),
    404: ("GatewayNotFound", "No route for this path (gateway)."),
    405: ("GatewayMethodNotAllowed", "The path does not allow this method; see Allow."),
    413: ("GatewayPayloadTooLarge", "The request body is over the route's limit (gateway)."),
    502: ("GatewayBadGateway", "The upstream is unreachable or reset the connection."),
    504: ("GatewayTimeout", "The upstream did not answer in time."),
}


def component_name(name: str) -> str:
    """``name`` made valid as an OpenAPI component key (``^[A-Za-z0-9._-]+$``)."""
    return _UNSAFE.sub("_", name).strip("_") or "x"


def plugin_schemes(plugin: Plugin[PluginConfig]) -> JsonDict:
    """The security schemes one auth plugin instance accepts (alternatives), by name.

    jwt-check: a bearer JWT, and the cookie / query parameter it also reads the
    token from when configured; service-key: an API key in its header.
    """
    kind, name, config = type(plugin).type_name, plugin.name, plugin.config
    key = component_name(name)
    if kind == "service-key":
        header = str(getattr(config, "header", "X-Service-Key"))
        about = f"Service key checked by the gateway ({name})."
        return {key: {"type": "apiKey", "in": "header", "name": header, "description": about}}
    if kind != "jwt-check":
        return {}
    about = f"JWT checked by the gateway ({name})"
    out: JsonDict = {
        key: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": about}
    }
    for where, option, what in (("cookie", "cookie", "cookie"), ("query", "query_param", "query")):
        value = getattr(config, option, None)
        if isinstance(value, str) and value:
            out[f"{key}_{where}"] = {
                "type": "apiKey",
                "in": where,
                "name": value,
                "description": f"{about}, in the {what} {value!r}.",
            }
    return out


def security_schemes(table: RouteTable) -> JsonDict:
    """Every auth plugin instance's schemes, keyed by instance name (``jwt``, ``jwt_cookie``)."""
    schemes: JsonDict = {}
    for plugin in table.plugins.values():
        schemes.update(plugin_schemes(plugin))
    return schemes


def _chain_security(route: Route) -> list[JsonDict] | None:
    """The route's security: every auth plugin of its chain must pass, each in any of its ways."""
    requirements: list[JsonDict] = [{}]
    for plugin in route.chain.plugins:
        ways = list(plugin_schemes(plugin))
        if ways:
            requirements = [{**req, way: []} for req in requirements for way in ways]
    return requirements if requirements != [{}] else None


def _base_components() -> JsonDict:
    ref = {"$ref": f"#/components/headers/{REQUEST_ID}"}
    responses = {
        name: {
            "description": description,
            "headers": {REQUEST_ID: ref},
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}
            },
        }
        for name, description in ERROR_RESPONSES.values()
    }
    return {
        "schemas": {
            ERROR_SCHEMA: {
                "type": "object",
                "description": "Every error the gateway itself answers.",
                "required": ["error", "message", "request_id"],
                "properties": {
                    "error": {"type": "string", "examples": ["unauthorized"]},
                    "message": {"type": "string"},
                    "request_id": {"type": "string"},
                },
            }
        },
        "responses": responses,
        "parameters": {
            REQUEST_ID: {
                "name": REQUEST_ID,
                "in": "header",
                "required": False,
                "description": "Kept when sane (up to 128 printable characters), else generated.",
                "schema": {"type": "string", "maxLength": 128},
            }
        },
        "headers": {
            REQUEST_ID: {
                "description": "The request's id (the client's or a generated one).",
                "schema": {"type": "string"},
            }
        },
    }


def build_document(
    table: RouteTable,
    docs: DocsSettings,
    upstream_docs: Mapping[str, Mapping[str, Any]] | None = None,
) -> JsonDict:
    """The OpenAPI 3.1 document of ``table``.

    ``upstream_docs`` maps an upstream name to its own (already fetched)
    OpenAPI document; routes to other upstreams are documented from config alone.
    """
    components = _base_components()
    schemes = security_schemes(table)
    if schemes:
        components["securitySchemes"] = schemes
    ctx = MergeContext(table, components, upstream_docs or {})
    paths: dict[str, JsonDict] = {}
    shapes: dict[str, str] = {}  # /a/{}/b -> the key used for that template
    operation_ids: set[str] = set()
    tags: dict[str, JsonDict] = {}
    for route in table.routes:
        for op in _route_operations(route, ctx):
            key = shapes.setdefault(_PARAM.sub("{}", op.path), op.path)
            if key != op.path:
                continue  # same template under other param names: the first route owns it
            item = paths.setdefault(op.path, {})
            method = op.method.lower()
            if method in item:
                continue
            item[method] = _finish(route, op, ctx, operation_ids)
            upstream = route.upstream.name
            tags.setdefault(
                upstream, {"name": upstream, "description": f"Routes to the {upstream} upstream."}
            )
    info: JsonDict = {"title": docs.title, "version": docs.version}
    info["description"] = docs.description or (
        f"Generated by aiogateway {__version__} from its route table. Errors the gateway "
        f"answers itself share the {ERROR_SCHEMA} schema; every response carries {REQUEST_ID}."
    )
    return {
        "openapi": OPENAPI_VERSION,
        "info": info,
        "tags": list(tags.values()),
        "paths": paths,
        "components": ctx.finish(),
    }


def _route_operations(route: Route, ctx: MergeContext) -> list[Operation]:
    merged = upstream_operations(route, ctx)
    if merged:
        return merged
    methods = _methods(route)
    if route.path is not None:
        path, params = route.path, _PARAM.findall(route.path)
        return [Operation(path, m, None, params) for m in methods if ctx.routes_to(route, m, path)]
    prefix = route.prefix or "/"
    path = "/{path}" if prefix == "/" else f"{prefix}/{{path}}"
    return [Operation(path, m, None, ["path"], catch_all=True) for m in methods]


def _methods(route: Route) -> list[str]:
    if route.methods is None:
        return list(COMMON_METHODS)
    return [m for m in _OPENAPI_METHODS if m in route.methods]


def _finish(route: Route, op: Operation, ctx: MergeContext, ids: set[str]) -> JsonDict:
    """The operation object: the upstream's (renamed) or a generic one, plus gateway parts."""
    out: JsonDict = dict(op.upstream) if op.upstream is not None else {}
    out["tags"] = [route.upstream.name]
    if op.upstream is None:
        out["summary"] = route.name
        out["description"] = _generic_description(route, op)
    out["operationId"] = _operation_id(route, op, out.get("operationId"), ids)
    out["parameters"] = _parameters(route, op, out.get("parameters", []), ctx.table)
    if op.upstream is None and op.method in _BODY_METHODS:
        out["requestBody"] = {
            "required": False,
            "description": "Streamed to the upstream unchanged.",
            "content": {"*/*": {"schema": {}}},
        }
    security = _chain_security(route)
    if security is not None:
        out["security"] = security
    responses: JsonDict = dict(out.get("responses") or {})
    default = responses.pop("default", None)
    if not responses and default is None:
        default = {"description": "The upstream's response, streamed unchanged."}
    for status in _gateway_statuses(route, op, security is not None):
        # The upstream's own description of a status wins: it is the more specific.
        responses.setdefault(
            str(status), {"$ref": f"#/components/responses/{ERROR_RESPONSES[status][0]}"}
        )
    if default is not None:
        responses["default"] = default
    out["responses"] = {status: _with_request_id(r) for status, r in responses.items()}
    return out


def _with_request_id(response: Any) -> Any:
    """The response with the X-Request-ID header the gateway adds to every response."""
    if not isinstance(response, dict) or "$ref" in response:
        return response  # a reference: siblings are not allowed (ours carry it already)
    headers = dict(response.get("headers") or {})
    if not any(h.lower() == REQUEST_ID.lower() for h in headers):
        headers[REQUEST_ID] = {"$ref": f"#/components/headers/{REQUEST_ID}"}
    return {**response, "headers": headers}


def _generic_description(route: Route, op: Operation) -> str:
    if op.catch_all:
        target = "the rest of the path" if route.strip_prefix else "the full path"
        return (
            f"Any path below {route.prefix} ({{path}} may contain '/'), "
            f"forwarded to the {route.upstream.name} upstream with {target}."
        )
    target = route.upstream_path or route.path or ""
    return f"Forwarded to the {route.upstream.name} upstream as {target}."


def _gateway_statuses(route: Route, op: Operation, authenticated: bool) -> list[int]:
    statuses = [401, 403] if authenticated else []
    if op.catch_all:
        statuses.append(404)
    if route.max_body_bytes and op.method in _BODY_METHODS:
        statuses.append(413)
    return [*statuses, 502, 504]


def _operation_id(route: Route, op: Operation, upstream_id: Any, ids: set[str]) -> str:
    if isinstance(upstream_id, str) and upstream_id:
        base = upstream_id if upstream_id not in ids else f"{route.upstream.name}_{upstream_id}"
    else:
        base = component_name(route.name).replace("-", "_").replace(".", "_")
        if route.methods is None or len(route.methods) > 1 or op.catch_all:
            base = f"{base}_{op.method.lower()}"
    candidate, n = base, 2
    while candidate in ids:
        candidate, n = f"{base}_{n}", n + 1
    ids.add(candidate)
    return candidate


def _parameters(route: Route, op: Operation, given: list[Any], table: RouteTable) -> list[Any]:
    """The upstream's parameters minus what the gateway sets, plus path and X-Request-ID."""
    # Headers a client cannot send through: identity headers (stripped on every
    # route) and those the chain consumes (a service key).
    dropped = route.chain.strip_headers | table.identity_headers_b
    out: list[Any] = []
    have_path: set[str] = set()
    have_request_id = False
    for p in given:
        if isinstance(p, dict) and p.get("in") == "header":
            name = str(p.get("name", ""))
            if name.lower().encode("latin-1", "replace") in dropped:
                continue  # stripped or set by the gateway: a client cannot send it
            have_request_id = have_request_id or name.lower() == REQUEST_ID.lower()
        if isinstance(p, dict) and p.get("in") == "path":
            if p.get("name") not in op.params:
                continue
            have_path.add(str(p.get("name")))
        out.append(p)
    for name in op.params:
        if name not in have_path:
            param: JsonDict = {"name": name, "in": "path", "required": True}
            param["schema"] = {"type": "string"}
            if op.catch_all:
                param["description"] = "The rest of the path below the prefix."
            out.append(param)
    if not have_request_id:
        out.append({"$ref": f"#/components/parameters/{REQUEST_ID}"})
    return out
