"""The shipped config.toml: the seed gateway's complete route table, nothing more or less.

``aiogateway check`` runs for real (a subprocess) and its printed table is
compared row by row with the seed's endpoint list; the variables keep their
names and defaults.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aiogateway.config import load_settings, load_table
from aiogateway.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.toml"
SECRET = "a-test-secret-of-at-least-32-bytes!!"
SEED_VARS = (
    "DATABASE_URL", "AUTH_SERVICE_URL", "KAFKA_BOOTSTRAP_SERVERS", "INTERNAL_SERVICE_KEY",
    "BILLING_SERVICE_URL", "CHAT_SERVICE_URL", "TPL_SERVICE_URL", "USER_SERVICE_URL",
)  # fmt: skip

AUTH = "auth (http://auth-service:8001)"
PUBLIC = "metrics,audit,events"
JWT = "metrics,jwt,audit,events"
INTERNAL = "metrics,internal,audit,events"

# name, methods, path, upstream, chain, event: the seed's endpoints, in order.
EXPECTED = [
    ("sign-up", "POST", "/v1/client/sign-up", AUTH, PUBLIC, "auth-events:user_registered"),
    ("sign-in", "POST", "/v1/client/sign-in/password", AUTH, PUBLIC, "auth-events:user_logged_in"),
    ("refresh-token", "POST", "/v1/client/refresh_token", AUTH, PUBLIC,
     "auth-events:token_refreshed"),
    ("logout", "POST", "/v1/client/logout", AUTH, PUBLIC, "auth-events:user_logged_out"),
    ("me", "GET", "/v1/client/me", AUTH, JWT, "user-events:user_info_requested"),
    ("switch-org", "PATCH", "/v1/client/switch-org", AUTH, JWT,
     "user-events:organization_switched"),
    ("create-org", "POST", "/v1/org", AUTH, JWT, "organization-events:organization_created"),
    ("list-members", "GET", "/v1/org/{id}/members", AUTH, JWT,
     "organization-events:members_listed"),
    ("invite-user", "POST", "/v1/org/{id}/invite", AUTH, JWT, "organization-events:user_invited"),
    ("accept-invite", "POST", "/v1/invite/accept", AUTH, JWT,
     "organization-events:invite_accepted"),
    ("remove-member", "DELETE", "/v1/org/{id}/member/{user_id}", AUTH, JWT,
     "organization-events:member_removed"),
    ("update-member-role", "PATCH", "/v1/org/{id}/member/{user_id}/role", AUTH, JWT,
     "organization-events:member_role_updated"),
    ("validate-token", "GET", "/auth/validate", AUTH, INTERNAL, "auth-events:token_validated"),
    ("get-user", "GET", "/auth/user/{id}", AUTH, INTERNAL, "user-events:user_detail_requested"),
    ("get-user-orgs", "GET", "/auth/user/{id}/orgs", AUTH, INTERNAL,
     "user-events:user_orgs_requested"),
    ("get-org", "GET", "/auth/org/{id}", AUTH, INTERNAL, "-"),
    ("get-org-members", "GET", "/auth/org/{id}/members", AUTH, INTERNAL, "-"),
    ("billing", "*", "/v1/billing/**", "billing (http://billing-service:8003)", JWT, "-"),
    ("chat", "*", "/v1/chat/**", "chat (http://chat-service:8004)", JWT, "-"),
    ("tpl", "*", "/v1/tpl/**", "tpl (http://tpl-service:8005)", JWT, "-"),
    ("user", "*", "/v1/user/**", "user (http://user-service:8006)", JWT, "-"),
]  # fmt: skip


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SEED_VARS and k != "JWT_SECRET"}
    return {**env, **extra}


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiogateway", "check", "--config", str(CONFIG)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def _rows(output: str) -> list[tuple[str, ...]]:
    lines = output.splitlines()
    assert lines[0].split() == ["NAME", "METHODS", "PATH", "UPSTREAM", "CHAIN", "EVENT"]
    # Columns are aligned on the header: cut each row at the header's column starts.
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    rows = []
    for line in lines[1:]:
        if line.startswith(("plugins:", "endpoints:")) or ": OK," in line:
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(tuple(cells))
    return rows


def test_check_prints_exactly_the_seed_route_table() -> None:
    result = _check(_clean_env(JWT_SECRET=SECRET))
    assert result.returncode == 0, result.stderr
    assert _rows(result.stdout) == EXPECTED
    assert "config.toml: OK, 21 routes" in result.stdout
    assert (
        "plugins: metrics (metrics), jwt (jwt-check), internal (service-key), "
        "audit (audit-log), events (kafka-emit)"
    ) in result.stdout
    assert "endpoints: /metrics" in result.stdout


def test_upstream_urls_follow_their_variables() -> None:
    env = _clean_env(
        JWT_SECRET=SECRET,
        AUTH_SERVICE_URL="http://127.0.0.1:9101",
        CHAT_SERVICE_URL="http://chat.internal:7000",
    )
    result = _check(env)
    assert result.returncode == 0, result.stderr
    rows = {r[0]: r for r in _rows(result.stdout)}
    assert rows["me"][3] == "auth (http://127.0.0.1:9101)"
    assert rows["chat"][3] == "chat (http://chat.internal:7000)"
    assert rows["billing"][3] == "billing (http://billing-service:8003)"


def test_without_jwt_secret_check_names_the_key_and_fails() -> None:
    result = _check(_clean_env())
    assert result.returncode == 2
    assert "config.toml: plugins.jwt.secret: environment variable JWT_SECRET is not set" in (
        result.stderr
    )
    assert result.stdout == ""


def test_seed_variables_keep_their_names_and_defaults() -> None:
    settings = load_settings(CONFIG, {"JWT_SECRET": SECRET})
    plugins = settings.plugins
    assert settings.server.port == 8002
    assert plugins["audit"]["dsn"] == "postgresql://user:password@db:5432/gateway_db"
    assert plugins["audit"]["migrate"] is True
    assert plugins["events"]["bootstrap_servers"] == "kafka:29092"
    assert plugins["internal"]["keys"] == ["gateway-secret-key-2024"]
    assert plugins["jwt"]["secret"] == SECRET
    text = CONFIG.read_text()
    for var, default in [
        ("DATABASE_URL", "postgresql://user:password@db:5432/gateway_db"),
        ("AUTH_SERVICE_URL", "http://auth-service:8001"),
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka:29092"),
        ("INTERNAL_SERVICE_KEY", "gateway-secret-key-2024"),
        ("BILLING_SERVICE_URL", "http://billing-service:8003"),
        ("CHAT_SERVICE_URL", "http://chat-service:8004"),
        ("TPL_SERVICE_URL", "http://tpl-service:8005"),
        ("USER_SERVICE_URL", "http://user-service:8006"),
    ]:
        assert f"${{{var}:-{default}}}" in text
    env = {
        "JWT_SECRET": SECRET,
        "INTERNAL_SERVICE_KEY": "rotated",
        "DATABASE_URL": "postgresql://a@h/d",
    }
    overridden = load_settings(CONFIG, env).plugins
    assert overridden["internal"]["keys"] == ["rotated"]
    assert overridden["audit"]["dsn"] == "postgresql://a@h/d"


def test_every_route_has_a_readable_unique_name_and_jwt_forwards_identity() -> None:
    table = load_table(CONFIG, {"JWT_SECRET": SECRET})
    names = [r.name for r in table.routes]
    assert len(set(names)) == len(names) == 21
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", n) for n in names)
    assert table.identity_headers == {"x-user-id", "x-org-id", "x-user-role"}
    assert all(r.websocket for r in table.routes if r.name == "chat")


def test_a_short_jwt_secret_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"plugins\.jwt.*at least 32 bytes"):
        load_table(CONFIG, {"JWT_SECRET": "too-short"})
