"""jwt-check: Bearer JWT validation (PyJWT); verified claims forwarded as headers.

The config is checked whole at load (allow-list without ``none``, no HS mixed
with asymmetric algorithms, exactly one key source, key sizes per RFC 7518).
Verification lives in :mod:`plugins.jwt_verify`, keys and JWKS in
:mod:`plugins.jwt_keys`. Failures answer 401 with an RFC 6750
``WWW-Authenticate`` challenge and a generic description; a JWKS that never
loaded answers 503 (the gateway cannot judge the token)::

    [plugins.jwt]
    type = "jwt-check"
    algorithms = ["RS256", "ES256"]
    jwks_url = "https://auth.example.com/.well-known/jwks.json"
    issuer = "auth-service"
    audience = ["api"]
    forward = { sub = "X-User-Id", org_id = "X-Org-Id", role = "X-User-Role" }
    forward_authorization = false     # the upstream sees identity headers only

The token is read from ``Authorization: Bearer``, else the configured
``cookie``, else ``query_param``.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from aiohttp.hdrs import AUTHORIZATION  # an istr: no case folding per lookup
from pydantic import Field, SecretStr, model_validator

from aiogateway import errors
from aiogateway.plugin import GatewayApp, Plugin, PluginConfig
from plugins.jwt_keys import (
    ALG_FAMILIES,
    HMAC_MIN_BYTES,
    JwksCache,
    KeySet,
    load_pem_keys,
    secret_key,
)
from plugins.jwt_verify import Rejection, TokenVerifier

if TYPE_CHECKING:
    from aiogateway.exchange import Exchange

__all__ = ["JwtCheck", "JwtCheckConfig"]

log = logging.getLogger("aiogateway.plugins.jwt")

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers a forward target must never overwrite (routing, framing, credentials, tracing).
_RESERVED = frozenset(
    {
        "authorization",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "cookie",
        "te",
        "trailer",
        "upgrade",
        "keep-alive",
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "proxy-authorization",
    }
)


class JwtCheckConfig(PluginConfig):
    algorithms: list[str] = Field(min_length=1, description="Allowed algs; 'none' never.")
    secret: SecretStr | None = Field(None, description="HMAC secret (HS* algorithms).")
    public_key_file: str | None = Field(None, description="PEM file: one or more public keys.")
    public_key_files: list[str] = Field(default_factory=list, description="Several PEM files.")
    jwks_url: str | None = Field(None, description="JWK Set URL (asymmetric algorithms).")
    jwks_refresh_interval: float = Field(300.0, gt=0, description="Seconds between refreshes.")
    jwks_min_refetch_interval: float = Field(
        30.0, ge=0, description="Unknown kid: at most one refetch per this many seconds."
    )
    issuer: str | list[str] | None = Field(None, description="Accepted iss value(s).")
    audience: str | list[str] | None = Field(None, description="Accepted aud value(s).")
    leeway: float = Field(30.0, ge=0, le=3600, description="Clock skew allowed, seconds.")
    require: list[str] = Field(default_factory=lambda: ["exp", "sub"])
    forward: dict[str, str] = Field(default_factory=dict, description="claim -> upstream header.")
    user_id_claim: str = Field("sub", min_length=1)
    org_id_claim: str = Field("org_id", min_length=1)
    forward_authorization: bool = Field(True, description="Send Authorization upstream.")
    cookie: str | None = Field(None, description="Cookie holding the token (fallback).")
    query_param: str | None = Field(None, description="Query parameter holding the token.")
    realm: str = Field("aiogateway", description="realm of the WWW-Authenticate challenge.")
    cache_size: int = Field(10000, ge=0, description="Verified tokens cached; 0 disables.")

    @property
    def pem_files(self) -> list[str]:
        return ([self.public_key_file] if self.public_key_file else []) + self.public_key_files

    @model_validator(mode="after")
    def _check(self) -> JwtCheckConfig:
        algs = self.algorithms
        for a in algs:
            if a.lower() == "none":
                raise ValueError("algorithms: 'none' is never accepted")
            if a not in ALG_FAMILIES:
                raise ValueError(f"algorithms: unknown {a!r} (known: {', '.join(ALG_FAMILIES)})")
        hmac_algs = [a for a in algs if a.startswith("HS")]
        if hmac_algs and len(hmac_algs) != len(algs):
            # SECURITY: the key-confusion setup (an HS token "signed" with the public key).
            raise ValueError("algorithms: HS* cannot be mixed with asymmetric algorithms")
        sources = [
            n
            for n, v in (
                ("secret", self.secret),
                ("public_key_file(s)", self.pem_files),
                ("jwks_url", self.jwks_url),
            )
            if v
        ]
        if len(sources) != 1:
            raise ValueError(
                "exactly one key source is required: secret, public_key_file(s) or jwks_url"
                + (f" (got {' and '.join(sources)})" if sources else "")
            )
        if self.secret is not None:
            if not hmac_algs:
                raise ValueError("secret needs HS* algorithms")
            raw = self.secret.get_secret_value().encode()
            need = max(HMAC_MIN_BYTES[a] for a in hmac_algs)
            if len(raw) < need:
                raise ValueError(
                    f"secret: at least {need} bytes required for {hmac_algs} "
                    f"(RFC 7518 §3.2), got {len(raw)}"
                )
            if b"-----BEGIN" in raw:
                raise ValueError("secret: looks like a PEM key; use public_key_file")
        elif hmac_algs:
            raise ValueError("HS* algorithms need 'secret' (not public keys or a JWKS)")
        if self.pem_files:
            for n, key in enumerate(load_pem_keys(self.pem_files), 1):
                if not any(key.fits(a) for a in algs):
                    raise ValueError(f"public key {n} ({key.kty}) fits none of {algs}")
        if self.jwks_url is not None and not self.jwks_url.startswith(("http://", "https://")):
            raise ValueError("jwks_url: must start with http:// or https://")
        seen: set[str] = set()
        for claim, header in self.forward.items():
            low = header.lower()
            if not claim or not _TOKEN.match(header) or low in _RESERVED or low in seen:
                raise ValueError(f"forward: {claim!r} -> {header!r} is not a usable header name")
            seen.add(low)
        for what, name in (("cookie", self.cookie), ("query_param", self.query_param)):
            if name is not None and not _TOKEN.match(name):
                raise ValueError(f"{what}: {name!r} is not a valid name")
        if not re.fullmatch(r"[ !#-\[\]-~]*", self.realm):
            raise ValueError("realm: printable ASCII without '\"' or '\\' only")
        if any(not c for c in self.require):
            raise ValueError("require: empty claim name")
        return self


class JwtCheck(Plugin[JwtCheckConfig]):
    """Validates a Bearer JWT; 401 with an RFC 6750 challenge when it fails."""

    type_name = "jwt-check"
    Config = JwtCheckConfig

    def __init__(self, name: str, config: JwtCheckConfig) -> None:
        super().__init__(name, config)
        static: KeySet = KeySet(())
        self.jwks: JwksCache | None = None
        if config.secret is not None:
            static = KeySet([secret_key(config.secret.get_secret_value())])
        elif config.pem_files:
            static = KeySet(load_pem_keys(config.pem_files))
        elif config.jwks_url is not None:  # the validator guarantees exactly one source
            self.jwks = JwksCache(
                config.jwks_url,
                config.algorithms,
                refresh_interval=config.jwks_refresh_interval,
                min_refetch_interval=config.jwks_min_refetch_interval,
            )
        self.verifier = TokenVerifier(config, static, self.jwks)
        self._session: aiohttp.ClientSession | None = None
        self._challenge = f'Bearer realm="{config.realm}"'
        self._identity = tuple(h.lower() for h in config.forward.values())
        self._strip = () if config.forward_authorization else ("authorization",)

    def identity_headers(self) -> tuple[str, ...]:
        return self._identity

    def strip_request_headers(self) -> tuple[str, ...]:
        return self._strip

    async def startup(self, app: GatewayApp) -> None:
        if self.jwks is not None:
            self._session = aiohttp.ClientSession()
            component = f"jwks:{self.name}"
            await self.jwks.start(self._session, lambda ok, d: app.set_ready(component, ok, d))

    async def shutdown(self, app: GatewayApp) -> None:
        if self.jwks is not None:
            await self.jwks.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _token(self, request: web.BaseRequest, auth: str | None) -> str | None:
        """The token: from ``auth`` (the Authorization header), else cookie, else query."""
        if auth is not None:
            if auth[:7] == "Bearer ":
                # The usual spelling: what the split below would find, without it.
                token = auth[7:].strip()
                if token:
                    return token
            else:
                parts = auth.split(None, 1)  # any run of whitespace; scheme case-insensitive
                if len(parts) == 2 and parts[0].lower() == "bearer":
                    return parts[1].strip()
        cfg = self.config
        if cfg.cookie is not None and (value := request.cookies.get(cfg.cookie)):
            return value
        if cfg.query_param is not None and (value := request.query.get(cfg.query_param)):
            return value
        return None

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        request = exchange.request
        auths = request.headers.getall(AUTHORIZATION, ())
        if len(auths) > 1:
            # SECURITY: which one would the upstream believe? Refuse the ambiguity.
            return self._reject(
                exchange, Rejection("several Authorization headers", "duplicate header", 400)
            )
        token = self._token(request, auths[0] if auths else None)
        if not token:
            # RFC 6750 §3.1: no credentials at all -> a bare challenge, no error code.
            return errors.error_response(
                401,
                errors.UNAUTHORIZED,
                "bearer token required",
                exchange.request_id,
                {"WWW-Authenticate": self._challenge},
            )
        verifier = self.verifier
        # A cached verification first, without a coroutine; verify() does the rest.
        hit = verifier.cached(token) if verifier.caching else None
        result = hit if hit is not None else await verifier.verify(token)
        if isinstance(result, Rejection):
            return self._reject(exchange, result)
        exchange.claims = dict(result.claims)  # a copy: the cached dict stays pristine
        exchange.user_id = result.user_id
        exchange.org_id = result.org_id
        if result.headers:
            # What add_upstream_header does per header, in one call.
            exchange.extra_upstream_headers.extend(result.headers)
        return None

    def _reject(self, exchange: Exchange, rejection: Rejection) -> web.StreamResponse:
        exchange.state["jwt_error"] = rejection.reason
        log.debug("%s: request %s rejected: %s", self.name, exchange.request_id, rejection.reason)
        if rejection.status == 503:
            return errors.error_response(
                503, errors.SERVICE_UNAVAILABLE, rejection.description, exchange.request_id
            )
        code = "invalid_request" if rejection.status == 400 else "invalid_token"
        challenge = (
            f'{self._challenge}, error="{code}", error_description="{rejection.description}"'
        )
        api_code = errors.BAD_REQUEST if rejection.status == 400 else errors.UNAUTHORIZED
        return errors.error_response(
            rejection.status,
            api_code,
            rejection.description,
            exchange.request_id,
            {"WWW-Authenticate": challenge},
        )
