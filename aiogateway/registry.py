"""Plugin types: from a config ``type`` string to a Plugin class.

A type is looked up as, in order: a built-in name (its module imported only
when a config uses it, so a gateway without Kafka never imports aiokafka), an
entry point in the ``aiogateway.plugins`` group (third-party packages), or a
``package.module:Class`` reference. Every failure is a ConfigError that says
what was tried.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from typing import Any

from pydantic import BaseModel

from .errors import ConfigError
from .plugin import Plugin, PluginConfig

__all__ = ["BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "resolve_plugin_class"]

BUILTIN_PLUGINS: dict[str, str] = {
    "jwt-check": "plugins.jwt_check:JwtCheck",
    "service-key": "plugins.service_key:ServiceKey",
    "audit-log": "plugins.audit_log:AuditLog",
    "kafka-emit": "plugins.kafka_emit:KafkaEmit",
    "metrics": "plugins.metrics:Metrics",
}
ENTRY_POINT_GROUP = "aiogateway.plugins"

PluginClass = type[Plugin[PluginConfig]]


def resolve_plugin_class(type_name: str, *, location: str = "") -> PluginClass:
    """The Plugin subclass for ``type_name``; errors are located at ``location``."""
    if type_name in BUILTIN_PLUGINS:
        return _check(_import(BUILTIN_PLUGINS[type_name], type_name, location), type_name, location)
    entry = _entry_point(type_name)
    if entry is not None:
        try:
            obj = entry.load()
        except Exception as exc:
            raise ConfigError(
                f"plugin type {type_name!r}: cannot load entry point {entry.value!r} "
                f"(group {ENTRY_POINT_GROUP}): {type(exc).__name__}: {exc}",
                location=location,
            ) from exc
        return _check(obj, type_name, location)
    if ":" in type_name:
        return _check(_import(type_name, type_name, location), type_name, location)
    known = ", ".join(sorted(BUILTIN_PLUGINS))
    close = difflib.get_close_matches(type_name, list(BUILTIN_PLUGINS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"unknown plugin type {type_name!r}{hint}; built-in types: {known}; "
        f"or 'package.module:Class', or an entry point in group {ENTRY_POINT_GROUP!r}",
        location=location,
    )


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP).select(name=name)
    return next(iter(found), None)


def _import(reference: str, type_name: str, location: str) -> Any:
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ConfigError(
            f"plugin type {type_name!r}: expected 'package.module:Class'", location=location
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        # ModuleNotFoundError for the module itself reads differently from a
        # failing import inside it (a missing dependency, a syntax error).
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name:
            detail = f"no module named {module_name!r}"
        else:
            detail = f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        raise ConfigError(f"plugin type {type_name!r}: {detail}", location=location) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"plugin type {type_name!r}: module {module_name!r} has no attribute {attr!r}",
                location=location,
            ) from None
    return obj


def _check(obj: Any, type_name: str, location: str) -> PluginClass:
    if not (isinstance(obj, type) and issubclass(obj, Plugin)) or obj is Plugin:
        raise ConfigError(
            f"plugin type {type_name!r}: {obj!r} is not a subclass of aiogateway.plugin.Plugin",
            location=location,
        )
    config = getattr(obj, "Config", None)
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        raise ConfigError(
            f"plugin type {type_name!r}: {obj.__name__}.Config must be a PluginConfig subclass",
            location=location,
        )
    return obj
