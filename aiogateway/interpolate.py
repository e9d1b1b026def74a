"""``${VAR}`` / ``${VAR:-default}`` substitution in parsed config.toml data.

Only string values are rewritten (keys never are), in nested tables, arrays
and inline tables alike. Results stay strings: pydantic's lax mode turns
``port = "${PORT:-8002}"`` into the int 8002 when the model validates it.
``$${`` escapes a literal ``${``; as in sh, ``:-`` also applies when the
variable is set but empty. Every unset variable without a default is
reported, each located by its key path (``plugins.jwt.secret``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["ConfigErrors", "interpolate", "join_location"]

T = TypeVar("T")

# One alternation so a single left-to-right scan decides escapes, references
# and stray ``${`` alike: "$${A}" is the literal "${A}", never a reference.
_TOKEN = re.compile(
    r"""\$\$\{                                   # escaped literal ${
      | \$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)
            (?::-(?P<default>[^}]*))?\}            # ${VAR} or ${VAR:-default}
      | (?P<bad>\$\{[^}]*\}?)                      # anything else after ${
    """,
    re.VERBOSE,
)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigErrors(ConfigError):
    """Several config problems at once; attributes describe the first, ``str()`` all."""

    def __init__(self, errors: list[ConfigError]) -> None:
        if not errors:
            raise ValueError("ConfigErrors needs at least one error")
        self.errors = list(errors)
        first = errors[0]
        super().__init__(first.message, file=first.file, location=first.location)

    def __str__(self) -> str:
        errors: list[ConfigError] = getattr(self, "errors", [])
        if len(errors) <= 1:
            return super().__str__()
        files = {e.file for e in errors}
        if len(files) != 1:
            return "\n".join([f"{len(errors)} errors:"] + [f"  {e}" for e in errors])
        # One file (the usual case): name it once, then one "location: message" a line.
        head = [f"{files.pop()}: {len(errors)} errors:"] if errors[0].file else []
        body = [f"  {ConfigError(e.message, location=e.location)}" for e in errors]
        return "\n".join(head + body) if head else "\n".join([f"{len(errors)} errors:", *body])

    def in_file(self, file: str) -> ConfigErrors:
        return ConfigErrors([e.in_file(file) for e in self.errors])

    @staticmethod
    def raise_if_any(errors: list[ConfigError]) -> None:
        """Raise the one error as itself, several as a group, none: return."""
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ConfigErrors(errors)


def join_location(base: str, key: str | int) -> str:
    """``plugins`` + ``jwt`` -> ``plugins.jwt``; ``routes`` + 3 -> ``routes[3]``."""
    if isinstance(key, int):
        return f"{base}[{key}]"
    part = key if _BARE_KEY.fullmatch(key) else '"' + key.replace('"', '\\"') + '"'
    return f"{base}.{part}" if base else part


def interpolate(data: T, env: Mapping[str, str], location: str = "") -> T:
    """Return ``data`` with every ``${...}`` in its string values resolved from ``env``.

    Raises :class:`ConfigError` (one) or :class:`ConfigErrors` (several) for
    unset variables without default and malformed references.
    """
    errors: list[ConfigError] = []
    out = _walk(data, env, location, errors)
    ConfigErrors.raise_if_any(errors)
    return out  # type: ignore[no-any-return]


def _walk(value: Any, env: Mapping[str, str], location: str, errors: list[ConfigError]) -> Any:
    if isinstance(value, str):
        return _substitute(value, env, location, errors) if "$" in value else value
    if isinstance(value, Mapping):
        return {k: _walk(v, env, join_location(location, k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, env, join_location(location, i), errors) for i, v in enumerate(value)]
    return value


def _substitute(text: str, env: Mapping[str, str], location: str, errors: list[ConfigError]) -> str:
    def repl(m: re.Match[str]) -> str:
        if m.group("bad") is not None:
            errors.append(
                ConfigError(
                    f"malformed variable reference {m.group('bad')!r}: "
                    "expected ${NAME} or ${NAME:-default} (write $${ for a literal ${)",
                    location=location,
                )
            )
            return ""
        name = m.group("name")
        if name is None:  # the $${ escape
            return "${"
        value = env.get(name)
        default = m.group("default")
        # As in sh and docker compose: ":-" also replaces a variable set to "".
        if default is not None and not value:
            return default
        if value is not None:
            return value
        errors.append(
            ConfigError(
                f"environment variable {name} is not set "
                f"(set it, or give a default: ${{{name}:-default}})",
                location=location,
            )
        )
        return ""

    return _TOKEN.sub(repl, text)
