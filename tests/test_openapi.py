"""OpenAPI at /openapi.json and Swagger UI at /docs: generated from the route
table, merged with the upstreams' own documents (fetched from real services),
regenerated on reload and SIGHUP, guarded or switched off by [docs].

``USERS_DOC`` is shaped like FastAPI's output (3.1, ``HTTPValidationError``,
ids like ``read_user_users__user_id__get``); ``BILLING_DOC`` is OpenAPI 3.0
(``nullable``, boolean ``exclusiveMinimum``), as older services publish.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from aiogateway.cli import main as cli_main
from aiogateway.config import load_table
from aiogateway.errors import ConfigError
from aiogateway.openapi import build_document
from aiogateway.openapi_merge import normalize_document
from aiogateway.server import Gateway
from tests.support.gateway import REPO, StartGateway, StartGatewayProcess, free_port
from tests.support.upstreams import RunningUpstream, StartUpstream

SECRET = "s" * 40


def ref(schema: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{schema}"}


def reply(description: str, schema: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": ref(schema)}}
    return out


def obj(*required: str, **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


def param(name: str, where: str = "path", **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": schema}


STRING = {"type": "string"}
VALIDATION = reply("Validation Error", "HTTPValidationError")

USERS_DOC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "users", "version": "0.1.0"},
    "paths": {
        "/users/{user_id}": {
            "get": {
                "summary": "Read User",
                "operationId": "read_user_users__user_id__get",
                # X-User-Id is set by the gateway from the token: clients cannot send it.
                "parameters": [
                    param("user_id", type="integer", title="User Id"),
                    param("X-User-Id", "header"),
                ],
                "responses": {"200": reply("Successful Response", "User"), "422": VALIDATION},
            },
            "delete": {
                "operationId": "delete_user_users__user_id__delete",
                "parameters": [param("user_id")],
                "responses": {"204": reply("Deleted")},
            },
        },
        "/users": {
            "post": {
                "summary": "Create User",
                "operationId": "create_user_users_post",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("UserCreate")}},
                },
                "responses": {
                    "201": reply("Created", "User"),
                    "409": reply("Taken", "GatewayError"),
                    "422": VALIDATION,
                },
            }
        },
        "/internal/stats": {
            "get": {"operationId": "stats", "responses": {"200": reply("ok", "Stats")}}
        },
    },
    "components": {
        "schemas": {
            "User": obj("id", "email", id={"type": "integer"}, email=STRING),
            "UserCreate": obj("email", "password", email=STRING, password=STRING),
            # Clashes with the gateway's own error schema: must be renamed.
            "GatewayError": obj(taken=STRING),
            "Stats": obj(count={"type": "integer"}),
            "HTTPValidationError": obj(detail={"type": "array", "items": ref("ValidationError")}),
            "ValidationError": obj(
                "loc",
                "msg",
                loc={"type": "array", "items": {"anyOf": [STRING, {"type": "integer"}]}},
                msg=STRING,
            ),
        }
    },
}

BILLING_DOC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "billing", "version": "2"},
    "paths": {
        "/invoices": {
            "get": {
                "operationId": "listInvoices",
                "responses": {"200": reply("ok", "Invoice")},
            }
        },
        "/invoices/{invoice_id}": {
            "parameters": [param("invoice_id", type="string")],
            "get": {"operationId": "getInvoice", "responses": {"200": reply("ok", "Invoice")}},
        },
    },
    "components": {
        "schemas": {
            "Invoice": obj(
                id=STRING,
                owner={"allOf": [ref("User")], "nullable": True},
                total={"type": "number", "minimum": 0, "exclusiveMinimum": True},
            ),
            # Another service's "User": renamed, not mixed up with the users service's.
            "User": obj(nickname={"type": "string", "nullable": True}),
        }
    },
}


def service_app(doc: dict[str, Any]) -> web.Application:
    """A service publishing ``doc`` at /openapi.json, echoing every other request."""
    body = orjson.dumps(doc)
    app = web.Application()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "method": request.method})

    app.router.add_get("/openapi.json", openapi)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def config(users: str, billing: str, *, routes: str = "", docs: str = "") -> str:
    """Users behind JWT, billing behind a prefix, the internal route behind a service key."""
    return f"""
