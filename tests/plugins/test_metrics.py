"""metrics through a real gateway: exact counts, histograms, telemetry, formats, workers.

Every number is read back from a real scrape of ``/metrics`` (parsed with
prometheus_client's own parser), after real requests through the gateway to
real upstreams on loopback. The small plugins below are used by the tests'
config.toml as ``type = "tests.plugins.test_metrics:Reject"`` and so on.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import values
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from aiogateway.config import load_table
from aiogateway.errors import ConfigError
from aiogateway.exchange import Exchange
from aiogateway.plugin import GatewayApp, Plugin, PluginConfig
from aiogateway.telemetry import Telemetry
from plugins.metrics_registry import MetricFamilies
from plugins.metrics_series import DEFAULT_BUCKETS
from tests.support.gateway import (
    StartGateway,
    StartGatewayProcess,
    free_port,
)
from tests.support.upstreams import RecordingUpstream, StartUpstream

# --- plugins the tests' configs load -------------------------------------------------


class RejectConfig(PluginConfig):
    status: int = 403
    allow_header: str | None = None  # a request with this header set to "ok" passes


class Reject(Plugin[RejectConfig]):
    """Stops every request (unless it carries ``allow_header: ok``)."""

    type_name = "test-reject"
    Config = RejectConfig

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        header = self.config.allow_header
        if header is not None and exchange.request.headers.get(header) == "ok":
            return None
        return web.json_response({"error": "rejected"}, status=self.config.status)


class Reporter(Plugin[PluginConfig]):
    """Reports what audit-log, kafka-emit and their queues would, once per request."""

    type_name = "test-reporter"

    def __init__(self, name: str, config: PluginConfig) -> None:
        super().__init__(name, config)
        self.telemetry: Telemetry | None = None

    async def startup(self, app: GatewayApp) -> None:
        self.telemetry = app.telemetry

    async def on_complete(self, exchange: Exchange) -> None:
        assert self.telemetry is not None
        self.telemetry.event_outcome("auth-events", "delivered")
        self.telemetry.event_outcome("auth-events", "spooled", 2)
        self.telemetry.audit_outcome("written", 3)
        self.telemetry.queue_depth("audit", 7)


class Boom(Plugin[PluginConfig]):
    """An on_complete that always fails (the gateway logs and counts it)."""

    type_name = "test-boom"

    async def on_complete(self, exchange: Exchange) -> None:
        raise RuntimeError("boom")


class WorkerTag(Plugin[PluginConfig]):
    """Tells the upstream which gateway process forwarded the request."""

    type_name = "test-worker-tag"

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        exchange.add_upstream_header("X-Worker-Pid", str(os.getpid()))
        return None


HERE = "tests.plugins.test_metrics"

# --- helpers ---------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


async def scrape(url: str, path: str = "/metrics") -> tuple[str, Samples]:
    async with aiohttp.ClientSession() as s, s.get(url + path) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    return text, parse(text)


def histogram(samples: Samples, name: str, **labels: str) -> tuple[list[tuple[str, float]], float]:
    """([(le, cumulative count)] in bucket order, _sum), checking the invariants."""
    buckets = [
        (dict(lb)["le"], v)
        for (n, lb), v in samples.items()
        if n == f"{name}_bucket" and {k: x for k, x in lb if k != "le"} == labels
    ]
    buckets.sort(key=lambda b: float(b[0]))
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"{name} buckets not cumulative: {buckets}"
    assert buckets[-1][0] == "+Inf"
    assert buckets[-1][1] == value(samples, f"{name}_count", **labels)
    return buckets, value(samples, f"{name}_sum", **labels)


def config(
    upstream_url: str, *, metrics: str = "", chain: str = '["metrics"]', extra: str = ""
) -> str:
    return f"""
[upstreams.svc]
url = "{upstream_url}"

[plugins.metrics]
{metrics}

{extra}

[[routes]]
name = "users"
methods = ["GET", "POST"]
path = "/users"
upstream = "svc"
chain = {chain}

[[routes]]
name = "orders"
prefix = "/orders"
upstream = "svc"
chain = {chain}
"""


@asynccontextmanager
async def raw_upstream(behaviour: str) -> AsyncIterator[str]:
    """A raw TCP upstream that stays silent ("silent") or cuts its response short ("cut")."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        if behaviour == "cut":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
            await writer.drain()
            writer.transport.abort()
        else:
            await reader.read()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


