"""The compiled route table: (method, normalised path) -> route, params.

Built once per config load; ``match`` is on every request's path, so it never
scans the routes. Fully static paths (the common case) are one dict lookup and
one per-method lookup. Paths with ``{param}`` segments live in a segment trie
walked depth-first, a static segment before ``{param}`` at each level, with
backtracking; prefixes live in a second trie of static segments. Every step is
a dict lookup keyed by the request's own segment, so the cost follows the
path's depth, never the number of routes.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError
from .pathnorm import BadPath, normalize_path, resolve_path
from .routes import Route

__all__ = ["Match", "Router"]


# A routed request: its route and ``{param}`` values (decoded segments). A plain
# tuple: a NamedTuple's __new__ is a Python call, ~2.5 k instructions per request.
Match = tuple[Route, dict[str, str]]


class _Target:
    """A route as placed in the table, with where its params sit in the path."""

    __slots__ = ("params", "route")

    def __init__(self, route: Route, params: tuple[tuple[int, str], ...]) -> None:
        self.route = route
        self.params = params  # (segment index, param name) pairs

    def match(self, segments: list[str]) -> Match:
        params: dict[str, str] = {}  # a loop: cheaper than a comprehension on 3.11
        for i, name in self.params:
            params[name] = segments[i]
        return self.route, params


class _Slot:
    """The routes sharing one path template (or prefix), by method."""

    __slots__ = ("any", "by_method", "methods", "targets")

    def __init__(self) -> None:
        self.by_method: dict[str, _Target] = {}
        self.any: _Target | None = None  # the route allowing every method
        self.methods: set[str] = set()
        self.targets: list[_Target] = []

    def add(self, target: _Target) -> None:
        route = target.route
        for other in self.targets:
            theirs = other.route.methods
            if route.methods is None or theirs is None or route.methods & theirs:
                both = (
                    "every method"
                    if route.methods is None or theirs is None
                    else "methods " + ", ".join(sorted(route.methods & theirs))
                )
                raise ConfigError(
                    f"route {route.name!r} ({route.pattern}) conflicts with route "
                    f"{other.route.name!r} (routes[{other.route.index}], "
                    f"{other.route.pattern}): same path, both allow {both}",
                    location=f"routes[{route.index}]",
                )
        self.targets.append(target)
        if route.methods is None:
            self.any = target
        else:
            self.methods |= route.methods
            for method in route.methods:
                self.by_method[method] = target


class _Node:
    """One level of a segment trie (param paths, or prefixes)."""

    __slots__ = ("param", "slot", "static")

    def __init__(self) -> None:
        self.static: dict[str, _Node] = {}
        self.param: _Node | None = None  # child for any non-empty segment
        self.slot: _Slot | None = None  # templates ending here


def _find(root: _Node, segments: list[str], method: str, misses: list[_Slot]) -> _Target | None:
    """Depth-first over the trie, a static child before the param child; the
    first target allowing ``method`` wins. Slots that matched the path but not
    the method go to ``misses`` (for the 405's Allow). A node's depth fixes
    its segment index, so each node is visited at most once per call."""
    end = len(segments)
    node = root
    i = 0
    pending: list[tuple[_Node, int]] = []  # param branches not taken yet
    while True:
        if i == end:
            slot = node.slot
            if slot is not None:
                target = slot.by_method.get(method) or slot.any
                if target is not None:
                    return target
                misses.append(slot)
        else:
            segment = segments[i]
            i += 1
            child = node.static.get(segment)
            param = node.param if segment else None  # a param is never empty
            if child is not None:
                if param is not None:
                    pending.append((param, i))
                node = child
                continue
            if param is not None:
                node = param
                continue
        if not pending:
            return None
        node, i = pending.pop()


class Router:
    """Routes compiled for matching; raises ConfigError on conflicting routes.

    Precedence: an exact static path, then ``{param}`` paths (a static segment
    beats a param at each level, backtracking when the static branch fails),
    then the longest matching prefix. A prefix ``/a`` matches ``/a``, ``/a/``
    and ``/a/x/y`` but not ``/ab``; the prefix ``/`` matches every path.
    Candidates are tried in that order and the first whose methods include
    the request's method wins.

    Paths match exactly, trailing slash included: ``/a`` and ``/a/`` are
    different paths (a ``/a/`` request can still reach a prefix route ``/a``).

    Methods compare exactly (upper case, as config stores them). ``HEAD`` is
    not implied by ``GET``: a route serving both lists both, so what reaches
    the upstream is exactly what config allows.

    Two routes with the same path template (same static segments and params
    in the same places, whatever their names) or the same prefix must not
    share a method (a route without ``methods`` shares them all).
    """

    __slots__ = ("_prefixes", "_static", "_trie")

    def __init__(self, routes: Sequence[Route]) -> None:
        self._static: dict[str, _Slot] = {}
        self._trie: _Node | None = None  # {param} paths
        self._prefixes: _Node | None = None  # prefixes, static segments only
        for route in routes:
            self._add(route)

    def _add(self, route: Route) -> None:
        if route.prefix is not None:
            prefix = _normal(route, route.prefix, "prefix")
            if prefix != "/":
                prefix = prefix.rstrip("/")
            if "{" in prefix or "}" in prefix:
                raise ConfigError(
                    f"prefix {route.prefix!r} cannot hold {{params}}; use 'path'",
                    location=f"routes[{route.index}].prefix",
                )
            if self._prefixes is None:
                self._prefixes = _Node()
            node = self._prefixes
            for segment in prefix[1:].split("/") if prefix != "/" else ():
                node = node.static.setdefault(segment, _Node())
            if node.slot is None:
                node.slot = _Slot()
            node.slot.add(_Target(route, ()))
            return
        if route.path is None:
            raise ConfigError("a route needs 'path' or 'prefix'", location=f"routes[{route.index}]")
        path = _normal(route, route.path, "path")
        segments = path[1:].split("/")
        params: list[tuple[int, str]] = []
        for i, segment in enumerate(segments):
            if segment.startswith("{") and segment.endswith("}"):
                name = segment[1:-1]
                if not name.isidentifier():
                    raise ConfigError(
                        f"{{param}} name {name!r} must be an identifier",
                        location=f"routes[{route.index}].path",
                    )
                if any(name == known for _, known in params):
                    raise ConfigError(
                        f"{{param}} {name!r} appears twice", location=f"routes[{route.index}].path"
                    )
                params.append((i, name))
            elif "{" in segment or "}" in segment:
                raise ConfigError(
                    f"a {{param}} must be a whole segment, not {segment!r}",
                    location=f"routes[{route.index}].path",
                )
        if not params:
            self._static.setdefault(path, _Slot()).add(_Target(route, ()))
            return
        if self._trie is None:
            self._trie = _Node()
        node = self._trie
        at = dict(params)
        for i, segment in enumerate(segments):
            if i in at:
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                node = node.static.setdefault(segment, _Node())
        if node.slot is None:
            node.slot = _Slot()
        node.slot.add(_Target(route, tuple(params)))

    def match(self, method: str, path: str) -> Match | frozenset[str] | None:
        """The route for ``method`` on the normalised ``path``.

        Returns a ``Match`` (route, params); or the methods the path allows (a frozenset:
        the core answers 405 with ``Allow``) when routes match the path but
        none allows ``method``; or None (404) when no route matches the path.
        """
        slot = self._static.get(path)
        if slot is not None:
            target = slot.by_method.get(method) or slot.any
            if target is not None:
                return target.route, {}
            misses = [slot]
        else:
            misses = []
        if self._trie is not None or self._prefixes is not None:
            segments = path[1:].split("/")
            if self._trie is not None:
                target = _find(self._trie, segments, method, misses)
                if target is not None:
                    return target.match(segments)
            if self._prefixes is not None:
                target = _find_prefix(self._prefixes, segments, method, misses)
                if target is not None:
                    return target.route, {}
        if misses:
            return frozenset(m for slot in misses for m in slot.methods)
        return None


def _find_prefix(
    root: _Node, segments: list[str], method: str, misses: list[_Slot]
) -> _Target | None:
    """The longest prefix allowing ``method``: walk down the path's segments
    (stopping where no prefix continues), then try the prefixes seen, longest
    first. A trailing slash's empty segment never matches a child, so ``/a/``
    is under prefix ``/a`` like ``/a/b`` is."""
    seen = [root.slot] if root.slot is not None else []
    node = root
    for segment in segments:
        child = node.static.get(segment)
        if child is None:
            break
        node = child
        if node.slot is not None:
            seen.append(node.slot)
    for slot in reversed(seen):
        target = slot.by_method.get(method) or slot.any
        if target is not None:
            return target
        misses.append(slot)
    return None


def _normal(route: Route, written: str, key: str) -> str:
    """``written`` checked to be a path a request can arrive as.

    Requests are matched once normalised (decoded, no ``//``, no dot
    segments), so a template must be written that way too; otherwise it could
    never match. Percent-escapes are refused rather than decoded so that a
    route's path/prefix is the very string matched (``strip_prefix`` relies on
    it) and ``%20`` never quietly means a literal ``%20``.
    """
    where = f"routes[{route.index}].{key}"
    if "%" in written:
        try:
            hint = f"; write it decoded: {normalize_path(written)!r}"
        except BadPath:
            hint = ""
        raise ConfigError(
            f"{written!r} holds a percent-escape, but routes match decoded paths{hint}",
            location=where,
        )
    path = resolve_path(written)
    if path != written:
        raise ConfigError(
            f"{written!r} is not a normalised path (requests for it arrive as {path!r})",
            location=where,
        )
    return path
