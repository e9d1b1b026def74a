"""Header rewriting between client and upstream, on raw bytes (no re-parsing).

Request: hop-by-hop headers and the headers the gateway owns are dropped, the
client's other headers pass through in order, then the gateway appends
X-Forwarded-For/Proto/Host, X-Request-ID and what plugins added. Framing
(Host, Content-Length, Transfer-Encoding) is the upstream pool's job.
Response: hop-by-hop and framing headers are dropped; aiohttp writes framing
for the client connection.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from multidict import CIMultiDict

__all__ = [
    "HOP_BY_HOP",
    "REQUEST_DROP",
    "RESPONSE_DROP",
    "connection_listed",
    "connection_tokens",
    "new_request_id",
    "request_id_from",
    "response_headers",
    "upstream_request_headers",
]

# RFC 9110 §7.6.1 plus the legacy Proxy-Connection; Proxy-* are never end-to-end.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Set by the gateway itself or written by the pool as framing.
REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-request-id",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-for",
}

# X-Request-ID: the client gets the gateway's id, exactly once.
RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"x-request-id"}

_MAX_REQUEST_ID = 128


_entropy = b""
_entropy_at = 0


def new_request_id() -> str:
    """32 random hex digits; the entropy is fetched 4 KiB at a time (one syscall
    per 256 ids, not one per request)."""
    global _entropy, _entropy_at
    at = _entropy_at
    if at >= len(_entropy):
        _entropy = os.urandom(4096)
        at = 0
    _entropy_at = at + 16
    return _entropy[at : at + 16].hex()


def request_id_from(value: str | None) -> str:
    """Keep the client's X-Request-ID if sane (≤128 printable ASCII), else make one."""
    if value and len(value) <= _MAX_REQUEST_ID and value.isascii() and value.isprintable():
        return value
    return new_request_id()


def connection_tokens(raw_headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names the Connection header declares hop-by-hop (lower-case)."""
    names: set[bytes] = set()
    for name, value in raw_headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


# What upstream_request_headers does with a request header, by its name as the
# client spelled it, per drop set: one dict lookup per header instead of lower(),
# a set lookup and a search for "_" (each bytes.find is ~1 k instructions).
_KEEP, _DROPPED, _FORWARDED_FOR, _HOST, _CONNECTION = range(5)
_REQUEST_KINDS: dict[frozenset[bytes], dict[bytes, int]] = {}
_MAX_KINDS = 1024  # spellings remembered per drop set (clients could invent endless ones)
_MAX_DROP_SETS = 256


def _request_kind(name: bytes, drop: frozenset[bytes], kinds: dict[bytes, int]) -> int:
    lname = name.lower()
    if lname in drop:
        kind = {b"x-forwarded-for": _FORWARDED_FOR, b"host": _HOST, b"connection": _CONNECTION}.get(
            lname, _DROPPED
        )
    elif b"_" in lname and lname.replace(b"_", b"-") in drop:
        # SECURITY: CGI/WSGI-style upstreams read X_User_Id as X-User-Id.
        kind = _DROPPED
    else:
        kind = _KEEP
    if len(kinds) < _MAX_KINDS:
        kinds[name] = kind
    return kind


def upstream_request_headers(
    raw_headers: Sequence[tuple[bytes, bytes]],
    drop: frozenset[bytes],
    *,
    client_ip: str,
    proto: str,
    request_id: str,
    extra: Iterable[tuple[str, str]] = (),
) -> list[tuple[bytes, bytes]]:
    """The header list sent upstream. ``drop`` = REQUEST_DROP | identity | chain strips."""
    out: list[tuple[bytes, bytes]] = []
    forwarded_for: list[bytes] = []
    host = b""
    has_connection = False
    kinds = _REQUEST_KINDS.get(drop)
    if kinds is None:
        if len(_REQUEST_KINDS) >= _MAX_DROP_SETS:
            _REQUEST_KINDS.clear()  # reloads made many chains; start afresh
        kinds = _REQUEST_KINDS[drop] = {}
    for name, value in raw_headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _request_kind(name, drop, kinds)
        if kind == _KEEP:
            out.append((name, value))
        elif kind == _FORWARDED_FOR:
            forwarded_for.append(value)
        elif kind == _HOST:
            host = value
        elif kind == _CONNECTION:
            has_connection = True
    if has_connection:
        # Headers the client named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
        listed = connection_tokens(raw_headers)
        if listed:
            out = [(n, v) for n, v in out if n.lower() not in listed]
    forwarded_for.append(client_ip.encode())
    out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    out.append((b"X-Forwarded-Proto", proto.encode()))
    if host:
        out.append((b"X-Forwarded-Host", host))
    out.append((b"X-Request-ID", request_id.encode()))
    for extra_name, extra_value in extra:
        out.append((extra_name.encode("latin-1"), extra_value.encode("latin-1")))
    return out


def response_headers(
    raw_headers: Sequence[tuple[bytes, bytes]], request_id: str
) -> CIMultiDict[str]:
    """The upstream's response headers as the client gets them."""
    kept: list[tuple[str, str]] = []
    listed: list[bytes] = []
    for name, value in raw_headers:
        lname = name.lower()
        if lname in RESPONSE_DROP:
            if lname == b"connection":
                listed.extend(connection_listed(value))
            continue
        kept.append((name.decode("latin-1"), value.decode("latin-1")))
    headers: CIMultiDict[str] = CIMultiDict(kept)  # one C-level build, not N adds
    for token in listed:
        headers.popall(token.decode("latin-1"), None)
    headers["X-Request-ID"] = request_id  # after the pops: Connection cannot remove it
    return headers


_SELF = frozenset({b"keep-alive", b"close"})


def connection_listed(value: bytes) -> list[bytes]:
    """The header names a response's Connection value declares hop-by-hop
    (lower-case); "keep-alive"/"close" (nearly always the only tokens) name none."""
    return [t for t in (t.strip().lower() for t in value.split(b",")) if t and t not in _SELF]
