"""audit-log against real PostgreSQL, through a real gateway, with real outages.

PostgreSQL outages are a TCP relay cut in front of the session's server; the
gateway-restart test runs the gateway as a subprocess and SIGTERMs it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from pydantic import ValidationError

from aiogateway.errors import ConfigError, error_response
from aiogateway.exchange import Exchange
from aiogateway.migrate import apply_migrations
from aiogateway.plugin import Plugin, PluginConfig
from aiogateway.spool import Spool
from plugins.audit_log import AuditLogConfig
from plugins.audit_writer import (
    COLUMNS,
    RECORD_ERRORS,
    AuditWriter,
    encode_record,
    encode_values,
    uuid7,
    uuid7_bytes,
)
from tests.support.gateway import RunningGateway, StartGateway, StartGatewayProcess
from tests.support.relay import Relay, StartRelay
from tests.support.upstreams import RecordingUpstream, StartUpstream


class Reject(Plugin[PluginConfig]):
    """Answers 403 after setting an identity, like an auth plugin denying a known user."""

    type_name = "test-reject"

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        exchange.user_id = "user-7"
        exchange.org_id = "org-3"
        return error_response(403, "forbidden", "no", exchange.request_id)


class Outcomes:
    """A telemetry sink keeping audit outcome counts."""

    def __init__(self) -> None:
        self.audit: dict[str, int] = {}

    def upstream_error(self, upstream: str, kind: str) -> None: ...
    def plugin_rejection(self, plugin: str, route: str, status: int) -> None: ...
    def plugin_failure(self, plugin: str, hook: str) -> None: ...
    def event_outcome(self, topic: str, outcome: str, count: int) -> None: ...
    def queue_depth(self, queue: str, depth: int) -> None: ...

    def audit_outcome(self, outcome: str, count: int) -> None:
        self.audit[outcome] = self.audit.get(outcome, 0) + count


def config(upstream: str, dsn: str, audit: str = "", routes: str = "") -> str:
    if "flush_interval" not in audit:
        audit += "\nflush_interval = 0.05"
    return f"""
[upstreams.app]
url = "{upstream}"

[upstreams.dead]
url = "http://127.0.0.1:1"
connect_timeout = 1

[plugins.audit]
type = "audit-log"
dsn = "{dsn}"
{audit}

[plugins.reject]
type = "tests.plugins.test_audit_log:Reject"

[[routes]]
name = "ok"
path = "/ok"
upstream = "app"
chain = ["audit"]

[[routes]]
name = "denied"
path = "/denied"
upstream = "app"
chain = ["reject", "audit"]

[[routes]]
name = "dead"
path = "/dead"
upstream = "dead"
chain = ["audit"]
{routes}
"""


@pytest.fixture
async def db(database_url: str) -> str:
    await asyncio.to_thread(apply_migrations, database_url)
    return database_url


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64), headers={"User-Agent": "audit-test/1.0"}
    ) as session:
        yield session


async def relayed(start_relay: StartRelay, url: str) -> tuple[Relay, str]:
    parts = urlsplit(url)
    relay = await start_relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    return relay, parts._replace(netloc=f"{parts.username}@127.0.0.1:{relay.port}").geturl()


async def fetch_rows(url: str, where: str = "") -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(f"SELECT * FROM audit_log {where} ORDER BY occurred_at"))
    finally:
        await conn.close()


async def count(url: str) -> tuple[int, int]:
    """(rows, distinct request ids stripped of any collision suffix)."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT split_part(request_id, '#', 1)) AS d "
            "FROM audit_log"
        )
    finally:
        await conn.close()
    assert row is not None
    return row["n"], row["d"]


