"""Hostile paths and identity spoofing through a real gateway, on raw sockets.

Routing decides on the normalised path and the upstream receives that same
path: no encoding (``..``, ``%2e%2e``, ``%2F``, ``//``, overlong UTF-8,
absolute-form) reaches the internal ``/auth/*`` routes without the service
key, nor an upstream path outside the route. Oversized request lines and
headers get 414/431 JSON, undecodable paths 400 JSON, never a 500. Headers
the gateway sets from identity (jwt ``forward`` targets) cannot be spoofed.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import unquote

import orjson
import pytest

from aiogateway.pathnorm import normalize_path
from fuzz.targets import fuzz_normalize_path, fuzz_router
from tests.support.gateway import RunningGateway, StartGateway
from tests.support.tokens import sign
from tests.support.upstreams import RecordingUpstream

SERVICE_KEY = "k3y-of-the-internal-services"
JWT_SECRET = "a-test-secret-of-at-least-32-bytes!!"


def gateway_config(upstream_url: str, server: str = "") -> str:
    return f"""
[server]
access_log = false
{server}

[upstreams.svc]
url = "{upstream_url}"

[plugins.internal]
type = "service-key"
keys = ["{SERVICE_KEY}"]

[plugins.jwt]
type = "jwt-check"
algorithms = ["HS256"]
secret = "{JWT_SECRET}"
forward = {{ sub = "X-User-Id", org_id = "X-Org-Id", role = "X-User-Role" }}

[[routes]]
prefix = "/v1"
upstream = "svc"

[[routes]]
name = "me"
methods = ["GET"]
path = "/me"
upstream = "svc"
chain = ["jwt"]

[[routes]]
name = "validate-token"
methods = ["GET"]
path = "/auth/validate"
upstream = "svc"
chain = ["internal"]

[[routes]]
name = "get-user"
methods = ["GET"]
path = "/auth/user/{{id}}"
upstream = "svc"
chain = ["internal"]

[[routes]]
name = "files"
prefix = "/files"
strip_prefix = true
upstream = "svc"

