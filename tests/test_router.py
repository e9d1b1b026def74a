"""Router: static, params, prefixes, precedence, 404/405, conflicts, and paths
reached through any encoding (routing on the normalised path)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiogateway.chain import EMPTY_CHAIN
from aiogateway.errors import ConfigError
from aiogateway.pathnorm import encode_path, normalize_path
from aiogateway.router import Router
from aiogateway.routes import Route
from aiogateway.settings import RouteSettings
from aiogateway.upstream import UpstreamPool

UPSTREAM = cast(UpstreamPool, object())


def route(
    index: int,
    *,
    path: str | None = None,
    prefix: str | None = None,
    methods: Iterable[str] | None = None,
    name: str | None = None,
) -> Route:
    meths = frozenset(methods) if methods is not None else None
    return Route(
        name=name or f"r{index}",
        methods=meths,
        path=path,
        prefix=prefix,
        upstream=UPSTREAM,
        chain=EMPTY_CHAIN,
        strip_prefix=False,
        upstream_path=None,
        max_body_bytes=0,
        websocket=True,
        event=None,
        settings=RouteSettings.model_construct(upstream="dummy"),
        index=index,
    )


def build(*specs: dict[str, object]) -> tuple[Router, list[Route]]:
    routes = [route(i, **spec) for i, spec in enumerate(specs)]  # type: ignore[arg-type]
    return Router(routes), routes


class Hit(NamedTuple):
    route: Route
    params: dict[str, str]


def hit(router: Router, method: str, path: str) -> Hit:
    result = router.match(method, path)
    assert isinstance(result, tuple), result
    return Hit(*result)


def test_static_paths() -> None:
    router, (up, root) = build(
        {"path": "/v1/client/sign-up", "methods": ["POST"]}, {"path": "/", "methods": ["GET"]}
    )
    assert hit(router, "POST", "/v1/client/sign-up") == (up, {})
    assert hit(router, "GET", "/") == (root, {})
    assert router.match("POST", "/v1/client/sign-up/x") is None
    assert router.match("POST", "/v1/client") is None


def test_params_are_decoded_segments() -> None:
    router, (rm,) = build({"path": "/v1/org/{id}/member/{user_id}", "methods": ["DELETE"]})
    assert hit(router, "DELETE", "/v1/org/42/member/u-7") == (rm, {"id": "42", "user_id": "u-7"})
    raw = "/v1/org/a%20b/member/caf%C3%A9"
    assert hit(router, "DELETE", normalize_path(raw)).params == {"id": "a b", "user_id": "café"}
    assert router.match("DELETE", "/v1/org/42/member") is None
    assert router.match("DELETE", "/v1/org/42/member/7/x") is None


def test_param_needs_a_non_empty_segment() -> None:
    router, _ = build({"path": "/o/{id}"}, {"path": "/p/{id}/x"})
    assert router.match("GET", "/o/") is None
    assert router.match("GET", "/p//x") is None  # not normalised, but still no empty param


def test_prefix_boundaries() -> None:
    router, (billing,) = build({"prefix": "/v1/billing"})
    for path in ("/v1/billing", "/v1/billing/", "/v1/billing/x/y", "/v1/billing/x/"):
        assert hit(router, "PATCH", path) == (billing, {})
    for path in ("/v1/billingx", "/v1/billin", "/v1", "/", "/v2/billing"):
        assert router.match("GET", path) is None


def test_root_prefix_matches_everything() -> None:
    router, (catch,) = build({"prefix": "/"})
    for path in ("/", "/a", "/a/", "/a/b/c"):
        assert hit(router, "GET", path).route is catch


def test_prefix_written_with_trailing_slash() -> None:
    router, (r,) = build({"prefix": "/a/"})
    assert hit(router, "GET", "/a").route is r
    assert hit(router, "GET", "/a/b").route is r


def test_longest_prefix_wins_then_shorter_by_method() -> None:
    router, (v1, billing, root) = build(
        {"prefix": "/v1"}, {"prefix": "/v1/billing", "methods": ["GET"]}, {"prefix": "/"}
    )
    assert hit(router, "GET", "/v1/billing/x").route is billing
    assert hit(router, "POST", "/v1/billing/x").route is v1  # next candidate allows POST
    assert hit(router, "GET", "/v1x").route is root
    assert hit(router, "GET", "/v1/other").route is v1


def test_precedence_static_param_prefix() -> None:
    router, (static, param, prefix) = build(
        {"path": "/v1/org/invite"}, {"path": "/v1/org/{id}"}, {"prefix": "/v1/org"}
    )
    assert hit(router, "GET", "/v1/org/invite").route is static
    assert hit(router, "GET", "/v1/org/42") == (param, {"id": "42"})
    assert hit(router, "GET", "/v1/org/42/x").route is prefix
    assert hit(router, "GET", "/v1/org").route is prefix


def test_static_segment_beats_param_with_backtracking() -> None:
    router, (members, invite, deep_a, deep_b) = build(
        {"path": "/v1/org/{id}/members"},
        {"path": "/v1/org/invite/{code}"},
        {"path": "/a/b/{x}/c"},
        {"path": "/a/{y}/z/d"},
    )
    assert hit(router, "GET", "/v1/org/7/members") == (members, {"id": "7"})
    assert hit(router, "GET", "/v1/org/invite/xyz") == (invite, {"code": "xyz"})
    # Static "invite" wins at its level, so invite/{code} takes "members" too.
    assert hit(router, "GET", "/v1/org/invite/members") == (invite, {"code": "members"})
    assert hit(router, "GET", "/a/b/q/c") == (deep_a, {"x": "q"})
    # The static branch b/{x} fails at "d": back up and take {y}.
    assert hit(router, "GET", "/a/b/z/d") == (deep_b, {"y": "b"})


def test_method_miss_falls_through_to_next_candidate() -> None:
    router, (get_invite, delete_org, post_prefix) = build(
        {"path": "/v1/org/invite", "methods": ["GET"]},
        {"path": "/v1/org/{id}", "methods": ["DELETE"]},
        {"prefix": "/v1", "methods": ["POST"]},
    )
    assert hit(router, "GET", "/v1/org/invite").route is get_invite
    assert hit(router, "DELETE", "/v1/org/invite") == (delete_org, {"id": "invite"})
    assert hit(router, "POST", "/v1/org/invite").route is post_prefix
    assert router.match("PUT", "/v1/org/invite") == frozenset({"GET", "DELETE", "POST"})
    assert router.match("PUT", "/v1/org/9") == frozenset({"DELETE", "POST"})


def test_404_vs_405_and_allow_set() -> None:
    router, _ = build(
        {"path": "/items", "methods": ["GET", "HEAD"]},
        {"path": "/items", "methods": ["POST"]},
        {"path": "/items/{id}", "methods": ["GET"]},
    )
    assert router.match("DELETE", "/items") == frozenset({"GET", "HEAD", "POST"})
    assert router.match("DELETE", "/items/3") == frozenset({"GET"})
    assert router.match("GET", "/nothing") is None
    assert router.match("GET", "/items/3/4") is None


def test_head_is_not_implied_by_get() -> None:
    router, _ = build({"path": "/x", "methods": ["GET"]})
    assert router.match("HEAD", "/x") == frozenset({"GET"})


def test_method_any() -> None:
    router, (anything, post) = build({"path": "/any"}, {"path": "/p/{id}", "methods": ["POST"]})
    for method in ("GET", "HEAD", "OPTIONS", "DELETE", "PURGE"):
        assert hit(router, method, "/any").route is anything
    assert hit(router, "POST", "/p/1").route is post


def test_trailing_slash_is_part_of_the_path() -> None:
    router, (plain, slashed, _) = build({"path": "/a"}, {"path": "/b/"}, {"path": "/o/{id}"})
    assert hit(router, "GET", "/a").route is plain
    assert router.match("GET", "/a/") is None
    assert hit(router, "GET", "/b/").route is slashed
    assert router.match("GET", "/b") is None
    assert router.match("GET", "/o/5/") is None
    both, (p1, p2) = build({"path": "/o/{id}"}, {"path": "/o/{id}/"})
    assert hit(both, "GET", "/o/5").route is p1
    assert hit(both, "GET", "/o/5/").route is p2


def test_templates_are_written_decoded() -> None:
    router, (spaced,) = build({"path": "/files/a b/{name}"})
    assert hit(router, "GET", normalize_path("/files/a%20b/x%25y")) == (spaced, {"name": "x%y"})
    with pytest.raises(ConfigError, match="write it decoded: '/files/a b'"):
        build({"path": "/files/a%20b"})


# -- conflicts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"path": "/x", "methods": ["GET"]}, {"path": "/x", "methods": ["GET", "POST"]}),
        ({"path": "/x"}, {"path": "/x", "methods": ["GET"]}),
        ({"path": "/x", "methods": ["PUT"]}, {"path": "/x"}),
        ({"path": "/o/{id}/m", "methods": ["GET"]}, {"path": "/o/{org}/m", "methods": ["GET"]}),
        ({"prefix": "/v1/billing"}, {"prefix": "/v1/billing/"}),
        ({"prefix": "/", "methods": ["GET"]}, {"prefix": "/", "methods": ["GET"]}),
    ],
)
def test_conflicts_name_both_routes(first: dict[str, object], second: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        build({"path": "/unrelated"}, {**first, "name": "one"}, {**second, "name": "two"})
    err = info.value
    assert err.location == "routes[2]"
    assert "'one'" in err.message
    assert "'two'" in err.message
    assert "routes[1]" in err.message


def test_disjoint_methods_and_different_shapes_do_not_conflict() -> None:
    router, (g, p, a, b, c) = build(
        {"path": "/x", "methods": ["GET"]},
        {"path": "/x", "methods": ["POST"]},
        {"path": "/o/{id}/m"},
        {"path": "/o/{id}/{m}"},
        {"prefix": "/x"},  # a prefix and a path of the same string differ
    )
    assert hit(router, "POST", "/x").route is p
    assert hit(router, "PUT", "/x").route is c
    assert hit(router, "GET", "/o/1/m").route is a
    assert hit(router, "GET", "/o/1/n") == (b, {"id": "1", "m": "n"})
    assert hit(router, "GET", "/x").route is g


@pytest.mark.parametrize(
    ("spec", "location"),
    [
        ({"path": "/a//b"}, "routes[0].path"),
        ({"path": "/a/./b"}, "routes[0].path"),
        ({"path": "/a/../b"}, "routes[0].path"),
        ({"path": "/a/%zz"}, "routes[0].path"),
        ({"path": "/a/%2e%2e/b"}, "routes[0].path"),
        ({"prefix": "/a%2Fb"}, "routes[0].prefix"),
        ({"path": "a/b"}, "routes[0].path"),
        ({"path": "/a/x{id}"}, "routes[0].path"),
        ({"path": "/a/{id}/{id}"}, "routes[0].path"),
        ({"path": "/a/{1x}"}, "routes[0].path"),
        ({"prefix": "/a/{id}"}, "routes[0].prefix"),
        ({"prefix": "/a//b"}, "routes[0].prefix"),
    ],
)
def test_bad_templates_are_config_errors(spec: dict[str, object], location: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(spec)
    assert info.value.location == location


def test_many_routes() -> None:
    specs: list[dict[str, object]] = []
    for i in range(300):
        specs.append({"path": f"/s{i}/items", "methods": ["GET"]})
        specs.append({"path": f"/p{i}/{{id}}/items", "methods": ["GET"]})
        specs.append({"prefix": f"/x{i}"})
    router, routes = build(*specs)
    assert hit(router, "GET", "/s123/items").route is routes[369]
    assert hit(router, "GET", "/p123/9/items") == (routes[370], {"id": "9"})
    assert hit(router, "GET", "/x123/a/b").route is routes[371]
    assert router.match("POST", "/p123/9/items") == frozenset({"GET"})
    assert router.match("GET", "/p300/9/items") is None


# -- routing on the normalised path ----------------------------------------------------

AUTH_ROUTES: tuple[dict[str, object], ...] = (
    {"prefix": "/auth", "name": "auth"},
    {"prefix": "/v1/public", "name": "public"},
    {"path": "/v1/{svc}/status", "name": "status"},
)


def test_escaped_traversal_routes_as_the_plain_path() -> None:
    router, (auth, public, _) = build(*AUTH_ROUTES)
    assert hit(router, "GET", normalize_path("/v1/%2e%2e/auth/validate")).route is auth
    assert hit(router, "GET", normalize_path("/v1/public/%2E%2e/%2e%2e/auth/x")).route is auth
    assert hit(router, "GET", normalize_path("/auth/%2e%2e/v1/public/x")).route is public
    # Double-encoded dots are a literal segment: they stay under the prefix.
    matched = hit(router, "GET", normalize_path("/v1/public/%252e%252e/auth"))
    assert matched.route is public


def _escape_some(raw: str, flags: list[bool]) -> str:
    return "".join(
        "".join(f"%{b:02X}" for b in c.encode()) if f else c
        for c, f in zip(raw, flags, strict=True)
    )


PLAIN = st.lists(
    st.sampled_from(["auth", "v1", "public", "status", "x", ".", "..", ""]), min_size=1, max_size=7
).map(lambda segs: "/" + "/".join(segs))


@given(PLAIN, st.data())
def test_no_encoding_reaches_another_route(plain: str, data: st.DataObject) -> None:
    """Whatever is percent-encoded, the route is the plain path's route, and
    the upstream (decoding once, as any server does) sees the same path."""
    router, _ = build(*AUTH_ROUTES)
    flags = data.draw(st.lists(st.booleans(), min_size=len(plain), max_size=len(plain)))
    path = normalize_path(_escape_some(plain, flags))
    expected = router.match("GET", normalize_path(plain))
    got = router.match("GET", path)
    assert (got[0] if isinstance(got, tuple) else got) == (
        expected[0] if isinstance(expected, tuple) else expected
    )
    upstream_sees = normalize_path(encode_path(path))
    assert upstream_sees == path
    if isinstance(got, tuple) and got[0].prefix is not None:
        prefix = got[0].prefix
        assert upstream_sees == prefix or upstream_sees.startswith(prefix + "/")
