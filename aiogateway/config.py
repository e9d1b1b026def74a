"""Load config.toml: parse, interpolate ``${VAR}``, validate, explain errors.

Every problem surfaces as a :class:`~aiogateway.errors.ConfigError` carrying
the file and a location users read (``server.port``, ``plugins.jwt.secret``,
``routes[3] (POST /v1/org).event.topic``) and a message saying what was
expected. pydantic's errors are translated here, once, for the core's models
and for plugin Configs alike (:func:`pydantic_errors`). All problems of a
file are reported together (:class:`ConfigErrors`), not one per attempt.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .errors import ConfigError
from .interpolate import ConfigErrors, interpolate, join_location
from .settings import GatewaySettings

if TYPE_CHECKING:
    from .routes import RouteTable

__all__ = [
    "ConfigErrors",
    "default_route_name",
    "describe_value",
    "load_settings",
    "load_table",
    "pydantic_errors",
    "route_label",
]

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_ROUTE_LOCATION = re.compile(r"^routes\[(\d+)\]")

_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "tuple_type": "an array",
    "set_type": "an array",
    "frozen_set_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "none_required": "nothing",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "greater_than": ("gt", "greater than"),
    "less_than_equal": ("le", "at most"),
    "less_than": ("lt", "less than"),
}


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> GatewaySettings:
    """Read, interpolate and validate ``path``; raise ConfigError naming the file."""
    file = str(path)
    data = _read_toml(Path(path), file)
    routes = data.get("routes")
    raw_routes = routes if isinstance(routes, list) else []
    try:
        data = interpolate(data, os.environ if env is None else env)
        return GatewaySettings.model_validate(data)
    except ValidationError as exc:
        errors = pydantic_errors(exc, GatewaySettings)
    except ConfigError as exc:
        errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    errors = [_with_route_label(e, raw_routes).in_file(file) for e in errors]
    raise errors[0] if len(errors) == 1 else ConfigErrors(errors)


def load_table(
    path: str | Path,
    env: Mapping[str, str] | None = None,
    previous: RouteTable | None = None,
) -> RouteTable:
    """:func:`load_settings` then :func:`aiogateway.build.build_table`."""
    # Imported here: build.py uses this module's error helpers (import cycle).
    from .build import build_table

    return build_table(load_settings(path, env), str(path), previous)


def _read_toml(path: Path, file: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config file not found (looked in {path.resolve()})", file=file
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=file) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=file) from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _TOML_POSITION.search(message)
        location = f"line {m.group(1)}, column {m.group(2)}" if m else ""
        detail = _TOML_POSITION.sub("", message)
        raise ConfigError(f"TOML syntax error: {detail}", file=file, location=location) from None


# -- route names and labels ----------------------------------------------------


def default_route_name(methods: Sequence[str] | None, path: str | None, prefix: str | None) -> str:
    """``"POST /v1/x"``, ``"GET,HEAD /v1/{id}"``, ``"* /v1/billing/**"`` (any method)."""
    verbs = ",".join(methods) if methods else "*"
    if path is not None:
        return f"{verbs} {path}"
    base = (prefix or "").rstrip("/")
    return f"{verbs} {base}/**"


def route_label(index: int, route: Mapping[str, Any]) -> str:
    """``routes[3] (sign-up)`` or ``routes[3] (POST /v1/org)``: findable by a human."""
    where = f"routes[{index}]"
    name = route.get("name")
    if isinstance(name, str) and name:
        return f"{where} ({name})"
    methods = route.get("methods")
    if not (isinstance(methods, list) and all(isinstance(m, str) for m in methods)):
        methods = None
    path, prefix = route.get("path"), route.get("prefix")
    if isinstance(path, str):
        return f"{where} ({default_route_name(methods, path, None)})"
    if isinstance(prefix, str):
        return f"{where} ({default_route_name(methods, None, prefix)})"
    return where


def _with_route_label(error: ConfigError, raw_routes: list[Any]) -> ConfigError:
    m = _ROUTE_LOCATION.match(error.location)
    if not m:
        return error
    index = int(m.group(1))
    raw = raw_routes[index] if index < len(raw_routes) else None
    if not isinstance(raw, Mapping):
        return error
    location = route_label(index, raw) + error.location[m.end() :]
    return ConfigError(error.message, file=error.file, location=location)


# -- pydantic errors -> ConfigError ---------------------------------------------


def describe_value(value: Any) -> str:
    """A config value as TOML users think of it: 'abc', 12, true, a table, an array."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__} value"


