"""jwt-check through a real gateway to a recording upstream: valid tokens, attacks, JWKS.

Tokens are made with joserfc or forged by hand (tests/support/tokens.py); the
gateway verifies with PyJWT. Every rejection also asserts that nothing reached
the upstream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from aiogateway.errors import ConfigError
from plugins.jwt_check import JwtCheckConfig
from tests.support.gateway import RunningGateway, StartGateway
from tests.support.tokens import (
    IdentityRecorder,
    JwksServer,
    KeyPair,
    assert_rejected,
    call,
    claims,
    ec_pair,
    ed_pair,
    forge,
    forge_hs,
    gateway_config,
    rsa_pair,
    sign,
)
from tests.support.upstreams import RecordingUpstream

SECRET = "s3cret-for-tests-0123456789abcdefghij"  # >= 32 bytes (RFC 7518 §3.2)


HS_TABLE = f'algorithms = ["HS256"]\nsecret = "{SECRET}"\nissuer = "auth-service"'


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def jwks() -> AsyncIterator[JwksServer]:
    server = await JwksServer().start()
    yield server
    await server.stop()


async def hs_gateway(
    start_gateway: StartGateway, upstream: RecordingUpstream, extra: str = "", server: str = ""
) -> RunningGateway:
    return await start_gateway(gateway_config(upstream.url, HS_TABLE + "\n" + extra, server))


# --- valid tokens, per algorithm ------------------------------------------------------


async def test_hs256_valid_token_forwards_claims_and_identity(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service", org_id=7, role="admin"), SECRET)
    ans = await call(client, gw, token)
    assert ans.status == 200
    up = recording_upstream.last
    assert up.header_all("X-User-Id") == ["user-42"]
    assert up.header_all("X-Org-Id") == ["7"]
    assert up.header_all("X-User-Role") == ["admin"]
    assert up.header("Authorization") == f"Bearer {token}"  # forwarded unchanged
    seen = IdentityRecorder.seen[ans.headers["X-Request-ID"]]
    assert (seen["user_id"], seen["org_id"]) == ("user-42", "7")
    assert seen["claims"]["role"] == "admin"


async def _asymmetric_ok(
    start_gateway: StartGateway,
    upstream: RecordingUpstream,
    client: Any,
    tmp_path: Path,
    pair: KeyPair,
) -> None:
    pem = tmp_path / "pub.pem"
    pem.write_bytes(pair.public_pem)
    table = f'algorithms = ["{pair.alg}"]\npublic_key_file = "{pem}"'
    gw = await start_gateway(gateway_config(upstream.url, table))
    ans = await call(client, gw, sign(claims(sub="u-" + pair.alg), pair))
    assert ans.status == 200, ans.body
    assert upstream.last.header("X-User-Id") == "u-" + pair.alg


async def test_rs256_valid_token(
    start_gateway: Any, recording_upstream: Any, client: Any, tmp_path: Path
) -> None:
    await _asymmetric_ok(start_gateway, recording_upstream, client, tmp_path, rsa_pair())


async def test_es256_valid_token(
    start_gateway: Any, recording_upstream: Any, client: Any, tmp_path: Path
) -> None:
    await _asymmetric_ok(start_gateway, recording_upstream, client, tmp_path, ec_pair())


async def test_eddsa_valid_token(
    start_gateway: Any, recording_upstream: Any, client: Any, tmp_path: Path
) -> None:
    await _asymmetric_ok(start_gateway, recording_upstream, client, tmp_path, ed_pair())


async def test_pem_file_with_several_keys_accepts_each(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any, tmp_path: Path
) -> None:
    old, new = rsa_pair("old"), rsa_pair("new")
    pem = tmp_path / "keys.pem"
    pem.write_bytes(old.public_pem + new.public_pem)
    table = f'algorithms = ["RS256"]\npublic_key_file = "{pem}"'
    gw = await start_gateway(gateway_config(recording_upstream.url, table))
    for pair in (old, new):
        assert (await call(client, gw, sign(claims(), pair, kid=""))).status == 200
    recording_upstream.requests.clear()
    stranger = sign(claims(), rsa_pair("stranger"))
    assert_rejected(await call(client, gw, stranger), recording_upstream, "invalid signature")


# --- time claims and leeway -----------------------------------------------------------


async def test_expired_token(start_gateway: Any, recording_upstream: Any, client: Any) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service", exp=int(time.time()) - 120), SECRET)
    assert_rejected(await call(client, gw, token), recording_upstream, "token expired")


async def test_not_yet_valid_token(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service", nbf=int(time.time()) + 120), SECRET)
    assert_rejected(await call(client, gw, token), recording_upstream, "token not yet valid")


async def test_leeway_accepts_exp_just_inside(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)  # leeway 30 (default)
    token = sign(claims(iss="auth-service", exp=int(time.time()) - 20), SECRET)
    assert (await call(client, gw, token)).status == 200


async def test_leeway_rejects_exp_just_outside(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service", exp=int(time.time()) - 40), SECRET)
    assert_rejected(await call(client, gw, token), recording_upstream, "token expired")


async def test_leeway_nbf_both_sides(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    now = int(time.time())
    inside = sign(claims(iss="auth-service", nbf=now + 20), SECRET)
    assert (await call(client, gw, inside)).status == 200
    recording_upstream.requests.clear()
    outside = sign(claims(iss="auth-service", nbf=now + 40), SECRET)
    assert_rejected(await call(client, gw, outside), recording_upstream, "token not yet valid")


# --- claims ---------------------------------------------------------------------------


async def test_wrong_issuer(start_gateway: Any, recording_upstream: Any, client: Any) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="evil-issuer"), SECRET)
    ans = await call(client, gw, token)
    assert_rejected(ans, recording_upstream, "token invalid")
    assert "evil" not in str(ans.body)
    assert "evil" not in ans.headers["WWW-Authenticate"]


async def test_wrong_audience(start_gateway: Any, recording_upstream: Any, client: Any) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream, 'audience = ["api", "web"]')
    good = sign(claims(iss="auth-service", aud="web"), SECRET)
    assert (await call(client, gw, good)).status == 200
    recording_upstream.requests.clear()
    bad = sign(claims(iss="auth-service", aud="billing"), SECRET)
    assert_rejected(await call(client, gw, bad), recording_upstream, "token invalid")
    missing = sign(claims(iss="auth-service"), SECRET)
    assert_rejected(await call(client, gw, missing), recording_upstream, "token invalid")


async def test_missing_required_claim(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    no_sub = sign(claims(iss="auth-service", sub=None), SECRET)
    assert_rejected(await call(client, gw, no_sub), recording_upstream, "token invalid")
    no_exp = sign(claims(iss="auth-service", exp=None), SECRET)
    assert_rejected(await call(client, gw, no_exp), recording_upstream, "token invalid")


# --- attacks --------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_rejected(
    start_gateway: Any, recording_upstream: Any, client: Any, alg: str
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    payload = claims(iss="auth-service")
    for token in (
        forge({"alg": alg, "typ": "JWT"}, payload),
        forge({"alg": alg}, payload, b"anything"),
    ):
        assert_rejected(await call(client, gw, token), recording_upstream, "token invalid")


async def test_key_confusion_hs256_signed_with_public_pem(
    start_gateway: Any, recording_upstream: Any, client: Any, tmp_path: Path
) -> None:
    pair = rsa_pair()
    pem = tmp_path / "pub.pem"
    pem.write_bytes(pair.public_pem)
    gw = await start_gateway(
        gateway_config(recording_upstream.url, f'algorithms = ["RS256"]\npublic_key_file = "{pem}"')
    )
    for header in ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256", "kid": pair.kid}):
        for secret in (pair.public_pem, pair.public_pem.strip()):
            token = forge_hs(header, claims(), secret)
            assert_rejected(await call(client, gw, token), recording_upstream, "token invalid")


async def test_token_signed_with_other_secret(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service"), SECRET[::-1])
    assert_rejected(await call(client, gw, token), recording_upstream, "invalid signature")


async def test_tampered_payload_rejected(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    good = sign(claims(iss="auth-service", role="user"), SECRET)
    header, _, sig = good.split(".")
    evil = forge({"alg": "HS256"}, claims(iss="auth-service", role="admin")).split(".")[1]
    token = f"{header}.{evil}.{sig}"
    assert_rejected(await call(client, gw, token), recording_upstream, "invalid signature")


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0",  # two segments
        "!!!.@@@.###",  # not base64url
        "eyJhbGciOiJIUzI1NiJ9.%%%%.AAAA",
        "e30.e30.",  # {} header: no alg
        forge({"alg": "HS256"}, {"sub": "x"})[:-1] + ".extra.segment",
        "....",
    ],
    ids=["garbage", "a.b", "two-segments", "bad-b64", "bad-b64-payload", "no-alg", "five", "dots"],
)
async def test_malformed_tokens(
    start_gateway: Any, recording_upstream: Any, client: Any, token: str
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    assert_rejected(await call(client, gw, token), recording_upstream, "token invalid")


async def test_64k_token_rejected_without_parsing(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    # The server is told to accept huge headers so the token reaches the plugin.
    gw = await hs_gateway(
        start_gateway, recording_upstream, server="[server]\nmax_field_size = 131072"
    )
    token = sign(claims(iss="auth-service", pad="x" * 65536), SECRET)
    assert len(token) > 65536
    assert_rejected(await call(client, gw, token), recording_upstream, "token invalid")


async def test_64k_token_with_default_limits_never_reaches_upstream(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = "a" * 65536
    try:
        ans = await call(client, gw, token)
        assert ans.status in (400, 401, 431)
    except aiohttp.ClientError:
        pass  # the server may also drop the connection; what matters is below
    assert recording_upstream.requests == []


# --- where the token comes from ---------------------------------------------------------


@pytest.mark.parametrize("value", ["bearer {t}", "BEARER {t}", "Bearer    {t}   ", "  bearer\t{t}"])
async def test_scheme_case_and_spaces_tolerated(
    start_gateway: Any, recording_upstream: Any, client: Any, value: str
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service"), SECRET)
    ans = await call(client, gw, headers={"Authorization": value.format(t=token)})
    assert ans.status == 200
    assert recording_upstream.last.header("X-User-Id") == "user-42"


@pytest.mark.parametrize("auth", [None, "Basic dXNlcjpwYXNz", "Bearer", "Bearer    "])
async def test_no_token_bare_challenge(
    start_gateway: Any, recording_upstream: Any, client: Any, auth: str | None
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    ans = await call(client, gw, headers={"Authorization": auth} if auth else None)
    assert ans.status == 401
    assert ans.headers["WWW-Authenticate"] == 'Bearer realm="aiogateway"'  # RFC 6750 §3.1
    assert ans.body["error"] == "unauthorized"
    assert recording_upstream.requests == []


async def test_two_authorization_headers_refused(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service"), SECRET)
    ans = await call(client, gw, token, headers=[("Authorization", "Bearer other")])
    assert ans.status == 400
    assert 'error="invalid_request"' in ans.headers["WWW-Authenticate"]
    assert recording_upstream.requests == []


async def test_cookie_and_query_param_sources(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(
        start_gateway, recording_upstream, 'cookie = "session"\nquery_param = "access_token"'
    )
    token = sign(claims(iss="auth-service"), SECRET)
    assert (await call(client, gw, headers={"Cookie": f"a=1; session={token}"})).status == 200
    assert (await call(client, gw, path=f"/p?access_token={token}")).status == 200
    assert len(recording_upstream.requests) == 2
    bad = await call(client, gw, path="/p?access_token=garbage")
    assert bad.status == 401
    assert len(recording_upstream.requests) == 2


# --- identity headers: forwarding and anti-spoofing -------------------------------------


async def test_spoofed_identity_headers_stripped_on_protected_route(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service"), SECRET)  # no org_id, no role claim
    spoof = [
        ("X-User-Id", "admin"),
        ("x-user-role", "admin"),
        ("X-ORG-ID", "1"),
        ("X-User-Id", "root"),
    ]
    assert (await call(client, gw, token, headers=spoof)).status == 200
    up = recording_upstream.last
    assert up.header_all("X-User-Id") == ["user-42"]
    assert up.header_all("X-User-Role") == []
    assert up.header_all("X-Org-Id") == []


async def test_spoofed_identity_headers_stripped_on_route_without_jwt(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    spoof = {"X-User-Id": "admin", "X-User-Role": "admin", "X-Org-Id": "1", "X-Other": "kept"}
    assert (await call(client, gw, path="/open", headers=spoof)).status == 200
    up = recording_upstream.last
    assert [up.header(h) for h in ("X-User-Id", "X-User-Role", "X-Org-Id")] == [None] * 3
    assert up.header("X-Other") == "kept"


async def test_authorization_not_forwarded_when_disabled(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream, "forward_authorization = false")
    token = sign(claims(iss="auth-service"), SECRET)
    assert (await call(client, gw, token)).status == 200
    assert recording_upstream.last.header("Authorization") is None
    assert recording_upstream.last.header("X-User-Id") == "user-42"


async def test_claim_with_newline_is_not_forwarded(
    start_gateway: Any, recording_upstream: Any, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service", role="a\r\nX-Injected: 1"), SECRET)
    assert (await call(client, gw, token)).status == 200
    up = recording_upstream.last
    assert up.header("X-User-Role") is None
    assert up.header("X-Injected") is None


# --- config: checked whole at load ------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"algorithms": ["none"], "secret": SECRET}, "'none' is never accepted"),
        ({"algorithms": ["HS256", "None"], "secret": SECRET}, "'none' is never accepted"),
        ({"algorithms": ["HS256", "RS256"], "secret": SECRET}, "cannot be mixed"),
        ({"algorithms": ["RS256"], "secret": SECRET}, "secret needs HS"),
        ({"algorithms": ["HS256"], "jwks_url": "http://x/jwks"}, "HS\\* algorithms need"),
        ({"algorithms": ["HS256"]}, "exactly one key source"),
        ({"algorithms": ["HS256"], "secret": SECRET, "jwks_url": "http://x"}, "got secret and"),
        ({"algorithms": ["HS256"], "secret": "short"}, "at least 32 bytes"),
        ({"algorithms": ["HS512"], "secret": SECRET}, "at least 64 bytes"),
        ({"algorithms": ["RS256"], "jwks_url": "ftp://x"}, "http:// or https://"),
        ({"algorithms": ["XS256"], "secret": SECRET}, "unknown 'XS256'"),
        ({"algorithms": [], "secret": SECRET}, "at least 1 item"),
        ({"algorithms": ["HS256"], "secret": SECRET, "forward": {"sub": "Authorization"}},
         "not a usable header"),
        ({"algorithms": ["HS256"], "secret": SECRET, "forward": {"a": "X-A", "b": "x-a"}},
         "not a usable header"),
        ({"algorithms": ["HS256"], "secret": SECRET, "forward": {"a": "Bad Header"}},
         "not a usable header"),
        ({"algorithms": ["HS256"], "secret": SECRET, "realm": 'a"b'}, "realm"),
        ({"algorithms": ["HS256"], "secret": SECRET, "leeway": -1}, "greater than or equal"),
        ({"algorithms": ["HS256"], "secret": SECRET, "unknown": 1}, "Extra inputs"),
    ],
)  # fmt: skip
def test_config_rejected_at_load(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        JwtCheckConfig.model_validate(table)


def test_config_public_key_must_fit_algorithms(tmp_path: Path) -> None:
    pem = tmp_path / "ec.pem"
    pem.write_bytes(ec_pair().public_pem)
    with pytest.raises(ValidationError, match="fits none of"):
        JwtCheckConfig.model_validate({"algorithms": ["RS256"], "public_key_file": str(pem)})
    ok = JwtCheckConfig.model_validate({"algorithms": ["ES256"], "public_key_files": [str(pem)]})
    assert ok.pem_files == [str(pem)]


def test_config_secret_is_not_shown() -> None:
    cfg = JwtCheckConfig.model_validate({"algorithms": ["HS256"], "secret": SECRET})
    assert SECRET not in repr(cfg)
    assert SECRET not in str(cfg.model_dump())


async def test_bad_config_refused_by_gateway(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    text = gateway_config(recording_upstream.url, 'algorithms = ["none"]\nsecret = "x"')
    with pytest.raises(ConfigError, match=r"plugins\.jwt"):
        await start_gateway(text)


# --- more through the gateway ---------------------------------------------------------


async def test_cached_claims_not_mutated_through_exchange(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service"), SECRET)
    ids = [(await call(client, gw, token)).headers["X-Request-ID"] for _ in range(2)]
    first, second = (IdentityRecorder.seen[i]["claims"] for i in ids)
    assert first == second
    assert first is not second


async def test_non_ascii_claim_forwarded_as_utf8(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service", role="José 😀", org_id=["a", "b"]), SECRET)
    assert (await call(client, gw, token)).status == 200
    up = recording_upstream.last
    raw = up.header("X-User-Role")
    assert raw is not None
    assert raw.encode("latin-1").decode() == "José 😀"
    assert up.header("X-Org-Id") == '["a","b"]'


async def test_iat_in_the_future_rejected(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, client: Any
) -> None:
    gw = await hs_gateway(start_gateway, recording_upstream)
    token = sign(claims(iss="auth-service", iat=int(time.time()) + 120), SECRET)
    assert_rejected(await call(client, gw, token), recording_upstream, "token not yet valid")