[server]
max_body_bytes = 1048576
[upstreams.users]
url = "{users}"
openapi = "/openapi.json"
[upstreams.billing]
url = "{billing}"
openapi = "/openapi.json"
[plugins.jwt]
type = "jwt-check"
secret = "{SECRET}"
algorithms = ["HS256"]
forward = {{ sub = "X-User-Id" }}
[plugins.internal]
type = "service-key"
header = "X-Internal-Key"
keys = ["k3y"]
[chains]
protected = ["jwt"]
internal = ["internal"]
[docs]
refresh_interval = 0.5
fetch_timeout = 2
{docs}
[[routes]]
name = "read-user"
methods = ["GET", "DELETE"]
path = "/v1/users/{{id}}"
upstream_path = "/users/{{id}}"
upstream = "users"
chain = "protected"
[[routes]]
name = "billing"
prefix = "/v1/billing"
strip_prefix = true
upstream = "billing"
chain = "protected"
[[routes]]
name = "stats"
path = "/internal/stats/{{day}}"
upstream = "users"
chain = "internal"
{routes}
"""


def table_of(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_table(path, {"PATH": os.environ.get("PATH", "")})


async def get_document(
    url: str, until: Callable[[dict[str, Any]], bool] = lambda d: True, timeout: float = 15.0
) -> dict[str, Any]:
    """GET /openapi.json until ``until(document)`` holds (fetches run in the background)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{url}/openapi.json") as resp:
                assert resp.status == 200, await resp.text()
                assert resp.content_type == "application/json"
                doc: dict[str, Any] = orjson.loads(await resp.read())
            if until(doc):
                return doc
            assert asyncio.get_running_loop().time() < deadline, sorted(doc["paths"])
            await asyncio.sleep(0.1)


def merged(doc: dict[str, Any]) -> bool:
    """Whether the users service's document is merged in."""
    return "HTTPValidationError" in doc["components"]["schemas"]


# Generation from config.toml alone ------------------------------------------------