# --- counts, histograms, bytes ---------------------------------------------------------


async def test_exact_counts_bytes_and_histograms(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config(recording_upstream.url))
    received = {"users": 0, "orders": 0}
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(f"{gw.url}/users") as r:
                assert r.status == 200
                received["users"] += len(await r.read())
        for _ in range(2):
            async with s.post(f"{gw.url}/users", data=b"0123456789") as r:
                assert r.status == 200
                received["users"] += len(await r.read())
        for i in range(4):
            async with s.get(f"{gw.url}/orders/{i}?status=503") as r:
                assert r.status == 503
                received["orders"] += len(await r.read())
    elapsed = time.perf_counter() - t0
    _, m = await scrape(gw.url)

    total = "gateway_requests_total"
    assert value(m, total, route="users", method="GET", status="200") == 3
    assert value(m, total, route="users", method="POST", status="200") == 2
    assert value(m, total, route="orders", method="GET", status="503") == 4
    routed = [lb for lb in series(m, total) if lb["route"] != "unmatched"]
    assert len(routed) == 3  # nothing else was counted for the routes
    assert value(m, "gateway_request_bytes_total", route="users") == 20
    assert value(m, "gateway_request_bytes_total", route="orders") == 0
    assert value(m, "gateway_response_bytes_total", route="users") == received["users"]
    assert value(m, "gateway_response_bytes_total", route="orders") == received["orders"]

    buckets, total_time = histogram(
        m, "gateway_request_duration_seconds", route="users", method="GET"
    )
    assert buckets[-1][1] == 3
    assert [le for le, _ in buckets][:3] == ["0.0005", "0.001", "0.0025"]
    assert 0 < total_time <= elapsed  # sequential requests: their durations fit in the wall time
    assert (
        histogram(m, "gateway_request_duration_seconds", route="orders", method="GET")[0][-1][1]
        == 4
    )
    up_buckets, up_time = histogram(m, "gateway_upstream_duration_seconds", upstream="svc")
    assert up_buckets[-1][1] == 9
    assert 0 < up_time <= total_time + elapsed
    assert value(m, "gateway_requests_in_flight") == 0


async def test_unmatched_paths_share_one_label_set(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config(recording_upstream.url))
    async with aiohttp.ClientSession() as s:  # warm up: the unmatched series exist now
        for method in ("GET", "PROPFIND"):
            async with s.request(method, f"{gw.url}/warm-up") as r:
                assert r.status == 404
    before_text, before = await scrape(gw.url)
    paths = [f"/{uuid.uuid4().hex}/{random.randrange(10**6)}" for _ in range(10_000)]
    methods = ["GET"] * 9_990 + ["PROPFIND"] * 5 + ["MKCOL"] * 5
    sem = asyncio.Semaphore(32)

    async def one(s: aiohttp.ClientSession, method: str, path: str) -> None:
        async with sem, s.request(method, gw.url + path) as r:
            assert r.status == 404
            await r.read()

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(one(s, m, p) for m, p in zip(methods, paths, strict=True)))
    text, after = await scrape(gw.url)

    def label_sets(m: Samples) -> set[tuple[str, str, str]]:
        return {
            (lb["route"], lb["method"], lb["status"]) for lb in series(m, "gateway_requests_total")
        }

    assert label_sets(before) == {("unmatched", "GET", "404"), ("unmatched", "OTHER", "404")}
    assert label_sets(after) == label_sets(before)
    assert (
        value(after, "gateway_requests_total", route="unmatched", method="GET", status="404")
        == 9_991
    )
    assert (
        value(after, "gateway_requests_total", route="unmatched", method="OTHER", status="404")
        == 11
    )
    # Scrapes are not traffic, and no path ever becomes a label: no new series at all.
    assert set(after) == set(before)
    assert len(text) - len(before_text) < 2_000
    assert not any(p in text for p in paths[:500])


# --- rejections, failures, upstream errors, queues ---------------------------------------


