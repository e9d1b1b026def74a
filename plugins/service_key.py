"""service-key: a shared secret in a header for internal service-to-service routes.

Keys come from ``keys`` (anonymous), ``key_names`` (caller name -> key or list
of keys) and ``keys_file``; several keys at once allow rotation.
``exchange.principal`` is the caller's name, or the plugin instance's name for
an anonymous key. A missing or empty header answers 401, a wrong key 403. The
key header is not forwarded (``strip = true``)::

    [plugins.internal]
    type = "service-key"
    keys = ["${INTERNAL_SERVICE_KEY}"]
    key_names = { billing = ["old-billing-key", "new-billing-key"] }
    keys_file = "/run/secrets/service-keys"

keys_file format: one key per line, ``<key>`` or ``<name> <key>``; lines
starting with ``#`` and blank lines are ignored (no trailing comments)::

    # rotated 2026-11
    k3y-without-a-name
    reports k3y-of-reports

Every presented key is compared with every configured key through
``hmac.compare_digest`` of fixed-length keyed BLAKE2b digests: the time taken reveals
neither which key matched nor the keys' lengths.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import istr
from pydantic import Field, SecretStr, model_validator

from aiogateway import errors
from aiogateway.plugin import Plugin, PluginConfig

if TYPE_CHECKING:
    from aiogateway.exchange import Exchange

__all__ = ["ServiceKey", "ServiceKeyConfig", "read_keys_file"]

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NAME = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")


def _check_key(key: str, where: str) -> None:
    if not key:
        raise ValueError(f"{where}: empty key")
    # HTTP strips surrounding whitespace from header values, and controls cannot be sent:
    # such a key could never match, so it is a configuration mistake.
    if key != key.strip() or any(ord(c) < 0x21 or ord(c) == 0x7F for c in key):
        raise ValueError(f"{where}: key contains whitespace or control characters")


def read_keys_file(path: str) -> list[tuple[str | None, str]]:
    """(name or None, key) per line of a keys file; raises ValueError with the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"keys_file: cannot read {path}: {e}") from None
    out: list[tuple[str | None, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            out.append((None, parts[0]))
        elif len(parts) == 2 and _NAME.match(parts[0]):
            out.append((parts[0], parts[1]))
        else:
            raise ValueError(f"keys_file {path}, line {n}: expected '<key>' or '<name> <key>'")
    return out


class ServiceKeyConfig(PluginConfig):
    header: str = Field("X-Service-Key", description="Request header carrying the key.")
    keys: list[SecretStr] = Field(default_factory=list, description="Accepted keys (rotation).")
    key_names: dict[str, SecretStr | list[SecretStr]] = Field(
        default_factory=dict, description="caller name -> its key(s); sets exchange.principal."
    )
    keys_file: str | None = Field(None, description="File: '<key>' or '<name> <key>' per line.")
    strip: bool = Field(True, description="Do not forward the key header upstream.")

    def entries(self) -> list[tuple[str | None, str]]:
        """Every (caller name or None, key) from keys, key_names and keys_file."""
        out: list[tuple[str | None, str]] = [(None, k.get_secret_value()) for k in self.keys]
        for name, value in self.key_names.items():
            for k in value if isinstance(value, list) else [value]:
                out.append((name, k.get_secret_value()))
        if self.keys_file is not None:
            out.extend(read_keys_file(self.keys_file))
        return out

    @model_validator(mode="after")
    def _check(self) -> ServiceKeyConfig:
        if not _TOKEN.match(self.header):
            raise ValueError(f"header: {self.header!r} is not a valid header name")
        for name in self.key_names:
            if not _NAME.match(name):
                raise ValueError(f"key_names: {name!r} is not a usable caller name")
        entries = self.entries()
        if not entries:
            raise ValueError("at least one key is required (keys, key_names or keys_file)")
        owner: dict[str, str | None] = {}
        for n, (who, key) in enumerate(entries, 1):
            _check_key(key, f"key {n}" + (f" of {who!r}" if who else ""))
            if key in owner and owner[key] != who:
                raise ValueError(f"key {n}: the same key is given to two different callers")
            owner[key] = who
        return self


class ServiceKey(Plugin[ServiceKeyConfig]):
    """Admits requests carrying one of the configured keys."""

    type_name = "service-key"
    Config = ServiceKeyConfig

    def __init__(self, name: str, config: ServiceKeyConfig) -> None:
        super().__init__(name, config)
        # SECURITY: keys are kept only as keyed BLAKE2b digests under a per-process random
        # salt, so every comparison is between two 32-byte values: the time of
        # compare_digest cannot even leak a key's length.
        self._salt = os.urandom(32)
        # The MAC, keyed once; each digest starts from a copy of it.
        self._mac = hashlib.blake2b(key=self._salt, digest_size=32)
        self._keys: tuple[tuple[bytes, str], ...] = tuple(
            (self._digest(key), who or name) for who, key in config.entries()
        )
        self._header = istr(config.header)  # no case folding per lookup
        self._strip = (config.header.lower(),) if config.strip else ()

    def _digest(self, key: str) -> bytes:
        # Keyed BLAKE2b: a MAC with no per-call key schedule (HMAC-SHA256 costs 3x).
        mac = self._mac.copy()  # cheaper than keying a new one (~2 k instructions)
        mac.update(key.encode())
        return mac.digest()

    def strip_request_headers(self) -> tuple[str, ...]:
        return self._strip

    def match(self, presented: str) -> str | None:
        """The caller (principal) owning ``presented``, or None.

        SECURITY: compares against every key, with no early exit, so the time
        taken does not depend on which key (if any) matched.
        """
        digest = self._digest(presented)
        found: str | None = None
        for key, principal in self._keys:
            if hmac.compare_digest(digest, key) and found is None:
                found = principal
        return found

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        values: list[str] = exchange.request.headers.getall(self._header, [])
        n = len(values)
        presented = values[0].strip() if n == 1 else ""
        if not n or (n == 1 and not presented):
            return errors.error_response(
                401, errors.UNAUTHORIZED, "service key required", exchange.request_id
            )
        # Several key headers: ambiguous, refused like a wrong key.
        principal = self.match(presented) if n == 1 else None
        if principal is None:
            return errors.error_response(
                403, errors.FORBIDDEN, "invalid service key", exchange.request_id
            )
        exchange.principal = principal
        return None