async def until(pred: Callable[[], Any], timeout: float = 30.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


async def rows_reach(url: str, n: int, timeout: float = 30.0) -> None:
    async def enough() -> bool:
        return (await count(url))[0] >= n

    await until(enough, timeout)


async def load(
    client: aiohttp.ClientSession, base: str, n: int, concurrency: int = 32, path: str = "/ok"
) -> list[int]:
    """n GETs with ``concurrency`` in flight; returns the statuses."""
    statuses: list[int] = []
    it = iter(range(n))

    async def worker() -> None:
        for _ in it:
            async with client.get(base + path) as resp:
                await resp.read()
                statuses.append(resp.status)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


async def readiness(client: aiohttp.ClientSession, gw: RunningGateway) -> dict[str, Any]:
    async with client.get(gw.url + "/readyz") as resp:
        body: dict[str, Any] = orjson.loads(await resp.read())
        audit: dict[str, Any] = body["components"]["audit"]
        return audit


# Rows with the right values -------------------------------------------------


async def test_rows_for_success_rejection_and_upstream_failures(
    db: str,
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(config(recording_upstream.url, db))
    t0 = datetime.now(UTC)
    async with client.post(
        gw.url + "/ok?secret=1", data=b"x" * 100, headers={"X-Request-ID": "req-ok-1"}
    ) as resp:
        body = await resp.read()
        assert resp.status == 200
    async with client.get(gw.url + "/denied", headers={"X-Request-ID": "req-denied"}) as resp:
        assert resp.status == 403
    async with client.get(gw.url + "/ok?status=503", headers={"X-Request-ID": "req-503"}) as r:
        assert r.status == 503
    async with client.get(gw.url + "/dead", headers={"X-Request-ID": "req-dead"}) as resp:
        assert resp.status == 502
    await rows_reach(db, 4)
    rows = {r["request_id"]: r for r in await fetch_rows(db)}
    assert set(rows) == {"req-ok-1", "req-denied", "req-503", "req-dead"}

    ok = rows["req-ok-1"]
    assert ok["route"] == "ok"
    assert ok["method"] == "POST"
    assert ok["path"] == "/ok"  # no query string
    assert ok["status"] == 200
    assert ok["upstream"] == "app"
    assert ok["bytes_in"] == 100
    assert ok["bytes_out"] == len(body)
    assert ok["user_agent"] == "audit-test/1.0"
    assert str(ok["client_ip"]) == "127.0.0.1"
    assert ok["error"] is None
    assert ok["user_id"] is None
    assert 0 < ok["duration_ms"] < 5000
    assert abs((ok["occurred_at"] - t0).total_seconds()) < 5
    assert uuid.UUID(str(ok["id"])).version == 7

    denied = rows["req-denied"]
    assert (denied["status"], denied["route"], denied["upstream"]) == (403, "denied", "app")
    assert (denied["user_id"], denied["org_id"]) == ("user-7", "org-3")
    # (bytes_out of a plugin's own response is whatever the core counts: not asserted here.)

    assert rows["req-503"]["status"] == 503
    assert rows["req-503"]["error"] is None
    dead = rows["req-dead"]
    assert (dead["status"], dead["upstream"], dead["error"]) == (502, "dead", "connect")
    assert gw.gateway.readiness["audit"] == (True, "")


async def test_client_abort_is_audited(
    db: str, start_gateway: StartGateway, start_upstream: StartUpstream
) -> None:
    release = asyncio.Event()

    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first chunk")
        await release.wait()
        return resp

    upstream = await start_upstream(slow)
    gw = await start_gateway(config(upstream.url, db))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Request-ID: req-abort\r\n\r\n")
    await writer.drain()
    assert b"first chunk" in await reader.read(4096) or await reader.read(4096)
    writer.close()
    await rows_reach(db, 1)
    (row,) = await fetch_rows(db)
    assert row["request_id"] == "req-abort"
    assert row["error"] == "client_abort"
    assert row["status"] == 200
    release.set()


async def test_reused_request_id_keeps_both_rows(
    db: str,
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(config(recording_upstream.url, db))
    for _ in range(3):
        async with client.get(gw.url + "/ok", headers={"X-Request-ID": "same-id"}) as resp:
            assert resp.status == 200
    await rows_reach(db, 3)
    ids = sorted(r["request_id"] for r in await fetch_rows(db))
    assert ids[0] == "same-id"
    assert [i.split("#")[0] for i in ids] == ["same-id"] * 3
    assert len(set(ids)) == 3


async def test_fields_limits_what_is_recorded(
    db: str,
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(
        config(recording_upstream.url, db, audit='fields = ["route", "status"]')
    )
    async with client.get(gw.url + "/ok") as resp:
        assert resp.status == 200
    await rows_reach(db, 1)
    (row,) = await fetch_rows(db)
    assert (row["route"], row["status"]) == ("ok", 200)
    assert row["request_id"]  # the key columns are always recorded
    assert row["id"]
    assert row["occurred_at"]
    assert row["path"] is None
    assert row["client_ip"] is None
    assert row["user_agent"] is None


async def test_ten_thousand_requests_ten_thousand_rows(
    db: str,
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(config(recording_upstream.url, db))
    statuses = await load(client, gw.url, 10_000, concurrency=64)
    assert statuses.count(200) == 10_000
    await rows_reach(db, 10_000)
    await asyncio.sleep(0.3)  # nothing more may arrive
    assert await count(db) == (10_000, 10_000)


# Outages ----------------------------------------------------------------------


async def test_postgres_cut_during_load_loses_and_duplicates_nothing(
    db: str,
    start_gateway: StartGateway,
    start_relay: StartRelay,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    relay, dsn = await relayed(start_relay, db)
    gw = await start_gateway(
        config(recording_upstream.url, dsn, audit="queue_size = 200\nbatch_size = 100")
    )
    spool = gw.gateway.state_dir / "spool" / "audit"
    traffic = asyncio.create_task(load(client, gw.url, 4000, concurrency=16))
    await rows_reach(db, 300)
    relay.cut()
    await until(lambda: _not_ready(client, gw))
    await until(lambda: _has_segments(spool))
    relay.restore()
    statuses = await traffic
    assert statuses.count(200) == 4000
    await rows_reach(db, 4000, timeout=60)
    await asyncio.sleep(0.5)
    assert await count(db) == (4000, 4000)
    assert (await readiness(client, gw))["ready"] is True
    assert not await _has_segments(spool)


async def _not_ready(client: aiohttp.ClientSession, gw: RunningGateway) -> bool:
    return (await readiness(client, gw))["ready"] is False


async def _ready(client: aiohttp.ClientSession, gw: RunningGateway) -> bool:
    return (await readiness(client, gw))["ready"] is True


async def _has_segments(spool: Path) -> bool:
    return any(spool.glob("*.seg"))


async def test_sigterm_during_outage_then_restart_replays_the_spool(
    db: str,
    gateway_process: StartGatewayProcess,
    start_relay: StartRelay,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    relay, dsn = await relayed(start_relay, db)
    spool = tmp_path / "audit-spool"
    text = config(recording_upstream.url, dsn, audit=f'spool_dir = "{spool}"\nqueue_size = 50')
    gp = await gateway_process(text)
    assert (await load(client, gp.url, 300)).count(200) == 300
    await rows_reach(db, 300)
    relay.cut()
    assert (await load(client, gp.url, 700)).count(200) == 700
    assert await gp.stop(signal.SIGTERM) == 0
    assert await count(db) == (300, 300)
    assert await _has_segments(spool)  # memory went to disk at shutdown

    relay.restore()
    gp2 = await gateway_process(text)
    await rows_reach(db, 1000)
    assert (await load(client, gp2.url, 10)).count(200) == 10
    await rows_reach(db, 1010)
    await asyncio.sleep(0.5)
    assert await count(db) == (1010, 1010)
    assert not await _has_segments(spool)
    assert await gp2.stop() == 0


async def test_down_at_startup_serves_spools_and_counts_drops_past_the_cap(
    db: str,
    start_gateway: StartGateway,
    start_relay: StartRelay,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    relay, dsn = await relayed(start_relay, db)
    relay.cut()
    gw = await start_gateway(
        config(
            recording_upstream.url,
            dsn,
            audit="queue_size = 5\nspool_max_bytes = 20000\nconnect_timeout = 1",
        )
    )
    outcomes = Outcomes()
    gw.gateway.telemetry.add_sink(outcomes)
    state = await readiness(client, gw)
    assert state["ready"] is False
    assert "unreachable" in state["detail"]
    assert (await load(client, gw.url, 300)).count(200) == 300

    async def settled() -> bool:
        held = outcomes.audit.get("spooled", 0) + outcomes.audit.get("dropped", 0)
        return held >= 295

    await until(settled)
    dropped = outcomes.audit["dropped"]
    assert 100 < dropped < 295  # the cap holds ~100 records of ~190 bytes
    assert 0 < outcomes.audit["spooled"] <= 20000 // 150

    relay.restore()
    await until(lambda: _ready(client, gw))
    await rows_reach(db, 300 - dropped)
    await asyncio.sleep(0.5)
    assert await count(db) == (300 - dropped, 300 - dropped)
    assert outcomes.audit["written"] == 300 - dropped
    assert (await readiness(client, gw))["ready"] is True


async def test_two_workers_share_the_spool_dir_and_replay_exactly(
    db: str,
    gateway_process: StartGatewayProcess,
    start_relay: StartRelay,
    recording_upstream: RecordingUpstream,
    tmp_path: Path,
) -> None:
    relay, dsn = await relayed(start_relay, db)
    spool = tmp_path / "audit-spool"
    text = config(recording_upstream.url, dsn, audit=f'spool_dir = "{spool}"\nqueue_size = 20')
    gp = await gateway_process(text, workers=2)
    relay.cut()
    # New connections each time, so SO_REUSEPORT spreads them over both workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as c:
        assert (await load(c, gp.url, 400, concurrency=8)).count(200) == 400
    assert await gp.stop(signal.SIGTERM) == 0
    owners = {p.name.split("-")[1] for p in spool.glob("*.seg")}
    assert len(owners) == 2  # both workers spooled, each in its own files

    relay.restore()
    gp2 = await gateway_process(text, workers=2)
    await rows_reach(db, 400)
    await asyncio.sleep(0.5)
    assert await count(db) == (400, 400)
    assert not await _has_segments(spool)
    assert await gp2.stop() == 0


async def test_sigterm_flushes_memory_to_postgresql(
    db: str,
    gateway_process: StartGatewayProcess,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    # A long flush_interval keeps the rows in memory until shutdown flushes them.
    text = config(recording_upstream.url, db, audit="flush_interval = 30\nbatch_size = 5000")
    gp = await gateway_process(text)
    assert (await load(client, gp.url, 300)).count(200) == 300
    await asyncio.sleep(0.3)
    assert await count(db) == (0, 0)
    assert await gp.stop(signal.SIGTERM) == 0
    assert await count(db) == (300, 300)


async def test_reload_during_outage_hands_the_spool_to_the_new_instance(
    db: str,
    start_gateway: StartGateway,
    start_relay: StartRelay,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    relay, dsn = await relayed(start_relay, db)
    text = config(recording_upstream.url, dsn, audit="queue_size = 20")
    gw = await start_gateway(text)
    relay.cut()
    assert (await load(client, gw.url, 200)).count(200) == 200
    assert await gw.reload(text + "\n# reloaded\n")
    assert (await load(client, gw.url, 100)).count(200) == 100
    relay.restore()
    await rows_reach(db, 300)
    await asyncio.sleep(0.5)
    assert await count(db) == (300, 300)
    assert not await _has_segments(gw.gateway.state_dir / "spool" / "audit")


# Startup and configuration ------------------------------------------------------


@pytest.mark.parametrize(
    ("make_dsn", "expected"),
    [
        (lambda u: "postgresql://postgres@no-such-host.invalid:5432/x", "no-such-host|not known"),
        (lambda u: u.replace("postgres@", "no_such_role@", 1), "no_such_role"),
        (lambda u: u.rsplit("/", 1)[0] + "/no_such_db", "no_such_db"),
        (lambda u: u, "audit_log.*aiogateway migrate"),
    ],
    ids=["unknown-host", "unknown-role", "unknown-database", "no-table"],
)
async def test_unusable_dsn_fails_startup_naming_the_key(
    database_url: str,
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    make_dsn: Callable[[str], str],
    expected: str,
) -> None:
    dsn = make_dsn(database_url)  # database_url has no migrations: no audit_log table
    with pytest.raises(ConfigError, match=r"plugins\.audit\.dsn") as err:
        await start_gateway(config(recording_upstream.url, dsn))
    assert re.search(expected, str(err.value)), str(err.value)


async def test_unusable_dsn_stops_the_process_with_a_clear_message(
    database_url: str, gateway_process: StartGatewayProcess, recording_upstream: RecordingUpstream
) -> None:
    dsn = database_url.replace("postgres@", "no_such_role@", 1)
    gp = await gateway_process(config(recording_upstream.url, dsn), wait=False)
    assert await asyncio.wait_for(gp.proc.wait(), 60) != 0
    assert "plugins.audit.dsn" in gp.log
    assert "no_such_role" in gp.log
    assert "Traceback" not in gp.log


async def test_malformed_dsn_is_reported_at_its_key(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    with pytest.raises(ConfigError, match=r"plugins\.audit\.dsn.*postgresql://"):
        await start_gateway(config(recording_upstream.url, "mysql://db/x"))


@pytest.mark.parametrize(
    "dsn", ["not a url", "mysql://db/x", "postgresql://db:notaport/x", "postgresql:///x"]
)
def test_malformed_dsn_is_a_config_error(dsn: str) -> None:
    with pytest.raises(ValidationError):
        AuditLogConfig.model_validate({"dsn": dsn})


def test_unknown_field_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="unknown column"):
        AuditLogConfig.model_validate({"dsn": "postgresql://db/x", "fields": ["route", "pw"]})


async def test_migrate_true_creates_the_table_at_startup(
    database_url: str,
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(config(recording_upstream.url, database_url, audit="migrate = true"))
    async with client.get(gw.url + "/ok") as resp:
        assert resp.status == 200
    await rows_reach(database_url, 1)


# The writer alone ----------------------------------------------------------------


def record(**over: Any) -> bytes:
    rec: dict[str, Any] = {
        "id": uuid7(),
        "occurred_at": time.time(),
        "request_id": uuid.uuid4().hex,
        "route": "r",
        "method": "GET",
        "path": "/p",
        "status": 200,
        "duration_ms": 1.5,
        "client_ip": "10.1.2.3",
        "bytes_in": 0,
        "bytes_out": 10,
    }
    rec.update(over)
    return orjson.dumps(rec)


@pytest.fixture
async def writer(db: str) -> AsyncIterator[AuditWriter]:
    w = AuditWriter()
    w.pool = await asyncpg.create_pool(
        db, min_size=1, max_size=2, init=w.init_connection, reset=w.reset_connection
    )
    yield w
    await w.pool.close()


async def test_writer_replay_never_duplicates(db: str, writer: AuditWriter) -> None:
    batch = [record() for _ in range(50)]
    assert await writer(batch) == []
    assert await writer([*batch[10:30], record()]) == []  # a replayed batch, plus one new
    assert await count(db) == (51, 51)


async def test_writer_drops_only_the_rows_postgresql_rejects(db: str, writer: AuditWriter) -> None:
    bad: list[int] = []
    writer.on_bad_record = bad.append
    batch = [
        record(path="/a\x00b"),  # NUL: stored with a replacement character
        record(status=2**40),  # out of integer range: rejected by the driver
        record(duration_ms="NaN-ish"),  # not a number: rejected
        record(client_ip="not-an-ip"),  # not an address: stored as NULL
        b"{not json",
        record(request_id="kept"),
    ]
    assert await writer(batch) == []
    rows = await fetch_rows(db)
    assert len(rows) == 3
    assert sum(bad) == 3
    paths = {r["path"] for r in rows}
    assert "/a\ufffdb" in paths
    assert {r["request_id"] for r in rows} >= {"kept"}
    assert [r["client_ip"] for r in rows].count(None) == 1


async def test_writer_without_pool_raises_so_the_queue_keeps_records() -> None:
    with pytest.raises(ConnectionError):
        await AuditWriter()([record()])


def test_uuid7_is_a_valid_time_ordered_uuid() -> None:
    ids = [uuid7() for _ in range(2000)]
    assert len(set(ids)) == 2000
    for text in ids[:50]:
        u = uuid.UUID(text)
        assert str(u) == text
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
    ms = int(ids[0].replace("-", "")[:12], 16)
    assert abs(ms / 1000 - time.time()) < 5
    # Ordered by creation time at millisecond resolution.
    stamps = [i.replace("-", "")[:12] for i in ids]
    assert stamps == sorted(stamps)


def test_forked_children_draw_their_own_id_bits() -> None:
    # The ids' bits are a per-process random start and a counter: a forked worker
    # continuing its parent's counter would repeat its ids.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.write(w, b"".join(uuid7_bytes() for _ in range(100)))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        theirs = f.read()
    os.waitpid(pid, 0)
    mine = {uuid7_bytes()[6:] for _ in range(100)}  # all but the millisecond
    assert len(theirs) == 1600
    assert not mine & {theirs[i + 6 : i + 16] for i in range(0, 1600, 16)}


# Records in PostgreSQL's binary COPY form (the hook's), and the old orjson form ----


def binary(**over: Any) -> bytes:
    values: dict[str, Any] = {
        "occurred_at": time.time(),
        "request_id": uuid.uuid4().hex,
        "route": "r",
        "method": "GET",
        "path": "/p",
        "status": 200,
        "duration_ms": 1.5,
        "user_id": None,
        "org_id": None,
        "client_ip": "10.1.2.3",
        "user_agent": None,
        "upstream": "app",
        "bytes_in": 0,
        "bytes_out": 10,
        "error": None,
    }
    values.update(over)
    return encode_record(**values)


async def test_binary_records_keep_every_value(db: str, writer: AuditWriter) -> None:
    at = 1_767_225_600.123456  # 2026-01-01 00:00:00.123456 UTC
    before = time.time()
    assert (
        await writer(
            [
                binary(
                    occurred_at=at,
                    request_id="req-a",
                    route="sign-up",
                    method="POST",
                    path="/v1/client/sign-up",
                    status=201,
                    duration_ms=12.345,
                    user_id="user-ü",
                    org_id="org-1",
                    client_ip="2001:db8::1",
                    user_agent="agent/1.0",
                    upstream="auth",
                    bytes_in=2**40,
                    bytes_out=7,
                    error="timeout",
                ),
                binary(request_id="req-b", client_ip="unix-socket", route="", path=""),
            ]
        )
        == []
    )
    rows = {r["request_id"]: r for r in await fetch_rows(db)}
    a, b = rows["req-a"], rows["req-b"]
    assert a["occurred_at"] == datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    assert (a["route"], a["method"], a["path"]) == ("sign-up", "POST", "/v1/client/sign-up")
    assert (a["status"], a["duration_ms"], a["upstream"], a["error"]) == (
        201,
        12.345,
        "auth",
        "timeout",
    )
    assert (a["user_id"], a["org_id"], a["user_agent"]) == ("user-ü", "org-1", "agent/1.0")
    assert str(a["client_ip"]) == "2001:db8::1"
    assert (a["bytes_in"], a["bytes_out"]) == (2**40, 7)
    assert (b["client_ip"], b["user_id"], b["error"], b["route"], b["path"]) == (
        None, None, None, "", ""
    )  # fmt: skip
    for row in (a, b):
        u = uuid.UUID(str(row["id"]))
        assert (u.version, u.variant) == (7, uuid.RFC_4122)
        assert abs(int(u.hex[:12], 16) / 1000 - before) < 5  # made now, in ms


async def test_binary_replay_and_reused_ids_in_one_batch(db: str, writer: AuditWriter) -> None:
    batch = [binary() for _ in range(50)]
    assert await writer(batch) == []
    # A replayed part (all conflicts), a new row, and a client-reused id twice over.
    assert await writer([*batch[10:30], binary(), binary(request_id="dup")]) == []
    assert await writer([binary(request_id="dup"), binary(request_id="dup")]) == []
    assert await writer(batch[:5]) == []
    assert await count(db) == (54, 52)
    dups = sorted(r["request_id"] for r in await fetch_rows(db, "WHERE request_id LIKE 'dup%'"))
    assert dups[0] == "dup"
    assert all(re.fullmatch(r"dup#[0-9a-f-]{36}", d) for d in dups[1:])


async def test_a_malformed_binary_record_is_dropped_alone(db: str, writer: AuditWriter) -> None:
    bad: list[int] = []
    writer.on_bad_record = bad.append
    good = [binary(request_id=f"good-{i}") for i in range(3)]
    torn = binary(request_id="torn")[:-9]  # a record cut short (a torn write)
    assert await writer([good[0], torn, good[1], record(request_id="old"), good[2]]) == []
    ids = {r["request_id"] for r in await fetch_rows(db)}
    assert ids == {"good-0", "good-1", "good-2", "old"}
    assert sum(bad) == 1


def test_odd_values_take_the_careful_encoder() -> None:
    for odd in ("/a\x00b", "/" + "x" * 3000, "/\udcff"):
        with pytest.raises(RECORD_ERRORS):
            binary(path=odd)
    with pytest.raises(RECORD_ERRORS):
        binary(status=2**40)
    # Plain values: both encoders agree byte for byte (but for the id).
    at = time.time()
    plain = binary(occurred_at=at, request_id="same", user_agent="ua", user_id="u")
    values = [
        uuid7_bytes(), at, "same", "r", "GET", "/p", 200, 1.5, "u", None, "10.1.2.3", "ua",
        "app", 0, 10, None,
    ]  # fmt: skip
    careful = encode_values(values)
    assert careful[:6] + careful[22:] == plain[:6] + plain[22:]


async def test_careful_records_are_made_storable(db: str, writer: AuditWriter) -> None:
    def odd(request_id: str, **over: Any) -> bytes:
        values = dict.fromkeys(COLUMNS)
        values.update(id=uuid7(), occurred_at=time.time(), request_id=request_id, **over)
        return encode_values(list(values.values()))

    assert (
        await writer(
            [
                odd("nul", path="/a\x00b"),
                odd("long", user_agent="x" * 3000),
                odd("surrogate", user_agent="a\udcffb"),
                odd("typed", status=404, bytes_in=3, user_id=42),
            ]
        )
        == []
    )
    rows = {r["request_id"]: r for r in await fetch_rows(db)}
    assert rows["nul"]["path"] == "/a\ufffdb"
    assert rows["long"]["user_agent"] == "x" * 2048
    assert rows["surrogate"]["user_agent"] == "a?b"
    assert (rows["typed"]["status"], rows["typed"]["bytes_in"]) == (404, 3)
    assert rows["typed"]["user_id"] == "42"
    assert rows["typed"]["route"] is None
    with pytest.raises(RECORD_ERRORS):
        odd("range", status=2**40)


async def test_long_user_agent_is_cut_not_lost(
    db: str,
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
) -> None:
    gw = await start_gateway(config(recording_upstream.url, db))
    agent = "agent/" + "é" * 3000
    async with client.get(gw.url + "/ok", headers={"User-Agent": agent}) as resp:
        assert resp.status == 200
    await rows_reach(db, 1)
    (row,) = await fetch_rows(db)
    assert row["user_agent"] == agent[:2048]
    assert row["route"] == "ok"


async def test_spooled_records_of_the_old_format_still_replay(
    db: str,
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # A spool left by a version that wrote orjson records, one replayed twice over.
    spool_dir = tmp_path / "audit-spool"
    at = time.time() - 60
    old = [record(request_id=f"old-{i}", occurred_at=at, user_agent="ua/1") for i in range(30)]
    spool = Spool(spool_dir, max_bytes=1 << 20, segment_bytes=1 << 20)
    spool.prepend([*old, old[3]])
    spool.close()
    gw = await start_gateway(config(recording_upstream.url, db, audit=f'spool_dir = "{spool_dir}"'))
    async with client.get(gw.url + "/ok", headers={"X-Request-ID": "new-1"}) as resp:
        assert resp.status == 200
    await rows_reach(db, 31)
    await asyncio.sleep(0.3)
    assert await count(db) == (31, 31)
    rows = {r["request_id"]: r for r in await fetch_rows(db)}
    assert set(rows) == {f"old-{i}" for i in range(30)} | {"new-1"}
    o = rows["old-7"]
    assert (o["route"], o["method"], o["path"], o["status"]) == ("r", "GET", "/p", 200)
    assert (str(o["client_ip"]), o["user_agent"], o["duration_ms"]) == ("10.1.2.3", "ua/1", 1.5)
    assert o["occurred_at"] == datetime.fromtimestamp(at, UTC)
    assert str(o["id"]) == orjson.loads(old[7])["id"]
    assert not await _has_segments(spool_dir)
