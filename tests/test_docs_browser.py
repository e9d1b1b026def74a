"""/docs in a real browser: headless Chromium (Debian's ``chromium``) loads Swagger UI
from the gateway (no network beyond loopback), which fetches /openapi.json and
renders the operations list, the upstream's own summaries and schemas included.
Assertions are on the rendered DOM; the screenshot is kept for people, not compared.

The shipped config.toml with the sample auth-service is rendered too: what
``make dev`` shows at http://localhost:8002/docs."""

from __future__ import annotations

import asyncio
import html
import re
import shutil
from pathlib import Path

import pytest

from aiogateway.demo.auth_openapi import document as auth_document
from tests.support.gateway import RunningGateway, StartGateway
from tests.support.upstreams import StartUpstream
from tests.test_examples import shipped
from tests.test_openapi import BILLING_DOC, USERS_DOC, config, get_document, merged, service_app

__all__ = ["shipped"]  # the fixture: the shipped config.toml before the sample services

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test-tools installs it as root)"
)


async def chromium(profile: Path, *args: str) -> bytes:
    """Run headless Chromium to completion; its stdout."""
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        # Virtual time runs until the page (scripts, the /openapi.json fetch) is idle.
        "--virtual-time-budget=30000",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 180)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


def rendered_operations(dom: str) -> set[tuple[str, str]]:
    return {
        (html.unescape(method), html.unescape(path))
        for method, path in re.findall(
            r'opblock-summary-method">([A-Z]+)</span>.*?data-path="([^"]+)"', dom
        )
    }


async def test_docs_render_operations_in_headless_chromium(
    tmp_path: Path, start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    users = await start_upstream(service_app(USERS_DOC))
    billing = await start_upstream(service_app(BILLING_DOC))
    gw = await start_gateway(config(users.url, billing.url))
    await get_document(gw.url, lambda d: merged(d) and "Invoice" in d["components"]["schemas"])
    url = f"{gw.url}/docs"

    dom = (await chromium(tmp_path / "profile", "--dump-dom", url)).decode()
    assert 'id="swagger-ui"' in dom
    assert "Unable to render this definition" not in dom
    assert "Failed to load API definition" not in dom
    rendered = rendered_operations(dom)
    assert {
        ("GET", "/v1/users/{id}"),
        ("DELETE", "/v1/users/{id}"),
        ("GET", "/v1/billing/invoices"),
        ("GET", "/v1/billing/invoices/{invoice_id}"),
        ("POST", "/internal/stats/{day}"),
    } <= rendered
    assert "Read User" in dom  # the upstream's own summary, merged
    for schema in ("GatewayError", "HTTPValidationError", "Invoice", "billing_User"):
        assert f">{schema}<" in dom, schema
    assert "OAS 3.1" in dom

    shot = tmp_path / "docs.png"
    await chromium(
        tmp_path / "profile-shot", "--window-size=1280,1800", f"--screenshot={shot}", url
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


async def test_shipped_docs_render_every_seed_endpoint_with_the_auth_bodies(
    tmp_path: Path, shipped: RunningGateway
) -> None:
    await get_document(shipped.url, lambda d: "SignUp" in d["components"]["schemas"])
    dom = (await chromium(tmp_path / "profile", "--dump-dom", f"{shipped.url}/docs")).decode()
    assert "Failed to load API definition" not in dom
    own = auth_document()["paths"]
    seed = {(m.upper(), p) for p, item in own.items() for m in item if p != "/healthz"}
    seed |= {("GET", f"/v1/{name}/{{path}}") for name in ("billing", "chat", "tpl", "user")}
    assert len(seed) == 21
    assert seed <= rendered_operations(dom)
    for summary in ("Sign up", "Sign in with a password", "Accept an invite"):
        assert f">{summary}<" in dom, summary  # the auth-service's own summaries
    for schema in ("SignUp", "Session", "MemberList", "InviteCreate", "GatewayError"):
        assert f">{schema}<" in dom, schema
