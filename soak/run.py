"""``make soak``: a steady load through the full plugin chain for SOAK_MINUTES (10).

Starts (or reuses) PostgreSQL and a Kafka broker, a small upstream, and one
gateway process (soak/gateway.py: the CLI's serve path plus a task-count
probe) whose routes run metrics, jwt-check or service-key, audit-log and
kafka-emit. A paced client sends SOAK_RPS requests a second (default 100,
over 8 connections) spread over three routes (public POST, JWT-protected GET,
service-key GET), all expected 2xx. Every 10 s it samples the gateway's RSS,
open file descriptors and asyncio task count. At the end it stops the
gateway with SIGTERM (queues flushed), then counts audit rows and events and
prints: requests, non-2xx, latency percentiles, the least-squares slope of
RSS/fds/tasks after the warm-up (first 20 % of the run, at least 60 s) and
audit rows = events = requests. Exit status 1 if anything is off.

PostgreSQL: ``TEST_DATABASE_URL`` (or postgresql://postgres@127.0.0.1:5432/postgres)
when reachable, else an embedded server (tests/support/postgres.py); a fresh
database, dropped after. Kafka: ``KAFKA_BOOTSTRAP_SERVERS`` else a Tansu broker
(tests/support/kafka.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import asyncpg  # noqa: E402
import jwt  # noqa: E402
import psutil  # noqa: E402
from aiohttp import web  # noqa: E402

from tests.support.relay import Relay  # noqa: E402

JWT_SECRET = "soak-secret-0123456789abcdef0123456789"
SERVICE_KEY = "soak-service-key-0123"
TOPIC = "soak-events"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"

CONFIG = """
[server]
host = "127.0.0.1"
access_log = false
log_level = "warning"
state_dir = "{state}"

[upstreams.svc]
url = "{upstream}"

[plugins.metrics]
path = "/metrics"

[plugins.jwt]
type = "jwt-check"
algorithms = ["HS256"]
secret = "{jwt_secret}"
forward = {{ sub = "X-User-Id", org_id = "X-Org-Id" }}

[plugins.internal]
type = "service-key"
keys = ["{service_key}"]

[plugins.audit]
type = "audit-log"
dsn = "{dsn}"
migrate = true

[plugins.events]
type = "kafka-emit"
bootstrap_servers = "{bootstrap}"

[chains]
public = ["metrics", "audit", "events"]
protected = ["metrics", "jwt", "audit", "events"]
internal = ["metrics", "internal", "audit", "events"]

[[routes]]
name = "create-item"
methods = ["POST"]
path = "/v1/items"
upstream = "svc"
chain = "public"
event = {{ topic = "{topic}", type = "item_created" }}

[[routes]]
name = "get-item"
methods = ["GET"]
path = "/v1/items/{{id}}"
upstream = "svc"
chain = "protected"
event = {{ topic = "{topic}", type = "item_read" }}

