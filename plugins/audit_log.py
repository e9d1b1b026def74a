"""audit-log: one row per request in PostgreSQL's ``audit_log``, written in batches.

``on_complete`` only builds the record (bytes, in the form PostgreSQL's binary
COPY reads, see :mod:`plugins.audit_writer`) and puts it on a
:class:`~aiogateway.delivery.DeliveryQueue`; it never waits on the database.
The queue's worker hands batches to :class:`~plugins.audit_writer.AuditWriter`
(COPY into a staging table, INSERT … ON CONFLICT: a replay never duplicates a
row). While PostgreSQL is down, records queue in memory, then spool to disk.

Startup: an unusable DSN (syntax, unknown host, authentication, unknown
database, missing table without ``migrate``) fails startup, located at
``plugins.<name>.dsn``. A database that is merely down does not: records
queue and spool, /readyz reports this instance not ready, and a background
task connects (and migrates, with ``migrate = true``) once it is back.

Requests that match no route are not audited (no route, no chain; a 404 scan
would otherwise write rows at the scanner's pace).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import asyncpg
from aiohttp.hdrs import USER_AGENT  # an istr: no case folding per lookup
from pydantic import Field, SecretStr, field_validator

from aiogateway.delivery import DeliveryQueue
from aiogateway.errors import ConfigError
from aiogateway.migrate import MigrationError, apply_migrations
from aiogateway.plugin import Plugin, PluginConfig

from .audit_writer import (
    COLUMNS,
    KEY_COLUMNS,
    RECORD_ERRORS,
    AuditWriter,
    encode_record,
    encode_values,
    uuid7_bytes,
)

if TYPE_CHECKING:
    from aiogateway.exchange import Exchange
    from aiogateway.plugin import GatewayApp

__all__ = ["AuditLog", "AuditLogConfig"]

log = logging.getLogger("aiogateway.audit")
_round = float.__round__  # round(x) without the builtin's lookup of __round__


class AuditLogConfig(PluginConfig):
    dsn: SecretStr = Field(description="postgresql://user:password@host:port/database")
    pool_size: int = Field(4, ge=1, le=100, description="Most connections to PostgreSQL.")
    batch_size: int = Field(500, ge=1, le=100_000, description="Most rows per write.")
    flush_interval: float = Field(0.2, gt=0, le=60, description="Longest wait to fill a batch.")
    queue_size: int = Field(10_000, ge=1, description="Records held in memory before spooling.")
    spool_dir: str | None = Field(None, description="Default: <state_dir>/spool/<instance>.")
    spool_max_bytes: int = Field(1 << 30, ge=0, description="Spool cap; past it rows drop.")
    fields: list[str] | None = Field(None, description="Columns to record (default: all).")
    migrate: bool = Field(False, description="Apply migrations at startup.")
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect.")
    write_timeout: float = Field(30.0, gt=0, description="Seconds one batch write may take.")
    flush_timeout: float = Field(10.0, ge=0, description="Shutdown: seconds to write, then spool.")

    @field_validator("dsn")
    @classmethod
    def _dsn_shape(cls, v: SecretStr) -> SecretStr:
        parts = urlsplit(v.get_secret_value())
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("expected postgresql://user:password@host:port/database")
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError as exc:
            raise ValueError(f"bad port in DSN ({exc})") from None
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError("DSN names no host")
        return v

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (bad := sorted(set(v) - set(COLUMNS))):
            raise ValueError(f"unknown column(s) {bad}; known: {list(COLUMNS)}")
        return v


def _fatal(exc: BaseException) -> bool:
    """Whether a connection failure is a configuration mistake rather than an outage."""
    if isinstance(exc, socket.gaierror):
        return exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
    return isinstance(
        exc,
        asyncpg.InvalidAuthorizationSpecificationError  # bad password, unknown role
        | asyncpg.InvalidCatalogNameError  # unknown database
        | asyncpg.UndefinedTableError  # audit_log missing and migrate = false
        | asyncpg.ClientConfigurationError
        | MigrationError
        | ValueError,
    )


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, asyncpg.UndefinedTableError):
        text += " (run `aiogateway migrate`, or set migrate = true)"
    return text


class AuditLog(Plugin[AuditLogConfig]):
    """One ``audit_log`` row per request of the routes whose chain lists this instance."""

    type_name = "audit-log"
    Config = AuditLogConfig

    def __init__(self, name: str, config: AuditLogConfig) -> None:
        super().__init__(name, config)
        self.queue: DeliveryQueue | None = None
        self.writer = AuditWriter(config.write_timeout, config.pool_size)
        self._app: GatewayApp | None = None
        self._connector: asyncio.Task[None] | None = None
        self._ready = False
        keep = set(config.fields) | KEY_COLUMNS if config.fields is not None else None
        # Indexes of the columns left NULL.
        self._drop = tuple(i for i, c in enumerate(COLUMNS) if keep is not None and c not in keep)

    # Lifecycle ---------------------------------------------------------------

    async def startup(self, app: GatewayApp) -> None:
        c = self.config
        self._app = app
        spool = Path(c.spool_dir) if c.spool_dir else app.state_dir / "spool" / self.name
        self.queue = DeliveryQueue(
            f"audit-log {self.name}",
            self.writer,
            spool_dir=spool,
            telemetry=app.telemetry,
            queue_name=f"audit-log:{self.name}",
            max_queue=c.queue_size,
            batch_size=c.batch_size,
            flush_interval=c.flush_interval,
            spool_max_bytes=c.spool_max_bytes,
            on_outcome=self._outcome,
        )
        self.writer.on_bad_record = lambda n: self._outcome("dropped", n)
        try:
            await self._connect()
        except Exception as exc:
            if _fatal(exc):
                raise ConfigError(
                    f"cannot use the database: {_why(exc)}", location=f"plugins.{self.name}.dsn"
                ) from exc
            log.warning("audit-log %s: PostgreSQL unreachable (%s); spooling", self.name, exc)
            self._set_ready(False, f"PostgreSQL unreachable: {_why(exc)}; records spool")
            self._connector = asyncio.create_task(self._keep_connecting())
        else:
            self._set_ready(True, "")
        await self.queue.start()

    async def _connect(self) -> None:
        c = self.config
        dsn = c.dsn.get_secret_value()
        # A probe first: it tells a bad DSN from an outage before migrations or the pool.
        probe = await asyncpg.connect(dsn, timeout=c.connect_timeout)
        await probe.close()
        if c.migrate:
            await asyncio.to_thread(apply_migrations, dsn, connect_timeout=c.connect_timeout)
        self.writer.pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=c.pool_size,
            timeout=c.connect_timeout,
            command_timeout=c.write_timeout,
            init=AuditWriter.init_connection,
            reset=AuditWriter.reset_connection,
        )

    async def _keep_connecting(self) -> None:
        delay = 0.2
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except Exception as exc:
                if _fatal(exc):
                    log.error("audit-log %s: %s", self.name, _why(exc))
                self._set_ready(False, f"PostgreSQL unreachable: {_why(exc)}; records spool")
                delay = min(delay * 2, 5.0)
                continue
            log.info("audit-log %s: connected to PostgreSQL", self.name)
            # Ready now, not at the next batch: an idle gateway must not look down.
            # A failing write turns it back (see _outcome).
            self._set_ready(True, "")
            return

    async def shutdown(self, app: GatewayApp) -> None:
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        if self.queue is not None:
            await self.queue.close(self.config.flush_timeout)
        pool, self.writer.pool = self.writer.pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except TimeoutError:
                pool.terminate()

    def _outcome(self, outcome: str, count: int) -> None:
        assert self._app is not None
        if outcome == "delivered":
            self._app.telemetry.audit_outcome("written", count)
            if not self._ready:
                self._set_ready(True, "")
            return
        self._app.telemetry.audit_outcome(outcome, count)
        if outcome == "failed" and self._ready and self.queue is not None:
            self._set_ready(False, f"PostgreSQL: {self.queue.last_error}; records spool")

    def _set_ready(self, ready: bool, detail: str) -> None:
        self._ready = ready
        if self._app is not None:
            # Not critical: while PostgreSQL is away rows spool and requests succeed.
            self._app.set_ready(self.name, ready, detail, critical=False)

    # Request path ------------------------------------------------------------

    async def on_complete(self, exchange: Exchange) -> None:
        route = exchange.route
        record: bytes | None
        if self._drop:
            record = self._careful_record(exchange)
        else:
            # exchange.duration, inline (a property call per request); set when it ended.
            end = exchange.finished
            try:
                record = encode_record(
                    exchange.started_at,
                    exchange.status,
                    _round(((end or perf_counter()) - exchange.started) * 1e6) / 1000,
                    exchange.bytes_in,
                    exchange.bytes_out,
                    exchange.request_id,
                    exchange.path,
                    route.name if route is not None else "unmatched",
                    exchange.method,
                    route.upstream.name if route is not None else None,
                    exchange.request.headers.get(USER_AGENT),
                    exchange.client_ip,
                    exchange.user_id,
                    exchange.org_id,
                    exchange.error,
                )
            except RECORD_ERRORS:  # an odd value (long, NUL, lone surrogate, out of range)
                record = self._careful_record(exchange)
        if record is None:
            return
        assert self.queue is not None
        self.queue.put(record)

    def _careful_record(self, exchange: Exchange) -> bytes | None:
        """The record with odd values made storable and ``fields`` applied; None if impossible."""
        route = exchange.route
        values: list[Any] = [
            uuid7_bytes(),
            exchange.started_at,
            exchange.request_id,
            exchange.route_name,
            exchange.method,
            exchange.path,
            exchange.status,
            round(exchange.duration * 1e6) / 1000,
            exchange.user_id,
            exchange.org_id,
            exchange.client_ip,
            exchange.request.headers.get(USER_AGENT),
            route.upstream.name if route is not None else None,
            exchange.bytes_in,
            exchange.bytes_out,
            exchange.error,
        ]
        for i in self._drop:
            values[i] = None
        try:
            return encode_values(values)
        except RECORD_ERRORS as exc:
            log.error("audit record of request %s cannot be made; dropped: %s", values[2], exc)
            self._outcome("dropped", 1)
            return None
