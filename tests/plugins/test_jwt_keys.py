"""jwt-check keys: PEM loading, JWKS parsing, and a real JWKS server behind a real gateway
(rotation, outage, unknown-kid floods, key removal invalidating the token cache)."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from plugins.jwt_check import JwtCheck
from plugins.jwt_keys import load_pem_keys, parse_jwks
from tests.support.gateway import RunningGateway, StartGateway, free_port
from tests.support.tokens import (
    JwksServer,
    assert_rejected,
    call,
    claims,
    ec_pair,
    gateway_config,
    rsa_pair,
    sign,
)
from tests.support.upstreams import RecordingUpstream


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = await JwksServer().start()
    yield server
    await server.stop()


def jwks_table(url: str, *, min_refetch: float = 0.5, cache: int = 0, refresh: float = 300) -> str:
    return (
        f'algorithms = ["RS256", "ES256"]\njwks_url = "{url}"\n'
        f"jwks_min_refetch_interval = {min_refetch}\njwks_refresh_interval = {refresh}\n"
        f"cache_size = {cache}"
    )


def jwt_plugin(gw: RunningGateway) -> JwtCheck:
    plugin = gw.gateway.table.plugins["jwt"]
    assert isinstance(plugin, JwtCheck)
    return plugin


# --- JWKS through the gateway -----------------------------------------------------------


async def test_jwks_token_verified_by_kid(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    jwks: JwksServer,
) -> None:
    rsa_key, ec_key = rsa_pair("r1"), ec_pair("e1")
    jwks.keys = [rsa_key.public_jwk, ec_key.public_jwk]
    gw = await start_gateway(gateway_config(recording_upstream.url, jwks_table(jwks.url)))
    for pair in (rsa_key, ec_key):
        assert (await call(client, gw, sign(claims(sub=pair.kid), pair))).status == 200
        assert recording_upstream.last.header("X-User-Id") == pair.kid
    assert jwks.hits == 1  # fetched once, at startup


async def test_jwks_unknown_kid_then_present_after_rotation(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    jwks: JwksServer,
) -> None:
    old, new = rsa_pair("old"), rsa_pair("new")
    jwks.keys = [old.public_jwk]
    gw = await start_gateway(gateway_config(recording_upstream.url, jwks_table(jwks.url)))
    token = sign(claims(), new)
    assert_rejected(await call(client, gw, token), recording_upstream, "invalid signature")
    assert jwks.hits == 2  # the unknown kid triggered one refetch
    jwks.keys = [old.public_jwk, new.public_jwk]  # the issuer rotates
    await asyncio.sleep(0.6)  # past jwks_min_refetch_interval
    assert (await call(client, gw, token)).status == 200
    assert jwks.hits == 3
    assert (await call(client, gw, sign(claims(), old))).status == 200  # both keys at once
    assert jwks.hits == 3


async def test_jwks_server_down_after_startup_serves_cached_keys(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    jwks: JwksServer,
) -> None:
    pair = rsa_pair("r1")
    jwks.keys = [pair.public_jwk]
    gw = await start_gateway(gateway_config(recording_upstream.url, jwks_table(jwks.url)))
    await jwks.stop()
    # cache_size = 0: each request is verified again, from the cached key set.
    for _ in range(3):
        assert (await call(client, gw, sign(claims(), pair))).status == 200
    stranger = await call(client, gw, sign(claims(), rsa_pair("unknown")))
    assert stranger.status == 401  # a failed refetch keeps the old keys, no 503
    component = (await call(client, gw, path="/readyz")).body["components"]["jwks:jwt"]
    assert component["ready"] is True  # stale keys still serve
    assert component["detail"].startswith("stale: JWKS fetch")
    assert (await call(client, gw, sign(claims(), pair))).status == 200
    assert len(recording_upstream.requests) == 4


async def test_jwks_unknown_kid_flood_fetches_at_most_once_per_interval(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    jwks: JwksServer,
) -> None:
    pair = rsa_pair("r1")
    jwks.keys = [pair.public_jwk]
    table = jwks_table(jwks.url, min_refetch=30)
    gw = await start_gateway(gateway_config(recording_upstream.url, table))
    assert jwks.hits == 1

    async def attack() -> int:
        token = sign(claims(), pair, kid=uuid.uuid4().hex)
        return (await call(client, gw, token)).status

    statuses = await asyncio.gather(*(attack() for _ in range(50)))
    assert set(statuses) == {401}
    assert jwks.hits == 2  # the whole flood caused a single fetch
    statuses = await asyncio.gather(*(attack() for _ in range(50)))
    assert set(statuses) == {401}
    assert jwks.hits == 2
    assert recording_upstream.requests == []
    assert (await call(client, gw, sign(claims(), pair))).status == 200


async def test_jwks_key_removal_drops_cached_verifications(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    jwks: JwksServer,
) -> None:
    revoked, kept = rsa_pair("revoked"), rsa_pair("kept")
    jwks.keys = [revoked.public_jwk, kept.public_jwk]
    table = jwks_table(jwks.url, cache=100, refresh=0.2)
    gw = await start_gateway(gateway_config(recording_upstream.url, table))
    token = sign(claims(), revoked)
    assert (await call(client, gw, token)).status == 200  # now cached
    assert jwt_plugin(gw).verifier.cached(token) is not None
    generation = jwt_plugin(gw).jwks.generation  # type: ignore[union-attr]
    jwks.keys = [kept.public_jwk]
    for _ in range(50):
        if jwt_plugin(gw).jwks.generation != generation:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.1)
    recording_upstream.requests.clear()
    assert_rejected(await call(client, gw, token), recording_upstream, "invalid signature")


async def test_jwks_unreachable_at_startup_503_then_recovers(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/jwks.json"
    gw = await start_gateway(gateway_config(recording_upstream.url, jwks_table(url)))
    pair = rsa_pair("r1")
    ans = await call(client, gw, sign(claims(), pair))
    assert ans.status == 503
    assert ans.body["error"] == "service_unavailable"
    ready = await call(client, gw, path="/readyz")
    assert ready.status == 503
    assert ready.body["components"]["jwks:jwt"]["ready"] is False
    server = await JwksServer(keys=[pair.public_jwk]).start(port)
    try:
        await asyncio.sleep(0.6)
        assert (await call(client, gw, sign(claims(), pair))).status == 200
        ready = await call(client, gw, path="/readyz")
        assert ready.body["components"]["jwks:jwt"] == {
            "ready": True,
            "detail": "",
            "critical": True,
        }
    finally:
        await server.stop()


# --- key loading units ------------------------------------------------------------------


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_pem_private_key_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="private key"):
        load_pem_keys([_write(tmp_path, "k.pem", pem)])


def test_pem_certificate_and_several_keys(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "auth")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    data = cert.public_bytes(serialization.Encoding.PEM) + rsa_pair("r1").public_pem
    keys = load_pem_keys([_write(tmp_path, "k.pem", data)])
    assert [(k.kty, k.curve) for k in keys] == [("EC", "P-256"), ("RSA", None)]
    assert keys[0].fits("ES256")
    assert not keys[0].fits("ES384")
    assert not keys[0].fits("HS256")


def test_pem_weak_rsa_and_garbage_refused(tmp_path: Path) -> None:
    weak = (
        rsa.generate_private_key(65537, 1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="1024 bits"):
        load_pem_keys([_write(tmp_path, "weak.pem", weak)])
    with pytest.raises(ValueError, match="no PEM"):
        load_pem_keys([_write(tmp_path, "junk.pem", b"hello")])
    with pytest.raises(ValueError, match="cannot read"):
        load_pem_keys([str(tmp_path / "missing.pem")])


def test_parse_jwks_skips_symmetric_encryption_and_foreign_alg_keys() -> None:
    good = rsa_pair("r1").public_jwk
    doc = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "h"},  # never trusted from a JWKS
            {**rsa_pair("enc").public_jwk, "use": "enc"},
            {**rsa_pair("ps").public_jwk, "alg": "PS256"},
            "not-an-object",
            good,
        ]
    }
    keys, skipped = parse_jwks(doc, ["RS256"])
    assert [k.kid for k in keys] == ["r1"]
    assert len(skipped) == 3
    with pytest.raises(ValueError, match="JWK Set"):
        parse_jwks({"keys": "nope"}, ["RS256"])


async def test_token_supplied_key_urls_and_embedded_keys_ignored(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    jwks: JwksServer,
) -> None:
    trusted, attacker = rsa_pair("trusted"), rsa_pair("attacker")
    jwks.keys = [trusted.public_jwk]
    evil = await JwksServer(keys=[attacker.public_jwk]).start()
    try:
        gw = await start_gateway(gateway_config(recording_upstream.url, jwks_table(jwks.url)))
        for header in ({"jku": evil.url}, {"x5u": evil.url}, {"jwk": attacker.public_jwk}):
            token = sign(claims(), attacker, header=header)
            ans = await call(client, gw, token)
            assert_rejected(ans, recording_upstream, "invalid signature")
        assert evil.hits == 0  # SECURITY: never fetch a key the token points at
    finally:
        await evil.stop()


async def test_kid_of_other_key_type_rejected(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    jwks: JwksServer,
) -> None:
    rsa_key, ec_key = rsa_pair("r1"), ec_pair("e1")
    jwks.keys = [rsa_key.public_jwk, ec_key.public_jwk]
    gw = await start_gateway(gateway_config(recording_upstream.url, jwks_table(jwks.url)))
    # An ES256 token naming the RSA key's kid, and an RS256 token naming the EC key's kid.
    for token in (sign(claims(), ec_key, kid="r1"), sign(claims(), rsa_key, kid="e1")):
        assert_rejected(await call(client, gw, token), recording_upstream, "invalid signature")


async def test_reload_replaces_keys_and_stops_old_refresher(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: Any,
    jwks: JwksServer,
) -> None:
    pair = rsa_pair("r1")
    jwks.keys = [pair.public_jwk]
    table = jwks_table(jwks.url, cache=100, refresh=0.1)
    gw = await start_gateway(gateway_config(recording_upstream.url, table))
    token = sign(claims(), pair)
    assert (await call(client, gw, token)).status == 200  # verified and cached
    secret = "another-secret-0123456789abcdefghijkl"
    assert await gw.reload(
        gateway_config(recording_upstream.url, f'algorithms = ["HS256"]\nsecret = "{secret}"')
    )
    recording_upstream.requests.clear()
    ans = await call(client, gw, token)  # the old instance's cache does not answer
    assert_rejected(ans, recording_upstream, "token invalid")
    assert (await call(client, gw, sign(claims(), secret))).status == 200
    hits = jwks.hits
    await asyncio.sleep(0.5)
    assert jwks.hits == hits  # the replaced instance's refresh task was stopped
