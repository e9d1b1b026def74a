"""``make dev`` / ``make demo`` for real: the launcher, the whole stack, the walkthrough.

The launcher (``python -m aiogateway.demo.devstack``, what ``make dev`` runs)
starts as a subprocess on free ports with the shipped config.toml. With the
session's PostgreSQL and Kafka in ``DATABASE_URL`` / ``KAFKA_BOOTSTRAP_SERVERS``
it must reuse them; with nothing reachable (a fresh machine) it must start an
embedded PostgreSQL and a Tansu broker itself. The walkthrough then runs
against the real gateway, sample services, broker and database: HTTP results,
the CloudEvents consumed from Kafka and the ``audit_log`` rows. The curl
walkthrough the launcher prints is run in bash, as a user would paste it.
Ctrl-C (SIGINT) must stop every process the launcher started.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil  # type: ignore[import-untyped]
import pytest

from aiogateway.demo.walkthrough import Stack, run
from tests.support.gateway import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET", "INTERNAL_SERVICE_KEY")}
    env.update(extra)
    return env


async def _launch(tmp_path: Path, env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiogateway.demo.devstack", "--config", str(REPO / "config.toml"),
        "--run-dir", str(tmp_path / ".run"), "--free-ports", *args,
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def _read_until(proc: asyncio.subprocess.Process, marker: str, seen: list[str]) -> None:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if not line:
            raise AssertionError(f"launcher ended before {marker!r}:\n" + "".join(seen))
        seen.append(line.decode())
        if marker in seen[-1]:
            return


def _gone(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still alive (zombies count as gone)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


async def test_make_dev_reuses_services_runs_the_walkthrough_and_stops_on_ctrl_c(
    tmp_path: Path, database_url: str, kafka_bootstrap: str
) -> None:
    proc = await _launch(
        tmp_path, _env(DATABASE_URL=database_url, KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap)
    )
    out: list[str] = []
    try:
        await _read_until(proc, "grep '^gateway_requests_total'", out)
        banner = "".join(out)
        stack = Stack.load(tmp_path / ".run" / "devstack.json")
        # Reachable services are reused, not replaced.
        assert stack.database_url == database_url
        assert stack.kafka == kafka_bootstrap
        assert "(from DATABASE_URL; migrations: 0001_audit_log, 0002_audit_log_indexes)" in banner
        assert "(from KAFKA_BOOTSTRAP_SERVERS; topics: auth-events, organization-events," in banner
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 3  # auth-service, echo service, gateway

        lines: list[str] = []
        w = await run(stack, out=lines.append)
        _assert_walkthrough(w, lines)
        await _run_pasted_walkthrough(banner, tmp_path)
        await _assert_docs(banner, stack.gateway)

        # `make demo` while `make dev` runs: it uses the running stack, starts nothing.
        demo = await _launch(tmp_path, _env(), "--demo")
        demo_out, _ = await asyncio.wait_for(demo.communicate(), 120)
        assert demo.returncode == 0, demo_out.decode()
        assert "using the running dev stack" in demo_out.decode()
        assert f"Walkthrough against {stack.gateway}" in demo_out.decode()
        assert "starting" not in demo_out.decode()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        rest = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, "".join(out) + rest[0].decode()
    assert "dev stack stopped" in rest[0].decode()
    assert not _gone(children)
    assert not (tmp_path / ".run" / "devstack.json").exists()


async def _assert_docs(banner: str, gateway: str) -> None:
    """The API docs the banner names: Swagger UI, and the auth-service's bodies merged."""
    found = re.search(r"^  API docs +(\S+)/docs ", banner, re.MULTILINE)
    assert found is not None, banner
    assert found.group(1) == gateway
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway}/docs") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
        for _ in range(100):  # the auth-service's document is fetched in the background
            async with session.get(f"{gateway}/openapi.json") as resp:
                assert resp.status == 200
                doc = await resp.json()
            if "SignUp" in doc["components"]["schemas"]:
                break
            await asyncio.sleep(0.1)
    sign_up = doc["paths"]["/v1/client/sign-up"]["post"]
    schema = sign_up["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/SignUp"}


