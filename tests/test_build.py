"""build_table / load_table: plugins, chains, pools, routes, endpoints, check output."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiogateway.build import build_table, format_route_table
from aiogateway.chain import EMPTY_CHAIN
from aiogateway.config import ConfigErrors, load_settings, load_table
from aiogateway.errors import ConfigError
from aiogateway.routes import RouteTable
from tests.sample_plugins import HeaderPlugin, ObserverPlugin

HEADER = "tests.sample_plugins:HeaderPlugin"
OBSERVER = "tests.sample_plugins:ObserverPlugin"

BASE = f"""
[upstreams.auth]
url = "http://127.0.0.1:9001"

[upstreams.billing]
url = "http://127.0.0.1:9002"
read_timeout = 5

[plugins.tag]
type = "{HEADER}"
header = "X-Tag"

[plugins.who]
type = "{HEADER}"
header = "X-User-Id"
identity = true

[plugins.seen]
type = "{OBSERVER}"
header = "X-Seen"

[chains]
public = ["seen", "tag"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, previous: RouteTable | None = None) -> RouteTable:
    return load_table(write(tmp_path, text), {}, previous)


def fails(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_table(path, {})
    err = info.value
    assert err.file == str(path)
    assert str(err).startswith(str(path))
    return err


def route(methods: str | None, where: str, upstream: str = "auth", **extra: str) -> str:
    lines = ["[[routes]]"]
    if methods:
        lines.append(f"methods = [{', '.join(repr(m) for m in methods.split(','))}]")
    lines.append(where)
    lines.append(f'upstream = "{upstream}"')
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n" + "\n".join(lines) + "\n"


def test_builds_routes_chains_and_plugins(tmp_path: Path) -> None:
    text = BASE + "[server]\nmax_body_bytes = 1000\n"
    text += route("POST", 'path = "/v1/client/sign-up"', name='"sign-up"', chain='"public"')
    text += route("DELETE", 'path = "/v1/org/{id}/member/{user_id}"', chain='["who", "tag"]')
    text += route(None, 'prefix = "/v1/billing/"', "billing", max_body_bytes="5")
    table = load(tmp_path, text)
    sign_up, member, billing = table.routes
    assert sign_up.name == "sign-up"
    assert sign_up.chain is table.chains["public"]
    assert sign_up.chain.names == ["seen", "tag"]
    assert isinstance(table.plugins["tag"], HeaderPlugin)
    assert table.plugins["tag"].config.header == "X-Tag"
    assert member.name == "DELETE /v1/org/{id}/member/{user_id}"
    assert member.chain.name == member.name
    assert member.chain.names == ["who", "tag"]
    assert member.max_body_bytes == 1000
    assert billing.name == "* /v1/billing/**"
    assert billing.prefix == "/v1/billing"
    assert billing.methods is None
    assert billing.chain is EMPTY_CHAIN
    assert billing.max_body_bytes == 5
    assert billing.upstream is table.pools["billing"]
    assert table.router.match("DELETE", "/v1/org/7/member/9") is not None
    assert [r.index for r in table.routes] == [0, 1, 2]


def test_identity_headers_union_of_all_instances(tmp_path: Path) -> None:
    text = BASE + f'[plugins.org]\ntype = "{HEADER}"\nheader = "X-Org-Id"\nidentity = true\n'
    table = load(tmp_path, text)
    # "who" is in no chain: its headers are still stripped everywhere.
    assert table.identity_headers == frozenset({"x-user-id", "x-org-id"})


def test_unmatched_chain_defaults_to_observers(tmp_path: Path) -> None:
    table = load(tmp_path, BASE)
    assert table.unmatched_chain.names == ["seen"]
    assert isinstance(table.unmatched_chain.plugins[0], ObserverPlugin)


def test_unmatched_chain_from_server_settings(tmp_path: Path) -> None:
    table = load(tmp_path, BASE + '[server]\nunmatched_chain = "public"\n')
    assert table.unmatched_chain is table.chains["public"]
    table = load(tmp_path, BASE + '[server]\nunmatched_chain = ["tag"]\n')
    assert table.unmatched_chain.names == ["tag"]
    err = fails(tmp_path, BASE + '[server]\nunmatched_chain = "nope"\n')
    assert err.location == "server.unmatched_chain"


def test_pools_reused_across_reload_when_unchanged(tmp_path: Path) -> None:
    first = load(tmp_path, BASE + '[upstreams.gone]\nurl = "http://127.0.0.1:9003"\n')
    changed = BASE.replace("read_timeout = 5", "read_timeout = 6")
    second = load(tmp_path, changed, previous=first)
    assert second.pools["auth"] is first.pools["auth"]
    assert second.pools["billing"] is not first.pools["billing"]
    assert second.pools["billing"].settings.read_timeout == 6
    retired = {id(p) for p in second.retired_pools}
    assert retired == {id(first.pools["billing"]), id(first.pools["gone"])}
    assert load(tmp_path, changed, previous=second).retired_pools == []


def test_plugin_endpoints_with_chain(tmp_path: Path) -> None:
    text = (
        BASE
        + f"""
[plugins.metrics]
type = "{HEADER}"
header = "X-M"
endpoint = "/metrics"
endpoint_chain = ["tag"]
"""
    )
    table = load(tmp_path, text)
    endpoint, chain = table.endpoints["/metrics"]
    assert endpoint.path == "/metrics"
    assert chain.names == ["tag"]


def test_plugin_config_error_located(tmp_path: Path) -> None:
    text = BASE.replace('header = "X-Tag"', 'header = "X-Tag"\ncount = 0\nheadr = 1')
    err = fails(tmp_path, text)
    assert isinstance(err, ConfigErrors)
    locations = [e.location for e in err.errors]
    assert locations == ["plugins.tag.count", "plugins.tag.headr"]
    assert "at least 1" in err.errors[0].message
    assert "did you mean 'header'" in err.errors[1].message


def test_plugin_config_missing_key(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + f'[plugins.bare]\ntype = "{HEADER}"\n')
    assert err.location == "plugins.bare.header"
    assert "required" in err.message


def test_unknown_plugin_type(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + '[plugins.x]\ntype = "jwt-chek"\n')
    assert err.location == "plugins.x.type"
    assert "unknown plugin type 'jwt-chek'" in err.message
    assert "did you mean 'jwt-check'" in err.message


def test_type_defaults_to_instance_name(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + "[plugins.frobnicate]\n")
    assert err.location == "plugins.frobnicate"
    assert "unknown plugin type 'frobnicate'" in err.message


def test_bad_module_reference(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + '[plugins.x]\ntype = "tests.no_such_module:Thing"\n')
    assert err.location == "plugins.x.type"
    assert "no module named 'tests.no_such_module'" in err.message


def test_non_plugin_class(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + '[plugins.x]\ntype = "tests.sample_plugins:NotAPlugin"\n')
    assert err.location == "plugins.x.type"
    assert "not a subclass of aiogateway.plugin.Plugin" in err.message


def test_unknown_plugin_instance_in_chain(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE.replace('["seen", "tag"]', '["seen", "tga"]'))
    assert err.location == "chains.public[1]"
    assert "unknown plugin instance 'tga'" in err.message


def test_duplicate_plugin_in_chain(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE.replace('["seen", "tag"]', '["tag", "seen", "tag"]'))
    assert err.location == "chains.public[2]"
    assert "listed twice" in err.message


def test_broken_plugin_is_reported_once(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE.replace('header = "X-Tag"', "count = 3"))
    assert err.location == "plugins.tag.header"  # not again at chains.public[1]
    assert not isinstance(err, ConfigErrors)


def test_unknown_chain(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + route("GET", 'path = "/a"', chain='"publik"'))
    assert err.location == "routes[0] (GET /a).chain"
    assert "unknown chain 'publik'" in err.message
    assert "known: public" in err.message


def test_unknown_instance_in_inline_chain(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + route("GET", 'path = "/a"', chain='["tag", "x"]'))
    assert err.location == "routes[0] (GET /a).chain[1]"


def test_unknown_upstream(tmp_path: Path) -> None:
    err = fails(tmp_path, BASE + route("GET", 'path = "/a"', "nope"))
    assert err.location == "routes[0] (GET /a).upstream"
    assert err.message == "unknown upstream 'nope' (known: auth, billing)"


def test_duplicate_route_name(tmp_path: Path) -> None:
    text = BASE + route("GET", 'path = "/a"', name='"x"') + route("GET", 'path = "/b"', name='"x"')
    err = fails(tmp_path, text)
    assert err.location == "routes[1] (x)"
    assert "duplicate route name 'x'" in err.message
    assert "routes[0]" in err.message


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/v1/org-{id}", "whole segment"),
        ("/v1/{1x}", "whole segment"),
        ("/v1/{id}/{id}", "appears twice"),
    ],
)
def test_bad_param_template(tmp_path: Path, path: str, words: str) -> None:
    err = fails(tmp_path, BASE + route("GET", f'path = "{path}"'))
    assert err.location == f"routes[0] (GET {path}).path"
    assert words in err.message


