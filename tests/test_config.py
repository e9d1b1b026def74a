"""load_settings: every error names the file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiogateway.config import ConfigErrors, load_settings
from aiogateway.errors import ConfigError

BASE = """
[upstreams.auth]
url = "http://127.0.0.1:9"
"""


def write(tmp_path: Path, text: str, name: str = "gw.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def fails(path: Path, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env or {})
    err = info.value
    assert err.file == str(path)
    assert str(err).startswith(str(path))
    return err


def test_valid_file_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """
[server]
port = 0
[chains]
public = ["a"]
[[routes]]
methods = ["post"]
path = "/v1/x/{id}"
upstream = "auth"
chain = "public"
event = { topic = "t", type = "x_done" }
""",
    )
    settings = load_settings(path, {})
    assert settings.server.port == 0
    assert settings.routes[0].methods == ["POST"]
    assert settings.upstreams["auth"].url == "http://127.0.0.1:9"
    assert settings.routes[0].event is not None
    assert settings.routes[0].event.topic == "t"


def test_missing_file(tmp_path: Path) -> None:
    err = fails(tmp_path / "nope.toml")
    assert "not found" in err.message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    err = fails(tmp_path)
    assert "cannot read" in err.message


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "[server]\nport = 80\nhost = \n"))
    assert err.location == "line 3, column 8"
    assert "TOML syntax error" in err.message


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    err = fails(write(tmp_path, BASE + "[servers]\nport = 1\n"))
    assert err.location == "servers"
    assert "unknown key 'servers'" in err.message
    assert "did you mean 'server'" in err.message


def test_unknown_key_in_server(tmp_path: Path) -> None:
    err = fails(write(tmp_path, BASE + "[server]\nshutdown_timout = 3\n"))
    assert err.location == "server.shutdown_timout"
    assert "unknown key 'shutdown_timout' (did you mean 'shutdown_timeout'?)" in err.message


def test_unknown_key_in_upstream(tmp_path: Path) -> None:
    err = fails(write(tmp_path, BASE + "conect_timeout = 1\n"))
    assert err.location == "upstreams.auth.conect_timeout"
    assert "did you mean 'connect_timeout'" in err.message


def test_unknown_key_in_route_names_the_route(tmp_path: Path) -> None:
    text = BASE + '[[routes]]\npath = "/a"\nupstream = "auth"\n'
    text += '[[routes]]\nmethods = ["POST"]\npath = "/v1/org"\nupstream = "auth"\nchian = "x"\n'
    err = fails(write(tmp_path, text))
    assert err.location == "routes[1] (POST /v1/org).chian"
    assert "did you mean 'chain'" in err.message


def test_unknown_key_in_event_inline_table(tmp_path: Path) -> None:
    text = BASE + '[[routes]]\nname = "sign-up"\npath = "/a"\nupstream = "auth"\n'
    text += 'event = { topic = "t", type = "x", tpoic = "y" }\n'
    err = fails(write(tmp_path, text))
    assert err.location == "routes[0] (sign-up).event.tpoic"


def test_wrong_type(tmp_path: Path) -> None:
    err = fails(write(tmp_path, BASE + '[server]\nport = "abc"\n'))
    assert err.location == "server.port"
    assert err.message == "expected an integer, got 'abc'"


def test_wrong_type_in_union_is_one_message(tmp_path: Path) -> None:
    err = fails(write(tmp_path, BASE + '[[routes]]\npath = "/a"\nupstream = "auth"\nchain = 5\n'))
    assert err.location == "routes[0] (* /a).chain"
    assert err.message == "expected a string or an array, got 5"


def test_wrong_item_type_in_union_points_at_the_item(tmp_path: Path) -> None:
    text = BASE + '[[routes]]\npath = "/a"\nupstream = "auth"\nchain = ["a", 5]\n'
    err = fails(write(tmp_path, text))
    assert err.location == "routes[0] (* /a).chain[1]"
    assert err.message == "expected a string, got 5"


def test_out_of_range(tmp_path: Path) -> None:
    err = fails(write(tmp_path, BASE + "[server]\nport = 70000\n"))
    assert err.location == "server.port"
    assert err.message == "out of range: must be at most 65535, got 70000"


def test_literal_choices(tmp_path: Path) -> None:
    err = fails(write(tmp_path, BASE + '[server]\nlog_level = "loud"\n'))
    assert err.location == "server.log_level"
    assert "'debug', 'info', 'warning' or 'error'" in err.message
    assert "got 'loud'" in err.message


def test_missing_required_key(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "[upstreams.auth]\nconnect_timeout = 1\n"))
    assert err.location == "upstreams.auth.url"
    assert "required" in err.message


def test_validator_message_is_kept(tmp_path: Path) -> None:
    err = fails(write(tmp_path, '[upstreams.auth]\nurl = "ftp://x"\n'))
    assert err.location == "upstreams.auth.url"
    assert err.message == "must start with http:// or https://"


@pytest.mark.parametrize("where", ['path = "/a"\nprefix = "/b"\n', ""], ids=["both", "neither"])
def test_route_needs_exactly_one_of_path_or_prefix(tmp_path: Path, where: str) -> None:
    text = BASE + f'[[routes]]\nname = "r"\n{where}upstream = "auth"\n'
    err = fails(write(tmp_path, text))
    assert err.location == "routes[0] (r)"
    assert "exactly one of 'path' or 'prefix'" in err.message


def test_all_errors_reported_together(tmp_path: Path) -> None:
    err = fails(write(tmp_path, BASE + '[server]\nport = "x"\nworkers = 0\n'))
    assert isinstance(err, ConfigErrors)
    assert [e.location for e in err.errors] == ["server.port", "server.workers"]
    assert all(e.file == err.file for e in err.errors)
    assert str(err).splitlines() == [
        f"{err.file}: 2 errors:",
        "  server.port: expected an integer, got 'x'",
        "  server.workers: out of range: must be at least 1, got 0",
    ]


def test_unset_env_var(tmp_path: Path) -> None:
    text = BASE + '[plugins.jwt]\ntype = "jwt-check"\nsecret = "${JWT_SECRET}"\n'
    err = fails(write(tmp_path, text))
    assert err.location == "plugins.jwt.secret"
    assert "JWT_SECRET" in err.message


def test_unset_env_var_in_route_is_labelled(tmp_path: Path) -> None:
    text = BASE + '[[routes]]\npath = "/a"\nupstream = "auth"\n'
    text += 'event = { topic = "${T}", type = "x" }\n'
    err = fails(write(tmp_path, text))
    assert err.location == "routes[0] (* /a).event.topic"


def test_env_defaults_escapes_and_int_from_string(tmp_path: Path) -> None:
    text = """
