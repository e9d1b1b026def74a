"""What the README shows, for real: the example plugin, the config reference, the samples.

- examples/ip_allow.py (the README's plugin guide quotes it verbatim) is loaded
  by ``type = "examples.ip_allow:IpAllow"`` into a real gateway and exercised.
- The README's config reference is exactly what the models generate.
- The sample auth-service's own OpenAPI document describes exactly its routes,
  and every answer of a walk through all of them matches the documented schema.
- The sample services behind the shipped config.toml, through a real gateway
  with real PostgreSQL and Kafka: the auth flows the demo relies on (tokens the
  gateway's jwt-check accepts, org switch forwarding X-Org-Id, invites, roles,
  refresh rotation, internal routes with the service key), the echo
  service's WebSocket through /v1/chat, and the gateway's /openapi.json with
  the auth-service's bodies merged under the gateway's paths.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from aiogateway.demo.auth_openapi import document as auth_document
from aiogateway.demo.auth_service import make_app as auth_app
from aiogateway.demo.echo_service import make_app as echo_app
from aiogateway.errors import ConfigError
from aiogateway.settings import GatewaySettings
from examples.config_reference import BEGIN, END, reference, replace_in
from examples.ip_allow import IpAllow
from tests.support.gateway import RunningGateway, StartGateway
from tests.support.upstreams import RecordingUpstream, StartUpstream

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SECRET = "examples-test-secret-0123456789abcdef"


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.DOTALL)


def test_readme_plugin_guide_quotes_the_tested_example_verbatim() -> None:
    source = (REPO / "examples" / "ip_allow.py").read_text()
    assert source in _code_blocks("python")


def test_readme_config_reference_is_generated_from_the_models() -> None:
    generated = reference()
    assert replace_in(README, generated) == README, (
        "README.md's config reference is stale: "
        "run `.venv/bin/python -m examples.config_reference --write`"
    )
    section = README.split(BEGIN, 1)[1].split(END, 1)[0]
    # Spot checks that the generator covers what it should.
    needed = ["`shutdown_timeout`", "`read_timeout`", "`strip_prefix`", 'type = "jwt-check"']
    needed += ["`bootstrap_servers`", "`keys`", "`dsn`", "`admin_port`"]
    needed += ["`client_body_timeout`", "`client_header_timeout`", "`openapi`"]
    needed += ["`openapi_path`", "`refresh_interval`", "`fetch_timeout`"]
    for key in needed:
        assert key in section
    # Every table of config.toml has its section.
    for table in GatewaySettings.model_fields:
        assert f"`[{table}" in section or f"`[[{table}" in section, table


def _ip_allow_config(upstream: str, allow: str) -> str:
    return f"""
[upstreams.app]
url = "{upstream}"

[plugins.office]
type = "examples.ip_allow:IpAllow"
allow = [{allow}]