def test_upstream_path_with_unknown_param(tmp_path: Path) -> None:
    text = BASE + route("GET", 'path = "/v1/org/{id}"', upstream_path='"/orgs/{org}"')
    err = fails(tmp_path, text)
    assert err.location == "routes[0] (GET /v1/org/{id}).upstream_path"
    assert "{org}" in err.message
    assert "{id}" in err.message


def test_upstream_path_using_params_is_fine(tmp_path: Path) -> None:
    text = BASE + route("GET", 'path = "/v1/org/{id}"', upstream_path='"/orgs/{id}.json"')
    assert load(tmp_path, text).routes[0].upstream_path == "/orgs/{id}.json"


@pytest.mark.parametrize("where", ['path = "/healthz"', 'prefix = "/readyz/"'])
def test_reserved_route_paths(tmp_path: Path, where: str) -> None:
    err = fails(tmp_path, BASE + route(None, where))
    assert err.location.endswith(".path") or err.location.endswith(".prefix")
    assert "answered by the gateway itself" in err.message


def test_reserved_and_clashing_endpoint_paths(tmp_path: Path) -> None:
    text = BASE + f'[plugins.h]\ntype = "{HEADER}"\nheader = "X"\nendpoint = "/healthz"\n'
    err = fails(tmp_path, text)
    assert err.location == "plugins.h"
    assert "/healthz" in err.message
    text = BASE + f'[plugins.m]\ntype = "{HEADER}"\nheader = "X"\nendpoint = "/metrics"\n'
    err = fails(tmp_path, text + route("GET", 'path = "/metrics"'))
    assert err.location == "plugins.m"
    assert "clashes with route 'GET /metrics'" in err.message