[[routes]]
name = "validate"
methods = ["GET"]
path = "/auth/validate"
upstream = "svc"
chain = "internal"
event = {{ topic = "{topic}", type = "token_validated" }}
"""


def log(msg: str) -> None:
    print(f"soak: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 1):
            return True
    except OSError:
        return False


@contextlib.asynccontextmanager
async def postgres() -> AsyncIterator[str]:
    """A fresh database's URL; dropped after (and the embedded server stopped)."""
    server = None
    admin = os.environ.get("TEST_DATABASE_URL") or DEFAULT_PG
    if not reachable(admin):
        from tests.support.postgres import PgServer

        base = Path(tempfile.mkdtemp(prefix="aiogw-soak-pg-"))
        server = await asyncio.to_thread(lambda: PgServer(base).init().start())
        admin = server.url
        log(f"PostgreSQL: embedded server on port {server.port}")
    else:
        log(f"PostgreSQL: {urlsplit(admin).hostname}:{urlsplit(admin).port}")
    name = f"soak_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield urlunsplit(urlsplit(admin)._replace(path="/" + name))
    finally:
        conn = await asyncpg.connect(admin, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        if server is not None:
            await asyncio.to_thread(server.destroy)


@contextlib.asynccontextmanager
async def kafka(outage: bool) -> AsyncIterator[tuple[str, Relay | None]]:
    """(bootstrap for the gateway, relay in front of the broker when ``outage``)."""
    from tests.support.kafka import KafkaBroker, create_topics

    broker = relay = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if outage:
        # The broker advertises the relay, so every connection after bootstrap goes
        # through it (and is cut with it): an external broker cannot do that.
        port = free_port()
        relay = await Relay("127.0.0.1", port).start()
        broker = await asyncio.to_thread(lambda: KafkaBroker(port, relay.port).start())
        bootstrap = relay.address
        log(f"Kafka: Tansu broker on :{port}, behind a relay on {bootstrap}")
    elif not bootstrap:
        broker = await asyncio.to_thread(lambda: KafkaBroker().start())
        bootstrap = broker.bootstrap
        log(f"Kafka: Tansu broker on {bootstrap}")
    else:
        log(f"Kafka: {bootstrap}")
    try:
        await create_topics(bootstrap, [TOPIC])
        yield bootstrap, relay
    finally:
        if relay is not None:
            await relay.close()
        if broker is not None:
            await asyncio.to_thread(broker.close)


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[str]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        return web.json_response({"ok": True, "path": request.path})

    runner = web.ServerRunner(web.Server(handler), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss: float  # MiB
    fds: int
    tasks: int
    requests: int


@dataclass
class Load:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (started, seconds)

    @property
    def non_2xx(self) -> int:
        bad = sum(n for s, n in self.statuses.items() if not 200 <= s < 300)
        return bad + sum(self.errors.values())


def token() -> str:
    now = int(time.time())
    claims = {"sub": "user-1", "org_id": "org-1", "iat": now, "exp": now + 86_400}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


async def run_load(url: str, rps: float, conns: int, seconds: float, load: Load) -> None:
    """Requests paced at ``rps`` (slot i at start + i/rps) over ``conns`` workers."""
    auth = {"Authorization": f"Bearer {token()}"}
    key = {"X-Service-Key": SERVICE_KEY}
    started = time.monotonic()
    end = started + seconds
    next_slot = 0
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal next_slot
            while True:
                i = next_slot
                next_slot += 1
                at = started + i / rps
                if at >= end:
                    return
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                kind = i % 3
                t0 = time.perf_counter()
                try:
                    if kind == 0:
                        ctx = session.post(f"{url}/v1/items", data=b'{"name": "soak"}')
                    elif kind == 1:
                        ctx = session.get(f"{url}/v1/items/{i}", headers=auth)
                    else:
                        ctx = session.get(f"{url}/auth/validate", headers=key)
                    load.sent += 1
                    async with ctx as resp:
                        await resp.read()
                        load.statuses[resp.status] = load.statuses.get(resp.status, 0) + 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    name = type(exc).__name__
                    load.errors[name] = load.errors.get(name, 0) + 1
                load.latencies.append((t0, time.perf_counter() - t0))

        await asyncio.gather(*(worker() for _ in range(conns)))


def percentiles(durations: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    lat = sorted(durations) or [0.0]
    return lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (per unit of x)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def count_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM audit_log"))
    finally:
        await conn.close()


async def count_events(bootstrap: str) -> int:
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
        tps = [TopicPartition(TOPIC, p) for p in consumer.partitions_for_topic(TOPIC) or ()]
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


async def wait_ready(url: str, proc: asyncio.subprocess.Process, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not ready after {limit}s")
            await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace) -> int:
    seconds = args.minutes * 60
    warmup = max(60.0, seconds * 0.2) if seconds >= 150 else seconds * 0.3
    work = Path(tempfile.mkdtemp(prefix="aiogw-soak-"))
    pg_relay: Relay | None = None
    async with (
        postgres() as dsn,
        kafka(args.outage) as (bootstrap, kafka_relay),
        upstream() as upstream_url,
    ):
        gateway_dsn = dsn
        if args.outage:
            parts = urlsplit(dsn)
            pg_relay = await Relay(parts.hostname or "127.0.0.1", parts.port or 5432).start()
            netloc = parts.netloc.rsplit("@", 1)
            at = f"{netloc[0]}@" if len(netloc) == 2 else ""
            gateway_dsn = urlunsplit(parts._replace(netloc=f"{at}{pg_relay.address}"))
        config = work / "config.toml"
        config.write_text(
            CONFIG.format(
                state=work / "state",
                upstream=upstream_url,
                jwt_secret=JWT_SECRET,
                service_key=SERVICE_KEY,
                dsn=gateway_dsn,
                bootstrap=bootstrap,
                topic=TOPIC,
            )
        )
        port = free_port()
        stats = work / "tasks"
        gateway_log = work / "gateway.log"
        with gateway_log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(REPO / "soak" / "gateway.py"), "--config", str(config),
                "--port", str(port), "--stats", str(stats), stdout=out, stderr=out,
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(url, proc)
            gw = psutil.Process(proc.pid)
            log(
                f"gateway pid {proc.pid} on {url}: {args.rps:g} req/s over {args.conns} "
                f"connections for {args.minutes:g} min, samples every {args.every:g} s, "
                f"warm-up {warmup:.0f} s"
            )
            load = Load()
            outage_at = (seconds * 0.4, seconds * 0.6) if args.outage else None
            if outage_at is not None:
                log(f"PostgreSQL and Kafka cut from {outage_at[0]:.0f} s to {outage_at[1]:.0f} s")
            load_started = time.perf_counter()
            loader = asyncio.ensure_future(run_load(url, args.rps, args.conns, seconds, load))
            samples: list[Sample] = []
            started = time.monotonic()
            cut = False
            while True:
                await asyncio.wait([loader], timeout=args.every)
                if loader.done():
                    break  # a sample after the load ended would not be steady state
                elapsed = time.monotonic() - started
                if outage_at is not None and pg_relay is not None and kafka_relay is not None:
                    if not cut and outage_at[0] <= elapsed < outage_at[1]:
                        pg_relay.cut()
                        kafka_relay.cut()
                        cut = True
                        log("PostgreSQL and Kafka relays cut")
                    elif cut and elapsed >= outage_at[1]:
                        pg_relay.restore()
                        kafka_relay.restore()
                        cut = False
                        log("PostgreSQL and Kafka relays restored")
                s = Sample(
                    t=time.monotonic() - started,
                    rss=gw.memory_info().rss / 2**20,
                    fds=gw.num_fds(),
                    tasks=int(stats.read_text() or 0),
                    requests=load.sent,
                )
                samples.append(s)
                log(
                    f"t={s.t:6.0f}s  requests={s.requests:7d}  rss={s.rss:6.1f} MiB  "
                    f"fds={s.fds:4d}  tasks={s.tasks:4d}  non-2xx={load.non_2xx}"
                )
            await loader
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 120)
        log(f"gateway exited {code} after SIGTERM (queues flushed)")
        rows = await count_rows(dsn)
        events = await count_events(bootstrap)
        if pg_relay is not None:
            await pg_relay.close()

    steady = [s for s in samples if s.t >= warmup]
    minutes = [s.t / 60 for s in steady]
    rss_slope = slope(minutes, [s.rss for s in steady])
    fd_slope = slope(minutes, [float(s.fds) for s in steady])
    task_slope = slope(minutes, [float(s.tasks) for s in steady])
    p50, p99 = percentiles([d for _, d in load.latencies])
    log(
        f"requests {load.sent} in {seconds:.0f} s ({load.sent / seconds:.1f}/s), statuses "
        f"{dict(sorted(load.statuses.items()))}, errors {load.errors}, "
        f"latency p50 {p50:.1f} ms p99 {p99:.1f} ms"
    )
    if steady:
        first, last = steady[0], steady[-1]
        log(
            f"after warm-up ({len(steady)} samples, {first.t:.0f}-{last.t:.0f} s): "
            f"RSS {first.rss:.1f} -> {last.rss:.1f} MiB, slope {rss_slope:+.3f} MiB/min; "
            f"fds {first.fds} -> {last.fds}, slope {fd_slope:+.3f}/min; "
            f"tasks {first.tasks} -> {last.tasks}, slope {task_slope:+.3f}/min"
        )
    log(f"audit rows {rows}, events {events}, requests {load.sent}")
    problems = []
    if outage_at is not None:

        def window(lo: float, hi: float) -> list[float]:
            return [d for t, d in load.latencies if lo <= t - load_started < hi]

        normal = percentiles(window(warmup, outage_at[0]))
        down = percentiles(window(outage_at[0] + args.every, outage_at[1]))
        log(
            f"latency with dependencies up: p50 {normal[0]:.1f} ms p99 {normal[1]:.1f} ms; "
            f"PostgreSQL and Kafka down: p50 {down[0]:.1f} ms p99 {down[1]:.1f} ms "
            f"(x{down[0] / normal[0]:.2f} p50, x{down[1] / normal[1]:.2f} p99)"
        )
        if down[0] > 2 * normal[0] or down[1] > 2 * max(normal[1], 1.0):
            problems.append("latency more than 2x normal while the dependencies were down")
    if load.non_2xx:
        problems.append(f"{load.non_2xx} non-2xx responses or errors")
    if not rows == events == load.sent:
        problems.append("audit rows, events and requests differ")
    if code != 0:
        problems.append(f"gateway exit status {code}")
    # With an outage the queues fill and drain by design: slopes are shown, not judged.
    if not args.outage and abs(rss_slope) > args.max_rss_slope:
        problems.append(f"RSS slope {rss_slope:+.3f} MiB/min over {args.max_rss_slope}")
    if not args.outage and max(abs(fd_slope), abs(task_slope)) > args.max_count_slope:
        problems.append("fd or task count not flat")
    log("FAILED: " + "; ".join(problems) if problems else "OK: flat, no errors, nothing lost")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "10"))
    )
    parser.add_argument("--rps", type=float, default=float(os.environ.get("SOAK_RPS", "100")))
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--max-rss-slope", type=float, default=0.5, help="MiB/min")
    parser.add_argument("--max-count-slope", type=float, default=0.5, help="fds or tasks/min")
    parser.add_argument(
        "--outage",
        action="store_true",
        default=bool(os.environ.get("SOAK_OUTAGE")),
        help="cut PostgreSQL and Kafka (relays) from 40%% to 60%% of the run",
    )
    return asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
