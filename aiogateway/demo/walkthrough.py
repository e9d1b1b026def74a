"""The demo walkthrough: sign up, sign in, call the API with the token, see the trail.

``run`` drives the gateway like a client would, then reads what the gateway
recorded: the CloudEvents on Kafka and the ``audit_log`` rows in PostgreSQL,
matched by the ``X-Request-ID`` each step sent. ``make demo`` prints it;
the end-to-end test asserts on the returned :class:`Walkthrough`.

Against a running ``make dev`` (it writes ``.run/devstack.json``)::

    python -m aiogateway.demo.walkthrough run       # the whole walkthrough
    python -m aiogateway.demo.walkthrough events    # the last events of every topic
    python -m aiogateway.demo.walkthrough audit     # the last audit rows
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

__all__ = [
    "AUDIT_COLUMNS",
    "STATE_FILE",
    "TOPICS",
    "Stack",
    "Step",
    "Walkthrough",
    "curl_walkthrough",
    "main",
    "read_audit",
    "read_events",
    "run",
]

STATE_FILE = Path(".run/devstack.json")
TOPICS = ("auth-events", "user-events", "organization-events")
AUDIT_COLUMNS = (
    "occurred_at", "request_id", "route", "method", "path", "status", "duration_ms",
    "user_id", "org_id", "client_ip", "user_agent", "upstream", "bytes_in", "bytes_out", "error",
)  # fmt: skip
Out = Callable[[str], None]


@dataclass(frozen=True)
class Stack:
    """Where a running dev stack is (``make dev`` writes it to ``.run/devstack.json``)."""

    gateway: str
    database_url: str
    kafka: str
    service_key: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Stack:
        return cls(**json.loads(path.read_text()))


@dataclass
class Step:
    name: str
    method: str
    path: str
    status: int
    body: Any
    request_id: str


@dataclass
class Walkthrough:
    steps: list[Step] = field(default_factory=list)
    user_id: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


def curl_walkthrough(gateway: str = "http://127.0.0.1:8002", service_key: str = "") -> str:
    """The copy-paste shell walkthrough ``make dev`` prints (and the README shows)."""
    key = service_key or "gateway-secret-key-2024"
    py = "python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])'"
    return f"""\
GW={gateway}
# 1. sign up, then sign in: the auth-service issues an HS256 JWT
curl -s -X POST $GW/v1/client/sign-up -H 'Content-Type: application/json' \\
  -d '{{"email": "ada@example.com", "password": "correct horse", "name": "Ada"}}'; echo
TOKEN=$(curl -s -X POST $GW/v1/client/sign-in/password -H 'Content-Type: application/json' \\
  -d '{{"email": "ada@example.com", "password": "correct horse"}}' | {py} access_token)
