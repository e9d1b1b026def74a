"""CloudEvents 1.0 structured-JSON envelopes for kafka-emit, and their queue records.

``build_event`` turns a finished exchange into the envelope DESIGN.md shows,
its Kafka key and its id. ``pack``/``unpack`` frame what kafka-emit hands the
delivery queue: the queue (and its on-disk spool) stores opaque bytes, so key,
headers and value travel together in one record, stable across restarts.
"""

from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from aiogateway.exchange import Exchange
    from aiogateway.settings import EventSpec

__all__ = [
    "RESERVED_ATTRIBUTES",
    "Envelope",
    "build_event",
    "check_attribute_name",
    "check_topic_name",
    "first_param",
    "pack",
    "rfc3339_ms",
    "unpack",
    "uuid4",
]

# Context attributes defined by the spec (and its JSON format): an extension
# attribute may not reuse them.
RESERVED_ATTRIBUTES = frozenset(
    {
        "specversion",
        "id",
        "source",
        "type",
        "time",
        "datacontenttype",
        "dataschema",
        "subject",
        "data",
        "data_base64",
    }
)
_ATTRIBUTE_NAME = re.compile(r"[a-z0-9]{1,20}")
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")

# Record framing: version byte, then u16 key length, u8 id length, u16 type length.
_VERSION = 1
_HEAD = struct.Struct(">BHBH")


@dataclass(frozen=True, slots=True)
class Envelope:
    key: bytes
    ce_id: bytes
    ce_type: bytes
    value: bytes


def check_attribute_name(name: str) -> str | None:
    """Why ``name`` cannot be an extension attribute, or None when it can."""
    if not _ATTRIBUTE_NAME.fullmatch(name):
        return "CloudEvents extension names are 1-20 lower-case letters or digits"
    if name in RESERVED_ATTRIBUTES:
        return f"{name!r} is a CloudEvents context attribute, not an extension"
    return None


def check_topic_name(topic: str) -> str | None:
    """Why ``topic`` is not a legal Kafka topic name, or None when it is."""
    if topic in (".", ".."):
        return "'.' and '..' are not topic names"
    if not _TOPIC_NAME.fullmatch(topic):
        return "Kafka topics are 1-249 characters of A-Z a-z 0-9 . _ -"
    return None


_second: list[Any] = [None, ""]  # the last second formatted, and its text


def rfc3339_ms(ts: float) -> str:
    """``2026-11-29T19:21:00.123Z``: UTC, milliseconds, ``Z``."""
    whole = int(ts)
    ms = int((ts - whole) * 1000)
    if _second[0] != whole:  # events of one second share the formatting
        _second[0] = whole
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{ms:03d}Z"


class _Uuid4:
    """Random (version 4) UUID strings from pooled os.urandom bytes.

    The same entropy source as ``uuid.uuid4()``, one system call per 256 ids
    instead of one each, and no UUID object: this runs once per event.
    """

    __slots__ = ("_pool", "_pos")

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def __call__(self) -> str:
        pos = self._pos
        if pos >= len(self._pool):
            self._pool, pos = os.urandom(16 * 256), 0
        self._pos = pos + 16
        b = bytearray(self._pool[pos : pos + 16])
        b[6] = (b[6] & 0x0F) | 0x40  # version 4
        b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
        h = b.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def reset(self) -> None:
        self._pool, self._pos = b"", 0


uuid4 = _Uuid4()
# A forked child must never reuse its parent's pooled bytes (duplicate ids).
os.register_at_fork(after_in_child=uuid4.reset)


def first_param(template: str | None) -> str | None:
    """The first ``{param}`` of a path template, in template order."""
    if template is None:
        return None
    start = template.find("{")
    if start < 0:
        return None
    end = template.find("}", start)
    return template[start + 1 : end] if end > start else None


def build_event(exchange: Exchange, spec: EventSpec, source: str) -> Envelope:
    """The envelope of one finished exchange; its route is known and has ``event``."""
    route = exchange.route
    assert route is not None  # on_complete only builds events for matched routes
    ce_id = uuid4()
    duration = exchange.duration
    # The occurrence is the request's outcome, known when it finished.
    occurred = exchange.started_at + duration
    user_id = exchange.user_id
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": ce_id,
        "source": source,
        "type": spec.type,
        "time": rfc3339_ms(occurred),
        "datacontenttype": "application/json",
        "subject": user_id,
    }
    if spec.attributes:
        doc.update(spec.attributes)  # names checked at load: never a core attribute
    doc["data"] = {
        "request_id": exchange.request_id,
        "route": route.name,
        "method": exchange.method,
        "path": exchange.path,
        "params": exchange.params,
        "status": exchange.status,
        "duration_ms": round(duration * 1000.0, 3),
        "user_id": user_id,
        "org_id": exchange.org_id,
        "client_ip": exchange.client_ip,
    }
    if user_id:
        key = user_id
    else:
        name = first_param(route.path)
        value = exchange.params.get(name) if name is not None else None
        key = value if value else exchange.request_id
    return Envelope(
        key=key.encode(),
        ce_id=ce_id.encode(),
        ce_type=spec.type.encode(),
        value=orjson.dumps(doc),
    )


def pack(env: Envelope) -> bytes:
    """One queue record: header, key, id, type, then the JSON value."""
    key = env.key[:0xFFFF]  # a key past 64 KiB is cut: keys only steer partitioning
    return (
        _HEAD.pack(_VERSION, len(key), len(env.ce_id), len(env.ce_type))
        + key
        + env.ce_id
        + env.ce_type
        + env.value
    )


def unpack(record: bytes) -> Envelope:
    version, klen, ilen, tlen = _HEAD.unpack_from(record)
    if version != _VERSION:
        raise ValueError(f"unknown event record version {version}")
    pos = _HEAD.size
    key = record[pos : pos + klen]
    pos += klen
    ce_id = record[pos : pos + ilen]
    pos += ilen
    ce_type = record[pos : pos + tlen]
    pos += tlen
    return Envelope(key=key, ce_id=ce_id, ce_type=ce_type, value=record[pos:])