def test_check_route_hook_gets_the_route_location(tmp_path: Path) -> None:
    text = BASE.replace('header = "X-Tag"', 'header = "X-Tag"\nneeds_event = true')
    err = fails(tmp_path, text + route("POST", 'path = "/a"', name='"a"', chain='"public"'))
    assert err.location == "routes[0] (a).event"
    assert "needs an 'event'" in err.message


def test_router_conflict_is_labelled(tmp_path: Path) -> None:
    text = BASE + route("GET", 'path = "/a/{x}"') + route("GET,POST", 'path = "/a/{y}"')
    err = fails(tmp_path, text)
    assert err.location == "routes[1] (GET,POST /a/{y})"
    assert "conflicts" in err.message


def test_several_errors_reported_together(tmp_path: Path) -> None:
    text = BASE + route("GET", 'path = "/a"', "nope") + route("GET", 'path = "/b"', chain='"x"')
    err = fails(tmp_path, text)
    assert isinstance(err, ConfigErrors)
    assert [e.location for e in err.errors] == [
        "routes[0] (GET /a).upstream",
        "routes[1] (GET /b).chain",
    ]


def test_build_table_directly(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE + route("GET", 'path = "/a"', "nope")), {})
    with pytest.raises(ConfigError) as info:
        build_table(settings, "other.toml")
    assert info.value.file == "other.toml"


def test_format_route_table(tmp_path: Path) -> None:
    text = BASE
    text += route("POST", 'path = "/v1/client/sign-up"', name='"sign-up"', chain='"public"')
    text = text.rstrip() + '\nevent = { topic = "auth-events", type = "user_registered" }\n'
    text += route("GET,HEAD", 'path = "/v1/org/{id}"', upstream_path='"/org/{id}"')
    text += route(None, 'prefix = "/v1/billing"', "billing", strip_prefix="true")
    out = format_route_table(load(tmp_path, text)).splitlines()
    assert out == [
        "NAME                   METHODS   PATH                       UPSTREAM"
        "                         CHAIN     EVENT",
        "sign-up                POST      /v1/client/sign-up         auth (http://127.0.0.1:9001)"
        "     seen,tag  auth-events:user_registered",
        "GET,HEAD /v1/org/{id}  GET,HEAD  /v1/org/{id} -> /org/{id}  auth (http://127.0.0.1:9001)"
        "     -         -",
        "* /v1/billing/**       *         /v1/billing/** (strip)     billing (http://127.0.0.1:9002)"
        "  -         -",
        f"plugins: tag ({HEADER}), who ({HEADER}), seen ({OBSERVER})",
    ]
