"""normalize_path / encode_path: examples, errors, and properties (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from aiogateway import pathnorm
from aiogateway.pathnorm import BadPath, encode_path, normalize_path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/v1/org/123/members", "/v1/org/123/members"),
        ("/", "/"),
        ("", "/"),
        ("a/b", "/a/b"),
        ("/a/", "/a/"),
        ("/a//b///c", "/a/b/c"),
        ("//", "/"),
        ("/a/./b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/b/../c", "/a/c"),
        ("/../a", "/a"),
        ("/../../..", "/"),
        ("/a//../b", "/b"),  # slashes merge before dot segments resolve
        ("/.well-known/x", "/.well-known/x"),
        ("/a..b/...", "/a..b/..."),  # only whole "." / ".." segments are dot segments
        ("/v1/%2e%2e/auth/validate", "/auth/validate"),
        ("/v1/%2E%2E/auth", "/auth"),
        ("/v1/.%2e/auth", "/auth"),
        ("/a%2Fb%2f..%2Fc", "/a/c"),  # %2F is a separator like any other
        ("/%252e%252e/x", "/%2e%2e/x"),  # decoded exactly once
        ("/a%20b", "/a b"),
        ("/caf%C3%A9", "/café"),
        ("/caf\udcc3\udca9", "/café"),  # raw UTF-8 bytes as aiohttp's parser passes them
        ("/x%3Fy%23z", "/x?y#z"),
    ],
)
def test_normalize_examples(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/%zz",
        "/%4",
        "/a%",
        "/%+1",
        "/% 1",
        "/%00",
        "/a%0Ab",
        "/%7F",
        "/%C2%85",  # C1 control
        "/%ff",  # not UTF-8
        "/%C3",  # truncated UTF-8
        "/%ED%A0%80",  # encoded surrogate
        "/\udcff",  # raw non-UTF-8 byte
        "/a#frag",
    ],
)
def test_normalize_rejects(raw: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(raw)


def test_resolve_path_does_not_decode() -> None:
    assert pathnorm.resolve_path("/a//./b/../%2e%2e") == "/a/%2e%2e"
    assert pathnorm.resolve_path("a/b/..") == "/a/"


def test_bad_path_is_value_error() -> None:
    assert issubclass(BadPath, ValueError)


def test_fast_path_returns_input_object() -> None:
    raw = "/v1/org/123/members"
    assert normalize_path(raw) is raw
    assert encode_path(raw) is raw


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/org/123", "/v1/org/123"),
        ("/a b", "/a%20b"),
        ("/100%", "/100%25"),
        ("/x?y#z", "/x%3Fy%23z"),
        ("/café", "/caf%C3%A9"),
        ("/a:b@c!$&'()*+,;=-._~", "/a:b@c!$&'()*+,;=-._~"),
        ('/[x]{y}|\\^`"<>', "/%5Bx%5D%7By%7D%7C%5C%5E%60%22%3C%3E"),
        ("/%2e%2e", "/%252e%252e"),
    ],
)
def test_encode_examples(path: str, expected: str) -> None:
    assert encode_path(path) == expected


# -- properties ---------------------------------------------------------------

# Pieces that exercise every branch: separators, dots, escapes of both, double
# escapes, malformed escapes, non-ASCII, controls.
TOKENS = st.sampled_from(
    [
        "/", "//", ".", "..", "a", "b", "v1", "%2e", "%2E", "%2e%2e", "%2F", "%2f",
        "%25", "%252e", "%252F", "%", "%4", "%zz", "é", "%C3%A9", "%00", " ", "~",
        "#", "\udcff", "-", "{id}",
    ]
)  # fmt: skip
RAW = st.one_of(st.lists(TOKENS, max_size=12).map("".join), st.text(max_size=30))


def check_normal(path: str) -> None:
    assert path.startswith("/")
    assert "//" not in path
    segments = path[1:].split("/")
    assert "." not in segments
    assert ".." not in segments
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in path)


@given(RAW)
@example("/a/%2e%2e/%2e%2e/%2e%2e/b")
@example("/%252e%252e/")
def test_normal_form(raw: str) -> None:
    try:
        path = normalize_path(raw)
    except BadPath:
        return
    check_normal(path)
    # The fast path must agree with the full algorithm.
    assert path == pathnorm.resolve_path(pathnorm._decode(raw))


@given(RAW)
def test_idempotent_through_upstream(raw: str) -> None:
    """Normalising is idempotent on what the upstream receives, and on the
    normalised path itself wherever decoding it again is a no-op."""
    try:
        path = normalize_path(raw)
    except BadPath:
        return
    assert normalize_path(encode_path(path)) == path
    if "%" not in path and "#" not in path:
        assert normalize_path(path) == path


@given(st.text(max_size=30))
def test_encode_normalize_round_trip(text: str) -> None:
    try:
        path = normalize_path(encode_path(text))
    except (BadPath, UnicodeEncodeError):
        return  # controls / lone surrogates: no normalised path holds them
    assert normalize_path(encode_path(path)) == path
    assert set(encode_path(path)) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789%/!$&'()*+,;=:@-._~"
    )


# A path made of plain pieces, and any mix of their percent-encodings: every
# encoding must normalise to what the plain path normalises to.
PLAIN = st.lists(st.sampled_from(["/", ".", "..", "a", "auth", "v1", "x.y", "é"]), max_size=10)


def _escape(char: str, upper: bool) -> str:
    hexes = [f"{b:02X}" if upper else f"{b:02x}" for b in char.encode()]
    return "".join("%" + h for h in hexes)


@given(PLAIN.map("".join), st.data())
def test_no_encoding_changes_the_path(plain: str, data: st.DataObject) -> None:
    raw = "/" + plain
    flags = data.draw(st.lists(st.booleans(), min_size=len(raw), max_size=len(raw)))
    upper = data.draw(st.booleans())
    encoded = "".join(_escape(c, upper) if f else c for c, f in zip(raw, flags, strict=True))
    assert normalize_path(encoded) == normalize_path(raw)


# Segments that decode to anything but "..": escaped and double-escaped dots.
SUFFIX = st.lists(
    st.sampled_from(
        ["", "a", ".", "%2e", "%2E", "%252e%252e", "%2e%252e", "..%252F", "%252F..", "a%2F."]
    ),
    max_size=12,
).map("/".join)


@given(SUFFIX)
@example("/%252e%252e/%252e%252e/auth")
def test_escaped_traversal_never_leaves_prefix(suffix: str) -> None:
    """Nothing that does not decode to a ".." segment climbs out of a prefix."""
    path = normalize_path("/v1/billing/" + suffix)
    assert path == "/v1/billing" or path.startswith("/v1/billing/")