[[routes]]
name = "templated"
methods = ["GET"]
path = "/v2/users/{{id}}"
upstream_path = "/internal/users/{{id}}"
upstream = "svc"
"""


@pytest.fixture
async def gw(start_gateway: StartGateway, recording_upstream: RecordingUpstream) -> RunningGateway:
    return await start_gateway(gateway_config(recording_upstream.url))


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1]) if head else 0
        self.head = head

    @property
    def json(self) -> dict[str, str]:
        data: dict[str, str] = orjson.loads(self.body)
        return data


async def raw_get(port: int, target: bytes, headers: bytes = b"") -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n" + headers + b"\r\n"
    )
    try:
        async with asyncio.timeout(5):
            return Answer(await reader.read())
    finally:
        writer.close()


def key_header() -> bytes:
    return f"X-Service-Key: {SERVICE_KEY}\r\n".encode()


def upstream_view(path: str) -> str:
    """The path an upstream would route on: decoded once, dot segments resolved."""
    return normalize_path(path)


# Encodings of /auth/validate: without the key 401, with it the upstream sees exactly
# /auth/validate (never the raw spelling).
SAME_AS_VALIDATE = [
    b"/v1/../auth/validate",
    b"/v1/%2e%2e/auth/validate",
    b"/v1/%2E%2e/auth/validate",
    b"/v1/.%2e/auth/validate",
    b"/v1/..%2fauth/validate",
    b"/v1/%2e%2e%2fauth%2fvalidate",
    b"/v1%2f..%2fauth%2fvalidate",
    b"/%61uth/validate",
    b"/auth/valid%61te",
    b"/auth%2fvalidate",
    b"/auth%2Fvalidate",
    b"/auth//validate",
    b"//auth/validate",
    b"///auth///validate",
    b"/auth/./validate",
    b"/./auth/validate",
    b"/%2e/auth/validate",
    b"/../auth/validate",
    b"/../../../../auth/validate",
    b"/auth/x/../validate",
    b"/auth/user/%2e%2e/validate",
    b"/files/../auth/validate",
    b"/files/%2e%2e/auth/validate",
    b"http://gw/v1/../auth/validate",
    b"http://gw/v1/%2e%2e/auth/validate",
    b"http://evil@gw/auth/validate",
]

# Spellings that are other paths (or undecodable): never the internal route.
NOT_VALIDATE = [
    (b"/AUTH/validate", 404),
    (b"/auth/Validate", 404),
    (b"/auth/validate;x=1", 404),
    (b"/auth/validate/", 404),
    (b"/auth/validate/.", 404),
    (b"/auth/validate%23", 404),
    (b"/auth/validate%3F", 404),
    (b"/auth/validate%20", 404),
    (b"/auth/validate%00", 400),
    (b"/auth/validate%0d%0a", 400),
    (b"/auth/validate%", 400),
    (b"/auth/validate%2", 400),
    (b"/auth/%zzvalidate", 400),
    (b"/v1/%c0%ae%c0%ae/auth/validate", 400),  # overlong UTF-8 dots
    (b"/v1/%c0%af../auth/validate", 400),  # overlong UTF-8 slash
    (b"/v1/%ed%a0%80/auth", 400),  # a UTF-16 surrogate
    (b"/v1/%ff/auth", 400),
]


@pytest.mark.parametrize("target", SAME_AS_VALIDATE, ids=lambda t: t.decode())
async def test_internal_route_needs_the_key_in_every_encoding(
    gw: RunningGateway, recording_upstream: RecordingUpstream, target: bytes
) -> None:
    without = await raw_get(gw.port, target)
    assert without.status == 401, (without.head, without.body)
    assert without.json["error"] == "unauthorized"
    assert recording_upstream.requests == []
    wrong = await raw_get(gw.port, target, b"X-Service-Key: not-the-key\r\n")
    assert wrong.status == 403
    assert recording_upstream.requests == []
    with_key = await raw_get(gw.port, target, key_header())
    assert with_key.status == 200, with_key.body
    assert [r.path for r in recording_upstream.requests] == ["/auth/validate"]
    assert recording_upstream.last.header("X-Service-Key") is None  # strip = true


@pytest.mark.parametrize(
    ("target", "status"), NOT_VALIDATE, ids=[t.decode("latin-1") for t, _ in NOT_VALIDATE]
)
async def test_other_spellings_never_reach_the_internal_route(
    gw: RunningGateway, recording_upstream: RecordingUpstream, target: bytes, status: int
) -> None:
    for headers in (b"", key_header()):
        answer = await raw_get(gw.port, target, headers)
        assert answer.status == status, answer.body
        assert answer.json["error"] == ("not_found" if status == 404 else "bad_request")
        assert answer.json["request_id"]
    assert recording_upstream.requests == []


# Paths below an open prefix: the upstream receives a path that stays below it
# however it decodes it once more (double encodings stay literal).
BELOW_PREFIX = [
    (b"/v1/a/../b", "/v1/b"),
    (b"/v1/a/%2e%2e/b", "/v1/b"),
    (b"/v1/%252e%252e/auth/validate", "/v1/%252e%252e/auth/validate"),
    (b"/v1/%25%32%65%25%32%65/x", "/v1/%252e%252e/x"),
    (b"/v1/a%2fb", "/v1/a/b"),
    (b"/v1/%2561uth", "/v1/%2561uth"),
    (b"/v1/%3f%23%25", "/v1/%3F%23%25"),
    (b"/v1/..%5cauth/validate", "/v1/..%5Cauth/validate"),
    (b"/v1/caf%C3%A9", "/v1/caf%C3%A9"),
    (b"/v1/%ef%bc%8e%ef%bc%8e/auth", "/v1/%EF%BC%8E%EF%BC%8E/auth"),
    (b"/v1/a%20b", "/v1/a%20b"),
]


@pytest.mark.parametrize(
    ("target", "expected"), BELOW_PREFIX, ids=[t.decode() for t, _ in BELOW_PREFIX]
)
async def test_upstream_receives_the_normalised_path(
    gw: RunningGateway, recording_upstream: RecordingUpstream, target: bytes, expected: str
) -> None:
    answer = await raw_get(gw.port, target)
    assert answer.status == 200, answer.body
    received = recording_upstream.last.path
    assert received == expected
    assert recording_upstream.last.query == ""
    # The upstream's own view (one more decode) is what the gateway routed on.
    assert upstream_view(received) == normalize_path(target.decode())
    assert upstream_view(received).startswith("/v1/")


@pytest.mark.parametrize(
    "target",
    [b"/files/../../etc/passwd", b"/files/%2e%2e/%2e%2e/etc", b"/files/a%2f..%2f..%2fb"],
)
async def test_strip_prefix_cannot_climb_out(
    gw: RunningGateway, recording_upstream: RecordingUpstream, target: bytes
) -> None:
    answer = await raw_get(gw.port, target)
    assert answer.status == 404
    assert recording_upstream.requests == []


async def test_strip_prefix_keeps_double_encoding_literal(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    answer = await raw_get(gw.port, b"/files/%252e%252e/secret")
    assert answer.status == 200
    assert recording_upstream.last.path == "/%252e%252e/secret"
    assert unquote(recording_upstream.last.path) == "/%2e%2e/secret"


@pytest.mark.parametrize(
    ("target", "status", "upstream_path"),
    [
        (b"/v2/users/42", 200, "/internal/users/42"),
        (b"/v2/users/%3Fadmin=1", 200, "/internal/users/%3Fadmin=1"),
        (b"/v2/users/%23frag", 200, "/internal/users/%23frag"),
        (b"/v2/users/a%2fb", 404, None),
        (b"/v2/users/%2e%2e", 404, None),
        (b"/v2/users/..%2f..%2fauth", 404, None),
        (b"/auth/user/%3F", 401, None),
    ],
)
async def test_params_cannot_break_out_of_upstream_path_templates(
    gw: RunningGateway,
    recording_upstream: RecordingUpstream,
    target: bytes,
    status: int,
    upstream_path: str | None,
) -> None:
    answer = await raw_get(gw.port, target)
    assert answer.status == status, answer.body
    if upstream_path is None:
        assert recording_upstream.requests == []
    else:
        assert recording_upstream.last.path == upstream_path
        assert recording_upstream.last.query == ""


# -- limits ------------------------------------------------------------------


async def test_path_just_under_the_line_limit_is_proxied(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    path = b"/v1/" + b"a" * 8000
    answer = await raw_get(gw.port, path)
    assert answer.status == 200
    assert recording_upstream.last.path == path.decode()


@pytest.mark.parametrize(
    "target",
    [b"/v1/" + b"a" * 9000, b"/v1/" + b"%2e" * 3000, b"/v1/a?" + b"q" * 9000],
    ids=["plain", "encoded", "query"],
)
async def test_overlong_request_target_is_414_json(
    gw: RunningGateway, recording_upstream: RecordingUpstream, target: bytes
) -> None:
    answer = await raw_get(gw.port, target)
    assert answer.status == 414
    assert answer.json["error"] == "bad_request"
    assert recording_upstream.requests == []


@pytest.mark.parametrize(
    "header",
    [b"X-Big: " + b"b" * 9000, b"X" + b"n" * 9000 + b": v", b"Cookie: " + b"c=1; " * 2000],
    ids=["value", "name", "cookie"],
)
async def test_overlong_header_is_431_json(
    gw: RunningGateway, recording_upstream: RecordingUpstream, header: bytes
) -> None:
    answer = await raw_get(gw.port, b"/v1/x", header + b"\r\n")
    assert answer.status == 431
    assert answer.json["request_id"]
    assert recording_upstream.requests == []


async def test_configured_limits_are_enforced(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(
        gateway_config(recording_upstream.url, "max_line_size = 1024\nmax_field_size = 2048")
    )
    assert (await raw_get(gw.port, b"/v1/" + b"a" * 900)).status == 200
    assert (await raw_get(gw.port, b"/v1/" + b"a" * 1100)).status == 414
    assert (await raw_get(gw.port, b"/v1/x", b"X-A: " + b"v" * 1500 + b"\r\n")).status == 200
    assert (await raw_get(gw.port, b"/v1/x", b"X-A: " + b"v" * 2100 + b"\r\n")).status == 431
    assert (await raw_get(gw.port, b"/v1/x", b"X-A: /" + b"v" * 2100 + b"\r\n")).status == 431
    assert len(recording_upstream.requests) == 2


@pytest.mark.parametrize("value", [b"/" + b"a" * 9000, b"http://" + b"a" * 9000])
async def test_long_header_value_that_looks_like_a_path_is_431(
    gw: RunningGateway, value: bytes
) -> None:
    answer = await raw_get(gw.port, b"/v1/x", b"Referer: " + value + b"\r\n")
    assert answer.status == 431


async def test_too_many_headers_is_431(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    answer = await raw_get(gw.port, b"/v1/x", headers)
    assert recording_upstream.requests == []
    assert answer.status == 431


async def test_too_many_headers_is_a_clean_4xx(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    answer = await raw_get(gw.port, b"/v1/x", headers)
    assert answer.status in (400, 431)
    assert answer.json["request_id"]
    assert recording_upstream.requests == []


@pytest.mark.parametrize(
    "target",
    [b"/v1/\xff", b"/v1/caf\xc3\xa9", b"/v1/a\x00b", b"/v1/a\tb", b"v1/a", b"*"],
    ids=["raw-ff", "raw-utf8", "raw-nul", "raw-tab", "no-slash", "asterisk"],
)
async def test_raw_bytes_in_the_target_are_400_json(
    gw: RunningGateway, recording_upstream: RecordingUpstream, target: bytes
) -> None:
    answer = await raw_get(gw.port, target)
    assert answer.status == 400
    assert answer.json["error"] == "bad_request"
    assert recording_upstream.requests == []


# -- identity headers ----------------------------------------------------------

SPOOFED = (
    b"X-User-Id: admin\r\nx-user-id: admin\r\nX-USER-ID: admin\r\n"
    b"X-Org-Id: org-1\r\nX-User-Role: superuser\r\nx-user-role: superuser\r\n"
)
IDENTITY = ("x-user-id", "x-org-id", "x-user-role")


def identity_seen(upstream: RecordingUpstream) -> list[tuple[str, str]]:
    return [(k, v) for k, v in upstream.last.headers if k.lower() in IDENTITY]


@pytest.mark.parametrize(
    ("target", "extra"),
    [
        (b"/v1/open", b""),
        (b"/auth/validate", key_header()),
        (b"/files/x", b""),
        (b"/v2/users/1", b""),
    ],
    ids=["public-prefix", "internal-with-key", "strip-prefix", "templated"],
)
async def test_identity_headers_are_stripped_on_every_route(
    gw: RunningGateway, recording_upstream: RecordingUpstream, target: bytes, extra: bytes
) -> None:
    answer = await raw_get(gw.port, target, SPOOFED + extra)
    assert answer.status == 200
    assert identity_seen(recording_upstream) == []


def token(**claims: object) -> str:
    now = int(time.time())
    return sign({"sub": "user-42", "iat": now, "exp": now + 300, **claims}, JWT_SECRET)


async def test_identity_headers_come_only_from_the_verified_token(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    auth = f"Authorization: Bearer {token(role='member', org_id='o-7')}\r\n".encode()
    # Connection cannot be used to make the gateway drop the headers it sets itself.
    hop = b"Connection: X-User-Id, X-User-Role, X-Forwarded-For\r\n"
    answer = await raw_get(gw.port, b"/me", SPOOFED + auth + hop)
    assert answer.status == 200
    assert sorted(identity_seen(recording_upstream)) == [
        ("X-Org-Id", "o-7"),
        ("X-User-Id", "user-42"),
        ("X-User-Role", "member"),
    ]
    assert recording_upstream.last.header("X-Forwarded-For") == "127.0.0.1"


async def test_a_claim_with_crlf_is_not_forwarded(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    bad = token(role="member\r\nX-User-Id: root", org_id="o\x00x")
    answer = await raw_get(gw.port, b"/me", SPOOFED + f"Authorization: Bearer {bad}\r\n".encode())
    assert answer.status == 200
    assert identity_seen(recording_upstream) == [("X-User-Id", "user-42")]


async def test_a_rejected_token_forwards_nothing(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    forged = token()[:-4] + "AAAA"
    auth = f"Authorization: Bearer {forged}\r\n".encode()
    answer = await raw_get(gw.port, b"/me", SPOOFED + auth)
    assert answer.status == 401
    assert recording_upstream.requests == []


async def test_underscore_variant_of_an_identity_header_is_not_forwarded(
    gw: RunningGateway, recording_upstream: RecordingUpstream
) -> None:
    answer = await raw_get(gw.port, b"/v1/open", b"X_User_Id: admin\r\nX-User_Role: su\r\n")
    assert answer.status == 200
    cgi_names = {k.upper().replace("-", "_") for k, _ in recording_upstream.last.headers}
    assert not cgi_names & {"X_USER_ID", "X_USER_ROLE"}


# -- fuzz targets (fuzz/targets.py), a short run; `make fuzz` runs them for longer ----


def test_fuzz_smoke_normalize_path() -> None:
    fuzz_normalize_path()


def test_fuzz_smoke_router() -> None:
    fuzz_router()
