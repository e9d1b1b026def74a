"""Verification keys for jwt-check: PEM files, an HMAC secret, a JWKS URL.

A :class:`KeySet` is an immutable snapshot of the trusted keys; jwt-check asks
it for the keys that may verify a token of a given ``alg`` (and ``kid``).
:class:`JwksCache` keeps a JWKS document fetched over HTTP: loaded at startup,
refreshed on a timer and, rate-limited, when a token names an unknown ``kid``;
when the server is down the last good key set keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

__all__ = [
    "ALG_FAMILIES",
    "HMAC_MIN_BYTES",
    "MAX_KID_CHARS",
    "RSA_MIN_BITS",
    "JwksCache",
    "KeySet",
    "VerifyKey",
    "key_from_public",
    "load_pem_keys",
    "parse_jwks",
    "secret_key",
]

log = logging.getLogger("aiogateway.plugins.jwt")

#: alg -> (JWK kty, curve or None). "none" is deliberately absent: it is never accepted.
ALG_FAMILIES: dict[str, tuple[str, str | None]] = {
    "HS256": ("oct", None),
    "HS384": ("oct", None),
    "HS512": ("oct", None),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES256K": ("EC", "secp256k1"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
#: RFC 7518 §3.2: an HMAC key MUST be at least as long as the hash output.
HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
RSA_MIN_BITS = 2048
MAX_JWKS_BYTES = 1 << 20
MAX_KID_CHARS = 256

_CURVES = {
    "secp256r1": "P-256",
    "secp384r1": "P-384",
    "secp521r1": "P-521",
    "secp256k1": "secp256k1",
}
_JWK_LOADERS: dict[str, Callable[[Any], Any]] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
}
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """One trusted key: what PyJWT verifies with, and what it may verify."""

    key: Any  # a cryptography public key, or bytes for HMAC
    kty: str  # oct, RSA, EC, OKP
    curve: str | None = None  # EC curve (P-256 ...) or OKP curve (Ed25519, Ed448)
    kid: str | None = None
    alg: str | None = None  # the JWK's own "alg": then only that alg
    fingerprint: str = ""  # identity for change detection (never logged with key material)

    def fits(self, alg: str) -> bool:
        kty, curve = ALG_FAMILIES[alg]
        if self.kty != kty or (self.alg is not None and self.alg != alg):
            return False
        return curve is None or self.curve == curve


def secret_key(secret: str) -> VerifyKey:
    raw = secret.encode()
    return VerifyKey(raw, "oct", fingerprint=hashlib.sha256(raw).hexdigest())


def key_from_public(obj: Any, kid: str | None = None, alg: str | None = None) -> VerifyKey:
    """Classify a cryptography public key; raise ValueError if it is unusable."""
    if isinstance(obj, rsa.RSAPublicKey):
        if obj.key_size < RSA_MIN_BITS:
            raise ValueError(f"RSA key of {obj.key_size} bits (at least {RSA_MIN_BITS} required)")
        kty, curve = "RSA", None
    elif isinstance(obj, ec.EllipticCurvePublicKey):
        kty, curve = "EC", _CURVES.get(obj.curve.name)
        if curve is None:
            raise ValueError(f"unsupported EC curve {obj.curve.name}")
    elif isinstance(obj, ed25519.Ed25519PublicKey):
        kty, curve = "OKP", "Ed25519"
    elif isinstance(obj, ed448.Ed448PublicKey):
        kty, curve = "OKP", "Ed448"
    else:
        raise ValueError(f"unsupported key type {type(obj).__name__}")
    der = obj.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(der + f"|{kid}|{alg}".encode()).hexdigest()
    return VerifyKey(obj, kty, curve, kid, alg, digest)


def load_pem_keys(paths: Iterable[str]) -> tuple[VerifyKey, ...]:
    """Every public key (or certificate's key) in the PEM files; several per file allowed."""
    keys: list[VerifyKey] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror}") from None
        blocks = list(_PEM_BLOCK.finditer(data))
        if not blocks:
            raise ValueError(f"{path}: no PEM public key or certificate found")
        for n, block in enumerate(blocks, 1):
            label = block.group(1).decode()
            # SECURITY: a gateway verifies; it must never hold a signing key.
            if "PRIVATE" in label:
                raise ValueError(f"{path}: block {n} is a private key; give the public key only")
            try:
                if label == "CERTIFICATE":
                    obj: Any = x509.load_pem_x509_certificate(block.group(0)).public_key()
                else:
                    obj = serialization.load_pem_public_key(block.group(0))
                keys.append(key_from_public(obj))
            except ValueError as e:
                raise ValueError(f"{path}: block {n} ({label}): {e}") from None
    return tuple(keys)


