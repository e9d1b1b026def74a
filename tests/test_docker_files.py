"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose file is parsed (PyYAML) and cross-checked against config.toml:
every variable config.toml reads is set for the gateway, and each points at a
service (or network alias) and port of this same file that really serves it.
``docker compose config`` runs too when the compose plugin is installed. The
Dockerfile's HEALTHCHECK command is executed against a real gateway.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from aiogateway.interpolate import interpolate
from tests.support.gateway import StartGateway, free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment with compose's own ${VAR:-default} resolved to defaults."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v), {}) for k, v in raw.items()}


def _config_vars() -> set[str]:
    """Variables the values of config.toml read (comments do not count)."""
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, str):
            found.update(VAR.findall(node))
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tomllib.loads((REPO / "config.toml").read_text()))
    return found


def _listens(service: dict[str, Any]) -> set[int]:
    """Ports a sample service's command makes it listen on."""
    cmd = service["command"]
    return {int(cmd[i + 1]) for i, arg in enumerate(cmd) if arg == "--port"}


def test_services_and_published_ports() -> None:
    services = _compose()["services"]
    assert set(services) == {"db", "kafka", "auth-service", "echo-service", "gateway"}
    assert services["db"]["ports"] == ["5455:5432"]
    assert services["gateway"]["ports"] == ["8002:8002"]
    assert services["auth-service"]["ports"] == ["8001:8001"]
    assert services["db"]["image"].startswith("postgres:")
    assert services["kafka"]["image"].startswith("apache/kafka:")
    for name in ("auth-service", "echo-service", "gateway"):
        assert services[name]["build"] == "."
        assert services[name]["image"] == "aiogateway:local"


def test_kafka_runs_in_kraft_mode_without_zookeeper() -> None:
    services = _compose()["services"]
    assert not any("zookeeper" in name or "zookeeper" in str(s.get("image", ""))
                   for name, s in services.items())  # fmt: skip
    env = _env(services["kafka"])
    assert not any("ZOOKEEPER" in k for k in env)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:29093"
    assert "CONTROLLER://:29093" in env["KAFKA_LISTENERS"]
    assert "PLAINTEXT://kafka:29092" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_gateway_environment_covers_config_toml_and_points_at_real_services() -> None:
    compose = _compose()
    services = compose["services"]
    gateway_env = _env(services["gateway"])
    needed = _config_vars()
    assert len(needed) == 9  # the seed's four, JWT_SECRET and the four other services
    assert needed <= set(gateway_env), f"not set for the gateway: {needed - set(gateway_env)}"
    # Seed defaults are kept, so config.toml and compose agree even without overrides.
    assert gateway_env["DATABASE_URL"] == "postgresql://user:password@db:5432/gateway_db"
    assert gateway_env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:29092"
    assert gateway_env["INTERNAL_SERVICE_KEY"] == "gateway-secret-key-2024"
    assert len(gateway_env["JWT_SECRET"].encode()) >= 32
    assert gateway_env["JWT_SECRET"] == _env(services["auth-service"])["JWT_SECRET"]

    db = _env(services["db"])
    url = urlsplit(gateway_env["DATABASE_URL"])
    assert (url.hostname, url.port, url.path) == ("db", 5432, "/" + db["POSTGRES_DB"])
    assert (url.username, url.password) == (db["POSTGRES_USER"], db["POSTGRES_PASSWORD"])

    # Every upstream host is a service or an alias, listening on the URL's port.
    hosts: dict[str, dict[str, Any]] = {}
    for name, svc in services.items():
        hosts[name] = svc
        for alias in (svc.get("networks") or {}).get("default", {}).get("aliases", []):
            hosts[alias] = svc
    for var in ("AUTH_SERVICE_URL", "BILLING_SERVICE_URL", "CHAT_SERVICE_URL",
                "TPL_SERVICE_URL", "USER_SERVICE_URL"):  # fmt: skip
        up = urlsplit(gateway_env[var])
        assert up.hostname in hosts, f"{var}: no service or alias {up.hostname}"
        assert up.port in _listens(hosts[up.hostname]), f"{var}: nothing listens on {up.port}"
        default = re.search(rf"\$\{{{var}:-([^}}]*)\}}", (REPO / "config.toml").read_text())
        assert default is not None
        assert default.group(1) == gateway_env[var]

    depends = services["gateway"]["depends_on"]
    assert {k: v["condition"] for k, v in depends.items()} == {
        "db": "service_healthy",
        "kafka": "service_healthy",
        "auth-service": "service_healthy",
        "echo-service": "service_healthy",
    }
    assert "aiogateway migrate" in " ".join(services["gateway"]["command"])


def test_docker_compose_config_when_available() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("no `docker compose` client here; the YAML checks above cover the file")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_slim_base_non_root_user_and_healthcheck() -> None:
    ins = _instructions()
    ops = [op for op, _ in ins]
    assert ops.count("FROM") == 1
    base = dict(ins)["FROM"]
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base), base
    user_at = ops.index("USER")
    assert dict(ins)["USER"] not in ("root", "0")
    assert user_at < ops.index("CMD")
    assert user_at < ops.index("HEALTHCHECK")
    assert "8002" in dict(ins)["EXPOSE"].split()
    copied = " ".join(rest for op, rest in ins if op == "COPY")
    for needed in ("aiogateway", "plugins", "migrations", "config.toml", "setup.cfg", "README.md"):
        assert needed in copied
    assert "aiogateway" in dict(ins)["CMD"]
    assert "serve" in dict(ins)["CMD"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".run"} <= set(ignored)


async def test_healthcheck_command_succeeds_against_a_real_gateway(
    start_gateway: StartGateway,
) -> None:
    healthcheck = dict(_instructions())["HEALTHCHECK"]
    argv = yaml.safe_load(healthcheck[healthcheck.index("CMD") + 3 :])
    assert argv[:2] == ["python", "-c"]
    code = argv[2]
    assert "http://127.0.0.1:8002/healthz" in code
    gw = await start_gateway('[upstreams.x]\nurl = "http://127.0.0.1:9"\n')
    # A subprocess, awaited: the gateway runs in this test's event loop.
    assert await _run_python(code.replace(":8002/", f":{gw.port}/")) == 0
    assert await _run_python(code.replace(":8002/", f":{free_port()}/")) != 0  # nothing there


async def _run_python(code: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)