def _assert_walkthrough(w: object, lines: list[str]) -> None:
    from aiogateway.demo.walkthrough import Walkthrough

    assert isinstance(w, Walkthrough)
    assert [(s.name, s.status) for s in w.steps] == [
        ("sign-up", 201), ("sign-in", 200), ("me", 200), ("me-no-token", 401),
        ("create-org", 201), ("billing", 200), ("get-user", 200),
    ]  # fmt: skip
    user = w.user_id
    assert w.step("me").body["email"].startswith("ada-")
    # The echo service saw the identity the gateway took from the verified token.
    assert w.step("billing").body["headers"]["X-User-Id"] == user
    assert w.step("me-no-token").body["error"] == "unauthorized"

    by_route = {e["data"]["route"]: e for e in w.events}
    assert sorted(by_route) == ["create-org", "get-user", "me", "sign-in", "sign-up"]
    assert len(w.events) == 5
    expect = {
        "sign-up": ("auth-events", "user_registered", None),
        "sign-in": ("auth-events", "user_logged_in", None),
        "me": ("user-events", "user_info_requested", user),
        "create-org": ("organization-events", "organization_created", user),
        "get-user": ("user-events", "user_detail_requested", None),
    }
    for route, (topic, type_, subject) in expect.items():
        ev = by_route[route]
        step = w.step(route)
        assert (ev["topic"], ev["type"], ev["subject"]) == (topic, type_, subject)
        assert ev["specversion"] == "1.0"
        assert ev["source"] == "aiogateway"
        assert ev["data"]["request_id"] == step.request_id
        assert ev["data"]["status"] == step.status
        assert ev["data"]["path"] == step.path
    # Kafka key: the user id when known, else the route's first param, else the request id.
    assert by_route["me"]["key"] == user
    assert by_route["get-user"]["key"] == user
    assert by_route["get-user"]["data"]["params"] == {"id": user}
    assert by_route["sign-up"]["key"] == w.step("sign-up").request_id

    rows = {r["request_id"]: r for r in w.audit}
    assert len(rows) == 7
    for step in w.steps:
        row = rows[step.request_id]
        route = "me" if step.name == "me-no-token" else step.name
        assert (row["route"], row["method"], row["path"], row["status"]) == (
            route, step.method, step.path, step.status,
        )  # fmt: skip
        assert row["client_ip"] == "127.0.0.1"
        assert row["user_agent"] == "aiogateway-demo"
        assert row["upstream"] == ("billing" if step.name == "billing" else "auth")
        signed_in = step.name in ("me", "create-org", "billing")
        assert row["user_id"] == (user if signed_in else None)
    assert any('route="sign-up",status="201"' in m for m in w.metrics)
    assert any('route="me",status="401"' in m for m in w.metrics)
    text = "\n".join(lines)
    assert "1. sign-up" in text
    assert "Kafka events" in text
    assert "audit_log rows" in text


async def _run_pasted_walkthrough(banner: str, tmp_path: Path) -> None:
    """The printed curl walkthrough, pasted into bash in the launcher's directory."""
    script = banner.split("Try it (copy-paste into another terminal, in this directory):", 1)[1]
    assert script.strip().startswith("GW=http://127.0.0.1:")
    script = script.replace(".venv/bin/python", sys.executable)
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    text = stdout.decode()
    assert proc.returncode == 0, text + stderr.decode()
    assert '"email": "ada@example.com"' in text
    assert re.search(r"^HTTP/1\.1 401", text, re.MULTILINE)
    assert '"service": "billing"' in text
    assert '"type": "user_registered"' in text  # `walkthrough events`
    assert '"route": "get-user"' in text  # `walkthrough audit`
    assert re.search(r'^gateway_requests_total\{.*route="me",status="200"\}', text, re.MULTILINE)


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A directory outside pytest's tree: another pytest run resets /tmp/pytest-of-<user>
    to 0700, which would lock the embedded PostgreSQL's service user out mid-test."""
    path = Path(tempfile.mkdtemp(prefix="aiogw-devstack-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_make_demo_on_a_fresh_machine_starts_its_own_postgres_and_broker(
    outside_tmp: Path,
) -> None:
    tmp_path = outside_tmp
    nowhere = free_port()  # nothing listens here: neither PostgreSQL nor Kafka answers
    env = _env(
        DATABASE_URL=f"postgresql://user:password@127.0.0.1:{nowhere}/gateway_db",
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{nowhere}",
    )
    proc = await _launch(tmp_path, env, "--demo")
    stdout, _ = await asyncio.wait_for(proc.communicate(), 200)
    text = stdout.decode()
    assert proc.returncode == 0, text
    assert "starting an embedded one" in text
    assert "starting a Tansu broker" in text
    assert "(embedded, throwaway, data in" in text
    assert "(Tansu, memory only;" in text
    for expected in ("7. get-user", "organization_created", "user_info_requested", "audit_log"):
        assert expected in text
    assert "dev stack stopped" in text
    # Nothing left behind: no data directory, no process running from it.
    assert not list((tmp_path / ".run").glob("postgres-*"))
    kafka = re.search(r"Kafka +(127\.0\.0\.1:\d+)", text)
    assert kafka is not None
    marks = (str(tmp_path), f"tcp://{kafka.group(1)}")
    leftovers = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if any(m in cmdline for m in marks):
            leftovers.append(cmdline)
    assert not leftovers


async def test_make_dev_refuses_a_busy_port_and_says_which(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        nowhere = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiogateway.demo.devstack", "--config", str(REPO / "config.toml"),
            "--run-dir", str(tmp_path / ".run"), "--gateway-port", str(port),
            env=_env(DATABASE_URL=f"postgresql://u:p@127.0.0.1:{nowhere}/d",
                     KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{nowhere}"),
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert re.search(rf"port\(s\) [\d, ]*\b{port}\b[\d, ]* already in use", out.decode())
    assert not list((tmp_path / ".run").glob("postgres-*"))
