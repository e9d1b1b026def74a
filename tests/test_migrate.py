"""Migrations against real PostgreSQL: apply, idempotence, schema shape, rollback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from aiogateway.migrate import (
    MigrationError,
    applied_migrations,
    apply_migrations,
    migrations_dir,
    rollback_migrations,
    yoyo_url,
)
from tests.support.postgres import PgServer

ALL = ["0001_audit_log", "0002_audit_log_indexes"]
COLUMNS = {
    "id": "uuid",
    "occurred_at": "timestamp with time zone",
    "request_id": "text",
    "route": "text",
    "method": "text",
    "path": "text",
    "status": "integer",
    "duration_ms": "double precision",
    "user_id": "text",
    "org_id": "text",
    "client_ip": "inet",
    "user_agent": "text",
    "upstream": "text",
    "bytes_in": "bigint",
    "bytes_out": "bigint",
    "error": "text",
}


async def columns(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'audit_log' ORDER BY ordinal_position"
        )
    finally:
        await conn.close()
    return {r["column_name"]: r["data_type"] for r in rows}


async def indexes(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = 'audit_log'")
    finally:
        await conn.close()
    return {r["indexdef"].split(" USING ")[1] for r in rows}


def test_migrations_ship_with_rollbacks() -> None:
    d = migrations_dir()
    ups = sorted(p.stem for p in d.glob("*.sql") if not p.name.endswith(".rollback.sql"))
    assert ups == ALL
    for up in ups:
        assert (d / f"{up}.rollback.sql").is_file()


async def test_apply_creates_the_designed_table_once(database_url: str) -> None:
    assert await asyncio.to_thread(apply_migrations, database_url) == ALL
    assert await columns(database_url) == COLUMNS
    assert await indexes(database_url) == {
        "btree (id)",
        "btree (request_id)",
        "btree (occurred_at)",
        "btree (user_id, occurred_at)",
        "btree (route, occurred_at)",
    }
    # Idempotent: a second run (another worker, a restart) applies nothing.
    assert await asyncio.to_thread(apply_migrations, database_url) == []
    assert await asyncio.to_thread(applied_migrations, database_url) == ALL


async def test_request_id_is_unique(database_url: str) -> None:
    await asyncio.to_thread(apply_migrations, database_url)
    conn = await asyncpg.connect(database_url)
    try:
        insert = (
            "INSERT INTO audit_log (id, occurred_at, request_id) "
            "VALUES (gen_random_uuid(), now(), 'same')"
        )
        await conn.execute(insert)
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(insert)
    finally:
        await conn.close()


async def test_rollback_one_then_all_then_apply_again(database_url: str) -> None:
    await asyncio.to_thread(apply_migrations, database_url)
    assert await asyncio.to_thread(rollback_migrations, database_url) == ["0002_audit_log_indexes"]
    assert await indexes(database_url) == {"btree (id)", "btree (request_id)"}
    assert await asyncio.to_thread(rollback_migrations, database_url, 5) == ["0001_audit_log"]
    assert await columns(database_url) == {}
    assert await asyncio.to_thread(applied_migrations, database_url) == []
    assert await asyncio.to_thread(apply_migrations, database_url) == ALL


async def test_concurrent_appliers_apply_each_migration_once(database_url: str) -> None:
    results = await asyncio.gather(
        *(asyncio.to_thread(apply_migrations, database_url) for _ in range(3))
    )
    assert sorted(i for ids in results for i in ids) == ALL
    assert await columns(database_url) == COLUMNS


def test_yoyo_url_uses_psycopg3_and_keeps_the_rest() -> None:
    assert (
        yoyo_url("postgresql://u:p%40ss@db:5432/gw?sslmode=require", 2.5)
        == "postgresql+psycopg://u:p%40ss@db:5432/gw?sslmode=require&connect_timeout=2"
    )
    assert yoyo_url("postgres://db/gw") == "postgresql+psycopg://db/gw"


def test_bad_urls_fail_clearly(postgres_server_url: str) -> None:
    with pytest.raises(MigrationError, match="must start with postgresql://"):
        apply_migrations("mysql://db/x")
    with pytest.raises(MigrationError, match="cannot connect to the database"):
        apply_migrations("postgresql://postgres@127.0.0.1:1/x", connect_timeout=2)
    missing = postgres_server_url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(MigrationError, match="no_such_database"):
        apply_migrations(missing)


async def test_a_dedicated_server_can_really_stop_and_start(
    start_postgres: Callable[[], PgServer],
) -> None:
    server = start_postgres()
    await asyncio.to_thread(server.stop)
    with pytest.raises(MigrationError, match="cannot connect"):
        await asyncio.to_thread(apply_migrations, server.url, connect_timeout=2)
    await asyncio.to_thread(server.start)
    assert await asyncio.to_thread(apply_migrations, server.url) == ALL
