"""The ``aiogateway`` command line, run as real processes: check, serve errors, help."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gateway import REPO

GOOD = """
[server]
port = 0

[upstreams.svc]
url = "http://127.0.0.1:9"

[[routes]]
name = "items"
methods = ["GET", "POST"]
path = "/items/{id}"
upstream = "svc"

[[routes]]
prefix = "/files"
upstream = "svc"
strip_prefix = true
"""

# A type error the settings model catches.
BAD_PORT = """
[server]
port = "eighty"

[upstreams.svc]
url = "http://127.0.0.1:9"
"""

# An unknown key inside a route.
BAD_ROUTE_KEY = """
[upstreams.svc]
url = "http://127.0.0.1:9"

[[routes]]
path = "/x"
upstrem = "svc"
upstream = "svc"
"""

# Only building the table finds this one (plugin types are resolved there).
BAD_PLUGIN_TYPE = """
[upstreams.svc]
url = "http://127.0.0.1:9"

[plugins.foo]
type = "no-such-type"

[[routes]]
path = "/x"
upstream = "svc"
chain = ["foo"]
"""


def run_cli(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "aiogateway", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_help_lists_commands(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("serve", "check", "migrate"):
        assert command in result.stdout


def test_check_prints_route_table(tmp_path: Path) -> None:
    config = write(tmp_path, GOOD)
    result = run_cli("check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "METHODS", "PATH", "UPSTREAM", "CHAIN", "EVENT"]
    items = next(line for line in lines if line.startswith("items"))
    assert items.split()[:4] == ["items", "GET,POST", "/items/{id}", "svc"]
    assert "http://127.0.0.1:9" in items
    assert any("/files/**" in line and "(strip)" in line for line in lines)
    assert lines[-1] == f"{config}: OK, 2 routes"


def test_check_default_config_path_is_cwd(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK, 2 routes" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BAD_PORT, ["server.port", "expected an integer", "'eighty'"]),
        (BAD_ROUTE_KEY, ["routes[0]", "upstrem", "unknown key"]),
        (BAD_PLUGIN_TYPE, ["plugins.foo.type", "no-such-type"]),
    ],
    ids=["type", "unknown-key", "plugin-type"],
)
def test_check_bad_config_names_file_and_key(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    config = write(tmp_path, text, "broken.toml")
    result = run_cli("check", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stdout == ""
    assert str(config) in result.stderr
    for part in expected:
        assert part in result.stderr
    assert "Traceback" not in result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    result = run_cli("check", "--config", "nowhere.toml", cwd=tmp_path)
    assert result.returncode != 0
    assert "nowhere.toml" in result.stderr
    assert "not found" in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("text", "expected"),
    [(BAD_PORT, "server.port"), (BAD_PLUGIN_TYPE, "plugins.foo.type")],
    ids=["settings", "plugin-type"],
)
def test_serve_bad_config_exits_with_message(
    tmp_path: Path, text: str, expected: str, workers: str
) -> None:
    # With workers > 1 a supervisor must not start (and endlessly restart)
    # workers for a config that cannot load: the command fails at once.
    config = write(tmp_path, text, "broken.toml")
    result = run_cli(
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--workers",
        workers,
        cwd=tmp_path,
        timeout=20,
    )
    assert result.returncode != 0
    assert str(config) in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_unknown_option_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("serve", "--no-such-flag", cwd=tmp_path)
    assert result.returncode == 2
    assert "usage:" in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port_exits_with_message(tmp_path: Path, workers: str) -> None:
    # With workers > 1 the supervisor must fail too, not restart workers forever.
    config = write(tmp_path, GOOD)
    with socket.socket() as taken:
        # SO_REUSEPORT like another gateway's worker: the new one must not share it.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run_cli(
            "serve",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--workers",
            workers,
            cwd=tmp_path,
            timeout=20,
        )
    assert result.returncode == 1
    assert port in result.stderr
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr
