"""audit-log's writer: records (orjson bytes) into PostgreSQL's ``audit_log``.

Each batch is one transaction: COPY into a per-connection temporary staging
table, then ``INSERT … SELECT … ON CONFLICT DO NOTHING`` into ``audit_log``
(COPY alone cannot skip rows already there). Measured against asyncpg's
``executemany`` of ``INSERT … ON CONFLICT`` in bench/bench_audit_writer.py.

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
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

__all__ = ["COLUMNS", "KEY_COLUMNS", "AuditWriter", "to_row", "uuid7"]

log = logging.getLogger("aiogateway.audit")

COLUMNS = (
    "id", "occurred_at", "request_id", "route", "method", "path", "status", "duration_ms",
    "user_id", "org_id", "client_ip", "user_agent", "upstream", "bytes_in", "bytes_out", "error",
)  # fmt: skip
KEY_COLUMNS = frozenset({"id", "occurred_at", "request_id"})  # always recorded
_MAX_TEXT = 2048  # longest user_agent / path kept; a row is no place for megabytes
_STAGING = "audit_log_staging"
_MIN_CHUNK = 1000  # rows: only a backlog (spool replay, bursts) is worth more connections
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
# Record-specific failures: rejected by PostgreSQL (bad data, a constraint) or by the
# driver's encoder (a value out of range). The batch is retried row by row and only
# the bad rows are dropped, so one bad record can never block the queue.
_DATA_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    OverflowError,
    TypeError,
    ValueError,
)


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7), built as text directly (the hook's
    hot path: ~3x faster than going through ``uuid.UUID``).

    The random bits come from ``random``, not ``os.urandom`` (a syscall per
    request): ids need uniqueness, not secrecy, and ``random`` reseeds itself in
    forked children, so workers never share a sequence.
    """
    t = f"{time.time_ns() // 1_000_000:012x}"
    h = f"{random.getrandbits(80):020x}"
    return f"{t[:8]}-{t[8:]}-7{h[:3]}-{_VARIANT[int(h[3], 16) & 3]}{h[4:7]}-{h[7:19]}"


_VARIANT = "89ab"  # the variant bits 10xx


def _text(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v)[:_MAX_TEXT]
    return s.replace("\x00", "\ufffd") if "\x00" in s else s  # PostgreSQL text has no NUL


@functools.lru_cache(maxsize=4096)
def _inet(v: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # Cached: client addresses repeat, and parsing one costs more than the rest of a row.
    try:
        return ipaddress.ip_address(v)
    except ValueError:
        return None  # e.g. a unix-socket peer


def to_row(rec: dict[str, Any]) -> tuple[Any, ...]:
    """A decoded record as a tuple in COLUMNS order, typed for COPY."""
    g = rec.get
    return (
        rec["id"],  # text: asyncpg's encoder parses and checks it (in C)
        datetime.fromtimestamp(rec["occurred_at"], UTC),
        _text(rec["request_id"]),
        _text(g("route")),
        _text(g("method")),
        _text(g("path")),
        g("status"),
        g("duration_ms"),
        _text(g("user_id")),
        _text(g("org_id")),
        _inet(ip) if isinstance(ip := g("client_ip"), str) and ip else None,
        _text(g("user_agent")),
        _text(g("upstream")),
        g("bytes_in"),
        g("bytes_out"),
        _text(g("error")),
    )


class AuditWriter:
    """The queue's sink: writes batches of records into ``audit_log``; usable alone (bench)."""

    def __init__(
        self, write_timeout: float = 30.0, acquire_timeout: float = 5.0, parallel: int = 1
    ) -> None:
        self.pool: asyncpg.Pool | None = None
        self.write_timeout = write_timeout
        self.acquire_timeout = acquire_timeout
        # A batch is split over up to this many connections, one transaction each:
        # rows need no order, and PostgreSQL overlaps one's commit with another's work.
        self.parallel = parallel
        # Told how many records could never be written (bad data): they are dropped.
        self.on_bad_record: Callable[[int], None] | None = None

    @staticmethod
    async def init_connection(conn: asyncpg.Connection) -> None:
        # One staging table per session, emptied by every commit: no catalog churn per batch.
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE audit_log) ON COMMIT DELETE ROWS"
        )

    async def __call__(self, records: list[bytes]) -> list[bytes]:
        """Write ``records``; return those not written (raise if none could be)."""
        if self.pool is None:
            raise ConnectionError("not connected to PostgreSQL yet")
        decoded: list[tuple[bytes, tuple[Any, ...]]] = []
        for r in records:
            try:
                decoded.append((r, to_row(orjson.loads(r))))
            except (ValueError, KeyError, TypeError, OverflowError):
                log.error("audit record cannot be decoded; dropped: %.200r", r)
                self._bad(1)
        n = max(1, min(self.parallel, len(decoded) // _MIN_CHUNK))
        chunks = [decoded[i::n] for i in range(n)]
        results = await asyncio.gather(
            *(self._write_chunk([row for _, row in c]) for c in chunks), return_exceptions=True
        )
        undelivered: list[bytes] = []
        error: BaseException | None = None
        for chunk, result in zip(chunks, results, strict=True):
            if isinstance(result, BaseException):
                error = error or result
                undelivered.extend(r for r, _ in chunk)
        if error is not None and len(undelivered) == len(decoded):
            raise error  # nothing written: the queue logs why and retries
        return undelivered

    async def _write_chunk(self, rows: list[tuple[Any, ...]]) -> None:
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

    async def _write(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        assert self.pool is not None
        async with self.pool.acquire(timeout=self.acquire_timeout) as conn, conn.transaction():
            await conn.copy_records_to_table(
                _STAGING, records=rows, columns=COLUMNS, timeout=self.write_timeout
            )
            status = await conn.execute(_INSERT, timeout=self.write_timeout)
            if int(status.rsplit(" ", 1)[1]) < len(rows):  # "INSERT 0 <n>"
                await conn.execute(_INSERT_COLLIDED, timeout=self.write_timeout)

    def _bad(self, n: int) -> None:
        if self.on_bad_record is not None:
            self.on_bad_record(n)
