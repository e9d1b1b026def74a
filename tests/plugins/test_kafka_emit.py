"""kafka-emit against a real broker (Tansu, or $KAFKA_BOOTSTRAP_SERVERS).

Events are read back with a separate consumer; a TCP relay between gateway
and broker stands in for a network partition.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aiogateway.errors import ConfigError
from aiogateway.exchange import Exchange
from aiogateway.plugin import Plugin, PluginConfig
from aiogateway.settings import EventSpec
from plugins.cloudevents import (
    Envelope,
    EventEncoder,
    build_event,
    duration_ms,
    fields,
    first_param,
    pack,
    rfc3339_ms,
    unpack,
    uuid4,
)
from plugins.kafka_emit import KafkaEmit
from tests.support.gateway import StartGateway, StartGatewayProcess
from tests.support.kafka import KafkaBroker, StartBroker, consume, create_topics, free_port
from tests.support.relay import Relay
from tests.support.upstreams import RecordingUpstream

pytestmark = pytest.mark.timeout(120)

TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
DATA_KEYS = {
    "request_id",
    "route",
    "method",
    "path",
    "params",
    "status",
    "duration_ms",
    "user_id",
    "org_id",
    "client_ip",
}


class FakeIdentity(Plugin[PluginConfig]):
    """Sets the identity from test headers; X-Test-Reject answers 401."""

    type_name = "fake-identity"

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        headers = exchange.request.headers
        if "X-Test-Reject" in headers:
            return web.json_response({"error": "unauthorized"}, status=401)
        exchange.user_id = headers.get("X-Test-User")
        exchange.org_id = headers.get("X-Test-Org")
        return None


class EventCounter:
    """A telemetry sink that keeps gateway_events_total's numbers."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()

    def upstream_error(self, upstream: str, kind: str) -> None: ...
    def plugin_rejection(self, plugin: str, route: str, status: int) -> None: ...
    def plugin_failure(self, plugin: str, hook: str) -> None: ...
    def audit_outcome(self, outcome: str, count: int) -> None: ...
    def queue_depth(self, queue: str, depth: int) -> None: ...

    def event_outcome(self, topic: str, outcome: str, count: int) -> None:
        self.events[(topic, outcome)] += count


def config(upstream: str, bootstrap: str, topic: str, extra: str = "", routes: str = "") -> str:
    return f"""
[upstreams.svc]
url = "{upstream}"

[plugins.who]
type = "tests.plugins.test_kafka_emit:FakeIdentity"

[plugins.events]
type = "kafka-emit"
bootstrap_servers = "{bootstrap}"
flush_interval = 0.02
{extra}

[chains]
public = ["who", "events"]

[[routes]]
name = "sign-up"
methods = ["POST"]
path = "/v1/client/sign-up"
upstream = "svc"
chain = "public"
event = {{ topic = "{topic}", type = "user_registered", attributes = {{ tenant = "acme" }} }}

[[routes]]
methods = ["DELETE"]
path = "/v1/org/{{id}}/member/{{user_id}}"
upstream = "svc"
chain = "public"
event = {{ topic = "{topic}", type = "member_removed", on = "always" }}

[[routes]]
name = "quiet"
path = "/v1/quiet"
upstream = "svc"
chain = "public"
{routes}
"""


def topic_name() -> str:
    return f"events-{uuid.uuid4().hex[:10]}"


# Envelope and record framing (no broker) -----------------------------------------


