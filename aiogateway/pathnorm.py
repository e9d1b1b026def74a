"""Request-path normalisation: the one path both routing and the upstream see.

``normalize_path`` turns the raw request-target path (query already split off)
into the path the router decides on: percent-decoded exactly once, checked
(valid UTF-8, no control characters), dot segments resolved (RFC 3986 §5.2.4,
never above the root) and repeated slashes merged. ``encode_path`` re-encodes
that path for the upstream's request line, so the upstream decodes exactly the
path the gateway routed on: no encoding (``%2e%2e``, ``%2F``, ``%252e``) can
reach a route, or an upstream path, that the plain path would not.

Both functions return their input unchanged after one cheap check in the
common case (plain ASCII, nothing to decode or resolve).
"""

from __future__ import annotations

import re
from urllib.parse import quote

__all__ = ["BadPath", "encode_path", "normalize_path", "resolve_path"]


class BadPath(ValueError):
    """The request path cannot be decoded safely; the core answers 400."""


# Two hex digits (any case) -> the byte they encode. A table rather than
# int(x, 16): int() also accepts "+1", " 1" and the like.
_HEX = "0123456789abcdefABCDEF"
_HEXBYTE = {(a + b).encode(): bytes((int(a + b, 16),)) for a in _HEX for b in _HEX}

# C0 controls, DEL and C1 controls (Unicode category Cc); NUL among them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]").search

# RFC 3986 pchar minus pct-encoded, plus "/": what the upstream gets verbatim.
_PATH_SAFE = "/!$&'()*+,;=:@-._~"
_NEEDS_QUOTE = re.compile(r"[^A-Za-z0-9!$&'()*+,;=:@\-._~/]").search


def normalize_path(raw: str) -> str:
    """The normalised form of ``raw`` (a request-target path without its query).

    * percent-decoded once (``%252e`` -> ``%2e``), the bytes as UTF-8;
      ``%2F`` becomes a ``/`` and separates segments like any other;
    * ``.`` and ``..`` segments resolved, never above the root (``/../a`` -> ``/a``);
    * empty segments dropped (``//`` -> ``/``), a trailing slash kept;
    * always starts with ``/``.

    Raises :class:`BadPath` for malformed escapes (``%zz``, ``%4``), bytes that
    are not UTF-8, control characters (NUL included) once decoded, and a
    literal ``#`` (a request-target carries no fragment, RFC 9112 §3.2).

    ``raw`` is a ``str`` as aiohttp's parser makes it (UTF-8 with
    ``surrogateescape``), so undecodable raw bytes are recovered and rejected.
    """
    # Fast path: plain printable ASCII with nothing to decode or resolve is
    # already normal. "/." conservatively sends every dot-led segment
    # (".well-known" too) down the slow path, which is still correct.
    if (
        raw[:1] == "/"
        and raw.isascii()
        and raw.isprintable()
        and "%" not in raw
        and "//" not in raw
        and "/." not in raw
        and "#" not in raw
    ):
        return raw
    return resolve_path(_decode(raw))


def _decode(raw: str) -> str:
    """Percent-decode ``raw`` once into checked text."""
    if "#" in raw:
        raise BadPath("a request path cannot contain '#'")
    try:
        data = raw.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise BadPath("the request path is not valid UTF-8") from None
    if b"%" in data:
        first, *rest = data.split(b"%")
        out = bytearray(first)
        hexbyte = _HEXBYTE
        for chunk in rest:
            byte = hexbyte.get(chunk[:2])
            if byte is None:
                raise BadPath(f"malformed percent-escape %{chunk[:2].decode('latin-1')}")
            out += byte
            out += chunk[2:]
        data = bytes(out)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("the request path is not valid UTF-8") from None
    # isprintable() is a quick pass for nearly every path; it is stricter than
    # "no Cc" (it also fails on e.g. U+00A0), so only its failures are rechecked.
    if not text.isprintable() and _CONTROL(text) is not None:
        raise BadPath("the request path contains a control character")
    return text


def resolve_path(text: str) -> str:
    """``text`` (already decoded) with dot segments resolved and slashes merged.

    The structural half of :func:`normalize_path`, without decoding: a path
    template is in normal form when ``resolve_path(template) == template``.
    """
    if text[:1] == "/" and "//" not in text and "/." not in text:
        return text
    segments = text.split("/")
    out: list[str] = []
    for seg in segments:
        if seg == ".." and out:
            out.pop()
        elif seg and seg not in (".", ".."):
            out.append(seg)
    if not out:
        return "/"
    # RFC 3986 §5.2.4 keeps the directory form: "/a/" and "/a/b/.." give "/a/".
    tail = "/" if segments[-1] in ("", ".", "..") else ""
    return "/" + "/".join(out) + tail


def encode_path(path: str) -> str:
    """``path`` (normalised) percent-encoded for the upstream's request line.

    Everything outside RFC 3986 ``pchar`` and ``/`` is encoded as UTF-8
    (space, ``%``, ``?``, ``#``, non-ASCII, controls); ``/`` is not, since the
    normalised path's slashes are its separators. ``normalize_path`` of the
    result gives ``path`` back.
    """
    if _NEEDS_QUOTE(path) is None:
        return path
    return quote(path, safe=_PATH_SAFE)