def parse_jwks(doc: Any, algorithms: Sequence[str]) -> tuple[tuple[VerifyKey, ...], list[str]]:
    """The usable signing keys of a JWKS document, and why the others were skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWK Set (an object with a 'keys' array)")
    keys: list[VerifyKey] = []
    skipped: list[str] = []
    for n, jwk in enumerate(doc["keys"]):
        if not isinstance(jwk, dict):
            skipped.append(f"keys[{n}]: not an object")
            continue
        kid, alg, kty = jwk.get("kid"), jwk.get("alg"), jwk.get("kty")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            skipped.append(f"keys[{n}]: bad kid")
            continue
        if jwk.get("use", "sig") != "sig":
            continue  # encryption keys are not ours to use
        if alg is not None and alg not in algorithms:
            skipped.append(f"keys[{n}]: alg {alg!r} not allowed")
            continue
        # SECURITY: only asymmetric kinds; a symmetric ("oct") key published in
        # a JWKS is never trusted, so HS tokens cannot ride on a JWKS.
        loader = _JWK_LOADERS.get(kty) if isinstance(kty, str) else None
        if loader is None:
            skipped.append(f"keys[{n}]: kty {kty!r} not supported")
            continue
        try:
            obj = loader(jwk)
            if hasattr(obj, "private_bytes"):  # a JWK with "d": keep the public half only
                obj = obj.public_key()
            key = key_from_public(obj, kid, alg)
        except (InvalidKeyError, ValueError, TypeError) as e:
            skipped.append(f"keys[{n}]: {e}")
            continue
        if any(key.fits(a) for a in algorithms):
            keys.append(key)
        else:
            skipped.append(f"keys[{n}]: fits none of the allowed algorithms")
    return tuple(keys), skipped


class KeySet:
    """An immutable snapshot of trusted keys, indexed by kid."""

    __slots__ = ("_by_kid", "_unkeyed", "fingerprints", "keys")

    def __init__(self, keys: Iterable[VerifyKey]) -> None:
        self.keys = tuple(keys)
        by_kid: dict[str, list[VerifyKey]] = {}
        for k in self.keys:
            if k.kid is not None:
                by_kid.setdefault(k.kid, []).append(k)
        self._by_kid = {kid: tuple(ks) for kid, ks in by_kid.items()}
        self._unkeyed = tuple(k for k in self.keys if k.kid is None)
        self.fingerprints = frozenset(k.fingerprint for k in self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def candidates(self, alg: str, kid: str | None) -> tuple[VerifyKey, ...]:
        """Keys that may verify a token with this header; () when the kid is unknown.

        A token without kid is tried against every key fitting its alg (as
        Envoy does); keys without a kid (PEM files, secret) serve any kid.
        """
        pool = self.keys if kid is None else self._by_kid.get(kid, ()) + self._unkeyed
        return tuple(k for k in pool if k.fits(alg))


class JwksCache:
    """A JWKS fetched over HTTP, kept fresh, served stale when the server is down."""

    def __init__(
        self,
        url: str,
        algorithms: Sequence[str],
        *,
        refresh_interval: float,
        min_refetch_interval: float,
        fetch_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.algorithms = tuple(algorithms)
        self.refresh_interval = refresh_interval
        self.min_refetch_interval = min_refetch_interval
        self.fetch_timeout = fetch_timeout
        self.keys = KeySet(())
        self.loaded = False
        #: Bumped whenever a trusted key disappears or changes: results
        #: verified with the old set must not be served from a cache.
        self.generation = 0
        self.fetches = 0
        self._session: aiohttp.ClientSession | None = None
        self._on_state: Callable[[bool, str], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._last_kid_fetch = -math.inf

    async def start(
        self, session: aiohttp.ClientSession, on_state: Callable[[bool, str], None] | None = None
    ) -> None:
        """First fetch (a failure is logged, not raised: requests get 503 until it works)."""
        self._session = session
        self._on_state = on_state
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop(), name=f"jwks-refresh {self.url}")

    async def stop(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._inflight = None

    async def refresh(self) -> bool:
        """Fetch now, joining a fetch already in flight; True when the key set changed."""
        if self._inflight is None:
            task = asyncio.create_task(self._fetch())
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        # shield: a client that disconnects must not cancel the fetch others wait on
        return await asyncio.shield(self._inflight)

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def refetch_for_unknown_kid(self) -> bool:
        """A token named a kid we lack: fetch, at most once per min_refetch_interval.

        SECURITY: kids are attacker-chosen; without the rate limit a flood of
        random kids would turn the gateway into a JWKS-server load generator.
        """
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        now = asyncio.get_running_loop().time()
        if now - self._last_kid_fetch < self.min_refetch_interval:
            return False
        self._last_kid_fetch = now
        return await self.refresh()

    async def _refresh_loop(self) -> None:
        while True:
            # Until a first success, retry sooner than the regular refresh.
            interval = self.refresh_interval
            if not self.loaded:
                interval = min(interval, max(self.min_refetch_interval, 1.0))
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:
                # Never let one surprise end the refreshes for the process's life.
                log.exception("JWKS %s: refresh failed unexpectedly", self.url)

    async def _fetch(self) -> bool:
        assert self._session is not None, "JwksCache.start() not called"
        self.fetches += 1
        try:
            timeout = aiohttp.ClientTimeout(total=self.fetch_timeout)
            async with self._session.get(self.url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise ValueError(f"document larger than {MAX_JWKS_BYTES} bytes")
            keys, skipped = parse_jwks(orjson.loads(body), self.algorithms)
            if not keys:
                # An empty or garbled set is far likelier an outage than a
                # deliberate revocation of every key: keep the last good set.
                raise ValueError("no usable signing keys")
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            detail = f"JWKS fetch from {self.url} failed: {e or type(e).__name__}"
            log.warning("%s%s", detail, "; serving the cached keys" if self.loaded else "")
            self._report(detail if not self.loaded else f"stale: {detail}")
            return False
        for problem in skipped:
            log.warning("JWKS %s: skipped %s", self.url, problem)
        new = KeySet(keys)
        changed = new.fingerprints != self.keys.fingerprints
        if self.keys.fingerprints - new.fingerprints:
            self.generation += 1
        self.keys = new
        self.loaded = True
        self._report("")
        if changed:
            log.info("JWKS %s: %d signing key(s) loaded", self.url, len(new))
        return changed

    def _report(self, detail: str) -> None:
        if self._on_state is not None:
            self._on_state(self.loaded, detail)
