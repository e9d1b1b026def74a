"""JWT helpers for tests, built on joserfc (not PyJWT) plus hand-forged tokens.

Tokens are signed with a different library from the one the gateway verifies
with, so an encoder bug cannot hide a decoder bug. ``forge`` assembles tokens
byte by byte for attacks no library will produce (alg none, key confusion,
broken encodings). :class:`JwksServer` is a real HTTP server publishing a JWK
Set that tests rotate, count hits on, and take down.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
import orjson
from aiohttp import web
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from aiogateway.exchange import Exchange
from aiogateway.plugin import Plugin, PluginConfig
from tests.support.gateway import RunningGateway
from tests.support.upstreams import RecordingUpstream

__all__ = [
    "Answer",
    "IdentityRecorder",
    "JwksServer",
    "KeyPair",
    "assert_rejected",
    "b64url",
    "call",
    "claims",
    "ec_pair",
    "ed_pair",
    "forge",
    "forge_hs",
    "gateway_config",
    "rsa_pair",
    "sign",
]

JoseKey = RSAKey | ECKey | OKPKey


@dataclass
class KeyPair:
    """A private key (joserfc) with the kid/alg it signs for."""

    key: JoseKey
    alg: str
    kid: str

    @property
    def public_pem(self) -> bytes:
        return self.key.as_pem(private=False)

    @property
    def public_jwk(self) -> dict[str, Any]:
        jwk = dict(self.key.as_dict(private=False))
        jwk.update(kid=self.kid, alg=self.alg, use="sig")
        return jwk


_RSA_CACHE: dict[str, RSAKey] = {}


def rsa_pair(kid: str = "rsa-1", alg: str = "RS256") -> KeyPair:
    # RSA generation costs ~50 ms: one key per kid for the whole session.
    if kid not in _RSA_CACHE:
        _RSA_CACHE[kid] = RSAKey.generate_key(2048)
    return KeyPair(_RSA_CACHE[kid], alg, kid)


def ec_pair(kid: str = "ec-1", alg: str = "ES256") -> KeyPair:
    curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
    return KeyPair(ECKey.generate_key(curve), alg, kid)


def ed_pair(kid: str = "ed-1") -> KeyPair:
    return KeyPair(OKPKey.generate_key("Ed25519"), "EdDSA", kid)


def claims(**override: Any) -> dict[str, Any]:
    """A valid claim set (sub, exp in 5 min, iat now); None values remove a claim."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "user-42", "iat": now, "exp": now + 300}
    base.update(override)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    payload: dict[str, Any],
    key: KeyPair | str,
    *,
    alg: str | None = None,
    kid: str | None = None,
    header: dict[str, Any] | None = None,
) -> str:
    """A compact JWS signed by joserfc; ``key`` is a KeyPair or an HMAC secret."""
    if isinstance(key, str):
        jose_key: JoseKey | OctKey = OctKey.import_key(key)
        alg = alg or "HS256"
    else:
        jose_key, alg = key.key, alg or key.alg
        kid = kid if kid is not None else key.kid
    hdr: dict[str, Any] = {"alg": alg, **({"kid": kid} if kid else {}), **(header or {})}
    with warnings.catch_warnings():
        # joserfc flags EdDSA as deprecated by RFC 9864; the gateway still supports it.
        warnings.simplefilter("ignore")
        return jose_jwt.encode(hdr, payload, jose_key, algorithms=[alg])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand: whatever header, any (or no) signature."""
    return ".".join(
        (b64url(orjson.dumps(header)), b64url(orjson.dumps(payload)), b64url(signature))
    )


def forge_hs(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """HMAC-SHA256 over a hand-built token: the key-confusion attack's tool."""
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(payload))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


@dataclass
class JwksServer:
    """A real JWKS endpoint on loopback: ``keys`` is served live, ``hits`` counted."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    url: str = ""
    _runner: web.ServerRunner | None = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.hits += 1
        return web.Response(body=orjson.dumps({"keys": self.keys}), content_type="application/json")

    async def start(self, port: int = 0) -> JwksServer:
        self._runner = web.ServerRunner(web.Server(self._handle), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        return self

    async def stop(self) -> None:
        """Take the server down: connections are refused from now on."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class IdentityRecorder(Plugin[PluginConfig]):
    """A test plugin (``type = "tests.support.tokens:IdentityRecorder"``) placed after an
    auth plugin: records what the exchange says about the caller, by request id."""

    type_name = "identity-recorder"
    seen: ClassVar[dict[str, dict[str, Any]]] = {}

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        IdentityRecorder.seen[exchange.request_id] = {
            "claims": exchange.claims,
            "user_id": exchange.user_id,
            "org_id": exchange.org_id,
            "principal": exchange.principal,
        }
        return None


FORWARD = '{ sub = "X-User-Id", org_id = "X-Org-Id", role = "X-User-Role" }'


def gateway_config(upstream: str, jwt_table: str, server: str = "") -> str:
    return f"""
{server}
[upstreams.svc]
url = "{upstream}"

[plugins.jwt]
type = "jwt-check"
forward = {FORWARD}
{jwt_table}

[plugins.recorder]
type = "tests.support.tokens:IdentityRecorder"

[[routes]]
name = "protected"
path = "/p"
upstream = "svc"
chain = ["jwt", "recorder"]

[[routes]]
name = "open"
path = "/open"
upstream = "svc"
"""


class Answer:
    """A gateway answer: status, headers, JSON body (or {"raw": bytes})."""

    def __init__(self, status: int, headers: Any, body: dict[str, Any]) -> None:
        self.status, self.headers, self.body = status, headers, body


async def call(
    client: aiohttp.ClientSession,
    gw: RunningGateway,
    token: str | None = None,
    *,
    path: str = "/p",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
) -> Answer:
    hdrs: list[tuple[str, str]] = list(
        headers.items() if isinstance(headers, dict) else headers or []
    )
    if token is not None:
        hdrs.append(("Authorization", f"Bearer {token}"))
    async with client.get(gw.url + path, headers=hdrs) as resp:
        raw = await resp.read()
        body = orjson.loads(raw) if resp.content_type == "application/json" else {"raw": raw}
        return Answer(resp.status, resp.headers, body)


def assert_rejected(ans: Answer, upstream: RecordingUpstream, description: str) -> None:
    assert ans.status == 401, ans.body
    assert ans.body["error"] == "unauthorized"
    assert ans.body["message"] == description
    assert ans.headers["WWW-Authenticate"] == (
        f'Bearer realm="aiogateway", error="invalid_token", error_description="{description}"'
    )
    assert upstream.requests == []