# 2. call a protected route with the token (and without: 401)
curl -s $GW/v1/client/me -H "Authorization: Bearer $TOKEN"; echo
curl -s -i $GW/v1/client/me | head -n 1
USER_ID=$(curl -s $GW/v1/client/me -H "Authorization: Bearer $TOKEN" | {py} id)
# 3. another service behind a prefix route; an internal route with the service key
curl -s $GW/v1/billing/invoices -H "Authorization: Bearer $TOKEN"; echo
curl -s $GW/auth/user/$USER_ID -H 'X-Service-Key: {key}'; echo
# 4. what the gateway recorded: Kafka events, audit rows, metrics
.venv/bin/python -m aiogateway.demo.walkthrough events
.venv/bin/python -m aiogateway.demo.walkthrough audit
curl -s $GW/metrics | grep '^gateway_requests_total'
"""


async def _call(
    session: aiohttp.ClientSession,
    stack: Stack,
    name: str,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> Step:
    request_id = f"demo-{secrets.token_hex(6)}-{name}"
    hdrs = {"X-Request-ID": request_id, "User-Agent": "aiogateway-demo", **(headers or {})}
    async with session.request(method, stack.gateway + path, json=json_body, headers=hdrs) as r:
        text = await r.text()
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = text
    return Step(name, method, path, r.status, body, request_id)


def _short(value: Any, width: int = 110) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= width else text[: width - 3] + "..."


async def run(stack: Stack, out: Out = print, within: float = 30.0) -> Walkthrough:
    """The walkthrough against ``stack``; raises AssertionError when a step goes wrong."""
    w = Walkthrough()
    email = f"ada-{secrets.token_hex(4)}@example.com"
    creds = {"email": email, "password": "correct horse"}
    out(f"Walkthrough against {stack.gateway}")
    async with aiohttp.ClientSession() as s:

        async def step(name: str, method: str, path: str, expect: int, **kw: Any) -> Step:
            result = await _call(s, stack, name, method, path, **kw)
            w.steps.append(result)
            out(f"{len(w.steps)}. {name:<14} {method} {path} -> {result.status}")
            out(f"   {_short(result.body)}")
            if result.status != expect:
                raise AssertionError(f"{name}: expected {expect}, got {result.status}")
            return result

        await step("sign-up", "POST", "/v1/client/sign-up", 201, json_body={**creds, "name": "Ada"})
        token = await step("sign-in", "POST", "/v1/client/sign-in/password", 200, json_body=creds)
        bearer = {"Authorization": f"Bearer {token.body['access_token']}"}
        me = await step("me", "GET", "/v1/client/me", 200, headers=bearer)
        w.user_id = me.body["id"]
        await step("me-no-token", "GET", "/v1/client/me", 401)
        await step("create-org", "POST", "/v1/org", 201, headers=bearer, json_body={"name": "Acme"})
        await step("billing", "GET", "/v1/billing/invoices", 200, headers=bearer)
        key = {"X-Service-Key": stack.service_key}
        await step("get-user", "GET", f"/auth/user/{w.user_id}", 200, headers=key)
        async with s.get(stack.gateway + "/metrics") as r:
            lines = (await r.text()).splitlines()
        w.metrics = [ln for ln in lines if ln.startswith("gateway_requests_total{")]
    ids = {st.request_id for st in w.steps}
    # Events: 2xx requests of routes with an `event` (billing has none, the 401 is no success).
    expected_events = {st.request_id for st in w.steps if st.name not in ("billing", "me-no-token")}
    out("\nKafka events (CloudEvents, one per successful request of an evented route):")
    w.events = await read_events(stack.kafka, TOPICS, expected_events, within)
    for ev in w.events:
        out(f"  {ev['topic']:<20} key={ev['key']:<38} {ev['type']:<22} subject={ev['subject']}")
    out("\naudit_log rows (one per request, rejected ones included):")
    w.audit = await read_audit(stack.database_url, ids, within)
    for row in w.audit:
        out(
            f"  {row['route']:<12} {row['method']:<5} {row['path']:<40} {row['status']} "
            f"user={row['user_id']} upstream={row['upstream']} {row['duration_ms']:.1f}ms"
        )
    out("\nmetrics (gateway_requests_total):")
    for line in w.metrics:
        out(f"  {line}")
    return w


async def read_events(
    bootstrap: str, topics: Iterable[str], request_ids: set[str] | None, within: float = 30.0
) -> list[dict[str, Any]]:
    """Events on ``topics`` (from the start); wait until every ``request_ids`` one is in.

    With ``request_ids`` None: whatever is there now. Each event is the CloudEvent
    with ``topic`` and ``key`` added, in arrival order.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        known = await consumer.topics()
        tps = [
            TopicPartition(t, p)
            for t in topics
            if t in known
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        events: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=200)
            for tp, records in sorted(batch.items(), key=lambda kv: kv[0].topic):
                for rec in records:
                    doc = json.loads(rec.value or b"{}")
                    key = (rec.key or b"").decode()
                    events.append({"topic": tp.topic, "key": key, **doc})
            if request_ids is None:
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                    return events
            else:
                mine = [e for e in events if e.get("data", {}).get("request_id") in request_ids]
                if {e["data"]["request_id"] for e in mine} >= request_ids:
                    return mine
            if loop.time() > deadline:
                raise TimeoutError(f"events did not all arrive on {list(topics)} in {within}s")
    finally:
        await consumer.stop()


async def read_audit(
    database_url: str, request_ids: set[str] | None, within: float = 30.0, limit: int = 20
) -> list[dict[str, Any]]:
    """``audit_log`` rows of ``request_ids`` (waiting for the batches), or the last ``limit``."""
    conn = await asyncpg.connect(database_url, timeout=10)
    cols = ", ".join(AUDIT_COLUMNS)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if request_ids is None:
                sql = f"SELECT {cols} FROM audit_log ORDER BY occurred_at DESC LIMIT $1"
                rows = list(reversed(await conn.fetch(sql, limit)))
            else:
                sql = (
                    f"SELECT {cols} FROM audit_log WHERE request_id = ANY($1) ORDER BY occurred_at"
                )
                rows = await conn.fetch(sql, list(request_ids))
            if request_ids is None or len(rows) >= len(request_ids):
                return [{k: _plain(v) for k, v in dict(r).items()} for r in rows]
            if loop.time() > deadline:
                raise TimeoutError(f"{len(rows)} of {len(request_ids)} audit rows in {within}s")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, int | float | str) else str(value)


def _print_json(items: Iterable[dict[str, Any]]) -> None:
    for item in items:
        print(json.dumps(item, default=str))


async def _main(args: argparse.Namespace) -> int:
    try:
        stack = Stack.load(args.state)
    except FileNotFoundError:
        print(f"no running dev stack ({args.state} missing): start it with `make dev`")
        return 2
    if args.command == "run":
        await run(stack)
    elif args.command == "events":
        _print_json(await read_events(stack.kafka, TOPICS, None, within=10))
    else:
        _print_json(await read_audit(stack.database_url, None, limit=args.limit))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiogateway.demo.walkthrough")
    parser.add_argument("command", choices=("run", "events", "audit"))
    parser.add_argument("--state", type=Path, default=STATE_FILE, help="the dev stack's file")
    parser.add_argument("--limit", type=int, default=10, help="audit: rows to show")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