def test_generated_document_is_valid_openapi_31(tmp_path: Path) -> None:
    extra = """
[[routes]]
name = "anything"
path = "/v1/any/{a}/{b}"
upstream = "users"
[[routes]]
name = "upload"
methods = ["POST"]
path = "/v1/upload"
upstream = "users"
max_body_bytes = 0
"""
    table = table_of(tmp_path, config("http://127.0.0.1:9", "http://127.0.0.1:9", routes=extra))
    doc = build_document(table, table.settings.docs)
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    paths = doc["paths"]
    assert set(paths) == {
        "/v1/users/{id}",
        "/v1/billing/{path}",
        "/internal/stats/{day}",
        "/v1/any/{a}/{b}",
        "/v1/upload",
    }
    assert set(paths["/v1/users/{id}"]) == {"get", "delete"}
    assert set(paths["/v1/any/{a}/{b}"]) == {"get", "post", "put", "patch", "delete"}
    assert set(paths["/v1/billing/{path}"]) == {"get", "post", "put", "patch", "delete"}
    get_user = paths["/v1/users/{id}"]["get"]
    assert {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}} in (
        get_user["parameters"]
    )
    assert {"$ref": "#/components/parameters/X-Request-ID"} in get_user["parameters"]
    assert get_user["tags"] == ["users"]
    assert paths["/v1/billing/{path}"]["get"]["tags"] == ["billing"]
    # Security from each route's chain.
    schemes = doc["components"]["securitySchemes"]
    assert schemes["jwt"] == {
        **schemes["jwt"],
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert schemes["internal"]["type"] == "apiKey"
    assert (schemes["internal"]["in"], schemes["internal"]["name"]) == ("header", "X-Internal-Key")
    assert get_user["security"] == [{"jwt": []}]
    assert paths["/internal/stats/{day}"]["get"]["security"] == [{"internal": []}]
    assert "security" not in paths["/v1/any/{a}/{b}"]["get"]
    # The gateway's own errors, with the JSON error schema and X-Request-ID.
    refs = {k: v["$ref"].rsplit("/", 1)[1] for k, v in get_user["responses"].items() if "$ref" in v}
    assert refs == {
        "401": "GatewayUnauthorized",
        "403": "GatewayForbidden",
        "502": "GatewayBadGateway",
        "504": "GatewayTimeout",
    }
    assert "401" not in paths["/v1/any/{a}/{b}"]["get"]["responses"]
    assert "413" in paths["/v1/any/{a}/{b}"]["post"]["responses"]  # server.max_body_bytes
    assert "413" not in paths["/v1/upload"]["post"]["responses"]  # the route lifted it
    error = doc["components"]["responses"]["GatewayNotFound"]
    assert error["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GatewayError"
    }
    assert error["headers"] == {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    assert doc["components"]["schemas"]["GatewayError"]["required"] == [
        "error",
        "message",
        "request_id",
    ]
    ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_security_alternatives_and_combinations(tmp_path: Path) -> None:
    text = f"""
[upstreams.app]
url = "http://127.0.0.1:9"
[plugins.jwt]
type = "jwt-check"
secret = "{SECRET}"
algorithms = ["HS256"]
cookie = "session"
[plugins.internal]
type = "service-key"
keys = ["k3y"]
[[routes]]
path = "/both"
upstream = "app"
chain = ["jwt", "internal"]
"""
    table = table_of(tmp_path, text)
    doc = build_document(table, table.settings.docs)
    validate(doc)
    cookie = doc["components"]["securitySchemes"]["jwt_cookie"]
    assert (cookie["type"], cookie["in"], cookie["name"]) == ("apiKey", "cookie", "session")
    assert doc["components"]["securitySchemes"]["internal"]["name"] == "X-Service-Key"
    # Both plugins must pass; the token may come either way.
    assert doc["paths"]["/both"]["get"]["security"] == [
        {"jwt": [], "internal": []},
        {"jwt_cookie": [], "internal": []},
    ]


def test_shipped_config_documents_every_route(tmp_path: Path) -> None:
    table = load_table(REPO / "config.toml", {"JWT_SECRET": SECRET})
    doc = build_document(table, table.settings.docs)
    validate(doc)
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    for route in table.routes:
        path = route.path or f"{route.prefix}/{{path}}"
        for method in route.methods or ("GET",):
            assert (method, path) in documented, route.name


# Merging the upstreams' own documents -----------------------------------------------


def test_merge_puts_upstream_operations_under_gateway_paths(tmp_path: Path) -> None:
    extra = """
[[routes]]
name = "exact-invoices"
path = "/v1/billing/invoices"
upstream = "users"
"""
    table = table_of(tmp_path, config("http://127.0.0.1:9", "http://127.0.0.1:9", routes=extra))
    upstream_docs = {"users": USERS_DOC, "billing": normalize_document(BILLING_DOC)}
    doc = build_document(table, table.settings.docs, upstream_docs)
    validate(doc)
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    # upstream_path /users/{id} <- the upstream's /users/{user_id}: its parameter renamed.
    get_user = paths["/v1/users/{id}"]["get"]
    assert get_user["operationId"] == "read_user_users__user_id__get"
    path_params = [p for p in get_user["parameters"] if p.get("in") == "path"]
    assert path_params == [
        {
            "name": "id",
            "in": "path",
            "required": True,
            "schema": {"type": "integer", "title": "User Id"},
        }
    ]
    # X-User-Id is set by the gateway from the token: not something a client sends.
    assert not [p for p in get_user["parameters"] if p.get("name") == "X-User-Id"]
    ok = get_user["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/User"}
    assert get_user["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/HTTPValidationError"
    }
    assert get_user["security"] == [{"jwt": []}]
    assert get_user["tags"] == ["users"]
    assert "401" in get_user["responses"]
    assert "502" in get_user["responses"]
    # Referenced transitively; unrouted operations and their schemas are left out.
    assert schemas["HTTPValidationError"]["properties"]["detail"]["items"] == {
        "$ref": "#/components/schemas/ValidationError"
    }
    assert "ValidationError" in schemas
    assert "Stats" not in schemas
    assert "/users" not in paths
    assert not any("stats" in p and "{day}" not in p for p in paths)
    # Prefix + strip_prefix: the upstream's paths below the prefix.
    invoice = paths["/v1/billing/invoices/{invoice_id}"]["get"]
    assert invoice["operationId"] == "getInvoice"
    assert invoice["tags"] == ["billing"]
    assert [p["name"] for p in invoice["parameters"] if p.get("in") == "path"] == ["invoice_id"]
    assert "/v1/billing/{path}" not in paths  # documented operation by operation instead
    # The exact route wins over the prefix, as it does for requests.
    exact = paths["/v1/billing/invoices"]["get"]
    assert exact["tags"] == ["users"]
    assert exact["summary"] == "exact-invoices"
    # Clashing names renamed; the 3.0 schema upgraded to 3.1.
    invoice_schema = schemas["Invoice"]
    assert invoice_schema["properties"]["owner"] == {
        "anyOf": [{"allOf": [{"$ref": "#/components/schemas/billing_User"}]}, {"type": "null"}]
    }
    assert invoice_schema["properties"]["total"] == {"type": "number", "exclusiveMinimum": 0}
    assert schemas["billing_User"]["properties"]["nickname"]["type"] == ["string", "null"]
    assert "email" in schemas["User"]["properties"]
    assert schemas["GatewayError"]["required"] == ["error", "message", "request_id"]


def test_merge_renames_a_clash_with_the_gateways_own_components(tmp_path: Path) -> None:
    extra = """
[[routes]]
name = "create-user"
methods = ["POST"]
path = "/v1/users"
upstream_path = "/users"
upstream = "users"
"""
    table = table_of(tmp_path, config("http://127.0.0.1:9", "http://127.0.0.1:9", routes=extra))
    doc = build_document(table, table.settings.docs, {"users": USERS_DOC})
    validate(doc)
    create = doc["paths"]["/v1/users"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/UserCreate"
    }
    taken = create["responses"]["409"]["content"]["application/json"]["schema"]
    assert taken == {"$ref": "#/components/schemas/users_GatewayError"}
    assert doc["components"]["schemas"]["users_GatewayError"]["properties"] == {
        "taken": {"type": "string"}
    }


def test_normalize_rejects_what_cannot_be_merged() -> None:
    with pytest.raises(ValueError, match=r"unsupported OpenAPI version .2\.0."):
        normalize_document({"swagger": "2.0", "paths": {}})
    with pytest.raises(ValueError, match="not a JSON object"):
        normalize_document([1])
    with pytest.raises(ValueError, match="'paths' is not an object"):
        normalize_document({"openapi": "3.1.0", "paths": []})
    assert normalize_document(USERS_DOC) is USERS_DOC  # 3.1: taken as is


# Served by a running gateway ---------------------------------------------------------


@pytest.fixture
async def services(start_upstream: StartUpstream) -> tuple[RunningUpstream, RunningUpstream]:
    return await start_upstream(service_app(USERS_DOC)), await start_upstream(
        service_app(BILLING_DOC)
    )


async def test_gateway_serves_merged_document(
    start_gateway: StartGateway, services: tuple[RunningUpstream, RunningUpstream]
) -> None:
    users, billing = services
    gw = await start_gateway(config(users.url, billing.url))
    doc = await get_document(
        gw.url, lambda d: merged(d) and "Invoice" in d["components"]["schemas"]
    )
    validate(doc)
    assert "/v1/billing/invoices/{invoice_id}" in doc["paths"]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gw.url}/openapi.json") as resp:
            etag = resp.headers["ETag"]
        async with session.get(f"{gw.url}/openapi.json", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
        # The documented path really routes there.
        async with session.get(f"{gw.url}/v1/billing/invoices/7") as resp:
            assert resp.status == 401  # jwt-check, as documented
        async with session.get(f"{gw.url}/docs") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            page = await resp.text()
        assert '<script src="/docs/swagger-ui-bundle.js">' in page
        async with session.get(f"{gw.url}/docs/swagger-ui-bundle.js") as resp:
            assert resp.status == 200
            assert resp.content_type == "application/javascript"
            assert b"SwaggerUIBundle" in await resp.read()
        assert "flask" not in sys.modules  # the assets' package is only read from
        async with session.get(f"{gw.url}/docs/swagger-ui-init.js") as resp:
            assert b'"url":"/openapi.json"' in await resp.read()
        async with session.head(f"{gw.url}/docs/swagger-ui.css") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/css"


# The `docs` extra not installed: its package blocked before aiogateway is imported
# (a None entry in sys.modules makes both import and find_spec see no such module).
WITHOUT_DOCS_EXTRA = (
    "import sys; sys.modules['flask_swagger_ui'] = None; "
    "from aiogateway.cli import main; sys.exit(main())"
)


async def test_without_the_docs_extra_openapi_is_served_and_docs_says_what_to_install(
    tmp_path: Path, services: tuple[RunningUpstream, RunningUpstream]
) -> None:
    users, billing = services
    path = tmp_path / "config.toml"
    path.write_text(config(users.url, billing.url))
    check = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WITHOUT_DOCS_EXTRA, "check", "--config", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert await check.wait() == 0, await check.stderr.read() if check.stderr else b""
    port = free_port()
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WITHOUT_DOCS_EXTRA, "serve", "--config", str(path),
            "--host", "127.0.0.1", "--port", str(port),
            cwd=tmp_path, stdout=log, stderr=log,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = asyncio.get_running_loop().time() + 30
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.returncode is None, log_path.read_text()
                try:
                    async with session.get(f"{url}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, log_path.read_text()
                await asyncio.sleep(0.1)
            doc = await get_document(url, lambda d: merged(d) and "Invoice" in str(d))
            validate(doc)
            for page, sent in (
                ("/docs", None),
                ("/docs", "my-request-1"),
                ("/docs/swagger-ui-bundle.js", None),
                ("/docs/swagger-ui.css", None),
                ("/docs/swagger-ui-init.js", None),
            ):
                headers = {"X-Request-ID": sent} if sent else {}
                async with session.get(url + page, headers=headers) as resp:
                    assert resp.status == 503, page
                    assert resp.content_type == "application/json"
                    body = await resp.json()
                    request_id = resp.headers["X-Request-ID"]
                assert body["error"] == "service_unavailable"
                assert "'docs' extra" in body["message"]
                assert "pip install 'aiogateway[docs]'" in body["message"]
                assert body["request_id"] == request_id == (sent or request_id)
                assert len(request_id) >= 8
            async with session.head(f"{url}/docs") as resp:
                assert resp.status == 503
            async with session.get(f"{url}/v1/users/7") as resp:
                assert resp.status == 401  # routing is untouched
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log_path.read_text()
    assert text.count("Swagger UI is not installed: install the 'docs' extra") == 1, text
    assert "Traceback" not in text


async def test_upstream_down_at_startup_then_merged_when_it_comes_up(
    start_gateway: StartGateway, services: tuple[RunningUpstream, RunningUpstream]
) -> None:
    _, billing = services
    port = free_port()
    gw = await start_gateway(config(f"http://127.0.0.1:{port}", billing.url))
    doc = await get_document(gw.url)  # at once: the generated part never waits
    assert "parameters" in doc["paths"]["/v1/users/{id}"]["get"]
    assert doc["paths"]["/v1/users/{id}"]["get"]["operationId"] == "read_user_get"
    runner = web.AppRunner(service_app(USERS_DOC), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        doc = await get_document(gw.url, merged)  # retried in the background
        assert doc["paths"]["/v1/users/{id}"]["get"]["operationId"] == (
            "read_user_users__user_id__get"
        )
    finally:
        await runner.cleanup()


async def test_unusable_upstream_documents_are_skipped_and_logged(
    start_gateway: StartGateway, start_upstream: StartUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    swagger2 = await start_upstream(service_app({"swagger": "2.0", "paths": {}}))

    async def broken(request: web.BaseRequest) -> web.Response:
        return web.Response(status=500, text="boom")

    failing = await start_upstream(broken)
    gw = await start_gateway(config(swagger2.url, failing.url))
    deadline = asyncio.get_running_loop().time() + 10
    while "HTTP 500" not in caplog.text or "unsupported OpenAPI version" not in caplog.text:
        assert asyncio.get_running_loop().time() < deadline, caplog.text
        await asyncio.sleep(0.1)
    doc = await get_document(gw.url)
    validate(doc)
    assert "/v1/billing/{path}" in doc["paths"]  # generated from config alone
    assert doc["paths"]["/v1/users/{id}"]["get"]["summary"] == "read-user"


async def test_stale_copy_kept_when_upstream_goes_down_and_on_reload(
    start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    runner = web.AppRunner(service_app(USERS_DOC), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gw = await start_gateway(config(f"http://127.0.0.1:{port}", "http://127.0.0.1:9"))
    await get_document(gw.url, merged)
    await runner.cleanup()  # the service goes away
    extra = '[[routes]]\nname = "new"\nmethods = ["GET"]\npath = "/v1/new"\nupstream = "users"\n'
    assert await gw.reload(config(f"http://127.0.0.1:{port}", "http://127.0.0.1:9", routes=extra))
    await asyncio.sleep(1.0)  # refetches fail meanwhile
    doc = await get_document(gw.url)
    assert "/v1/new" in doc["paths"]
    assert merged(doc)
    validate(doc)


async def test_docs_disabled_guarded_and_moved(
    start_gateway: StartGateway, services: tuple[RunningUpstream, RunningUpstream]
) -> None:
    users, billing = services
    gw = await start_gateway(config(users.url, billing.url, docs="enabled = false"))
    async with aiohttp.ClientSession() as session:
        for path in ("/docs", "/openapi.json", "/docs/swagger-ui-bundle.js"):
            async with session.get(gw.url + path) as resp:
                assert resp.status == 404, path
        moved = 'path = "/api/docs"\nopenapi_path = "/api/openapi.json"\nchain = "internal"'
        assert await gw.reload(config(users.url, billing.url, docs=moved))
        async with session.get(f"{gw.url}/api/openapi.json") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        key = {"X-Internal-Key": "k3y"}
        async with session.get(f"{gw.url}/api/openapi.json", headers=key) as resp:
            assert resp.status == 200
            assert "/v1/users/{id}" in (await resp.json())["paths"]
        async with session.get(f"{gw.url}/api/docs/swagger-ui-init.js", headers=key) as resp:
            assert b'"url":"/api/openapi.json"' in await resp.read()
        async with session.get(f"{gw.url}/docs") as resp:
            assert resp.status == 404


async def test_bad_docs_config_is_located(
    tmp_path: Path,
    start_gateway: StartGateway,
    services: tuple[RunningUpstream, RunningUpstream],
    capsys: pytest.CaptureFixture[str],
) -> None:
    users, billing = services
    path = tmp_path / "bad.toml"
    path.write_text(config(users.url, billing.url, docs='chain = "nope"'))
    with pytest.raises(ConfigError, match=r"bad\.toml: docs\.chain: unknown chain 'nope'"):
        await Gateway(path, env=dict(os.environ), host="127.0.0.1", port=0).start()
    # `check` (and so `serve`, before any worker starts) says the same.
    assert cli_main(["check", "--config", str(path)]) == 2
    assert "bad.toml: docs.chain: unknown chain 'nope'" in capsys.readouterr().err
    path.write_text(config(users.url, billing.url, docs='openapi_path = "/docs"'))
    assert cli_main(["check", "--config", str(path)]) == 2
    assert "docs.openapi_path: must differ from docs.path" in capsys.readouterr().err
    # Clashes only the built table shows: the gateway's own paths, plugin endpoints.
    for docs, extra, problem in (
        ('path = "/healthz"', "", "docs.path: /healthz is answered by the gateway itself"),
        (
            'openapi_path = "/metrics"',
            '[plugins.metrics]\npath = "/metrics"\n',
            "docs.openapi_path: /metrics is already served by a plugin endpoint",
        ),
    ):
        path.write_text(config(users.url, billing.url, docs=docs, routes=extra))
        with pytest.raises(ConfigError, match=re.escape(f"bad.toml: {problem}")):
            await Gateway(path, env=dict(os.environ), host="127.0.0.1", port=0).start()
    gw = await start_gateway(config(users.url, billing.url))
    clash = '[[routes]]\nname = "x"\npath = "/docs"\nupstream = "users"\n'
    assert not await gw.reload(config(users.url, billing.url, routes=clash))
    assert not await gw.reload(config(users.url, billing.url, docs='chain = ["jwt", "nope"]'))
    await get_document(gw.url)  # the old docs are still served


async def test_sighup_regenerates_the_document(gateway_process: StartGatewayProcess) -> None:
    text = config("http://127.0.0.1:9", "http://127.0.0.1:9")
    gp = await gateway_process(text)
    doc = await get_document(gp.url)
    assert "/v1/added/{x}" not in doc["paths"]
    extra = '[[routes]]\nname = "added"\npath = "/v1/added/{x}"\nupstream = "users"\n'
    gp.config_path.write_text(config("http://127.0.0.1:9", "http://127.0.0.1:9", routes=extra))
    gp.send_signal(signal.SIGHUP)
    doc = await get_document(gp.url, lambda d: "/v1/added/{x}" in d["paths"])
    validate(doc)
    assert await gp.stop() == 0


async def test_cli_prints_the_document(
    tmp_path: Path, services: tuple[RunningUpstream, RunningUpstream]
) -> None:
    users, billing = services
    path = tmp_path / "config.toml"
    path.write_text(config(users.url, billing.url))

    async def run(*args: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiogateway",
            "openapi",
            "--config",
            str(path),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        doc: dict[str, Any] = orjson.loads(out)
        validate(doc)
        return doc

    plain = await run()
    assert "/v1/billing/{path}" in plain["paths"]
    assert not merged(plain)
    fetched = await run("--fetch")
    assert "/v1/billing/invoices/{invoice_id}" in fetched["paths"]
    assert merged(fetched)
