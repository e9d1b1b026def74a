"""Fuzz targets: path normalisation + routing, and header processing.

Each target is a hypothesis test (``@given``) checking invariants that must
hold for any input, so it runs three ways: in pytest as a short smoke test
(tests/test_hostile_paths.py, tests/test_hostile_http.py), for a bounded time
under ``make fuzz`` (fuzz/run.py feeds random buffers to
``target.hypothesis.fuzz_one_input``), and under atheris when it is installed
(``python fuzz/run.py --atheris``).

Invariants:

* ``normalize_path``: raises only BadPath; the result starts with ``/``, holds no
  ``//``, no ``.``/``..`` segment, no control character; it is a fixed point of
  ``resolve_path`` and survives ``encode_path`` -> ``normalize_path`` unchanged
  (the upstream routes on what the gateway routed on); ``encode_path`` gives
  printable ASCII with no space, ``?`` or ``#``.
* ``Router.match`` agrees with a reference matcher written from the documented
  precedence (exact path, then ``{param}`` paths with static segments first,
  then the longest prefix; the first allowing the method), including the 405
  method sets and the params it extracts.
* ``upstream_request_headers``: no hop-by-hop, framing, identity or
  Connection-listed header from the client survives; the gateway's own
  X-Forwarded-*/X-Request-ID appear exactly once; everything else passes in
  order, byte for byte. ``response_headers`` and ``request_id_from`` likewise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from aiogateway.chain import EMPTY_CHAIN
from aiogateway.errors import ConfigError
from aiogateway.headers import (
    HOP_BY_HOP,
    REQUEST_DROP,
    RESPONSE_DROP,
    connection_tokens,
    request_id_from,
    response_headers,
    upstream_request_headers,
)
from aiogateway.pathnorm import BadPath, encode_path, normalize_path, resolve_path
from aiogateway.router import Router
from aiogateway.routes import Route

__all__ = [
    "TARGETS",
    "fuzz_headers",
    "fuzz_normalize_path",
    "fuzz_response_headers",
    "fuzz_router",
]

FUZZ = settings(
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=list(HealthCheck),
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# -- paths ---------------------------------------------------------------------------

path_atoms = st.sampled_from(
    ["/", "/", "/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%25", "%", "%0", "%00", "%c0%ae",
     "%ff", "%e2%80%8f", "a", "b", "v1", "auth", "validate", "{x}", "?", "#", ";", "\\", " ",
     "\t", "é", "\udcff", "~", "%7e", "%252e", "//", "/./", "/../"]
)  # fmt: skip
raw_paths = st.one_of(
    st.lists(path_atoms, max_size=12).map("".join),
    st.text(max_size=40),
    st.lists(path_atoms, max_size=12).map(lambda a: "/" + "".join(a)),
)


@FUZZ
@given(raw=raw_paths)
def fuzz_normalize_path(raw: str) -> None:
    try:
        path = normalize_path(raw)
    except BadPath:
        return
    assert path.startswith("/"), (raw, path)
    assert "//" not in path, (raw, path)
    segments = path.split("/")
    assert not {".", ".."} & set(segments), (raw, path)
    assert _CONTROL.search(path) is None, (raw, path)
    assert resolve_path(path) == path, (raw, path)
    encoded = encode_path(path)
    assert encoded.isascii(), (raw, encoded)
    assert encoded.isprintable(), (raw, encoded)
    assert not set(encoded) & {" ", "?", "#"}, (raw, encoded)
    # The upstream decodes once more: it must land on the very same path.
    assert normalize_path(encoded) == path, (raw, path, encoded)


# -- router --------------------------------------------------------------------------

SEGMENTS = ["a", "b", "c", "{p}", "{q}"]
METHODS = ["GET", "POST", "DELETE"]


@dataclass(frozen=True)
class RouteSpec:
    path: str | None
    prefix: str | None
    methods: frozenset[str] | None


def _spec(segs: list[str], is_prefix: bool, methods: list[str] | None) -> RouteSpec:
    if is_prefix:
        path = None
        prefix = "/" + "/".join(s for s in segs if "{" not in s)
    else:
        # Param names unique within the template ({p0}, {p1}...).
        named = [f"{{p{i}}}" if s.startswith("{") else s for i, s in enumerate(segs)]
        path, prefix = "/" + "/".join(named), None
    return RouteSpec(path, prefix, None if methods is None else frozenset(methods))


route_specs = st.builds(
    _spec,
    st.lists(st.sampled_from(SEGMENTS), max_size=4),
    st.booleans(),
    st.one_of(st.none(), st.lists(st.sampled_from(METHODS), min_size=1, unique=True)),
)


def build_routes(specs: list[RouteSpec]) -> list[Route]:
    routes = []
    for i, spec in enumerate(specs):
        routes.append(
            Route(
                name=f"r{i}",
                methods=spec.methods,
                path=spec.path,
                prefix=spec.prefix,
                upstream=None,  # type: ignore[arg-type]
                chain=EMPTY_CHAIN,
                strip_prefix=False,
                upstream_path=None,
                max_body_bytes=0,
                websocket=False,
                event=None,
                settings=None,  # type: ignore[arg-type]
                index=i,
            )
        )
    return routes


def reference_params(template: str, path: str) -> dict[str, str] | None:
    t = template[1:].split("/")
    p = path[1:].split("/")
    if len(t) != len(p):
        return None
    params = {}
    for ts, ps in zip(t, p, strict=True):
        if ts.startswith("{"):
            if not ps:
                return None
            params[ts[1:-1]] = ps
        elif ts != ps:
            return None
    return params


def prefix_matches(prefix: str, path: str) -> bool:
    base = prefix.rstrip("/")
    return prefix == "/" or path == base or path.startswith(base + "/")


def allows(route: Route, method: str) -> bool:
    return route.methods is None or method in route.methods


def reference_match(
    routes: list[Route], method: str, path: str
) -> tuple[Route | None, frozenset[str], bool]:
    """(winner, methods of the path's routes, any route matches the path)."""
    static = [r for r in routes if r.path is not None and "{" not in r.path and r.path == path]
    params = [
        r
        for r in routes
        if r.path is not None and "{" in r.path and reference_params(r.path, path) is not None
    ]
    prefixes = [r for r in routes if r.prefix is not None and prefix_matches(r.prefix, path)]
    matching = static + params + prefixes
    methods = frozenset(m for r in matching if r.methods for m in r.methods)
    for r in static:
        if allows(r, method):
            return r, methods, True
    ok = [r for r in params if allows(r, method)]
    if ok:
        # Static segments beat params level by level: the smallest kind sequence wins.
        def kinds(r: Route) -> tuple[int, ...]:
            return tuple(1 if s.startswith("{") else 0 for s in (r.path or "")[1:].split("/"))

        return min(ok, key=kinds), methods, True
    ok = [r for r in prefixes if allows(r, method)]
    if ok:
        return max(ok, key=lambda r: len((r.prefix or "").rstrip("/"))), methods, True
    return None, methods, bool(matching)


@FUZZ
@given(
    specs=st.lists(route_specs, max_size=8),
    raw=st.one_of(
        st.lists(st.sampled_from(["a", "b", "c", "d", "", ".", "..", "%61"]), max_size=5).map(
            lambda s: "/" + "/".join(s)
        ),
        raw_paths,
    ),
    method=st.sampled_from(METHODS),
)
def fuzz_router(specs: list[RouteSpec], raw: str, method: str) -> None:
    routes = build_routes(specs)
    try:
        router = Router(routes)
    except ConfigError:
        assume(False)  # conflicting or ill-formed routes: config rejects them
        return
    try:
        path = normalize_path(raw)
    except BadPath:
        return
    got = router.match(method, path)
    winner, methods, any_match = reference_match(routes, method, path)
    if winner is None:
        if any_match:
            assert got == methods, (specs, path, method, got, methods)
        else:
            assert got is None, (specs, path, method, got)
        return
    assert isinstance(got, tuple), (specs, path, method, got)
    route, params = got
    assert route is winner, (specs, path, method, route.name, winner.name)
    if winner.path is not None:
        assert params == reference_params(winner.path, path)
    else:
        assert params == {}


# -- headers -------------------------------------------------------------------------

header_names = st.one_of(
    st.sampled_from(
        [b"Host", b"Connection", b"connection", b"Keep-Alive", b"TE", b"Trailer",
         b"Transfer-Encoding", b"Upgrade", b"Proxy-Authorization", b"Proxy-Connection",
         b"Content-Length", b"Expect", b"X-Request-ID", b"X-Forwarded-For",
         b"X-Forwarded-Proto", b"X-Forwarded-Host", b"X-User-Id", b"x-user-id", b"X-USER-ID",
         b"X-Org-Id", b"X_User_Id", b"X-Forwarded_For", b"X-Custom", b"Accept", b"Cookie",
         b"Authorization", b"X-Service-Key"]
    ),
    st.from_regex(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}", fullmatch=True),
)  # fmt: skip
header_values = st.one_of(
    st.sampled_from(
        [b"", b"close", b"keep-alive, X-Custom", b"X-Custom, x-user-id", b"Upgrade, TE",
         b" X-Custom ,, accept ", b"chunked", b"1.2.3.4", b"a\xffb"]
    ),
    st.binary(max_size=20).filter(lambda v: b"\r" not in v and b"\n" not in v),
)  # fmt: skip
IDENTITY = frozenset({b"x-user-id", b"x-org-id"})
OWN = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}