async def test_rejections_counted_by_plugin_and_in_flight_balanced(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    extra = f'[plugins.deny]\ntype = "{HERE}:Reject"\nstatus = 401\n'
    text = config(recording_upstream.url, extra=extra, chain='["metrics", "deny"]')
    # A second route whose rejecting plugin runs before metrics: metrics' on_request
    # never runs there, so on_complete must not lower the in-flight gauge.
    text += (
        '\n[[routes]]\nname = "early"\npath = "/early"\nupstream = "svc"\n'
        'chain = ["deny", "metrics"]\n'
    )
    gw = await start_gateway(text)
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.get(f"{gw.url}/users") as r:
                assert r.status == 401
        for _ in range(2):
            async with s.get(f"{gw.url}/early") as r:
                assert r.status == 401
    _, m = await scrape(gw.url)
    rej = "gateway_plugin_rejections_total"
    assert value(m, rej, plugin="deny", route="users", status="401") == 4
    assert value(m, rej, plugin="deny", route="early", status="401") == 2
    assert value(m, "gateway_requests_total", route="users", method="GET", status="401") == 4
    assert value(m, "gateway_requests_total", route="early", method="GET", status="401") == 2
    assert value(m, "gateway_requests_in_flight") == 0
    assert recording_upstream.requests == []


async def test_upstream_error_kinds(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    async with raw_upstream("silent") as silent, raw_upstream("cut") as cut:
        extra = f"""
[upstreams.down]
url = "http://127.0.0.1:{free_port()}"
[upstreams.slow]
url = "{silent}"
read_timeout = 0.3
[upstreams.cut]
url = "{cut}"

[[routes]]
name = "down"
path = "/down"
upstream = "down"
chain = ["metrics"]
[[routes]]
name = "slow"
path = "/slow"
upstream = "slow"
chain = ["metrics"]
[[routes]]
name = "cut"
path = "/cut"
upstream = "cut"
chain = ["metrics"]
"""
        gw = await start_gateway(config(recording_upstream.url) + extra)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{gw.url}/down") as r:
                assert r.status == 502
            for _ in range(2):
                async with s.get(f"{gw.url}/slow") as r:
                    assert r.status == 504
            async with s.get(f"{gw.url}/cut") as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
        await asyncio.sleep(0.05)  # the cut exchange completes after the client saw the cut
        _, m = await scrape(gw.url)
    errors = "gateway_upstream_errors_total"
    assert value(m, errors, upstream="down", kind="connect") == 1
    assert value(m, errors, upstream="slow", kind="timeout") == 2
    assert value(m, errors, upstream="cut", kind="reset") == 1
    assert len(series(m, errors)) == 3
    assert value(m, "gateway_requests_total", route="down", method="GET", status="502") == 1
    assert value(m, "gateway_requests_total", route="slow", method="GET", status="504") == 2
    assert value(m, "gateway_requests_in_flight") == 0


async def test_events_audit_queue_and_plugin_failures(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    extra = f'[plugins.report]\ntype = "{HERE}:Reporter"\n[plugins.boom]\ntype = "{HERE}:Boom"\n'
    gw = await start_gateway(
        config(recording_upstream.url, extra=extra, chain='["metrics", "report", "boom"]')
    )
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(f"{gw.url}/users") as r:
                assert r.status == 200
    _, m = await scrape(gw.url)
    assert value(m, "gateway_events_total", topic="auth-events", outcome="delivered") == 5
    assert value(m, "gateway_events_total", topic="auth-events", outcome="spooled") == 10
    assert value(m, "gateway_audit_records_total", outcome="written") == 15
    assert value(m, "gateway_queue_depth", queue="audit") == 7
    assert value(m, "gateway_plugin_failures_total", plugin="boom", hook="on_complete") == 5
    assert value(m, "gateway_requests_total", route="users", method="GET", status="200") == 5


# --- formats and serving ---------------------------------------------------------------


async def promtool_check(text: str) -> None:
    """``promtool check metrics``: valid exposition and no lint findings."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus provides it)")
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(text.encode())
    assert proc.returncode == 0, out.decode()
    assert out.decode().strip() == "", out.decode()


async def test_output_passes_promtool(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    extra = (
        f'[plugins.deny]\ntype = "{HERE}:Reject"\n'
        f'[plugins.report]\ntype = "{HERE}:Reporter"\n[plugins.boom]\ntype = "{HERE}:Boom"\n'
        f'[upstreams.down]\nurl = "http://127.0.0.1:{free_port()}"\n'
        '[[routes]]\nname = "denied"\npath = "/denied"\nupstream = "svc"\n'
        'chain = ["metrics", "deny"]\n'
        '[[routes]]\nname = "down"\npath = "/down"\nupstream = "down"\nchain = ["metrics"]\n'
    )
    gw = await start_gateway(
        config(recording_upstream.url, extra=extra, chain='["metrics", "report", "boom"]')
    )
    async with aiohttp.ClientSession() as s:
        for path in ("/users", "/orders/1?status=201", "/denied", "/down", "/nowhere"):
            async with s.get(gw.url + path) as r:
                await r.read()
    text, m = await scrape(gw.url)
    # Every family of the design has samples in this scrape.
    for family in (
        "gateway_requests_total",
        "gateway_request_duration_seconds_count",
        "gateway_upstream_duration_seconds_count",
        "gateway_requests_in_flight",
        "gateway_request_bytes_total",
        "gateway_response_bytes_total",
        "gateway_upstream_errors_total",
        "gateway_plugin_rejections_total",
        "gateway_plugin_failures_total",
        "gateway_events_total",
        "gateway_audit_records_total",
        "gateway_queue_depth",
    ):
        assert series(m, family), family
    await promtool_check(text)


async def test_openmetrics_on_accept_plain_text_otherwise_and_head(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config(recording_upstream.url))
    om = "application/openmetrics-text; version=1.0.0"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/users") as r:
            assert r.status == 200
        async with s.get(f"{gw.url}/metrics", headers={"Accept": om}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            text = await r.text()
        assert text.endswith("# EOF\n")
        families = {f.name: f for f in openmetrics_families(text)}
        requests = families["gateway_requests"]
        assert requests.type == "counter"
        got = {
            (x.labels["route"], x.labels["status"]): x.value
            for x in requests.samples
            if x.name == "gateway_requests_total"
        }
        assert got[("users", "200")] == 1
        async with s.get(f"{gw.url}/metrics") as r:
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            plain = await r.text()
            assert "# EOF" not in plain
        async with s.head(f"{gw.url}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            assert await r.read() == b""
        async with s.post(f"{gw.url}/metrics") as r:
            assert r.status == 405

    off = await start_gateway(
        config(recording_upstream.url, metrics="openmetrics = false"), name="off.toml"
    )
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{off.url}/metrics", headers={"Accept": om}) as r,
    ):
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"


async def test_admin_port_serves_metrics_off_the_gateway_port(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    port = free_port()
    text = config(recording_upstream.url, metrics=f'admin_port = {port}\npath = "/prom"')
    gw = await start_gateway(text)
    admin = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/users") as r:
            assert r.status == 200
        async with s.get(f"{gw.url}/prom") as r:
            assert r.status == 404  # not on the gateway's port: clients cannot reach it
        async with s.get(f"{admin}/metrics") as r:
            assert r.status == 404
        async with s.post(f"{admin}/prom") as r:
            assert r.status == 405
        async with s.head(f"{admin}/prom") as r:
            assert r.status == 200
            assert await r.read() == b""
    _, m = await scrape(admin, "/prom")
    assert value(m, "gateway_requests_total", route="users", method="GET", status="200") == 1
    assert value(m, "gateway_requests_total", route="unmatched", method="GET", status="404") == 1

    # A reload's new instance binds the same admin port while the old one still
    # holds it (SO_REUSEPORT), and the counters carry on.
    assert await gw.reload(text + "\n# reloaded\n")
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/users") as r:
        assert r.status == 200
    _, m = await scrape(admin, "/prom")
    assert value(m, "gateway_requests_total", route="users", method="GET", status="200") == 2


async def test_admin_port_taken_rejects_the_reload_and_keeps_serving(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    port = free_port()
    gw = await start_gateway(config(recording_upstream.url, metrics=f"admin_port = {port}"))
    with socket.socket() as other:  # another program's listener, without SO_REUSEPORT
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        assert not await gw.reload(config(recording_upstream.url, metrics=f"admin_port = {taken}"))
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/users") as r:
        assert r.status == 200
    _, m = await scrape(f"http://127.0.0.1:{port}")
    assert value(m, "gateway_requests_total", route="users", method="GET", status="200") == 1


async def test_chain_guards_the_endpoint(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    extra = f'[plugins.guard]\ntype = "{HERE}:Reject"\nallow_header = "X-Metrics-Key"\n'
    gw = await start_gateway(
        config(recording_upstream.url, metrics='chain = ["guard"]', extra=extra)
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/metrics") as r:
            assert r.status == 403
        async with s.get(f"{gw.url}/metrics", headers={"X-Metrics-Key": "ok"}) as r:
            assert r.status == 200
            m = parse(await r.text())
    assert (
        value(m, "gateway_plugin_rejections_total", plugin="guard", route="unmatched", status="403")
        == 1
    )


# --- reloads -----------------------------------------------------------------------------


async def test_reload_keeps_counters_and_never_double_counts(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    start_upstream: StartUpstream,
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hold(request: web.BaseRequest) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return web.Response(text="held")

    held = await start_upstream(hold)
    extra = (
        f'[upstreams.held]\nurl = "{held.url}"\n[upstreams.down]\nurl = "http://127.0.0.1:{free_port()}"\n'
        '[[routes]]\nname = "hold"\npath = "/hold"\nupstream = "held"\nchain = ["metrics"]\n'
        '[[routes]]\nname = "down"\npath = "/down"\nupstream = "down"\nchain = ["metrics"]\n'
    )
    text = config(recording_upstream.url, extra=extra)
    gw = await start_gateway(text)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(f"{gw.url}/users") as r:
                assert r.status == 200

        async def held_request() -> int:
            async with s.get(f"{gw.url}/hold") as r:
                await r.read()
                return r.status

        pending = asyncio.ensure_future(held_request())
        await asyncio.wait_for(arrived.wait(), 5)
        # The old table stays alive (its plugins started) until /hold finishes:
        # both metrics instances are up, yet every report must count once.
        old = gw.gateway.table
        assert await gw.reload(text + "\n# reloaded\n")
        assert gw.gateway.table is not old
        _, m = await scrape(gw.url)
        assert value(m, "gateway_requests_in_flight") == 1
        async with s.get(f"{gw.url}/down") as r:
            assert r.status == 502
        for _ in range(2):
            async with s.get(f"{gw.url}/users") as r:
                assert r.status == 200
        release.set()
        assert await pending == 200
    await asyncio.sleep(0.05)
    _, m = await scrape(gw.url)
    assert value(m, "gateway_requests_total", route="users", method="GET", status="200") == 5
    assert value(m, "gateway_requests_total", route="hold", method="GET", status="200") == 1
    assert value(m, "gateway_upstream_errors_total", upstream="down", kind="connect") == 1
    assert value(m, "gateway_requests_in_flight") == 0
    assert (
        histogram(m, "gateway_request_duration_seconds", route="users", method="GET")[0][-1][1] == 5
    )

    # New buckets: that histogram starts over with them; counters carry on.
    assert await gw.reload(
        config(recording_upstream.url, metrics="buckets = [0.1, 1.0]", extra=extra)
    )
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/users") as r:
        assert r.status == 200
    _, m = await scrape(gw.url)
    buckets, _ = histogram(m, "gateway_request_duration_seconds", route="users", method="GET")
    assert buckets == [("0.1", buckets[0][1]), ("1.0", 1.0), ("+Inf", 1.0)]
    assert value(m, "gateway_requests_total", route="users", method="GET", status="200") == 6


# --- workers -------------------------------------------------------------------------------


async def test_two_workers_counts_add_up_in_one_scrape(
    gateway_process: StartGatewayProcess, recording_upstream: RecordingUpstream
) -> None:
    extra = f'[plugins.tag]\ntype = "{HERE}:WorkerTag"\n'
    gp = await gateway_process(
        config(recording_upstream.url, extra=extra, chain='["metrics", "tag"]'), workers=2
    )
    sent = 0
    pids: set[str] = set()
    # Fresh connections: the kernel spreads them over both workers (SO_REUSEPORT);
    # the second worker may still be booting when the first answers /healthz.
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        while len(pids) < 2 and time.monotonic() < deadline:
            for _ in range(20):
                async with s.get(f"{gp.url}/users") as r:
                    assert r.status == 200
                sent += 1
            pids = {rq.header("X-Worker-Pid") or "" for rq in recording_upstream.requests}
            await asyncio.sleep(0.05)
    assert len(pids) == 2, f"one worker served all {sent} requests:\n{gp.log}"
    # Each worker flushes its numbers within FLUSH_INTERVAL; the scraped one at once.
    deadline = time.monotonic() + 10
    while True:
        text, m = await scrape(gp.url)
        total = value(m, "gateway_requests_total", route="users", method="GET", status="200")
        if total == sent or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert total == sent, f"{total} counted of {sent} sent:\n{text}"
    buckets, _ = histogram(m, "gateway_request_duration_seconds", route="users", method="GET")
    assert buckets[-1][1] == sent
    assert value(m, "gateway_requests_in_flight") == 0, text
    await promtool_check(text)
    code = await gp.stop()
    assert code == 0, gp.log


async def test_multiprocess_mode_even_if_prometheus_client_was_imported_first(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # prometheus_client chose its in-memory value class at import (this process had
    # no PROMETHEUS_MULTIPROC_DIR then); the plugin must still write the shared files.
    # monkeypatch restores the value class afterwards, for the rest of the session.
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    assert not getattr(values.ValueClass, "_multiprocess", False)
    mpdir = tmp_path / "prom"
    mpdir.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mpdir))
    gw = await start_gateway(config(recording_upstream.url))
    async with aiohttp.ClientSession() as s:
        for _ in range(7):
            async with s.get(f"{gw.url}/users") as r:
                assert r.status == 200
    text, m = await scrape(gw.url)
    assert value(m, "gateway_requests_total", route="users", method="GET", status="200") == 7
    buckets, _ = histogram(m, "gateway_request_duration_seconds", route="users", method="GET")
    assert buckets[-1][1] == 7
    assert any(f.name.startswith("counter_") for f in mpdir.iterdir())
    assert "_created" not in text  # merged from the files, not this process's registry
    await promtool_check(text)


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "where", "problem"),
    [
        ("buckets = [1.0, 0.5]", "plugins.metrics.buckets", "increasing"),
        ("upstream_buckets = []", "plugins.metrics.upstream_buckets", "at least one"),
        ("buckets = [0.1, inf]", "plugins.metrics.buckets", "finite"),
        ('path = "metrics"', "plugins.metrics.path", "start with '/'"),
        ('admin_port = 9102\nchain = ["x"]', "plugins.metrics", "admin_port"),
        ("admin_port = 70000", "plugins.metrics.admin_port", "65535"),
        ("unknown = 1", "plugins.metrics.unknown", ""),
    ],
)
def test_config_errors_are_located(tmp_path: Path, table: str, where: str, problem: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(config("http://127.0.0.1:9", metrics=table))
    with pytest.raises(ConfigError) as caught:
        load_table(path, {})
    message = str(caught.value)
    assert f"{where}:" in message, message
    assert problem in message, message


def test_made_up_methods_count_as_other_without_a_key_each() -> None:
    # The hot path keys series by the raw method; client-chosen ones must not grow that.
    families = MetricFamilies(DEFAULT_BUCKETS, DEFAULT_BUCKETS)
    for i in range(50):
        for method in (f"X-{i}", "GET"):
            ex = Exchange(None, f"r{i}", method, "/p", "", "127.0.0.1", time.perf_counter())  # type: ignore[arg-type]
            ex.status = 404
            ex.finished = ex.started + 0.002
            families.complete(ex)
    assert len(families._by_request) == 2  # (unmatched, GET, 404) and (unmatched, OTHER, 404)
    families.flush()
    samples = parse(families.render("", False)[0].decode())
    for method in ("GET", "OTHER"):
        labels = {"route": "unmatched", "method": method, "status": "404"}
        assert value(samples, "gateway_requests_total", **labels) == 50
        labels.pop("status")
        assert value(samples, "gateway_request_duration_seconds_count", **labels) == 50
