"""The plugin mechanism end to end: hook order, short-circuit, on_complete always."""

from __future__ import annotations

import logging
from typing import ClassVar

import aiohttp
import orjson
import pytest
from aiohttp import web

from aiogateway import errors
from aiogateway.exchange import Exchange
from aiogateway.plugin import Plugin, PluginConfig, implements
from tests.support.gateway import StartGateway
from tests.support.upstreams import RecordingUpstream

# Every hook call, in order, as (instance name, hook, request id).
calls: list[tuple[str, str, str]] = []
completed: list[Exchange] = []


class TraceConfig(PluginConfig):
    reject_with: int = 0
    response_header: str = ""


class Trace(Plugin[TraceConfig]):
    type_name = "trace"
    Config: ClassVar[type[PluginConfig]] = TraceConfig

    async def on_request(self, exchange: Exchange) -> web.StreamResponse | None:
        calls.append((self.name, "on_request", exchange.request_id))
        exchange.add_upstream_header(f"X-Trace-{self.name}", "1")
        if self.config.reject_with:
            return errors.error_response(
                self.config.reject_with, errors.FORBIDDEN, "no", exchange.request_id
            )
        return None

    async def on_response(self, exchange: Exchange) -> None:
        calls.append((self.name, "on_response", exchange.request_id))
        assert exchange.upstream_status == 200
        if self.config.response_header:
            exchange.response_headers[self.config.response_header] = self.name

    async def on_complete(self, exchange: Exchange) -> None:
        calls.append((self.name, "on_complete", exchange.request_id))
        completed.append(exchange)


class Broken(Plugin[PluginConfig]):
    type_name = "broken"

    async def on_complete(self, exchange: Exchange) -> None:
        raise RuntimeError("boom")


class OnlyComplete(Plugin[PluginConfig]):
    type_name = "only-complete"

    async def on_complete(self, exchange: Exchange) -> None:
        calls.append((self.name, "on_complete", exchange.request_id))


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()
    completed.clear()


def config(upstream_url: str, chain: str, plugins: str) -> str:
    return f"""
[upstreams.svc]
url = "{upstream_url}"

{plugins}

[[routes]]
name = "things"
prefix = "/v1"
upstream = "svc"
chain = {chain}
"""


PLUGINS = """
[plugins.a]
type = "tests.test_plugin_chain:Trace"
response_header = "X-A"

[plugins.b]
type = "tests.test_plugin_chain:Trace"

[plugins.deny]
type = "tests.test_plugin_chain:Trace"
reject_with = 403

[plugins.broken]
type = "tests.test_plugin_chain:Broken"

[plugins.tail]
type = "tests.test_plugin_chain:OnlyComplete"
"""


async def test_hooks_run_in_chain_order(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config(recording_upstream.url, '["a", "b"]', PLUGINS))
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/x") as r:
        assert r.status == 200
        assert r.headers["X-A"] == "a"
        rid = r.headers["X-Request-ID"]
    assert calls == [
        ("a", "on_request", rid),
        ("b", "on_request", rid),
        ("a", "on_response", rid),
        ("b", "on_response", rid),
        ("a", "on_complete", rid),
        ("b", "on_complete", rid),
    ]
    rec = recording_upstream.last
    assert rec.header("X-Trace-a") == "1"
    assert rec.header("X-Trace-b") == "1"
    ex = completed[0]
    assert ex.status == 200
    assert ex.route_name == "things"
    assert ex.bytes_out > 0
    assert ex.finished is not None
    assert ex.upstream_duration is not None


async def test_rejection_stops_chain_but_on_complete_runs_for_all(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(config(recording_upstream.url, '["a", "deny", "b"]', PLUGINS))
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/x") as r:
        assert r.status == 403
        assert (await r.json())["error"] == "forbidden"
        rid = r.headers["X-Request-ID"]
    assert recording_upstream.requests == []
    assert calls == [
        ("a", "on_request", rid),
        ("deny", "on_request", rid),
        ("a", "on_complete", rid),
        ("deny", "on_complete", rid),
        ("b", "on_complete", rid),
    ]
    assert completed[0].rejected_by == "deny"
    assert completed[0].status == 403
    assert completed[0].bytes_out > 0  # the JSON error body


async def test_on_complete_failure_is_logged_not_shown(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[tuple[str, str]] = []

    class Sink:
        def plugin_failure(self, plugin: str, hook: str) -> None:
            failures.append((plugin, hook))

        def __getattr__(self, name: str) -> object:
            return lambda *a, **k: None

    gw = await start_gateway(config(recording_upstream.url, '["broken", "tail"]', PLUGINS))
    gw.gateway.telemetry.add_sink(Sink())  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="aiogateway.chain"):
        async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/x") as r:
            assert r.status == 200
            rid = r.headers["X-Request-ID"]
    assert failures == [("broken", "on_complete")]
    assert "boom" in caplog.text
    assert ("tail", "on_complete", rid) in calls  # later plugins still ran


async def test_unmatched_requests_reach_observers_only(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(
        config(recording_upstream.url, '["a"]', PLUGINS + '\n[server]\nunmatched_chain = ["b"]\n')
    )
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/elsewhere") as r:
        assert r.status == 404
        rid = r.headers["X-Request-ID"]
    assert calls == [("b", "on_complete", rid)]
    assert completed[0].route is None
    assert completed[0].route_name == "unmatched"
    assert completed[0].status == 404


def test_hooks_not_overridden_are_skipped() -> None:
    broken = Broken("x", PluginConfig())
    assert implements(broken, "on_complete")
    assert not implements(broken, "on_request")
    assert not implements(broken, "on_response")


async def test_access_log_is_one_json_line_per_request(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiogateway.logs import JsonFormatter

    gw = await start_gateway(config(recording_upstream.url, "[]", ""))
    with caplog.at_level(logging.INFO, logger="aiogateway.access"):
        async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/v1/logged?q=1") as r:
            rid = r.headers["X-Request-ID"]
    records = [r for r in caplog.records if r.name == "aiogateway.access"]
    assert len(records) == 1
    line = orjson.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == rid
    assert line["path"] == "/v1/logged"
    assert line["status"] == 200
    assert line["route"] == "things"
    assert line["upstream"] == "svc"
    assert line["level"] == "info"


async def test_plugin_endpoint_answers_with_request_id(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await start_gateway(
        config(
            recording_upstream.url,
            "[]",
            '[plugins.hello]\ntype = "tests.sample_plugins:HeaderPlugin"\n'
            'header = "X-Hello"\nvalue = "hi"\nendpoint = "/hello"\n',
        )
    )
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/hello") as r:
        assert r.status == 200
        assert await r.text() == "hi"
        assert len(r.headers["X-Request-ID"]) == 32
    assert recording_upstream.requests == []