@FUZZ
@given(
    raw=st.lists(st.tuples(header_names, header_values), max_size=12),
    client_ip=st.sampled_from(["127.0.0.1", "::1", "10.0.0.7"]),
    request_id=st.text(max_size=140),
    chain_strip=st.sets(st.sampled_from([b"x-service-key", b"authorization"])),
)
def fuzz_headers(
    raw: list[tuple[bytes, bytes]], client_ip: str, request_id: str, chain_strip: set[bytes]
) -> None:
    rid = request_id_from(request_id)
    assert len(rid) <= 128
    assert rid.isascii()
    assert rid.isprintable()
    assert rid
    if 0 < len(request_id) <= 128 and request_id.isascii() and request_id.isprintable():
        assert rid == request_id
    listed = connection_tokens(raw)
    assert all(t and t == t.strip().lower() for t in listed)

    drop = REQUEST_DROP | IDENTITY | frozenset(chain_strip)
    extra = [("X-User-Id", "user-1")]
    out = upstream_request_headers(
        raw, drop, client_ip=client_ip, proto="http", request_id=rid, extra=extra
    )
    names = [n.lower() for n, _ in out]
    # The gateway's own headers, exactly once, at the end.
    for own in (b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"):
        assert names.count(own) == 1, (raw, out)
    hosts = [v for n, v in raw if n.lower() == b"host"]
    assert names.count(b"x-forwarded-host") == (1 if hosts and hosts[-1] else 0)
    assert names.count(b"x-user-id") == 1
    assert out[-1] == (b"X-User-Id", b"user-1")
    assert dict((n.lower(), v) for n, v in out)[b"x-request-id"] == rid.encode()
    xff = dict((n.lower(), v) for n, v in out)[b"x-forwarded-for"]
    assert xff.split(b", ")[-1] == client_ip.encode()
    # Nothing the client sent that must be dropped survives; everything else does, in order.
    passed = [(n, v) for n, v in out if n.lower() not in OWN and n.lower() != b"x-user-id"]
    expected = [
        (n, v)
        for n, v in raw
        # Underscore spellings too: CGI/WSGI upstreams read X_User_Id as X-User-Id.
        if n.lower().replace(b"_", b"-") not in drop and n.lower() not in listed
    ]
    assert passed == expected, (raw, out)
    assert not {n.lower() for n, _ in passed} & (HOP_BY_HOP | IDENTITY | chain_strip)


@FUZZ
@example(raw=[(b"X-Request-ID", b"upstream-id")], request_id="gateway-id")
@example(raw=[(b"Connection", b"X-Request-ID")], request_id="gateway-id")
@given(
    raw=st.lists(st.tuples(header_names, header_values), max_size=12),
    request_id=st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
)
def fuzz_response_headers(raw: list[tuple[bytes, bytes]], request_id: str) -> None:
    listed = connection_tokens(raw)
    resp = response_headers(raw, request_id)
    assert resp.getall("X-Request-ID", []) == [request_id], (raw, list(resp.items()))
    resp_names = {k.lower().encode("latin-1") for k in resp}
    assert not resp_names & (RESPONSE_DROP | listed) - {b"x-request-id"}
    kept = [
        (n.decode("latin-1"), v.decode("latin-1"))
        for n, v in raw
        if n.lower() not in RESPONSE_DROP and n.lower() not in listed
        and n.lower() != b"x-request-id"
    ]  # fmt: skip
    assert [(k, v) for k, v in resp.items() if k.lower() != "x-request-id"] == kept


TARGETS = {
    "normalize_path": fuzz_normalize_path,
    "router": fuzz_router,
    "headers": fuzz_headers,
    "response_headers": fuzz_response_headers,
}
