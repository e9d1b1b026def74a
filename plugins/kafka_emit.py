"""kafka-emit: one CloudEvents event per successful request, to Kafka (aiokafka).

A route emits when it has ``event = { topic = "...", type = "..." }`` and its
chain holds this plugin; ``on = "always"`` emits for every status (rejected
requests included), the default only for 2xx. ``on_complete`` builds the
envelope (:mod:`plugins.cloudevents`) and puts it on the topic's
:class:`~aiogateway.delivery.DeliveryQueue`: it never waits on Kafka. Each
topic has its own queue and spool (``<spool_dir>/<topic>``), so a topic the
broker refuses never holds the others back, and ``gateway_events_total`` is
counted per topic. Delivery and its guarantee: :mod:`plugins.kafka_producer`.

The producer connects in the background: a broker that is down at startup
does not stop the gateway; ``/readyz`` shows this instance not ready (and why)
until it connects, and events spool meanwhile.

Example::

    [plugins.events]
    type = "kafka-emit"
    bootstrap_servers = "${KAFKA_BOOTSTRAP_SERVERS:-kafka:29092}"
    auto_create_topics = true
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from aiokafka.codec import has_lz4, has_zstd
from pydantic import Field, field_validator, model_validator

from aiogateway.delivery import DeliveryQueue
from aiogateway.errors import ConfigError
from aiogateway.plugin import GatewayApp, Plugin, PluginConfig

from .cloudevents import EventEncoder, check_attribute_name, check_topic_name
from .kafka_producer import EventProducer, ProducerSettings

if TYPE_CHECKING:
    from aiogateway.exchange import Exchange
    from aiogateway.routes import Route
    from aiogateway.settings import EventSpec, RouteSettings
    from aiogateway.telemetry import Telemetry

__all__ = ["KafkaEmit", "KafkaEmitConfig"]

log = logging.getLogger("aiogateway.plugins.kafka_emit")


class KafkaEmitConfig(PluginConfig):
    bootstrap_servers: list[str] = Field(
        description="host:port of the brokers: a list or a comma-separated string."
    )
    client_id: str = Field("aiogateway", min_length=1, description="Kafka client id.")
    acks: Literal["all", 0, 1] = Field("all", description="Acknowledgements: all, 1 or 0.")
    linger_ms: int = Field(5, ge=0, description="Wait this long to fill a producer batch.")
    max_batch_size: int = Field(65536, ge=1024, description="Producer batch size, bytes.")
    compression: Literal["none", "gzip", "lz4", "zstd"] = Field(
        "none", description="Compression of produced batches."
    )
    request_timeout: float = Field(30.0, gt=0, description="Kafka request timeout, seconds.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = Field(None, description="CA bundle to verify the brokers.")
    ssl_certfile: str | None = Field(None, description="Client certificate (mutual TLS).")
    ssl_keyfile: str | None = Field(None, description="Client key (mutual TLS).")
    enable_idempotence: bool = Field(
        False, description="Broker-side de-duplication of client retries (needs acks=all)."
    )
    queue_size: int = Field(10_000, ge=1, description="Events held in memory per topic.")
    batch_size: int = Field(500, ge=1, description="Events per delivery batch.")
    flush_interval: float = Field(0.2, gt=0, description="Longest wait to fill a batch, s.")
    flush_timeout: float = Field(
        10.0, ge=0, description="At shutdown, seconds to deliver queued events before spooling."
    )
    spool_dir: str | None = Field(
        None, description="Spool directory (default <server.state_dir>/spool/<instance>)."
    )
    spool_max_bytes: int = Field(1 << 30, ge=1 << 16, description="Spool cap per topic, bytes.")
    source: str = Field("aiogateway", min_length=1, description="CloudEvents source.")
    auto_create_topics: bool = Field(False, description="Create the routes' topics at startup.")
    topic_partitions: int = Field(1, ge=1, description="Partitions of created topics.")
    topic_replication: int = Field(1, ge=1, description="Replication factor of created topics.")
    topics: list[str] = Field(default_factory=list, description="More topics to create.")

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        return [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else v

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one host:port")
        for s in v:
            host, _, port = s.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{s!r} is not host:port")
        return v

    @field_validator("topics")
    @classmethod
    def _topic_names(cls, v: list[str]) -> list[str]:
        for t in v:
            if (why := check_topic_name(t)) is not None:
                raise ValueError(f"{t!r}: {why}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> KafkaEmitConfig:
        if self.compression == "lz4" and not has_lz4():
            raise ValueError("compression 'lz4' needs the lz4 support of aiokafka (cramjam)")
        if self.compression == "zstd" and not has_zstd():
            raise ValueError("compression 'zstd' needs the zstd support of aiokafka (cramjam)")
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_username and self.sasl_password
        ):
            raise ValueError(f"{self.security_protocol} needs sasl_username and sasl_password")
        if self.enable_idempotence and self.acks != "all":
            raise ValueError("enable_idempotence needs acks = 'all'")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("set both ssl_certfile and ssl_keyfile, or neither")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file {path!r}")
        return self


# A route's emitter: its topic queue's put, its encoder's record, and whether
# every status emits (on = "always").
_Emitter = tuple[Callable[[bytes], None], Callable[["Exchange"], bytes], bool]


class _Topic:
    """One topic's queue, and the outcome counter that maps to its label."""

    __slots__ = ("name", "queue", "refused", "telemetry")

    def __init__(self, name: str, telemetry: Telemetry) -> None:
        self.name = name
        self.telemetry = telemetry
        self.refused = 0  # refused records the queue will count as delivered
        self.queue: DeliveryQueue

    def outcome(self, outcome: str, count: int) -> None:
        if outcome == "delivered" and self.refused:
            # The sink reports refused records as handled (never to be retried).
            taken = min(self.refused, count)
            self.refused -= taken
            count -= taken
            if not count:
                return
        self.telemetry.event_outcome(self.name, outcome, count)


