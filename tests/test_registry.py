"""resolve_plugin_class: built-ins (lazily), entry points, module:Class references."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from aiogateway.errors import ConfigError
from aiogateway.plugin import Plugin
from aiogateway.registry import BUILTIN_PLUGINS, ENTRY_POINT_GROUP, resolve_plugin_class
from tests.sample_plugins import HeaderPlugin, ObserverPlugin


def test_module_reference() -> None:
    assert resolve_plugin_class("tests.sample_plugins:HeaderPlugin") is HeaderPlugin
    assert resolve_plugin_class("tests.sample_plugins:ObserverPlugin") is ObserverPlugin


def test_builtin_names_are_the_documented_ones() -> None:
    assert set(BUILTIN_PLUGINS) == {
        "jwt-check",
        "service-key",
        "audit-log",
        "kafka-emit",
        "metrics",
    }


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_builtin_resolves_to_its_class(name: str) -> None:
    module = BUILTIN_PLUGINS[name].partition(":")[0]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    cls = resolve_plugin_class(name)
    assert issubclass(cls, Plugin)
    assert cls.type_name == name


def test_builtins_are_imported_lazily() -> None:
    code = (
        "import sys, aiogateway.registry, aiogateway.build, aiogateway.config\n"
        "print(sorted(m for m in sys.modules if m == 'plugins' or m.startswith('plugins.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_unknown_type_lists_builtins() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_plugin_class("rate-limit", location="plugins.rl.type")
    err = info.value
    assert err.location == "plugins.rl.type"
    assert "unknown plugin type 'rate-limit'" in err.message
    for name in BUILTIN_PLUGINS:
        assert name in err.message
    assert ENTRY_POINT_GROUP in err.message


def test_missing_module() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_plugin_class("tests.nope_nope:X", location="plugins.x.type")
    assert info.value.location == "plugins.x.type"
    assert "no module named 'tests.nope_nope'" in info.value.message


def test_missing_class() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_plugin_class("tests.sample_plugins:Nope")
    assert "module 'tests.sample_plugins' has no attribute 'Nope'" in info.value.message


@pytest.mark.parametrize("ref", ["tests.sample_plugins:", ":HeaderPlugin"])
def test_malformed_reference(ref: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_plugin_class(ref)
    assert "expected 'package.module:Class'" in info.value.message


def test_failing_import_names_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "aiogw_broken_dep.py").write_text("import aiogw_not_installed_dep\n")
    (tmp_path / "aiogw_broken_syntax.py").write_text("def (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as info:
        resolve_plugin_class("aiogw_broken_dep:P")
    message = info.value.message
    assert "importing module 'aiogw_broken_dep' failed" in message
    assert "aiogw_not_installed_dep" in message
    with pytest.raises(ConfigError) as info:
        resolve_plugin_class("aiogw_broken_syntax:P")
    assert "importing module 'aiogw_broken_syntax' failed: SyntaxError" in info.value.message


@pytest.mark.parametrize(
    "ref",
    ["tests.sample_plugins:NotAPlugin", "aiogateway.plugin:Plugin", "tests.sample_plugins:__all__"],
)
def test_non_plugin_rejected(ref: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_plugin_class(ref)
    assert "is not a subclass of aiogateway.plugin.Plugin" in info.value.message


def test_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "aiogw_sample_ep-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aiogw-sample-ep\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n"
        "sample-header = tests.sample_plugins:HeaderPlugin\n"
        "sample-broken = tests.nope_nope:X\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_plugin_class("sample-header") is HeaderPlugin
    with pytest.raises(ConfigError) as info:
        resolve_plugin_class("sample-broken", location="plugins.b.type")
    assert info.value.location == "plugins.b.type"
    assert "cannot load entry point 'tests.nope_nope:X'" in info.value.message
