"""CloudEvents 1.0 structured-JSON envelopes for kafka-emit, and their queue records.

``build_event`` turns a finished exchange into the envelope DESIGN.md shows,
its Kafka key and its id. ``pack``/``unpack`` frame what kafka-emit hands the
delivery queue: the queue (and its on-disk spool) stores opaque bytes, so key,
headers and value travel together in one record, stable across restarts.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .kafka_records import SMALL_VARINTS, headers_tail, record_fields, record_tail, varint

if TYPE_CHECKING:
    from aiogateway.exchange import Exchange
    from aiogateway.settings import EventSpec

__all__ = [
    "RESERVED_ATTRIBUTES",
    "Envelope",
    "EventEncoder",
    "build_event",
    "check_attribute_name",
    "check_topic_name",
    "duration_ms",
    "fields",
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


_N_IDS = 256
# 256 ids at a time: their text rows ("-" and the version digit in place) ...
_ID_ROWS = b"00000000-0000-4000-8000-000000000000 " * _N_IDS
# ... filled column by column from 32 random hex digits per id: (text column, hex
# digit). Digit 12 is the version (4, in the template); 16 is the variant digit.
_ID_COLUMNS = [
    (dst, src)
    for src, dst in enumerate(c for c in range(36) if c not in (8, 13, 18, 23))
    if src not in (12, 16)
]
_VARIANT = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")  # RFC 4122: 10xx


class _Uuid4:
    """Random (version 4) UUIDs, as text, from pooled os.urandom bytes.

    The same entropy source as ``uuid.uuid4()`` (122 random bits each), one
    system call per 256 ids instead of one each, and no UUID object: this runs
    once per event. The 256 ids are formatted together, a column of digits at a
    time, as ASCII bytes (what the event needs).
    """

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: list[bytes] = []

    def __call__(self) -> str:
        return self.next_bytes().decode()

    def next_bytes(self) -> bytes:
        ids = self._ids
        if not ids:
            digits = os.urandom(16 * _N_IDS).hex().encode()
            rows = bytearray(_ID_ROWS)
            for dst, src in _ID_COLUMNS:
                rows[dst::37] = digits[src::32]
            rows[19::37] = digits[16::32].translate(_VARIANT)
            ids[:] = bytes(rows).split()
        return ids.pop()

    def reset(self) -> None:
        self._ids.clear()


uuid4 = _Uuid4()
_ids = uuid4._ids  # the pool itself: EventEncoder pops from it without a call
# A forked child must never reuse its parent's pooled ids (duplicate ids).
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


_MS = [b".%03dZ" % ms for ms in range(1000)]
# 0..999 as decimal text (statuses; whole milliseconds of most durations).
_DECIMAL = [b"%d" % n for n in range(1000)]
# Thousandths as orjson writes a float's fraction: ".5", ".25", ".125", ".0".
_FRACTION = [(b".%03d" % n).rstrip(b"0") if n else b".0" for n in range(1000)]
_dumps = orjson.dumps
# orjson text of strings that repeat (methods, client addresses): one dict
# lookup instead of an orjson call.
_QUOTED: dict[str, bytes] = {}


def _quoted(text: str) -> bytes:
    # A miss: callers try ``_QUOTED.get(text)`` first.
    if len(_QUOTED) >= 4096:
        _QUOTED.clear()
    quoted = _QUOTED[text] = _dumps(text)
    return quoted


def duration_ms(duration: float) -> bytes:
    """``orjson.dumps(round(duration * 1000.0, 3))``, without float formatting.

    ``round(ms, 3)`` rounds the exact binary value of ``ms`` half-even at the
    third decimal; rounding ``ms * 1000.0`` half-even to an integer gives the
    same thousandths unless that product came out exactly halfway (then the
    exact value may lie on either side): those, negatives and values past
    10**9 ms are left to orjson. Below that orjson's shortest form of the
    rounded float is its whole part and up to three decimals (the tests check).
    """
    micros = duration * 1000.0 * 1000.0
    thousandths = round(micros)
    if 0 <= thousandths < 10**12 and thousandths - micros != 0.5 and micros - thousandths != 0.5:
        whole, fraction = divmod(thousandths, 1000)
        return (_DECIMAL[whole] if whole < 1000 else b"%d" % whole) + _FRACTION[fraction]
    return _dumps(round(duration * 1000.0, 3))


class EventEncoder:
    """One route's events straight to queue records: ``pack(build_event(...))``, cheaper.

    Everything the route fixes (source, type, attributes, route name, where the
    key comes from) is serialized once, here; per event only the request's own
    values are encoded (orjson, one call each, none for repeated methods and
    client addresses or for numbers). The value is byte for byte what orjson
    makes of the dict :func:`build_event` builds (the tests compare them).
    """

    __slots__ = (
        "_after_id",
        "_after_route",
        "_after_time",
        "_after_user",
        "_headers",
        "_key_param",
    )

    def __init__(
        self, route_name: str, route_path: str | None, spec: EventSpec, source: str
    ) -> None:
        self._key_param = first_param(route_path)
        self._headers = headers_tail(spec.type.encode())
        self._after_id = b'","source":' + _dumps(source) + b',"type":' + _dumps(spec.type)
        self._after_id += b',"time":"'
        self._after_time = b'","datacontenttype":"application/json","subject":'
        # Extensions sit between subject and data (build_event's dict order).
        extensions = b"," + _dumps(spec.attributes)[1:-1] if spec.attributes else b""
        self._after_user = extensions + b',"data":{"request_id":'
        self._after_route = b',"route":' + _dumps(route_name) + b',"method":'

    def record(self, exchange: Exchange) -> bytes:
        """The queue record (see :func:`pack`) of one finished exchange's event."""
        ids = _ids  # ids are 36 bytes: headers_tail ends with that length
        ce_id = ids.pop() if ids else uuid4.next_bytes()
        finished = exchange.finished
        duration = exchange.duration if finished is None else finished - exchange.started
        occurred = exchange.started_at + duration
        whole = int(occurred)
        if _second_b[0] != whole:  # events of one second share the formatting
            _second_b[0] = whole
            _second_b[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)).encode()
        user_id = exchange.user_id
        user = b"null" if user_id is None else _dumps(user_id)
        org_id = exchange.org_id
        params = exchange.params
        if user_id:
            key = user_id
        else:
            name = self._key_param
            value = params.get(name) if name is not None else None
            key = value if value else exchange.request_id
        key_b = key.encode()[:0xFFFF]  # as pack() cuts it
        status = exchange.status
        doc = b"".join(
            (
                b'{"specversion":"1.0","id":"',
                ce_id,
                self._after_id,
                _second_b[1],
                _MS[int((occurred - whole) * 1000)],
                self._after_time,
                user,
                self._after_user,
                _dumps(exchange.request_id),
                self._after_route,
                _QUOTED.get(exchange.method) or _quoted(exchange.method),
                b',"path":',
                _dumps(exchange.path),
                b',"params":',
                _dumps(params) if params else b"{}",
                b',"status":',
                _DECIMAL[status] if 0 <= status < 1000 else b"%d" % status,
                b',"duration_ms":',
                duration_ms(duration),
                b',"user_id":',
                user,
                b',"org_id":',
                b"null" if org_id is None else _dumps(org_id),
                b',"client_ip":',
                _QUOTED.get(exchange.client_ip) or _quoted(exchange.client_ip),
                b"}}",
            )
        )
        n = len(doc)
        k = len(key_b)
        return b"".join(
            (
                SMALL_VARINTS[k] if k < 4096 else varint(k),
                key_b,
                SMALL_VARINTS[n] if n < 4096 else varint(n),
                doc,
                self._headers,
                ce_id,
            )
        )


_second_b: list[Any] = [None, b""]  # the last second formatted for EventEncoder, and its text


def pack(env: Envelope) -> bytes:
    """One queue record: key, value and headers as Kafka encodes them (see kafka_records)."""
    key = env.key[:0xFFFF]  # a key past 64 KiB is cut: keys only steer partitioning
    return record_tail(key, env.ce_id, env.ce_type, env.value)


def fields(record: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """A queue record's (key, ce_id, ce_type, value): :func:`unpack` without the object."""
    return record_fields(record)


def unpack(record: bytes) -> Envelope:
    key, ce_id, ce_type, value = fields(record)
    return Envelope(key=key, ce_id=ce_id, ce_type=ce_type, value=value)
