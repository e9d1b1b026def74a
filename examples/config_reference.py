"""Generate README.md's config reference from the pydantic models' fields.

Every key of every table (core and built-in plugins) with its type, default
and description. ``tests/test_examples.py`` checks README.md holds exactly
this output; after changing a model, refresh it with::

    .venv/bin/python -m examples.config_reference --write
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from aiogateway.registry import BUILTIN_PLUGINS, resolve_plugin_class
from aiogateway.settings import (
    DocsSettings,
    EventSpec,
    RouteSettings,
    ServerSettings,
    UpstreamSettings,
)

__all__ = ["BEGIN", "END", "README", "reference", "replace_in"]

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- config-reference:begin (generated: python -m examples.config_reference --write) -->"
END = "<!-- config-reference:end -->"

_CORE: list[tuple[str, type[BaseModel]]] = [
    ("[server]", ServerSettings),
    ("[upstreams.NAME]", UpstreamSettings),
    ("[[routes]]", RouteSettings),
    ("routes.event", EventSpec),
    ("[docs]", DocsSettings),
]


def _type(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"\b(typing|pydantic\.\w+|ipaddress|collections\.abc)\.", "", text)
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r"\baiogateway\.[\w.]+\.(\w+)", r"\1", text)
    text = text.replace("SecretStr", "str (secret)").replace("NoneType", "None")
    return re.sub(r"Literal\[([^\]]*)\]", lambda m: " | ".join(m.group(1).split(", ")), text)


def _value(value: Any) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe ends a Markdown table cell, even in `code`


def _rows(model: type[BaseModel]) -> list[str]:
    out = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "**required**"
        elif field.default_factory is not None:
            default = f"`{_value(field.default_factory())}`"  # type: ignore[call-arg]
        else:
            default = f"`{_value(field.default)}`"
        desc = _cell(field.description or "").replace("<", "&lt;")
        out.append(f"| `{name}` | `{_cell(_type(field.annotation))}` | {_cell(default)} | {desc} |")
    return out


def reference() -> str:
    """The whole reference, as Markdown."""
    lines: list[str] = []
    for title, model in _CORE:
        lines += [f"#### `{title}`", "", *_rows(model), ""]
    lines += [
        "#### `[chains]`",
        "",
        '`NAME = ["instance", ...]`: ordered plugin instances; a route\'s `chain` names one',
        "(or lists its instances inline).",
        "",
    ]
    for type_name in sorted(BUILTIN_PLUGINS):
        cls = resolve_plugin_class(type_name)
        lines += [f'#### `[plugins.NAME]` with `type = "{type_name}"`', ""]
        lines += ["`type` names the plugin; it defaults to the instance name NAME.", ""]
        lines += [*_rows(cls.Config), ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_in(text: str, generated: str) -> str:
    """``text`` with the part between the markers replaced by ``generated``."""
    if BEGIN not in text or END not in text:
        raise ValueError("README.md lacks the config-reference markers")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{generated}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args(argv)
    generated = reference()
    if args.write:
        README.write_text(replace_in(README.read_text(), generated))
    else:
        sys.stdout.write(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
