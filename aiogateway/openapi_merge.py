"""Merge an upstream's own OpenAPI document into the gateway's.

For each route whose upstream published a document, the operations the route
really reaches are taken from it, under the gateway's paths:

- a ``path`` route: the upstream path it forwards to (``upstream_path`` or
  the same template), matched segment by segment, the upstream's path
  parameters renamed to the route's;
- a ``prefix`` route: every upstream path below the prefix (or, with
  ``strip_prefix``, every upstream path, put below the prefix);

and only where the gateway's router sends that method and path to this very
route (an exact route elsewhere in the table wins, as it does for requests).
Upstream operations the gateway does not route are left out.

Components those operations reference (transitively) are copied once, renamed
``<upstream>_<Name>`` when the name is taken by the gateway's own components
or another upstream's; every ``$ref`` (and discriminator mapping) is rewritten.
OpenAPI 3.0 documents are upgraded to 3.1 schemas (``nullable``, boolean
``exclusiveMinimum``) by :func:`normalize_document` when fetched.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .routes import Route, RouteTable

__all__ = ["MergeContext", "Operation", "normalize_document", "upstream_operations"]

JsonDict = dict[str, Any]

# Plugin types whose presence in a chain replaces the upstream's own security.
AUTH_TYPES = frozenset({"jwt-check", "service-key"})
OPERATION_KEYS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PARAM = re.compile(r"\{([^{}]*)\}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_COMPONENT_REF = re.compile(r"^#/components/([^/]+)/([^/]+)(/.*)?$")


@dataclass
class Operation:
    """One operation to document: gateway path, method, the upstream's operation if any."""

    path: str
    method: str  # upper case
    upstream: JsonDict | None  # the upstream's operation, refs rewritten, params renamed
    params: list[str]  # names of the path's {params}
    catch_all: bool = False


def normalize_document(doc: Any) -> JsonDict:
    """Check a fetched document and upgrade OpenAPI 3.0 schemas to 3.1; ValueError if unusable."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    version = doc.get("openapi")
    if not isinstance(version, str) or not version.startswith(("3.0", "3.1")):
        found = version if version is not None else doc.get("swagger")
        raise ValueError(f"unsupported OpenAPI version {found!r} (3.0 and 3.1 are supported)")
    if not isinstance(doc.get("paths", {}), dict):
        raise ValueError("'paths' is not an object")
    out: JsonDict = doc
    if version.startswith("3.0"):
        out = copy.deepcopy(doc)
        _upgrade(out)
    return out


def _upgrade(node: Any) -> None:
    """3.0 schema keywords to their JSON Schema 2020-12 (OpenAPI 3.1) forms, in place."""
    if isinstance(node, list):
        for item in node:
            _upgrade(item)
        return
    if not isinstance(node, dict):
        return
    if isinstance(node.get("nullable"), bool) and node.pop("nullable"):
        kind = node.get("type")
        if isinstance(kind, str):
            node["type"] = [kind, "null"]
        if isinstance(node.get("enum"), list) and None not in node["enum"]:
            node["enum"].append(None)
        if kind is None and "enum" not in node:  # e.g. allOf: [$ref], nullable
            inner = dict(node)
            node.clear()
            node["anyOf"] = [inner, {"type": "null"}]
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        # pop() runs whenever the keyword is a 3.0 boolean: false just goes away.
        if isinstance(node.get(bound), bool) and node.pop(bound) and limit in node:
            node[bound] = node.pop(limit)
    for value in node.values():
        _upgrade(value)


class MergeContext:
    """Upstream documents of one build, and the components their operations pull in."""

    def __init__(
        self, table: RouteTable, components: JsonDict, docs: Mapping[str, Mapping[str, Any]]
    ) -> None:
        self.table = table
        self.components = components
        self.docs = docs
        self._names: dict[tuple[str, str, str], str] = {}  # (upstream, section, name) -> name
        self._taken = {(s, n) for s, items in components.items() for n in items}
        self._pending: list[tuple[str, str, str]] = []
        self._shapes: dict[str, dict[str, str]] = {}  # upstream -> path shape -> path

    def routes_to(self, route: Route, method: str, path: str) -> bool:
        """Whether the router sends ``method path`` (a template) to ``route``."""
        match = self.table.router.match(method, path)
        return not isinstance(match, frozenset) and match is not None and match[0] is route

    def shape_index(self, upstream: str) -> dict[str, str]:
        index = self._shapes.get(upstream)
        if index is None:
            paths = self.docs[upstream].get("paths") or {}
            index = {}
            for path in paths:
                index.setdefault(_PARAM.sub("{}", path), path)
            self._shapes[upstream] = index
        return index

    def name_for(self, upstream: str, section: str, name: str) -> str:
        key = (upstream, section, name)
        new = self._names.get(key)
        if new is None:
            new = name
            if (section, new) in self._taken:
                base = _UNSAFE.sub("_", f"{upstream}_{name}").strip("_")
                new, n = base, 2
                while (section, new) in self._taken:
                    new, n = f"{base}_{n}", n + 1
            self._taken.add((section, new))
            self._names[key] = new
            self._pending.append(key)
        return new

    def rewrite(self, upstream: str, node: Any) -> Any:
        """A copy of ``node`` with every local component reference renamed."""
        if isinstance(node, list):
            return [self.rewrite(upstream, v) for v in node]
        if not isinstance(node, dict):
            return node
        out: JsonDict = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                out[key] = self._ref(upstream, value)
            elif key == "discriminator" and isinstance(value, dict):
                out[key] = self._discriminator(upstream, value)
            else:
                out[key] = self.rewrite(upstream, value)
        return out

    def _ref(self, upstream: str, ref: str) -> str:
        m = _COMPONENT_REF.match(ref)
        if m is None:
            return ref
        section, name, rest = m.group(1), _unescape(m.group(2)), m.group(3) or ""
        return f"#/components/{section}/{_escape(self.name_for(upstream, section, name))}{rest}"

    def _discriminator(self, upstream: str, value: JsonDict) -> JsonDict:
        out = dict(value)
        mapping = value.get("mapping")
        if isinstance(mapping, dict):
            out["mapping"] = {
                k: (
                    self._ref(upstream, v)
                    if v.startswith("#")
                    else self.name_for(upstream, "schemas", v)
                )
                if isinstance(v, str)
                else v
                for k, v in mapping.items()
            }
        return out

    def resolve(self, upstream: str, node: Any) -> Any:
        """Follow a local ``$ref`` (parameters are inlined to be inspected and renamed)."""
        seen = 0
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 16:
            m = _COMPONENT_REF.match(node["$ref"])
            if m is None or m.group(3):
                return node
            found = (self.docs[upstream].get("components") or {}).get(m.group(1), {})
            node = found.get(_unescape(m.group(2)), node) if isinstance(found, dict) else node
            seen += 1
        return node

    def finish(self) -> JsonDict:
        """The gateway's components plus every upstream component referenced so far."""
        while self._pending:
            upstream, section, name = self._pending.pop(0)
            source = (self.docs[upstream].get("components") or {}).get(section) or {}
            if not isinstance(source, dict) or name not in source:
                continue  # a dangling reference stays dangling, as upstream wrote it
            item = self.rewrite(upstream, source[name])
            self.components.setdefault(section, {})[self.name_for(upstream, section, name)] = item
        return self.components


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def upstream_operations(route: Route, ctx: MergeContext) -> list[Operation]:
    """The operations of the route's upstream document this route reaches (may be [])."""
    upstream = route.upstream.name
    doc = ctx.docs.get(upstream)
    if doc is None:
        return []
    paths = doc.get("paths") or {}
    found: list[Operation] = []
    if route.path is not None:
        target = route.upstream_path or route.path
        source = ctx.shape_index(upstream).get(_PARAM.sub("{}", target))
        if source is None or not isinstance(paths.get(source), dict):
            return []
        renames = dict(zip(_PARAM.findall(source), _PARAM.findall(target), strict=True))
        found = _operations(route, ctx, route.path, paths[source], renames)
    elif route.upstream_path is None:
        for source, item in paths.items():
            if not isinstance(item, dict) or not isinstance(source, str):
                continue
            path = _gateway_path(route, source)
            if path is not None:
                found.extend(_operations(route, ctx, path, item, {}))
    return found