[[routes]]
name = "admin"
prefix = "/v1/admin"
upstream = "app"
chain = ["office"]
"""


async def test_example_plugin_lets_listed_networks_in_and_stamps_the_response(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(_ip_allow_config(recording_upstream.url, '"127.0.0.0/8"'))
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/admin/users") as r:
        assert r.status == 200
        assert r.headers["X-Allowed-Network"] == "127.0.0.0/8"
    assert recording_upstream.last.path == "/v1/admin/users"


async def test_example_plugin_rejects_other_addresses_and_counts_them(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(
        _ip_allow_config(recording_upstream.url, '"10.0.0.0/8", "2001:db8::/32"')
    )
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(f"{gw.url}/v1/admin/users") as r:
                assert r.status == 403
                body = await r.json()
                assert "X-Allowed-Network" not in r.headers
        assert body["error"] == "forbidden"
        assert body["request_id"] == r.headers["X-Request-ID"]
    assert recording_upstream.requests == []
    plugin = gw.gateway.table.plugins["office"]
    assert isinstance(plugin, IpAllow)
    for _ in range(100):  # on_complete runs after the response went out
        if plugin.rejected == 3:
            break
        await asyncio.sleep(0.01)
    assert plugin.rejected == 3


async def test_example_plugin_config_is_validated_at_load(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    with pytest.raises(ConfigError) as info:
        await start_gateway(_ip_allow_config(recording_upstream.url, '"10.0.0.0/8", "not-a-net"'))
    assert "plugins.office.allow[1]" in str(info.value)
    with pytest.raises(ConfigError, match=r"plugins\.office\.allow"):
        await start_gateway(_ip_allow_config(recording_upstream.url, ""), name="empty.toml")


# -- the sample auth-service's own OpenAPI document -----------------------------------


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, url
        assert resp.content_type == "application/json"
        return await resp.json()


def _response_schema(doc: dict[str, Any], method: str, template: str, status: int) -> Any:
    """The documented JSON schema of one answer, its refs resolvable (KeyError: undocumented)."""
    answer = doc["paths"][template][method.lower()]["responses"][str(status)]
    schema = answer["content"]["application/json"]["schema"]
    return {**schema, "components": doc["components"]}


async def test_sample_auth_service_documents_each_route_and_answers_as_documented(
    start_upstream: StartUpstream,
) -> None:
    app = auth_app(SECRET)
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    } - {("GET", "/openapi.json")}
    auth = await start_upstream(app)
    async with aiohttp.ClientSession() as session:
        doc = await _get_json(session, f"{auth.url}/openapi.json")
        assert doc == auth_document()
        validate(doc)
        assert doc["openapi"] == "3.1.0"
        documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
        assert documented == served
        called: set[tuple[str, str]] = set()

        async def call(
            method: str, template: str, status: int, user: str = "", **params: Any
        ) -> Any:
            path = template.format(**params.pop("path", {}))
            headers = params.pop("headers", {})
            if user:
                headers["X-User-Id"] = user  # what the gateway forwards from the token
            async with session.request(method, auth.url + path, headers=headers, **params) as resp:
                assert resp.status == status, (method, path, await resp.text())
                body = await resp.json()
            Draft202012Validator(_response_schema(doc, method, template, status)).validate(body)
            called.add((method, template))
            return body

        creds = {"email": "a@example.com", "password": "pw"}
        owner = await call("POST", "/v1/client/sign-up", 201, json={**creds, "name": "A"})
        await call("POST", "/v1/client/sign-up", 409, json=creds)
        await call("POST", "/v1/client/sign-up", 400, json={"email": "b@example.com"})
        guest = await call("POST", "/v1/client/sign-up", 201, json={**creds, "email": "b@x.io"})
        a, b = owner["user"]["id"], guest["user"]["id"]
        signed_in = await call("POST", "/v1/client/sign-in/password", 200, json=creds)
        await call("POST", "/v1/client/sign-in/password", 401, json={**creds, "password": "x"})
        fresh = await call(
            "POST", "/v1/client/refresh_token", 200, json={"refresh_token": owner["refresh_token"]}
        )
        await call("POST", "/v1/client/logout", 200, json={"refresh_token": fresh["refresh_token"]})
        await call("GET", "/v1/client/me", 401)
        org = await call("POST", "/v1/org", 201, a, json={"name": "Acme"})
        ids = {"path": {"id": org["id"]}}
        await call("PATCH", "/v1/client/switch-org", 200, a, json={"org_id": org["id"]})
        await call("PATCH", "/v1/client/switch-org", 403, b, json={"org_id": org["id"]})
        await call("GET", "/v1/org/{id}/members", 403, b, **ids)
        invite = await call("POST", "/v1/org/{id}/invite", 201, a, json={"email": "b@x.io"}, **ids)
        accept = {"token": invite["invite_token"]}
        await call("POST", "/v1/invite/accept", 200, b, json=accept)
        await call("POST", "/v1/invite/accept", 404, b, json=accept)
        me = await call("GET", "/v1/client/me", 200, b, headers={"X-Org-Id": org["id"]})
        assert me["orgs"] == [{"id": org["id"], "name": "Acme", "role": "member"}]
        await call("GET", "/v1/org/{id}/members", 200, b, **ids)
        member = {"path": {"id": org["id"], "user_id": b}}
        await call(
            "PATCH", "/v1/org/{id}/member/{user_id}/role", 200, a, json={"role": "admin"}, **member
        )
        await call("DELETE", "/v1/org/{id}/member/{user_id}", 200, a, **member)
        await call("DELETE", "/v1/org/{id}/member/{user_id}", 404, a, **member)
        bearer = {"Authorization": f"Bearer {signed_in['access_token']}"}
        await call("GET", "/auth/validate", 200, headers=bearer)
        await call("GET", "/auth/validate", 401, headers={"Authorization": "Bearer nope"})
        await call("GET", "/auth/user/{id}", 200, path={"id": a})
        await call("GET", "/auth/user/{id}", 404, path={"id": "nope"})
        await call("GET", "/auth/user/{id}/orgs", 200, path={"id": a})
        await call("GET", "/auth/org/{id}", 200, **ids)
        await call("GET", "/auth/org/{id}/members", 200, **ids)
        await call("GET", "/healthz", 200)
    assert called == documented


# -- the sample services behind the shipped config.toml ------------------------------


@pytest.fixture
async def shipped(
    database_url: str,
    kafka_bootstrap: str,
    start_upstream: StartUpstream,
    start_gateway: StartGateway,
) -> RunningGateway:
    # Fixture order matters: teardown runs in reverse, so the gateway (flushing its
    # audit rows) stops before its database is dropped and its upstreams go away.
    auth = await start_upstream(auth_app(SECRET))
    echo = await start_upstream(echo_app())
    env = {
        "JWT_SECRET": SECRET,
        "AUTH_SERVICE_URL": auth.url,
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "INTERNAL_SERVICE_KEY": "test-internal-key",
        **{f"{n}_SERVICE_URL": echo.url for n in ("BILLING", "CHAT", "TPL", "USER")},
    }
    return await start_gateway((REPO / "config.toml").read_text(), env=env)


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.s = session
        self.base = base

    async def call(
        self, method: str, path: str, token: str | None = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = kw.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.s.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, await r.json()

    async def user(self, email: str) -> tuple[str, str]:
        creds = {"email": email, "password": "pw-" + email}
        status, body = await self.call("POST", "/v1/client/sign-up", json=creds)
        assert status == 201
        return body["user"]["id"], body["access_token"]


async def test_sample_auth_flows_through_the_shipped_gateway(shipped: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        c = Client(session, shipped.url)
        owner_id, owner = await c.user("owner@example.com")
        guest_id, guest = await c.user("guest@example.com")
        again = {"email": "owner@example.com", "password": "x"}
        assert (await c.call("POST", "/v1/client/sign-up", json=again))[0] == 409
        bad = {"email": "owner@example.com", "password": "wrong"}
        assert (await c.call("POST", "/v1/client/sign-in/password", json=bad))[0] == 401

        status, org = await c.call("POST", "/v1/org", owner, json={"name": "Acme"})
        assert status == 201
        org_id = org["id"]
        # A guest is no member: the auth-service refuses, the gateway let the token through.
        assert (await c.call("GET", f"/v1/org/{org_id}/members", guest))[0] == 403
        status, inv = await c.call(
            "POST", f"/v1/org/{org_id}/invite", owner, json={"email": "guest@example.com"}
        )
        assert status == 201
        token = {"token": inv["invite_token"]}
        assert await c.call("POST", "/v1/invite/accept", guest, json=token) == (
            200, {"org_id": org_id, "role": "member"},
        )  # fmt: skip
        status, members = await c.call("GET", f"/v1/org/{org_id}/members", guest)
        assert {m["id"]: m["role"] for m in members["members"]} == {
            owner_id: "owner", guest_id: "member",
        }  # fmt: skip
        role = {"role": "admin"}
        path = f"/v1/org/{org_id}/member/{guest_id}/role"
        assert (await c.call("PATCH", path, guest, json=role))[0] == 403
        assert (await c.call("PATCH", path, owner, json=role))[0] == 200

        # switch-org issues a token with org_id; the gateway forwards it as X-Org-Id.
        status, switched = await c.call(
            "PATCH", "/v1/client/switch-org", guest, json={"org_id": org_id}
        )
        assert status == 200
        status, me = await c.call("GET", "/v1/client/me", switched["access_token"])
        assert (status, me["id"], me["org_id"]) == (200, guest_id, org_id)
        status, echo = await c.call("GET", "/v1/tpl/templates", switched["access_token"])
        assert echo["service"] == "tpl"
        assert echo["headers"]["X-Org-Id"] == org_id
        assert echo["headers"]["X-User-Role"] == "admin"

        # Spoofed identity headers never reach a service: the gateway strips them.
        spoof = {"X-User-Id": owner_id, "X-Org-Id": "evil"}
        status, me = await c.call("GET", "/v1/client/me", guest, headers=spoof)
        assert (me["id"], me["org_id"]) == (guest_id, None)

        assert (await c.call("DELETE", f"/v1/org/{org_id}/member/{guest_id}", owner))[0] == 200
        assert (await c.call("GET", f"/v1/org/{org_id}/members", guest))[0] == 403

        # Refresh tokens rotate; logout revokes.
        creds = {"email": "guest@example.com", "password": "pw-guest@example.com"}
        _, signed_in = await c.call("POST", "/v1/client/sign-in/password", json=creds)
        old = {"refresh_token": signed_in["refresh_token"]}
        status, fresh = await c.call("POST", "/v1/client/refresh_token", json=old)
        assert status == 200
        assert (await c.call("POST", "/v1/client/refresh_token", json=old))[0] == 401
        new = {"refresh_token": fresh["refresh_token"]}
        assert (await c.call("POST", "/v1/client/logout", json=new))[0] == 200
        assert (await c.call("POST", "/v1/client/refresh_token", json=new))[0] == 401


async def test_internal_routes_need_the_service_key(shipped: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        c = Client(session, shipped.url)
        user_id, token = await c.user("svc@example.com")
        key = {"X-Service-Key": "test-internal-key"}
        assert (await c.call("GET", f"/auth/user/{user_id}"))[0] == 401
        wrong = {"X-Service-Key": "gateway-secret-key-2024"}  # the default, overridden here
        assert (await c.call("GET", f"/auth/user/{user_id}", headers=wrong))[0] == 403
        status, user = await c.call("GET", f"/auth/user/{user_id}", headers=key)
        assert (status, user["email"]) == (200, "svc@example.com")
        assert await c.call("GET", f"/auth/user/{user_id}/orgs", headers=key) == (
            200, {"orgs": []},
        )  # fmt: skip
        status, valid = await c.call(
            "GET", "/auth/validate", headers={**key, "Authorization": f"Bearer {token}"}
        )
        assert (status, valid["claims"]["sub"]) == (200, user_id)
        assert (await c.call("GET", "/auth/org/nope", headers=key))[0] == 404


async def test_shipped_gateway_docs_carry_the_auth_services_bodies(
    shipped: RunningGateway,
) -> None:
    own = auth_document()
    async with aiohttp.ClientSession() as session:
        for _ in range(150):  # fetched in the background right after startup
            doc = await _get_json(session, f"{shipped.url}/openapi.json")
            if "SignUp" in doc["components"]["schemas"]:
                break
            await asyncio.sleep(0.1)
        async with session.get(f"{shipped.url}/docs") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
    validate(doc)
    schemas = doc["components"]["schemas"]

    def resolved(schema: dict[str, Any], source: dict[str, Any]) -> Any:
        return source["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]

    sign_up = doc["paths"]["/v1/client/sign-up"]["post"]
    body = sign_up["requestBody"]["content"]["application/json"]["schema"]
    assert set(resolved(body, doc)["properties"]) == {"email", "password", "name"}
    assert resolved(body, doc)["required"] == ["email", "password"]
    # Every seed endpoint of the auth-service: its own operation under the gateway's path.
    auth_routes = [
        (method, path) for path, item in own["paths"].items() for method in item
        if path != "/healthz"
    ]  # fmt: skip
    assert len(auth_routes) == 17
    public = {"/v1/client/sign-up", "/v1/client/sign-in/password"}
    public |= {"/v1/client/refresh_token", "/v1/client/logout"}
    for method, path in auth_routes:
        theirs, ours = own["paths"][path][method], doc["paths"][path][method]
        assert (ours["operationId"], ours["summary"]) == (
            theirs["operationId"], theirs["summary"],
        ), path  # fmt: skip
        if "requestBody" in theirs:
            mine = ours["requestBody"]["content"]["application/json"]["schema"]
            src = theirs["requestBody"]["content"]["application/json"]["schema"]
            assert resolved(mine, doc) == resolved(src, own), path
        for status, answer in theirs["responses"].items():
            mine = ours["responses"][status]["content"]["application/json"]["schema"]
            assert mine == answer["content"]["application/json"]["schema"], (path, status)
        # Identity headers are the gateway's to set: not documented for clients.
        names = {p.get("name") for p in ours["parameters"]}
        assert not names & {"X-User-Id", "X-Org-Id"}, path
        if path in public:
            assert "security" not in ours, path
        else:
            chain = "internal" if path.startswith("/auth/") else "jwt"
            assert ours["security"] == [{chain: []}], path
    assert "/healthz" not in doc["paths"]  # the auth-service's, not routed by the gateway
    assert {"Session", "Me", "MemberList", "InviteCreate", "GatewayError"} <= set(schemas)


async def test_chat_websocket_echo_through_the_gateway(shipped: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        c = Client(session, shipped.url)
        _, token = await c.user("chat@example.com")
        ws_url = shipped.url.replace("http://", "ws://") + "/v1/chat/rooms/1/ws"
        headers = {"Authorization": f"Bearer {token}"}
        async with session.ws_connect(ws_url, headers=headers) as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=10)).data == "hello"
            await ws.send_bytes(b"\x00\x01")
            assert (await ws.receive(timeout=10)).data == b"\x00\x01"
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(ws_url)
        assert info.value.status == 401


def test_readme_walkthrough_is_what_make_dev_prints() -> None:
    from aiogateway.demo.walkthrough import curl_walkthrough

    assert curl_walkthrough() in _code_blocks("sh")


async def test_readme_metrics_table_lists_exactly_the_scraped_families(
    shipped: RunningGateway,
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{shipped.url}/v1/client/me") as r:
            assert r.status == 401
        async with s.get(f"{shipped.url}/metrics") as r:
            text = await r.text()
    scraped = set(re.findall(r"^# TYPE (gateway_\w+) ", text, re.MULTILINE))
    # prometheus-client's per-series creation timestamps are not families of their own.
    scraped = {name for name in scraped if not name.endswith("_created")}
    section = README.split("## Metrics (metrics)", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(gateway_\w+)`", section))
    assert scraped == listed
