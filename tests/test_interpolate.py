"""``${VAR}`` substitution over parsed TOML data."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiogateway.errors import ConfigError
from aiogateway.interpolate import ConfigErrors, interpolate, join_location


def test_plain_default_and_empty_default() -> None:
    env = {"A": "alpha", "EMPTY": ""}
    data = {"x": "${A}", "y": "${B:-beta}", "z": "${B:-}", "w": "pre-${A}-post", "e": "${EMPTY}"}
    assert interpolate(data, env) == {
        "x": "alpha",
        "y": "beta",
        "z": "",
        "w": "pre-alpha-post",
        "e": "",
    }


def test_default_applies_to_empty_value_like_sh() -> None:
    assert interpolate({"x": "${E:-d}"}, {"E": ""}) == {"x": "d"}
    assert interpolate({"x": "${E:-d}"}, {"E": "set"}) == {"x": "set"}


def test_default_may_hold_urls_and_colons() -> None:
    out = interpolate({"url": "${U:-postgresql://u:p@db:5432/x}"}, {})
    assert out == {"url": "postgresql://u:p@db:5432/x"}


def test_nested_tables_arrays_inline_tables() -> None:
    env = {"K": "k1", "H": "X-Id"}
    data = {
        "plugins": {"internal": {"keys": ["${K}", "static"], "forward": {"sub": "${H}"}}},
        "routes": [{"event": {"topic": "${T:-t}"}}],
        "n": 3,
        "b": True,
    }
    assert interpolate(data, env) == {
        "plugins": {"internal": {"keys": ["k1", "static"], "forward": {"sub": "X-Id"}}},
        "routes": [{"event": {"topic": "t"}}],
        "n": 3,
        "b": True,
    }


def test_keys_are_not_interpolated() -> None:
    assert interpolate({"${A}": "v"}, {"A": "x"}) == {"${A}": "v"}


def test_escape_gives_literal() -> None:
    out = interpolate({"x": "$${A}", "y": "cost $$5 $${B:-c}"}, {"A": "a"})
    assert out == {"x": "${A}", "y": "cost $$5 ${B:-c}"}


@given(st.text(alphabet="${}:-_AB x", max_size=30))
def test_escaping_every_dollar_brace_round_trips(text: str) -> None:
    escaped = text.replace("${", "$${")
    assert interpolate({"k": escaped}, {"A": "a", "B": "b"}) == {"k": text}


def test_value_stays_a_string() -> None:
    assert interpolate({"port": "${PORT:-8002}"}, {}) == {"port": "8002"}
    assert interpolate({"port": "${PORT:-8002}"}, {"PORT": "9000"}) == {"port": "9000"}


def test_unset_variable_is_located() -> None:
    with pytest.raises(ConfigError) as info:
        interpolate({"plugins": {"jwt": {"secret": "${JWT_SECRET}"}}}, {})
    assert info.value.location == "plugins.jwt.secret"
    assert "JWT_SECRET" in info.value.message
    assert "not set" in str(info.value)


def test_unset_in_array_is_located_with_index() -> None:
    with pytest.raises(ConfigError) as info:
        interpolate({"routes": [{}, {"keys": ["a", "${NOPE}"]}]}, {})
    assert info.value.location == "routes[1].keys[1]"


def test_every_unset_variable_is_reported() -> None:
    with pytest.raises(ConfigErrors) as info:
        interpolate({"a": "${X}", "b": {"c": "${Y}"}}, {})
    assert [e.location for e in info.value.errors] == ["a", "b.c"]
    text = str(info.value)
    assert "2 errors" in text
    assert "X" in text
    assert "Y" in text


@pytest.mark.parametrize("bad", ["${}", "${1A}", "${A", "${A-b}", "x ${A B}"])
def test_malformed_reference(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        interpolate({"k": bad}, {"A": "a"})
    assert info.value.location == "k"
    assert "malformed" in info.value.message


def test_location_prefix_and_quoted_keys() -> None:
    with pytest.raises(ConfigError) as info:
        interpolate({"a.b": "${Q}"}, {}, location="plugins")
    assert info.value.location == 'plugins."a.b"'
    assert join_location("", "server") == "server"
    assert join_location("routes", 2) == "routes[2]"


def test_file_attribution_keeps_all_errors() -> None:
    group = ConfigErrors([ConfigError("one", location="a"), ConfigError("two", location="b")])
    moved = group.in_file("gw.toml")
    assert isinstance(moved, ConfigErrors)
    assert [e.file for e in moved.errors] == ["gw.toml", "gw.toml"]
    assert moved.file == "gw.toml"
    assert str(moved).splitlines() == ["gw.toml: 2 errors:", "  a: one", "  b: two"]