[server]
port = "${PORT:-8002}"
shutdown_timeout = "${GRACE:-2.5}"
access_log = "${ACCESS:-false}"
state_dir = "$${HOME}/x"
[upstreams.auth]
url = "${AUTH_SERVICE_URL:-http://auth-service:8001}"
"""
    path = write(tmp_path, text)
    settings = load_settings(path, {})
    assert settings.server.port == 8002
    assert settings.server.shutdown_timeout == 2.5
    assert settings.server.access_log is False
    assert settings.server.state_dir == "${HOME}/x"
    assert settings.upstreams["auth"].url == "http://auth-service:8001"
    settings = load_settings(path, {"PORT": "9001", "AUTH_SERVICE_URL": "http://a:1"})
    assert settings.server.port == 9001
    assert settings.upstreams["auth"].url == "http://a:1"


def test_non_numeric_env_value_is_a_type_error(tmp_path: Path) -> None:
    err = fails(write(tmp_path, BASE + '[server]\nport = "${PORT}"\n'), {"PORT": "eighty"})
    assert err.location == "server.port"
    assert err.message == "expected an integer, got 'eighty'"


def test_env_defaults_to_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOGW_TEST_PORT", "8123")
    path = write(tmp_path, BASE + '[server]\nport = "${AIOGW_TEST_PORT}"\n')
    assert load_settings(path).server.port == 8123
