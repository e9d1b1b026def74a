"""Per-request cost of the metrics plugin's recording (on_request + on_complete).

Runs the real plugin's hooks on real Exchange objects against a real route and
subtracts a baseline loop that does the same work with a plugin that records
nothing, so the figure is what metrics adds to each request.

    .venv/bin/python bench/bench_metrics.py                 # single process
    .venv/bin/python bench/bench_metrics.py --multiprocess  # mmap values (workers > 1)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# prometheus_client is imported before PROMETHEUS_MULTIPROC_DIR is set, as in a
# gateway whose supervisor loads config.toml before forking workers.
from aiogateway.chain import Chain
from aiogateway.exchange import Exchange
from aiogateway.plugin import Plugin, PluginConfig
from aiogateway.routes import Route
from aiogateway.settings import GatewaySettings, RouteSettings, UpstreamSettings
from aiogateway.telemetry import Telemetry
from aiogateway.upstream import UpstreamPool
from plugins.metrics import Metrics, MetricsConfig


class BenchApp:
    """The smallest real GatewayApp: what startup/shutdown use."""

    def __init__(self, state_dir: Path) -> None:
        self.settings = GatewaySettings()
        self.config_path = Path("config.toml")
        self.telemetry = Telemetry()
        self.state_dir = state_dir
        self.worker_id = 0

    def set_ready(
        self, component: str, ready: bool, detail: str = "", *, critical: bool = True
    ) -> None:
        pass


def make_route(name: str) -> Route:
    settings = RouteSettings(path=f"/{name}", upstream="svc")
    return Route(
        name=name,
        methods=None,
        path=f"/{name}",
        prefix=None,
        upstream=UpstreamPool("svc", UpstreamSettings(url="http://127.0.0.1:9")),
        chain=Chain("bench", ()),
        strip_prefix=False,
        upstream_path=None,
        max_body_bytes=0,
        websocket=False,
        event=None,
        settings=settings,
        index=0,
    )


async def run(n: int, rounds: int) -> dict[str, float]:
    class Noop(Plugin[PluginConfig]):
        async def on_request(self, exchange: Exchange) -> None:
            return None

        async def on_complete(self, exchange: Exchange) -> None:
            return None

    with tempfile.TemporaryDirectory() as tmp:
        app = BenchApp(Path(tmp))
        metrics = Metrics("metrics", MetricsConfig())
        await metrics.startup(app)
        noop = Noop("noop", PluginConfig())
        routes = [make_route(f"route-{i}") for i in range(8)]
        methods = ("GET", "POST", "GET", "DELETE")
        statuses = (200, 200, 201, 404, 200, 502)

        async def loop(plugin: Plugin[Any]) -> float:
            t0 = time.perf_counter()
            for i in range(n):
                now = time.perf_counter()
                ex = Exchange(cast(Any, None), "rid", methods[i & 3], "/p", "", "127.0.0.1", now)
                ex.route = routes[i & 7]
                await plugin.on_request(ex)
                ex.upstream_started = now
                ex.upstream_headers_at = now + 0.001
                ex.status = statuses[i % 6]
                ex.bytes_in = 120
                ex.bytes_out = 2048
                ex.finished = now + 0.002
                await plugin.on_complete(ex)
            if plugin is metrics:
                # The bulk move into prometheus_client (per scrape, or per second
                # with workers) is part of the cost: amortise it over the round.
                families = metrics._families
                assert families is not None
                families.flush()
            return (time.perf_counter() - t0) / n * 1e6

        await loop(metrics)  # warm the label caches and the interpreter
        base, with_metrics = [], []
        for _ in range(rounds):
            base.append(await loop(noop))
            with_metrics.append(await loop(metrics))
        await metrics.shutdown(app)
    # Minimum of the rounds: the machine is shared, other load only adds time.
    b, m = min(base), min(with_metrics)
    return {"baseline_us": b, "metrics_us": m, "added_us": m - b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=50_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--multiprocess", action="store_true", help="mmap-backed values")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as mpdir:
        if args.multiprocess:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = mpdir
        res = asyncio.run(run(args.n, args.rounds))
    mode = "multiprocess" if args.multiprocess else "single-process"
    print(
        f"metrics {mode}: {res['added_us']:.2f} us per request recorded "
        f"(loop with metrics {res['metrics_us']:.2f} us, baseline {res['baseline_us']:.2f} us, "
        f"best of {args.rounds} x {args.n})"
    )


if __name__ == "__main__":
    main()
