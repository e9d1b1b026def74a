"""Token verification for jwt-check: PyJWT with an allow-list, key selection and an LRU.

:class:`TokenVerifier` turns a raw token into :class:`Verified` (claims, ids,
headers to forward) or a :class:`Rejection` with a generic description. Only
algorithms in the allow-list verify, each only with a key of its own family
(:meth:`plugins.jwt_keys.KeySet.candidates`). Successes are cached by raw token,
never past exp + leeway, and dropped when a JWKS key disappears.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt
import orjson
from jwt.types import Options

from plugins.jwt_keys import MAX_KID_CHARS, JwksCache, KeySet, VerifyKey

if TYPE_CHECKING:
    from plugins.jwt_check import JwtCheckConfig

__all__ = [
    "BAD_SIGNATURE",
    "EXPIRED",
    "INVALID",
    "NOT_YET_VALID",
    "Rejection",
    "TokenVerifier",
    "Verified",
]

# Descriptions clients see: generic on purpose, never which key or claim value.
EXPIRED = "token expired"
NOT_YET_VALID = "token not yet valid"
BAD_SIGNATURE = "invalid signature"
INVALID = "token invalid"

MAX_TOKEN_CHARS = 16384  # far above any sane JWT; longer ones are not even parsed
MAX_KEYS_TRIED = 8  # kid-less tokens try each fitting key; bound the crypto per request
NO_EXP_CACHE_SECONDS = 60.0  # a token without exp is re-verified at least this often


@dataclass(frozen=True, slots=True)
class Verified:
    """A verified token: what the exchange gets; cached until ``expires_at``."""

    claims: dict[str, Any]
    user_id: str | None
    org_id: str | None
    headers: tuple[tuple[str, str], ...]
    expires_at: float  # wall clock; never past exp + leeway


@dataclass(frozen=True, slots=True)
class Rejection:
    description: str  # shown to the client (generic)
    reason: str  # for logs and exchange.state (no token material)
    status: int = 401


def _claim_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None


def _header_value(value: Any) -> str | None:
    text = _claim_str(value)
    if text is None and isinstance(value, list | dict):
        text = orjson.dumps(value).decode()
    # SECURITY: a claim must not smuggle CR/LF or other controls into upstream headers.
    if text is None or len(text) > 4096 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return None
    # Header values travel as latin-1 strings; non-ASCII claims go out as their
    # UTF-8 bytes (as nginx/Kong send them), never as an encoding error.
    return text if text.isascii() else text.encode().decode("latin-1")


class TokenVerifier:
    """Verifies raw tokens against a static KeySet or a JwksCache, with an LRU cache."""

    def __init__(self, config: JwtCheckConfig, keys: KeySet, jwks: JwksCache | None) -> None:
        self.config = config
        self._static = keys
        self._jwks = jwks
        self._algorithms = frozenset(config.algorithms)
        self._jwt = jwt.PyJWT()
        self._options: Options = {
            "require": list(config.require),
            "verify_aud": config.audience is not None,
            "enforce_minimum_key_length": True,
        }
        self._issuer = config.issuer
        self._audience = config.audience
        self._cache: OrderedDict[str, Verified] = OrderedDict()
        self._cache_size = config.cache_size
        self.caching = config.cache_size > 0
        self._generation = 0

    def _keyset(self) -> KeySet:
        return self._jwks.keys if self._jwks is not None else self._static

    def cached(self, token: str) -> Verified | None:
        """The cached verification of this exact token, if still valid."""
        if self._jwks is not None and self._jwks.generation != self._generation:
            # A trusted key vanished: everything it vouched for must be re-verified.
            self._cache.clear()
            self._generation = self._jwks.generation
        hit = self._cache.get(token)
        if hit is None:
            return None
        if hit.expires_at <= time.time():
            del self._cache[token]
            return None
        self._cache.move_to_end(token)
        return hit

    async def verify(self, token: str) -> Verified | Rejection:
        if self.caching:
            hit = self.cached(token)
            if hit is not None:
                return hit
        if len(token) > MAX_TOKEN_CHARS:
            return Rejection(INVALID, "too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return Rejection(INVALID, "malformed")
        alg, kid = header.get("alg"), header.get("kid")
        # SECURITY: the allow-list decides, never the token; "none" is never in it.
        if not isinstance(alg, str) or alg not in self._algorithms:
            return Rejection(INVALID, "algorithm not allowed")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            return Rejection(INVALID, "bad kid")
        keys = self._keyset().candidates(alg, kid)
        if not keys and self._jwks is not None:
            await self._jwks.refetch_for_unknown_kid()
            if not self._jwks.loaded:
                return Rejection("signing keys unavailable", "jwks unavailable", 503)
            keys = self._jwks.keys.candidates(alg, kid)
        if not keys:
            return Rejection(BAD_SIGNATURE, "no key for kid/alg")
        result = self._decode(token, alg, keys)
        if isinstance(result, Verified) and self._cache_size:
            # No await since the keys were read: the generation is still theirs.
            self._cache[token] = result
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result

    def _decode(self, token: str, alg: str, keys: tuple[VerifyKey, ...]) -> Verified | Rejection:
        for key in keys[:MAX_KEYS_TRIED]:
            try:
                claims = self._jwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],  # only the alg this key was chosen for
                    options=self._options,
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self.config.leeway,
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue  # maybe the next key (rotation, kid-less token)
            except jwt.ExpiredSignatureError:
                return Rejection(EXPIRED, "expired")
            except jwt.ImmatureSignatureError:
                return Rejection(NOT_YET_VALID, "nbf/iat in the future")
            except jwt.InvalidIssuerError:
                return Rejection(INVALID, "issuer")
            except jwt.InvalidAudienceError:
                return Rejection(INVALID, "audience")
            except jwt.MissingRequiredClaimError:
                return Rejection(INVALID, "missing claim")
            except jwt.PyJWTError:
                return Rejection(INVALID, "claims")
            return self._accept(claims)
        return Rejection(BAD_SIGNATURE, "signature")

    def _accept(self, claims: dict[str, Any]) -> Verified:
        cfg = self.config
        exp = claims.get("exp")
        now = time.time()
        expires = (
            float(exp) + cfg.leeway if isinstance(exp, int | float) else now + NO_EXP_CACHE_SECONDS
        )
        headers = []
        for claim, header in cfg.forward.items():
            if claim in claims:
                value = _header_value(claims[claim])
                if value is not None:
                    headers.append((header, value))
        return Verified(
            claims=claims,
            user_id=_claim_str(claims.get(cfg.user_id_claim)),
            org_id=_claim_str(claims.get(cfg.org_id_claim)),
            headers=tuple(headers),
            expires_at=expires,
        )