def test_rfc3339_ms_is_utc_with_milliseconds() -> None:
    assert rfc3339_ms(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_ms(1795980060.1239) == "2026-11-29T19:21:00.123Z"


def test_duration_ms_is_orjson_of_the_rounded_float() -> None:
    rng = random.Random(8)
    durations = [0.0, 0.0005, 0.0000625, 0.0015, 1e-9, 999.9995, 1e6 - 1e-7, 1e6, 5e6, -0.001]
    durations += [k / 16e6 for k in range(0, 20000, 7)]  # exact halves of a thousandth
    for scale in (1e-4, 1e-2, 1.0, 1e3, 1e5):
        durations += [rng.random() * scale for _ in range(20000)]
    for d in durations:
        assert duration_ms(d) == orjson.dumps(round(d * 1000.0, 3)), d


def test_first_param_in_template_order() -> None:
    assert first_param("/v1/org/{id}/member/{user_id}") == "id"
    assert first_param("/v1/client/sign-up") is None
    assert first_param(None) is None


def test_record_round_trip() -> None:
    env = Envelope(key="ü".encode(), ce_id=b"abc", ce_type=b"t", value=b'{"x":1}')
    assert unpack(pack(env)) == env


def test_record_fields_match_unpack() -> None:
    env = Envelope(key=b"k", ce_id=b"i" * 36, ce_type=b"user_registered", value=b"{}")
    assert fields(pack(env)) == (env.key, env.ce_id, env.ce_type, env.value)
    with pytest.raises(ValueError, match="format"):
        fields(b"\x03" + pack(env)[1:])  # odd, and not format 1


def test_uuid4_ids_are_random_rfc4122_version_4() -> None:
    ids = [uuid4() for _ in range(1000)]  # several pools of 256
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    # Every random digit varies (a column left out of the template would not).
    for pos in range(36):
        if pos not in (8, 13, 14, 18, 19, 23):
            assert len({t[pos] for t in ids}) > 8, pos
    assert {t[19] for t in ids} == set("89ab")


def test_uuid4_pool_is_not_shared_with_a_forked_child() -> None:
    uuid4()  # the pool is filled
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.write(write, uuid4().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != uuid4()


def _finished_exchange(**values: Any) -> Exchange:
    ex = Exchange(
        make_mocked_request("GET", "/"),
        values.pop("request_id", "req-1"),
        values.pop("method", "GET"),
        values.pop("path", "/v1/x"),
        "",
        values.pop("client_ip", "127.0.0.1"),
        100.0,
    )
    ex.started_at = values.pop("started_at", 1795980060.1)
    ex.finished = ex.started + values.pop("duration", 0.0123)
    for name, value in values.items():
        setattr(ex, name, value)
    return ex


@pytest.mark.parametrize(
    ("route_path", "spec", "values"),
    [
        ("/v1/x", EventSpec(topic="t", type="user_registered"), {"status": 201}),
        (
            "/v1/org/{id}/member/{user_id}",
            EventSpec(topic="t", type="member_removed", on="always"),
            {"status": 500, "params": {"id": 'o"1', "user_id": "m/ü"}, "org_id": "org-9"},
        ),
        (
            "/v1/org/{id}",
            EventSpec(topic="t", type='t\u00e9"', attributes={"tenant": 'ac"me', "z": "1"}),
            {
                "status": 204,
                "params": {"id": ""},
                "user_id": 'user \\ "1" \n\u2028',
                "org_id": "",
                "request_id": 'r"\\q',
                "path": "/v1/org/ü%2F\x7f",
                "method": "PATCH",
                "client_ip": "",
                "duration": 1234.56789,
                "started_at": 0.0009,
            },
        ),
        (None, EventSpec(topic="t", type="t"), {"status": 200, "user_id": "", "duration": 0.0}),
    ],
)
def test_encoder_record_is_pack_of_build_event(
    route_path: str | None, spec: EventSpec, values: dict[str, Any]
) -> None:
    # The fast encoder must give the very bytes of the plain one: same envelope
    # (orjson of the same dict, same order), key, headers and framing.
    route: Any = SimpleNamespace(name='route "ü"', path=route_path)
    ex = _finished_exchange(**values)
    ex.route = route
    record = EventEncoder(route.name, route_path, spec, 'src"').record(ex)
    got = unpack(record)
    want = build_event(ex, spec, 'src"')
    assert len(got.ce_id) == 36
    assert got.value.replace(got.ce_id, want.ce_id) == want.value
    assert record == pack(Envelope(want.key, got.ce_id, want.ce_type, got.value))
    doc = orjson.loads(got.value)
    assert doc["id"] == got.ce_id.decode()


# Config checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plugin_extra", "route_event", "where"),
    [
        ("", '{ topic = "bad topic", type = "t" }', r"routes\[0\].*\.event\.topic: Kafka topics"),
        (
            "",
            '{ topic = "t", type = "t", attributes = { id = "x" } }',
            r"routes\[0\].*\.event\.attributes\.id: 'id' is a CloudEvents",
        ),
        (
            "",
            '{ topic = "t", type = "t", attributes = { "Bad-Name" = "x" } }',
            r"attributes\.Bad-Name",
        ),
        ('compression = "zstd"', '{ topic = "t", type = "t" }', "zstd"),
        ('security_protocol = "SASL_SSL"', '{ topic = "t", type = "t" }', "sasl_username"),
        ("acks = 1\nenable_idempotence = true", '{ topic = "t", type = "t" }', "idempotence"),
    ],
)
def test_config_errors_are_located(
    tmp_path: Path, plugin_extra: str, route_event: str, where: str
) -> None:
    from aiogateway.config import load_table

    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[upstreams.svc]
url = "http://127.0.0.1:1"
[plugins.events]
type = "kafka-emit"
bootstrap_servers = "127.0.0.1:9092"
{plugin_extra}
[[routes]]
path = "/x"
upstream = "svc"
chain = ["events"]
event = {route_event}
"""
    )
    with pytest.raises(ConfigError, match=where):
        load_table(path, {})


# Through a running gateway --------------------------------------------------------


async def test_envelope_headers_and_user_key(
    kafka_bootstrap: str, recording_upstream: RecordingUpstream, start_gateway: StartGateway
) -> None:
    topic = topic_name()
    await create_topics(kafka_bootstrap, [topic])
    gw = await start_gateway(config(recording_upstream.url, kafka_bootstrap, topic))
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{gw.url}/v1/client/sign-up",
            headers={"X-Test-User": "u-42", "X-Test-Org": "o-7", "X-Request-ID": "req-1"},
            data=b"{}",
        ) as resp,
    ):
        assert resp.status == 200
    [rec] = await consume(kafka_bootstrap, topic, 1)
    event = orjson.loads(rec.value)
    assert set(event) == {
        "specversion", "id", "source", "type", "time", "datacontenttype", "subject", "data",
        "tenant",
    }  # fmt: skip
    assert event["specversion"] == "1.0"
    assert uuid.UUID(event["id"]).version == 4
    assert event["source"] == "aiogateway"
    assert event["type"] == "user_registered"
    assert TIME_RE.fullmatch(event["time"])
    assert event["datacontenttype"] == "application/json"
    assert event["subject"] == "u-42"
    assert event["tenant"] == "acme"
    data = event["data"]
    assert set(data) == DATA_KEYS
    assert data["request_id"] == "req-1"
    assert data["route"] == "sign-up"
    assert (data["method"], data["path"]) == ("POST", "/v1/client/sign-up")
    assert data["params"] == {}
    assert data["status"] == 200
    assert isinstance(data["duration_ms"], float)
    assert 0 < data["duration_ms"] < 10_000
    assert (data["user_id"], data["org_id"]) == ("u-42", "o-7")
    assert data["client_ip"] == "127.0.0.1"
    assert rec.key == b"u-42"
    assert dict(rec.headers) == {"ce_type": b"user_registered", "ce_id": event["id"].encode()}


async def test_key_falls_back_to_first_param_then_request_id(
    kafka_bootstrap: str, recording_upstream: RecordingUpstream, start_gateway: StartGateway
) -> None:
    topic = topic_name()
    await create_topics(kafka_bootstrap, [topic])
    gw = await start_gateway(config(recording_upstream.url, kafka_bootstrap, topic))
    async with aiohttp.ClientSession() as http:
        async with http.delete(
            f"{gw.url}/v1/org/org-9/member/m-3", headers={"X-Request-ID": "req-a"}
        ) as resp:
            assert resp.status == 200
        async with http.post(
            f"{gw.url}/v1/client/sign-up", headers={"X-Request-ID": "req-b"}
        ) as resp:
            assert resp.status == 200
    recs = await consume(kafka_bootstrap, topic, 2)
    assert [r.key for r in recs] == [b"org-9", b"req-b"]
    first = orjson.loads(recs[0].value)
    assert first["data"]["params"] == {"id": "org-9", "user_id": "m-3"}
    assert first["subject"] is None


async def test_non_2xx_emits_only_with_on_always(
    kafka_bootstrap: str, recording_upstream: RecordingUpstream, start_gateway: StartGateway
) -> None:
    topic = topic_name()
    await create_topics(kafka_bootstrap, [topic])
    gw = await start_gateway(config(recording_upstream.url, kafka_bootstrap, topic))
    async with aiohttp.ClientSession() as http:
        for url, headers, status in [
            ("/v1/client/sign-up?status=500", {}, 500),  # on=success: nothing
            ("/v1/client/sign-up", {"X-Test-Reject": "1"}, 401),  # rejected: nothing
            ("/v1/quiet", {}, 200),  # no event on the route
            ("/v1/org/o/member/m?status=404", {"X-Request-ID": "r404"}, 404),
            ("/v1/org/o/member/m", {"X-Test-Reject": "1", "X-Request-ID": "r401"}, 401),
            ("/v1/client/sign-up?status=201", {"X-Request-ID": "r201"}, 201),
        ]:
            method = "DELETE" if "/org/" in url else "POST"
            async with http.request(method, gw.url + url, headers=headers) as resp:
                assert resp.status == status
    recs = await consume(kafka_bootstrap, topic, 3)
    seen = [
        (d["data"]["request_id"], d["data"]["status"])
        for d in map(orjson.loads, (r.value for r in recs))
    ]
    assert seen == [("r404", 404), ("r401", 401), ("r201", 201)]


async def test_ten_thousand_requests_ten_thousand_events(
    kafka_bootstrap: str, recording_upstream: RecordingUpstream, start_gateway: StartGateway
) -> None:
    topic = topic_name()
    await create_topics(kafka_bootstrap, [topic], partitions=3)
    gw = await start_gateway(config(recording_upstream.url, kafka_bootstrap, topic))
    n = 10_000
    sem = asyncio.Semaphore(64)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:

        async def one(i: int) -> None:
            async with (
                sem,
                http.post(
                    f"{gw.url}/v1/client/sign-up",
                    headers={"X-Test-User": f"u{i % 50}", "X-Request-ID": f"r{i}"},
                ) as resp,
            ):
                assert resp.status == 200
                await resp.read()

        await asyncio.gather(*(one(i) for i in range(n)))
    recs = await consume(kafka_bootstrap, topic, n, timeout=60)
    ids = {orjson.loads(r.value)["id"] for r in recs}
    assert len(recs) == n
    assert len(ids) == n
    assert {orjson.loads(r.value)["data"]["request_id"] for r in recs} == {
        f"r{i}" for i in range(n)
    }


# Outages --------------------------------------------------------------------------


async def post_as(http: aiohttp.ClientSession, url: str, user: str, request_id: str) -> None:
    async with http.post(
        f"{url}/v1/client/sign-up", headers={"X-Test-User": user, "X-Request-ID": request_id}
    ) as resp:
        assert resp.status == 200
        await resp.read()


@pytest.fixture
async def partitioned_broker(
    start_kafka_broker: StartBroker,
) -> AsyncIterator[tuple[KafkaBroker, Relay]]:
    """A dedicated broker reachable only through a relay the test can cut.

    The broker advertises the relay's port, so the connections a Kafka client
    opens after bootstrapping go through the relay as well.
    """
    relay_port = free_port()
    broker = await start_kafka_broker(advertised_port=relay_port)
    relay = await Relay("127.0.0.1", broker.port).start(port=relay_port)
    yield broker, relay
    await relay.close()


def assert_exact_and_ordered(recs: list[Any], expected: list[str]) -> None:
    """Every expected request id once, none extra, each user's in sending order."""
    events = [orjson.loads(r.value) for r in recs]
    ids = [e["data"]["request_id"] for e in events]
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    assert not dupes, f"{len(dupes)} duplicated events, e.g. {dupes[:5]}"
    assert sorted(ids) == sorted(expected)
    assert len({e["id"] for e in events}) == len(events)
    per_key: dict[bytes, list[str]] = defaultdict(list)
    for rec in sorted(recs, key=lambda r: (r.partition, r.offset)):
        per_key[rec.key].append(orjson.loads(rec.value)["data"]["request_id"])
    for key, seq in per_key.items():
        assert seq == sorted(seq), f"events of {key!r} out of order"


async def test_broker_cut_during_load_delivers_all_in_order(
    partitioned_broker: tuple[KafkaBroker, Relay],
    recording_upstream: RecordingUpstream,
    start_gateway: StartGateway,
) -> None:
    _broker, relay = partitioned_broker
    topic = topic_name()
    await create_topics(relay.address, [topic], partitions=3)
    # A small memory queue: the outage also pushes events through the spool.
    gw = await start_gateway(
        config(recording_upstream.url, relay.address, topic, extra="queue_size = 50")
    )
    counter = EventCounter()
    gw.gateway.telemetry.add_sink(counter)
    users, per_user = 10, 120
    sent = 0
    async with aiohttp.ClientSession() as http:

        async def user(u: int) -> None:
            nonlocal sent
            for i in range(per_user):
                await post_as(http, gw.url, f"user-{u}", f"u{u:02d}-{i:05d}")
                sent += 1
                await asyncio.sleep(0.002)

        load = asyncio.gather(*(user(u) for u in range(users)))
        while sent < 300:
            await asyncio.sleep(0.01)
        relay.cut()
        cut_at = sent
        await asyncio.sleep(1.5)  # requests go on and succeed while Kafka is unreachable
        during = sent - cut_at
        relay.restore()
        await load
    assert during > 100, "the load did not continue through the outage"
    recs = await consume(relay.address, topic, users * per_user, timeout=60)
    expected = [f"u{u:02d}-{i:05d}" for u in range(users) for i in range(per_user)]
    assert_exact_and_ordered(recs, expected)
    assert counter.events[(topic, "spooled")] > 0
    assert counter.events[(topic, "dropped")] == 0


async def test_sigterm_during_outage_spools_and_replays_on_restart(
    partitioned_broker: tuple[KafkaBroker, Relay],
    recording_upstream: RecordingUpstream,
    gateway_process: StartGatewayProcess,
) -> None:
    _broker, relay = partitioned_broker
    topic = topic_name()
    await create_topics(relay.address, [topic], partitions=2)
    text = config(recording_upstream.url, relay.address, topic, extra="flush_timeout = 1")
    gp = await gateway_process(text)
    await wait_ready(gp.url, "events")
    async with aiohttp.ClientSession() as http:
        for i in range(100):
            await post_as(http, gp.url, f"user-{i % 7}", f"a{i:04d}")
        await consume(relay.address, topic, 100)  # delivered before the outage
        relay.cut()
        for i in range(300):
            await post_as(http, gp.url, f"user-{i % 7}", f"b{i:04d}")
    assert await gp.stop() == 0
    spool = gp.config_path.parent / ".run" / "state" / "spool" / "events" / topic
    assert sum(p.stat().st_size for p in spool.glob("*.seg")) > 300 * 100, gp.log
    relay.restore()
    gp2 = await gateway_process(text)
    recs = await consume(relay.address, topic, 400, timeout=60)
    expected = [f"a{i:04d}" for i in range(100)] + [f"b{i:04d}" for i in range(300)]
    assert_exact_and_ordered(recs, expected)
    assert await gp2.stop() == 0
    assert not any(p.stat().st_size > 16 for p in spool.glob("*.seg"))


async def wait_ready(url: str, component: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{url}/readyz") as resp:
                state = (await resp.json())["components"].get(component, {})
            if state.get("ready"):
                return state  # type: ignore[no-any-return]
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{component} not ready: {state}")
            await asyncio.sleep(0.1)


async def test_unreachable_broker_at_startup_gateway_serves_then_connects(
    recording_upstream: RecordingUpstream, start_gateway: StartGateway
) -> None:
    port = free_port()  # nothing listens here yet
    topic = topic_name()
    gw = await start_gateway(
        config(
            recording_upstream.url,
            f"127.0.0.1:{port}",
            topic,
            extra="auto_create_topics = true\nrequest_timeout = 2",
        )
    )
    async with aiohttp.ClientSession() as http:
        await post_as(http, gw.url, "user-1", "early")
        async with http.get(f"{gw.url}/readyz") as resp:
            body = await resp.json()
        # Degraded, not down: events spool and requests succeed meanwhile.
        assert resp.status == 200
        assert body["status"] == "degraded"
        events = body["components"]["events"]
        assert events["ready"] is False
        assert events["critical"] is False
        assert f"127.0.0.1:{port}" in events["detail"] or "connect" in events["detail"]
    broker = KafkaBroker(port=port)
    try:
        await asyncio.to_thread(broker.start)
        await wait_ready(gw.url, "events")
        [rec] = await consume(broker.bootstrap, topic, 1, timeout=30)
        assert orjson.loads(rec.value)["data"]["request_id"] == "early"
    finally:
        broker.close()


async def test_spool_cap_drops_are_counted(
    recording_upstream: RecordingUpstream, start_gateway: StartGateway
) -> None:
    topic = topic_name()
    extra = "queue_size = 10\nbatch_size = 10\nspool_max_bytes = 65536"
    gw = await start_gateway(
        config(recording_upstream.url, f"127.0.0.1:{free_port()}", topic, extra=extra)
    )
    counter = EventCounter()
    gw.gateway.telemetry.add_sink(counter)
    plugin = gw.gateway.table.plugins["events"]
    assert isinstance(plugin, KafkaEmit)
    n = 400  # ~600 bytes each: far more than 64 KiB of spool
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            await post_as(http, gw.url, "user-1", f"r{i:04d}")
    queue = plugin.queues[topic]
    deadline = asyncio.get_running_loop().time() + 10
    while queue.depth + counter.events[(topic, "dropped")] != n:
        assert asyncio.get_running_loop().time() < deadline, (queue.depth, counter.events)
        await asyncio.sleep(0.05)
    assert counter.events[(topic, "dropped")] > 0
    assert counter.events[(topic, "delivered")] == 0
    assert queue.spooled_bytes <= 65536


async def test_oversized_event_is_dropped_and_counted_without_blocking_others(
    kafka_bootstrap: str, recording_upstream: RecordingUpstream, start_gateway: StartGateway
) -> None:
    topic = topic_name()
    await create_topics(kafka_bootstrap, [topic])
    huge = "x" * 1_100_000  # past the largest request a producer may send
    route = f"""
[[routes]]
name = "huge"
path = "/v1/huge"
upstream = "svc"
chain = "public"
event = {{ topic = "{topic}", type = "huge", attributes = {{ blob = "{huge}" }} }}
"""
    gw = await start_gateway(config(recording_upstream.url, kafka_bootstrap, topic, routes=route))
    counter = EventCounter()
    gw.gateway.telemetry.add_sink(counter)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/v1/huge") as resp:
            assert resp.status == 200
        await post_as(http, gw.url, "user-1", "after-huge")
    [rec] = await consume(kafka_bootstrap, topic, 1)
    assert orjson.loads(rec.value)["data"]["request_id"] == "after-huge"
    deadline = asyncio.get_running_loop().time() + 5
    while counter.events[(topic, "delivered")] < 1:
        assert asyncio.get_running_loop().time() < deadline, counter.events
        await asyncio.sleep(0.05)
    assert counter.events[(topic, "dropped")] == 1
    assert counter.events[(topic, "delivered")] == 1


async def test_reload_keeps_every_event(
    kafka_bootstrap: str, recording_upstream: RecordingUpstream, start_gateway: StartGateway
) -> None:
    topic = topic_name()
    await create_topics(kafka_bootstrap, [topic])
    text = config(recording_upstream.url, kafka_bootstrap, topic)
    gw = await start_gateway(text)
    async with aiohttp.ClientSession() as http:

        async def load(prefix: str) -> None:
            for i in range(150):
                await post_as(http, gw.url, f"user-{i % 3}", f"{prefix}{i:04d}")

        background = asyncio.ensure_future(load("a"))
        await asyncio.sleep(0.1)
        assert await gw.reload(text + "\n# reloaded\n")
        await background
        await load("b")
    recs = await consume(kafka_bootstrap, topic, 300, timeout=30)
    expected = [f"a{i:04d}" for i in range(150)] + [f"b{i:04d}" for i in range(150)]
    ids = sorted(orjson.loads(r.value)["data"]["request_id"] for r in recs)
    assert ids == sorted(expected)


class AnswerEater:
    """A Kafka-aware TCP proxy that can lose one Produce answer.

    Armed, it lets the next Produce request reach the broker (so it is
    written) but drops the broker's answer and cuts that connection: the
    producer cannot know whether its batch was written. Everything else
    passes through. The broker advertises this proxy's port.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.eaten = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))
        api_keys: dict[int, int] = {}  # correlation id -> api key, this connection's
        for coro in (
            self._pipe(reader, up_writer, api_keys, requests=True, peer=writer),
            self._pipe(up_reader, writer, api_keys, requests=False, peer=up_writer),
        ):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        api_keys: dict[int, int],
        *,
        requests: bool,
        peer: asyncio.StreamWriter,
    ) -> None:
        try:
            while True:
                head = await reader.readexactly(4)
                frame = await reader.readexactly(int.from_bytes(head, "big"))
                if requests:  # api_key i16, api_version i16, correlation_id i32
                    api_keys[int.from_bytes(frame[4:8], "big")] = int.from_bytes(frame[:2], "big")
                else:
                    api_key = api_keys.pop(int.from_bytes(frame[:4], "big"), -1)
                    if api_key == 0 and self.armed:  # a Produce answer: lose it
                        self.armed = False
                        self.eaten += 1
                        writer.transport.abort()
                        peer.transport.abort()
                        return
                writer.write(head + frame)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
            peer.transport.abort()


async def test_lost_answer_is_verified_not_resent(
    start_kafka_broker: StartBroker,
    recording_upstream: RecordingUpstream,
    start_gateway: StartGateway,
) -> None:
    proxy_port = free_port()
    broker = await start_kafka_broker(advertised_port=proxy_port)
    proxy = AnswerEater(broker.port)
    await proxy.start(proxy_port)
    try:
        bootstrap = f"127.0.0.1:{proxy_port}"
        topic = topic_name()
        await create_topics(bootstrap, [topic])
        gw = await start_gateway(config(recording_upstream.url, bootstrap, topic))
        async with aiohttp.ClientSession() as http:
            await post_as(http, gw.url, "user-1", "r0")
            await consume(bootstrap, topic, 1)
            proxy.armed = True  # r1's batch is written, its answer lost
            await post_as(http, gw.url, "user-1", "r1")
            deadline = asyncio.get_running_loop().time() + 10
            while proxy.eaten == 0:
                assert asyncio.get_running_loop().time() < deadline, "no Produce answer lost"
                await asyncio.sleep(0.02)
            await post_as(http, gw.url, "user-1", "r2")
        recs = await consume(bootstrap, topic, 3, timeout=30)
        assert [orjson.loads(r.value)["data"]["request_id"] for r in recs] == ["r0", "r1", "r2"]
    finally:
        await proxy.close()
