"""audit-log's writer: records into PostgreSQL's ``audit_log``.

A record is made once, in the hook, in the form PostgreSQL's binary COPY reads
(:func:`encode_record`): the field count (int16, 16), then for each column in
``RECORD_COLUMNS`` order (fixed-size ones first: they pack in one call) an
int32 length (-1: NULL) and the value in PostgreSQL's binary format. A batch is
its records joined under COPY's binary header: the writer decodes and
re-encodes nothing. Records spooled by earlier versions are
orjson objects (they start with ``{``, a tuple with ``\\x00``) and are
converted when they are read back.

Each batch is one COPY straight into ``audit_log``: one round trip, atomic.
When it hits a unique key (a replay, or a reused request id, see below) the
batch is written again the careful way, in one transaction: COPY into a
per-connection temporary staging table, then ``INSERT … SELECT … ON CONFLICT
DO NOTHING`` into ``audit_log`` (COPY alone cannot skip rows already there);
batches keep taking that way for a minute, so a replay or a client that keeps
reusing an id costs one aborted COPY a minute, not one per batch. Measured
against asyncpg's ``executemany`` of ``INSERT … ON CONFLICT`` in
bench/bench_audit_writer.py.

No duplicates on replay: every record carries an ``id`` (UUIDv7: time-ordered,
so the primary key index grows at its right edge) made when the request
completed, so a batch re-sent after an outage or a crash conflicts on it and
is skipped. ``request_id`` is unique too, but clients may choose their own
X-Request-ID: a second request with the same one is stored as
``<request_id>#<id>`` instead of being dropped, so nobody can hide a request
from the audit log by reusing an id.

A record PostgreSQL or the driver rejects (bad data) is isolated by writing
its batch row by row and dropped alone (logged, counted): one bad record must
never block the queue behind it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import os
import random
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "COLUMNS",
    "KEY_COLUMNS",
    "RECORD_COLUMNS",
    "RECORD_ERRORS",
    "AuditWriter",
    "encode_record",
    "encode_values",
    "to_row",
    "uuid7",
    "uuid7_bytes",
]

log = logging.getLogger("aiogateway.audit")

COLUMNS = (
    "id", "occurred_at", "request_id", "route", "method", "path", "status", "duration_ms",
    "user_id", "org_id", "client_ip", "user_agent", "upstream", "bytes_in", "bytes_out", "error",
)  # fmt: skip
KEY_COLUMNS = frozenset({"id", "occurred_at", "request_id"})  # always recorded
# The order of a record's fields (COPY names the columns, so any order will do).
RECORD_COLUMNS = (
    "id", "occurred_at", "status", "duration_ms", "bytes_in", "bytes_out", "request_id", "path",
    "route", "method", "upstream", "user_agent", "client_ip", "user_id", "org_id", "error",
)  # fmt: skip
_TO_RECORD = tuple(COLUMNS.index(c) for c in RECORD_COLUMNS)
_MAX_TEXT = 2048  # longest user_agent / path kept; a row is no place for megabytes
_STAGING = "audit_log_staging"
# The COPY statement per table, made once (asyncpg's copy_to_table quotes and formats
# it on every call: ~85 k of the writer's ~290 k instructions for a 20-row batch).
_COPY_INTO = {
    t: f"COPY {t} ({', '.join(RECORD_COLUMNS)}) FROM STDIN (FORMAT binary)"
    for t in ("audit_log", _STAGING)
}
_MIN_CHUNK = 1000  # rows: only a backlog (spool replay, bursts) is worth more connections
_CAREFUL_FOR = 60.0  # seconds of staged writes after a batch hit a unique key
_COLS = ", ".join(COLUMNS)
_COLLIDED = ", ".join(
    "s.request_id || '#' || s.id::text" if c == "request_id" else f"s.{c}" for c in COLUMNS
)
# Rows new by id go in; rows skipped are replays (their id is there) or, rarely,
# a request_id collision: only then the second statement keeps those under a
# suffixed request_id (it costs an index probe per row, so it runs on demand).
_INSERT = f"INSERT INTO audit_log ({_COLS}) SELECT {_COLS} FROM {_STAGING} ON CONFLICT DO NOTHING"
_INSERT_COLLIDED = (
    f"INSERT INTO audit_log ({_COLS}) SELECT {_COLLIDED} FROM {_STAGING} s"
    " WHERE NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.id = s.id) ON CONFLICT DO NOTHING"
)
# Record-specific failures: rejected by PostgreSQL (bad data, a constraint, a malformed
# tuple). The batch is retried row by row and only the bad rows are dropped, so one bad
# record can never block the queue.
_DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
# What making a record of odd values raises (encode_record: go the careful way;
# encode_values, to_row: the record cannot be written).
RECORD_ERRORS = (
    ValueError,  # also UnicodeError, a bad UUID
    KeyError,
    TypeError,
    AttributeError,
    OverflowError,
    struct.error,  # an integer out of its column's range
)

# The binary COPY format (PostgreSQL docs, "COPY", "Binary Format").
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension
_COPY_TRAILER = b"\xff\xff"
_ONE_MESSAGE = 8 << 20  # bytes: a larger batch goes out in several CopyData messages
_NULL = b"\xff\xff\xff\xff"
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 (PostgreSQL's epoch) in Unix microseconds
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_len = struct.Struct("!i").pack
_INT4 = struct.Struct("!ii").pack
_INT8 = struct.Struct("!iq").pack
_FLOAT8 = struct.Struct("!id").pack
_UUID = struct.Struct("!QQ").pack
_time_ns = time.time_ns
_round = float.__round__  # round(x) without the builtin's lookup of __round__


def _new_id_source() -> None:
    """This process's id bits (RFC 9562 §6.2, method 2: a randomly seeded counter).

    An id's first half is its millisecond, the version and 12 random bits; its
    second half the variant and a 62-bit counter that starts at a random value:
    ids never repeat within a process, and processes (forked workers included:
    this runs again in each child) draw their own bits.
    """
    global _ID_RAND_A, _next_id_b
    _ID_RAND_A = 0x7 << 12 | random.getrandbits(12)  # version 7
    # Variant 10, then the counter; from below 2**61 it cannot run out.
    _next_id_b = itertools.count(0b10 << 62 | random.getrandbits(61)).__next__


_ID_RAND_A = 0
_next_id_b: Callable[[], int]
_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)


def uuid7_bytes() -> bytes:
    """A time-ordered UUID (RFC 9562 version 7) as its 16 bytes.

    No ``os.urandom`` (a syscall per request): ids need uniqueness, not
    secrecy (see ``_new_id_source``).
    """
    return _UUID(_time_ns() // 1_000_000 << 16 | _ID_RAND_A, _next_id_b())


def uuid7() -> str:
    """:func:`uuid7_bytes` as text."""
    return str(uuid.UUID(bytes=uuid7_bytes()))


def _text(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v)[:_MAX_TEXT]
    return s.replace("\x00", "\ufffd") if "\x00" in s else s  # PostgreSQL text has no NUL


def _text_field(v: Any) -> bytes:
    s = _text(v)
    if s is None:
        return _NULL
    b = s.encode("utf-8", "replace")  # a lone surrogate (from a header or a path) -> "?"
    return _len(len(b)) + b


# Columns with few distinct values keep their encoded fields. One cache each: a
# user agent seen once must not push a route name out.
_label = functools.lru_cache(maxsize=256)(_text_field)  # error
_agent = functools.lru_cache(maxsize=1024)(_text_field)


@functools.lru_cache(maxsize=1024)
def _route(route: Any, method: Any, upstream: Any) -> bytes:
    """The route, method and upstream fields: a few per route."""
    return _text_field(route) + _text_field(method) + _text_field(upstream)


def _once(s: str) -> bytes:
    """A text field of a value seen once (request id, path): raises unless plain."""
    if "\x00" in s:
        raise ValueError("NUL")
    b = s.encode()
    if len(b) > _MAX_TEXT:
        raise ValueError("long text")
    return _len(len(b)) + b


@functools.lru_cache(maxsize=4096)
def _tail(user_id: str | None, org_id: str | None, error: str | None) -> bytes:
    """The user_id, org_id and error fields: a few per user."""
    return b"".join(
        (
            _NULL if user_id is None else _once(user_id),
            _NULL if org_id is None else _once(org_id),
            _NULL if error is None else _label(error),
        )
    )


@functools.lru_cache(maxsize=4096)
def _inet(v: Any) -> bytes:
    # Cached: client addresses repeat, and parsing one costs more than the rest of a row.
    if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
        a = v
    else:
        try:
            a = ipaddress.ip_address(v)
        except ValueError:
            return _NULL  # e.g. a unix-socket peer
    p = a.packed
    # family (PGSQL_AF_INET 2, PGSQL_AF_INET6 3), bits, is_cidr, address length
    return _len(4 + len(p)) + bytes((2 if a.version == 4 else 3, 8 * len(p), 0, len(p))) + p


# A record's head, for each pair of request id and path lengths (request id length
# << 12 | path length): the 16 fields' count, the fixed-size fields (id, occurred_at,
# status, duration_ms, bytes_in, bytes_out), then request_id and path, each field
# after its length, in one call.
_HEADS: dict[int, Callable[..., bytes]] = {}
# The route, method, upstream, user_agent and client_ip fields (adjacent in a
# record) by their values: a few per route and client.
_MIDDLES: dict[tuple[Any, ...], bytes] = {}
_CACHED = 4096  # entries of either; past it, it starts again
_NO_IDENTITY = _NULL * 3  # user_id, org_id and error: NULL


def _head(n: int) -> Callable[..., bytes]:
    if len(_HEADS) >= _CACHED:
        _HEADS.clear()
    pack = _HEADS[n] = struct.Struct(f"!hiQQiqiiidiqiqi{n >> 12}si{n & 0xFFF}s").pack
    return pack


def _middle(route: str, method: str, upstream: str | None, agent: str | None, ip: str) -> bytes:
    if len(_MIDDLES) >= _CACHED:
        _MIDDLES.clear()
    b = _MIDDLES[route, method, upstream, agent, ip] = (
        _route(route, method, upstream) + _agent(agent) + _inet(ip)
    )
    return b


def encode_record(
    occurred_at: float,
    status: int,
    duration_ms: float,
    bytes_in: int,
    bytes_out: int,
    request_id: str,
    path: str,
    route: str,
    method: str,
    upstream: str | None,
    user_agent: str | None,
    client_ip: str,
    user_id: str | None,
    org_id: str | None,
    error: str | None,
) -> bytes:
    """The record of one request, with a new id (the hook's hot path; RECORD_COLUMNS order).

    Plain values only: anything else (a long or NUL-bearing text, a lone
    surrogate, a number out of range) raises one of RECORD_ERRORS, and the
    caller takes :func:`encode_values`.
    """
    # NUL checked in the str: `bytes in bytes` first tries the needle as an int,
    # and formats (then drops) a TypeError each time.
    if "\x00" in request_id or "\x00" in path:
        raise ValueError("NUL")
    rid = request_id.encode()
    p = path.encode()
    if len(rid) > _MAX_TEXT or len(p) > _MAX_TEXT:
        raise ValueError("long text")
    n = len(rid) << 12 | len(p)
    try:
        head = _HEADS[n]
    except KeyError:
        head = _head(n)
    try:
        middle = _MIDDLES[route, method, upstream, user_agent, client_ip]
    except KeyError:
        middle = _middle(route, method, upstream, user_agent, client_ip)
    record = head(
        16,
        16,
        _time_ns() // 1_000_000 << 16 | _ID_RAND_A,  # the id, as in uuid7_bytes()
        _next_id_b(),
        8,
        _round(occurred_at * 1e6) - _PG_EPOCH_US,
        4,
        status,
        8,
        duration_ms,
        8,
        bytes_in,
        8,
        bytes_out,
        len(rid),
        rid,
        len(p),
        p,
    )
    if user_id is None and org_id is None and error is None:
        return record + middle + _NO_IDENTITY
    return record + middle + _tail(user_id, org_id, error)


def _uuid_field(v: bytes | str | uuid.UUID) -> bytes:
    if isinstance(v, str):
        v = uuid.UUID(v)
    b = v.bytes if isinstance(v, uuid.UUID) else v
    if len(b) != 16:
        raise ValueError(f"not a UUID: {b!r}")
    return _len(16) + b


def _time_field(v: float | datetime) -> bytes:
    if isinstance(v, datetime):
        return _INT8(8, (v - _PG_EPOCH) // _US)
    return _INT8(8, round(v * 1e6) - _PG_EPOCH_US)


def _int4_field(v: int) -> bytes:
    return _INT4(4, v)


def _float8_field(v: float) -> bytes:
    return _FLOAT8(8, v)


def _int8_field(v: int) -> bytes:
    return _INT8(8, v)


_ENCODERS: tuple[Callable[[Any], bytes], ...] = (
    _uuid_field, _time_field, _text_field, _text_field, _text_field, _text_field,
    _int4_field, _float8_field, _text_field, _text_field, _inet, _text_field, _text_field,
    _int8_field, _int8_field, _text_field,
)  # fmt: skip


def encode_values(values: Sequence[Any]) -> bytes:
    """A record of any values given in COLUMNS order (None: NULL); the id as bytes or text.

    Texts are made storable (cut to 2048 characters, NUL and lone surrogates
    replaced); a value no column can take raises one of RECORD_ERRORS.
    """
    if len(values) != len(COLUMNS):
        raise ValueError(f"{len(values)} values for {len(COLUMNS)} columns")
    fields = [_NULL if (v := values[i]) is None else _ENCODERS[i](v) for i in _TO_RECORD]
    return b"".join([b"\x00\x10", *fields])


def to_row(rec: dict[str, Any]) -> tuple[Any, ...]:
    """A decoded orjson record (the format before binary records) as a tuple in COLUMNS order."""
    g = rec.get
    return (
        rec["id"],
        datetime.fromtimestamp(rec["occurred_at"], UTC),
        _text(rec["request_id"]),
        _text(g("route")),
        _text(g("method")),
        _text(g("path")),
        g("status"),
        g("duration_ms"),
        _text(g("user_id")),
        _text(g("org_id")),
        ip if isinstance(ip := g("client_ip"), str) and ip else None,
        _text(g("user_agent")),
        _text(g("upstream")),
        g("bytes_in"),
        g("bytes_out"),
        _text(g("error")),
    )


def _current(record: bytes) -> bytes | None:
    """``record`` in the binary form; None (logged) when it cannot be read."""
    if record[:1] == b"\x00":
        return record
    try:
        return encode_values(to_row(orjson.loads(record)))
    except RECORD_ERRORS:
        log.error("audit record cannot be decoded; dropped: %.200r", record)
        return None


_Conn = asyncpg.Connection | PoolConnectionProxy


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), _ONE_MESSAGE):
        yield data[i : i + _ONE_MESSAGE]


class AuditWriter:
    """The queue's sink: writes batches of records into ``audit_log``; usable alone (bench)."""

    def __init__(self, write_timeout: float = 30.0, parallel: int = 1) -> None:
        self.pool: asyncpg.Pool | None = None
        self.write_timeout = write_timeout
        # A batch is split over up to this many connections, one transaction each:
        # rows need no order, and PostgreSQL overlaps one's commit with another's work.
        self.parallel = parallel
        # Told how many records could never be written (bad data): they are dropped.
        self.on_bad_record: Callable[[int], None] | None = None
        self._careful_until = 0.0  # monotonic: staged writes until then (a unique key hit)

    @staticmethod
    async def init_connection(conn: asyncpg.Connection) -> None:
        # One staging table per session, emptied by every commit: no catalog churn per batch.
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE audit_log) ON COMMIT DELETE ROWS"
        )

    @staticmethod
    async def reset_connection(conn: asyncpg.Connection) -> None:
        """The pool's ``reset``: nothing (asyncpg's default costs a round trip per batch).

        The writer leaves no session state behind: no LISTEN, cursor, advisory lock
        or setting, and a transaction left open is rolled back by the pool anyway.
        """

    async def __call__(self, records: list[bytes]) -> list[bytes]:
        """Write ``records``; return those not written (raise if none could be).

        Records of the old format come back (if at all) in the current one.
        """
        if self.pool is None:
            raise ConnectionError("not connected to PostgreSQL yet")
        rows = records
        # Binary records start with a 0 byte, old ones with "{": the largest tells.
        if records and max(records)[:1] != b"\x00":
            rows = [row for r in records if (row := _current(r)) is not None]
            if len(rows) < len(records):
                self._bad(len(records) - len(rows))
        n = max(1, min(self.parallel, len(rows) // _MIN_CHUNK))
        if n == 1:
            await self._write_chunk(rows)  # raising: nothing written, the queue retries
            return []
        chunks = [rows[i::n] for i in range(n)]
        results = await asyncio.gather(
            *(self._write_chunk(c) for c in chunks), return_exceptions=True
        )
        undelivered: list[bytes] = []
        error: BaseException | None = None
        for chunk, result in zip(chunks, results, strict=True):
            if isinstance(result, BaseException):
                error = error or result
                undelivered.extend(chunk)
        if error is not None and len(undelivered) == len(rows):
            raise error  # nothing written: the queue logs why and retries
        return undelivered

    async def _write_chunk(self, rows: list[bytes]) -> None:
        try:
            await self._write(rows)
        except _DATA_ERRORS as exc:
            log.warning("audit batch rejected (%s); writing its rows one by one", exc)
            for row in rows:
                try:
                    await self._write([row])
                except _DATA_ERRORS as exc1:
                    log.error("audit row rejected by PostgreSQL; dropped: %s: %r", exc1, row)
                    self._bad(1)

    async def _write(self, rows: list[bytes]) -> None:
        if not rows:
            return
        assert self.pool is not None
        data = b"".join([_COPY_HEADER, *rows, _COPY_TRAILER])
        # No acquire timeout (asyncpg wraps that wait in a task, ~37 k instructions a
        # batch): the writer is the pool's only user and holds at most `parallel`
        # (<= pool size) connections at once, so acquire never waits for one, and
        # opening one is bounded by the pool's connect timeout.
        conn = await self.pool.acquire()
        try:
            if time.monotonic() >= self._careful_until:
                try:
                    await self._copy(conn, "audit_log", data)
                    return
                except asyncpg.UniqueViolationError:
                    # A replay or a reused request id: this batch and the next ones
                    # for a while go the way that skips or renames such rows.
                    self._careful_until = time.monotonic() + _CAREFUL_FOR
            async with conn.transaction():
                await self._copy(conn, _STAGING, data)
                status = await conn.execute(_INSERT, timeout=self.write_timeout)
                if int(status.rsplit(" ", 1)[1]) < len(rows):  # "INSERT 0 <n>"
                    await conn.execute(_INSERT_COLLIDED, timeout=self.write_timeout)
        finally:
            await self.pool.release(conn)

    async def _copy(self, conn: _Conn, table: str, data: bytes) -> None:
        source: Any = _chunks(data)
        if len(data) <= _ONE_MESSAGE:
            # One message, sent as is. A memoryview, not the bytes: asyncpg would take
            # bytes for a file name (its stubs leave out the buffer its docs allow).
            source = memoryview(data)
        # What copy_to_table ends in (asyncpg >= 0.11), with the statement made once.
        copy_in = conn._copy_in  # type: ignore[union-attr]  # private, not in the stubs
        await copy_in(_COPY_INTO[table], source, self.write_timeout)

    def _bad(self, n: int) -> None:
        if self.on_bad_record is not None:
            self.on_bad_record(n)