def _gateway_path(route: Route, source: str) -> str | None:
    """Where the upstream path ``source`` is reached below a prefix route, if it is."""
    prefix = route.prefix or "/"
    if route.strip_prefix:
        if prefix == "/":
            return source
        return prefix if source == "/" else prefix + source
    if prefix in ("/", source) or source.startswith(prefix + "/"):
        return source
    return None


def _operations(
    route: Route, ctx: MergeContext, path: str, item: JsonDict, renames: dict[str, str]
) -> list[Operation]:
    upstream = route.upstream.name
    doc = ctx.docs[upstream]
    params = _PARAM.findall(path)
    shared = [ctx.resolve(upstream, p) for p in item.get("parameters") or []]
    out: list[Operation] = []
    for key in OPERATION_KEYS:
        op = item.get(key)
        method = key.upper()
        if not isinstance(op, dict):
            continue
        if route.methods is not None and method not in route.methods:
            continue
        if not ctx.routes_to(route, method, path):
            continue
        own = [ctx.resolve(upstream, p) for p in op.get("parameters") or []]
        merged = _merge_parameters(shared, own, renames)
        body = {k: v for k, v in op.items() if k not in ("servers", "parameters", "security")}
        body["parameters"] = merged
        security = op.get("security", doc.get("security"))
        auth = any(type(p).type_name in AUTH_TYPES for p in route.chain.plugins)
        if security is not None and not auth:
            body["security"] = [
                {ctx.name_for(upstream, "securitySchemes", n): s for n, s in req.items()}
                for req in security
                if isinstance(req, dict)
            ]
        out.append(Operation(path, method, ctx.rewrite(upstream, body), params))
    return out


def _merge_parameters(shared: list[Any], own: list[Any], renames: dict[str, str]) -> list[Any]:
    """Path-item parameters overridden by the operation's (by name and location)."""
    by_key: dict[tuple[str, str], Any] = {}
    for given in [*shared, *own]:
        if not isinstance(given, dict):
            continue
        name, where = str(given.get("name", "")), str(given.get("in", ""))
        param = given
        if where == "path" and name in renames:
            name = renames[name]
            param = {**given, "name": name}
        by_key[(name, where)] = param
    return list(by_key.values())