class KafkaEmit(Plugin[KafkaEmitConfig]):
    type_name = "kafka-emit"
    Config = KafkaEmitConfig

    def __init__(self, name: str, config: KafkaEmitConfig) -> None:
        super().__init__(name, config)
        # Filled by check_route while the config loads, before startup.
        self._route_topics: set[str] = set()
        self._topics: dict[str, _Topic] = {}
        # Per route (this config load's Route objects): its queue's put, its
        # encoder's record and whether every status emits; made at the route's
        # first event.
        self._emitters: dict[Route, _Emitter] = {}
        self._producer: EventProducer | None = None
        self._app: GatewayApp | None = None
        self._spool_root = Path()
        self._starting: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def queues(self) -> dict[str, DeliveryQueue]:
        """Each topic's delivery queue (depth, spooled bytes, health)."""
        return {name: t.queue for name, t in self._topics.items()}

    def check_route(self, route: RouteSettings, location: str) -> None:
        event = route.event
        if event is None:
            return  # such a route simply emits nothing
        if (why := check_topic_name(event.topic)) is not None:
            raise ConfigError(why, location=f"{location}.event.topic")
        if len(event.type) > 1000:
            raise ConfigError("longer than 1000 characters", location=f"{location}.event.type")
        for key in event.attributes:
            if (why := check_attribute_name(key)) is not None:
                raise ConfigError(why, location=f"{location}.event.attributes.{key}")
        self._route_topics.add(event.topic)

    # Lifecycle ---------------------------------------------------------------

    async def startup(self, app: GatewayApp) -> None:
        c = self.config
        self._app = app
        self._spool_root = Path(c.spool_dir) if c.spool_dir else app.state_dir / "spool" / self.name
        topics = self._route_topics | set(c.topics)
        # Topics with events spooled by an earlier run are replayed even when no
        # route names them any more.
        if self._spool_root.is_dir():
            topics |= {p.name for p in self._spool_root.iterdir() if p.is_dir()}
        self._producer = EventProducer(
            ProducerSettings(
                bootstrap_servers=c.bootstrap_servers,
                client_id=c.client_id,
                acks=c.acks,
                linger_ms=c.linger_ms,
                max_batch_size=c.max_batch_size,
                compression=None if c.compression == "none" else c.compression,
                request_timeout=c.request_timeout,
                security_protocol=c.security_protocol,
                sasl_mechanism=c.sasl_mechanism,
                sasl_username=c.sasl_username,
                sasl_password=c.sasl_password,
                ssl_cafile=c.ssl_cafile,
                ssl_certfile=c.ssl_certfile,
                ssl_keyfile=c.ssl_keyfile,
                enable_idempotence=c.enable_idempotence,
                topic_partitions=c.topic_partitions,
                topic_replication=c.topic_replication,
                create_topics=(
                    sorted(self._route_topics | set(c.topics)) if c.auto_create_topics else ()
                ),
            ),
            on_state=self._on_state,
            on_refused=self._on_refused,
        )
        for topic in sorted(topics):
            await self._open_topic(topic).queue.start()
        self._producer.start()

    def _open_topic(self, topic: str) -> _Topic:
        assert self._app is not None
        assert self._producer is not None
        c = self.config
        entry = _Topic(topic, self._app.telemetry)
        deliver = self._producer.deliver

        async def sink(records: list[bytes]) -> list[bytes]:
            return await deliver(topic, records)

        entry.queue = DeliveryQueue(
            f"kafka-emit {self.name} {topic}",
            sink,
            spool_dir=self._spool_root / topic,
            telemetry=self._app.telemetry,
            queue_name=f"kafka-emit:{self.name}:{topic}",
            max_queue=c.queue_size,
            batch_size=c.batch_size,
            flush_interval=c.flush_interval,
            spool_max_bytes=c.spool_max_bytes,
            on_outcome=entry.outcome,
        )
        self._topics[topic] = entry
        return entry

    def _on_state(self, ready: bool, detail: str) -> None:
        # After shutdown began (a reload retiring this instance) the component
        # name belongs to the successor: stay quiet.
        if self._app is not None and not self._closing:
            # Not critical: while Kafka is away events spool and requests succeed.
            self._app.set_ready(self.name, ready, detail, critical=False)

    def _on_refused(self, topic: str, count: int) -> None:
        entry = self._topics.get(topic)
        if entry is not None:
            entry.refused += count
            entry.telemetry.event_outcome(topic, "dropped", count)

    async def shutdown(self, app: GatewayApp) -> None:
        producer = self._producer
        if producer is None:
            return
        self._closing = True
        queues = [t.queue for t in self._topics.values()]
        c = self.config
        # The queues get flush_timeout to deliver what they hold; after that the
        # producer is told to stop waiting, every pending send settles (sent, or
        # stopped before sending) and the queues spool exactly what is left. The
        # queues' own timeout is only a backstop for a delivery that hangs.
        closing = asyncio.gather(
            *(q.close(c.flush_timeout + c.request_timeout + 5) for q in queues)
        )
        done, _ = await asyncio.wait([closing], timeout=c.flush_timeout)
        if not done:
            producer.stop_waiting()
        await closing
        await producer.close()
        self._producer = None

    # Request path ------------------------------------------------------------

    async def on_complete(self, exchange: Exchange) -> None:
        emitter = self._emitters.get(exchange.route)  # type: ignore[arg-type]
        if emitter is None:
            route = exchange.route
            if route is None or route.event is None:
                return
            emitter = self._emitter(route, route.event)
        put, record, always = emitter
        if always or 200 <= exchange.status < 300:
            put(record(exchange))

    def _emitter(self, route: Route, event: EventSpec) -> _Emitter:
        entry = self._topics.get(event.topic)
        if entry is None:
            entry = self._late_topic(event.topic)
        if len(self._emitters) >= 10_000:  # only this load's routes are expected here
            self._emitters.clear()
        emitter = self._emitters[route] = (
            entry.queue.put,
            EventEncoder(route.name, route.path, event, self.config.source).record,
            event.on == "always",
        )
        return emitter

    def _late_topic(self, topic: str) -> _Topic:
        # Not seen by check_route (a route built without it): start its queue now;
        # put() before start() only fills the memory queue.
        entry = self._open_topic(topic)
        task = asyncio.ensure_future(entry.queue.start())
        self._starting.add(task)
        task.add_done_callback(self._started)
        return entry

    def _started(self, task: asyncio.Task[None]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "kafka-emit %s: a queue failed to start", self.name, exc_info=task.exception()
            )