def pydantic_errors(
    exc: ValidationError, model: type[BaseModel], location: str = ""
) -> list[ConfigError]:
    """Translate ``exc`` (from validating ``model``) into located ConfigErrors.

    ``location`` prefixes every path (``plugins.jwt`` for a plugin's Config).
    Union members' tags (``str``, ``list[str]``) are folded into one message.
    """
    # Keep pydantic's order; a union's errors take the place of its first one.
    slots: list[ConfigError | tuple[Any, ...]] = []
    unions: dict[tuple[Any, ...], list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
    for err in exc.errors(include_url=False):
        path, union_at, known = _clean_loc(model, err["loc"])
        if union_at is None:
            slots.append(_convert(location, path, dict(err), known))
            continue
        base = tuple(path[:union_at])
        if base not in unions:
            slots.append(base)
        unions.setdefault(base, []).append((tuple(path), dict(err)))
    out: list[ConfigError] = []
    for slot in slots:
        if isinstance(slot, ConfigError):
            out.append(slot)
        else:
            out.extend(_fold_union(location, slot, unions[slot]))
    return out


def _fold_union(
    location: str, base: tuple[Any, ...], members: list[tuple[tuple[Any, ...], dict[str, Any]]]
) -> list[ConfigError]:
    deepest = max(len(p) for p, _ in members)
    if deepest > len(base):  # the value had a member's shape: its inner error is the one
        return [_convert(location, list(p), e, None) for p, e in members if len(p) == deepest]
    expected = [_EXPECTED.get(e["type"]) for _, e in members]
    if not all(expected):
        return [_convert(location, list(p), e, None) for p, e in members]
    wanted = " or ".join(dict.fromkeys(x for x in expected if x))
    got = describe_value(members[0][1]["input"])
    return [ConfigError(f"expected {wanted}, got {got}", location=_join(location, base))]


def _join(location: str, path: Iterable[str | int]) -> str:
    for key in path:
        location = join_location(location, key)
    return location


def _convert(
    location: str, path: list[Any], err: dict[str, Any], known: list[str] | None
) -> ConfigError:
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    got = describe_value(err["input"])
    where = _join(location, path)
    if kind == "missing":
        return ConfigError("required key is missing", location=where)
    if kind == "extra_forbidden":
        key = str(path[-1]) if path else "?"
        unknown = f"unknown key {key!r}"
        close = difflib.get_close_matches(key, known or [], n=1)
        if close:
            unknown += f" (did you mean {close[0]!r}?)"
        elif known:
            unknown += f" (known keys: {', '.join(known)})"
        return ConfigError(unknown, location=where)
    if kind in _EXPECTED:
        return ConfigError(f"expected {_EXPECTED[kind]}, got {got}", location=where)
    if kind == "literal_error":
        return ConfigError(f"expected one of {ctx.get('expected')}, got {got}", location=where)
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        bound = f"{words} {ctx.get(key)}"
        return ConfigError(f"out of range: must be {bound}, got {got}", location=where)
    if kind in ("string_too_short", "too_short"):
        least = ctx.get("min_length", 1)
        if least == 1:
            return ConfigError("must not be empty", location=where)
        unit = "characters" if kind == "string_too_short" else "items"
        return ConfigError(f"must have at least {least} {unit}, got {got}", location=where)
    if kind in ("string_too_long", "too_long"):
        unit = "characters" if kind == "string_too_long" else "items"
        return ConfigError(f"must have at most {ctx.get('max_length')} {unit}", location=where)
    message: str = err["msg"]
    for lead in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(lead)
    if message[:1].isupper() and not message[1:2].isupper():
        message = message[0].lower() + message[1:]
    return ConfigError(message, location=where)


def _union_members(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) in (Union, types.UnionType):
        return tuple(a for a in get_args(tp) if a is not type(None))
    return None


def _tag(member: Any) -> str:
    return member.__name__ if isinstance(member, type) else str(member)


def _clean_loc(
    model: type[BaseModel], loc: tuple[int | str, ...]
) -> tuple[list[str | int], int | None, list[str] | None]:
    """Drop pydantic's union tags from ``loc`` by walking the model's annotations.

    Returns the user-facing path, where a union tag was dropped (or None), and
    the keys the innermost table accepts (for "did you mean").
    """
    tp: Any = model
    path: list[str | int] = []
    union_at: int | None = None
    known: list[str] | None = None
    for el in loc:
        while get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        members = _union_members(tp)
        if members is not None and len(members) == 1:
            tp, members = members[0], None
        known = None
        if members is not None:
            union_at = len(path)
            tp = next((m for m in members if _tag(m) == el), Any)
            continue
        path.append(el)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            known = list(tp.model_fields)
            field = tp.model_fields.get(el) if isinstance(el, str) else None
            tp = field.annotation if field is not None else Any
        elif origin is dict or origin is Mapping:
            tp = get_args(tp)[1]
        elif origin in (list, tuple, set, frozenset, Sequence):
            args = get_args(tp)
            tp = args[0] if args else Any
        else:
            tp = Any
    return path, union_at, known
