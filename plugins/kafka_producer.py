"""kafka-emit's producer: connects in the background, delivers queue batches.

Delivery guarantee (what a record handed to :meth:`EventProducer.deliver` gets):

* Records are handed to one ``AIOKafkaProducer`` in queue order and their
  futures awaited together (``send()`` then wait), never one round trip each.
* A record is reported *undelivered* (so the delivery queue retries it, in
  order) only when it was never handed to the Kafka client (``send()`` raised:
  no metadata, buffer full, producer down) or when shutdown stopped the client
  before it was sent. A record the client accepted is never re-sent by the
  gateway while the gateway runs: aiokafka's batch expiry is switched off
  (``_keep_retrying``), so the client retries it itself until it is
  acknowledged, in order, the way an idempotent producer does.
* A record the broker *refused* (too large, invalid topic, not authorised) is
  dropped, logged and counted ``dropped``: retrying cannot help and would stop
  every later event of the topic.
* The one window without exactly-once: a produce request in flight when its
  connection drops may have been written although no answer came back. The
  client then sends it again (or, at shutdown, it is spooled and replayed), so
  it can appear twice. ``enable_idempotence = true`` closes that window on
  brokers that support it (Apache Kafka does; the test broker does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import BrokerResponseError, KafkaError, ProducerClosed
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from .cloudevents import unpack

_PARTITIONER = DefaultPartitioner()
_estimate = DefaultRecordBatchBuilder.estimate_size_in_bytes

__all__ = ["EventProducer", "ProducerSettings", "keep_retrying"]

log = logging.getLogger("aiogateway.plugins.kafka_emit")

TOPIC_ALREADY_EXISTS = 36
# aiokafka's default max_request_size: a larger event can never be sent.
MAX_EVENT_BYTES = 1_048_576


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    bootstrap_servers: list[str]
    client_id: str
    acks: int | str
    linger_ms: int
    max_batch_size: int
    compression: str | None
    request_timeout: float
    security_protocol: str
    sasl_mechanism: str
    sasl_username: str | None
    sasl_password: str | None
    ssl_cafile: str | None
    ssl_certfile: str | None
    ssl_keyfile: str | None
    enable_idempotence: bool
    topic_partitions: int = 1
    topic_replication: int = 1
    create_topics: Sequence[str] = field(default_factory=tuple)

    def connection_kwargs(self) -> dict[str, Any]:
        """Arguments the producer and the admin client share."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": int(self.request_timeout * 1000),
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs


def keep_retrying(producer: AIOKafkaProducer) -> bool:
    """Stop aiokafka from expiring accepted batches (False if its internals changed).

    aiokafka fails a batch not acknowledged within request_timeout; re-sending
    it from the gateway would risk duplicates and reorder it behind newer
    batches of the same partition. With no expiry the client retries it in
    order until it is acknowledged (what it does anyway with idempotence on).
    """
    acc = getattr(producer, "_message_accumulator", None)
    if acc is None or not hasattr(acc, "_batch_ttl"):
        return False
    acc._batch_ttl = math.inf
    return True


def _refused(exc: BaseException) -> bool:
    """The broker (or the client's own size check) rejected the record for good."""
    return isinstance(exc, BrokerResponseError) and not exc.retriable


class EventProducer:
    """One AIOKafkaProducer, connected in the background and retried until it is."""

    def __init__(
        self,
        settings: ProducerSettings,
        on_state: Callable[[bool, str], None],
        on_refused: Callable[[str, int], None],
    ) -> None:
        self.settings = settings
        self._on_state = on_state
        self._on_refused = on_refused
        self._producer: AIOKafkaProducer | None = None
        self._connector: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._halted = False
        self._halting: asyncio.Task[None] | None = None
        self._ready: bool | None = None
        self._partitions: dict[int, dict[bytes, int]] = {}  # partition count -> key -> partition

    @property
    def connected(self) -> bool:
        return self._producer is not None

    def start(self) -> None:
        """Begin connecting; the gateway does not wait for Kafka to be reachable."""
        self._report(False, f"connecting to {','.join(self.settings.bootstrap_servers)}")
        self._connector = asyncio.create_task(self._connect_loop(), name="kafka-emit:connect")

    async def _connect_loop(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            producer = self._new_producer()
            try:
                await producer.start()
            except asyncio.CancelledError:
                await producer.stop()  # a half-started client still holds connections
                raise
            except Exception as exc:  # unreachable, auth failure, bad TLS: keep trying
                with contextlib.suppress(Exception):
                    await producer.stop()
                self._report(False, f"cannot connect: {type(exc).__name__}: {exc}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            if not keep_retrying(producer):
                log.warning("aiokafka internals changed: accepted events may be retried twice")
            self._producer = producer
            self._report(True, "connected")
            if self.settings.create_topics:
                await self._create_topics()
            return

    def _new_producer(self) -> AIOKafkaProducer:
        s = self.settings
        return AIOKafkaProducer(
            **s.connection_kwargs(),
            acks=s.acks,
            linger_ms=s.linger_ms,
            max_batch_size=s.max_batch_size,
            compression_type=s.compression,
            enable_idempotence=s.enable_idempotence,
        )

    async def _create_topics(self) -> None:
        s = self.settings
        admin = AIOKafkaAdminClient(**s.connection_kwargs())
        try:
            await admin.start()
            resp = await admin.create_topics(
                [NewTopic(t, s.topic_partitions, s.topic_replication) for t in s.create_topics],
                timeout_ms=int(s.request_timeout * 1000),
            )
            for topic, code, message in resp.topic_errors:
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    log.error("kafka-emit: cannot create topic %s: %s %s", topic, code, message)
        except Exception:  # the broker may auto-create; events still flow
            log.exception("kafka-emit: creating topics %s failed", list(s.create_topics))
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    def _report(self, ready: bool, detail: str) -> None:
        if ready != self._ready:
            self._ready = ready
            self._on_state(ready, detail)

    # Delivery -------------------------------------------------------------------

    async def deliver(self, topic: str, records: list[bytes]) -> list[bytes]:
        """The delivery queue's sink: returns the records that were not delivered."""
        producer = self._producer
        if producer is None or self._halted:
            raise ConnectionError("Kafka producer not connected")
        batch = _Handover(producer, topic, records, self._partitions)
        work = asyncio.ensure_future(batch.run())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not (work.done() or stop.done()):
                await asyncio.wait(
                    (work, stop),
                    timeout=self.settings.request_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not work.done():
                    self._report(False, "Kafka is not acknowledging events")
            if not work.done():
                # Shutdown: stop the client so that every pending future settles
                # for good (sent, or never to be sent) before we answer.
                await self.halt()
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        finally:
            stop.cancel()
            if not work.done():  # we were cancelled ourselves
                work.cancel()
        undelivered, refused = batch.outcome(self._halted)
        if refused:
            self._on_refused(topic, refused)
        self._report(not undelivered, "connected" if not undelivered else "delivery failing")
        return undelivered

    # Shutdown -------------------------------------------------------------------

    def stop_waiting(self) -> None:
        """Make running deliveries answer now (shutdown's flush time is over)."""
        self._stopping.set()

    async def halt(self) -> None:
        """Stop the client's sender: in-flight requests finish, nothing else is sent."""
        if self._halting is None:
            self._halting = asyncio.ensure_future(self._halt())
        await asyncio.shield(self._halting)

    async def _halt(self) -> None:
        self._halted = True
        producer = self._producer
        if producer is None:
            return
        # aiokafka has no "close without flushing": cancelling its sender routine
        # lets in-flight requests finish; nothing queued is sent after that.
        await producer._sender.close()
        producer._message_accumulator.fail_all(ProducerClosed())

    async def close(self) -> None:
        self._stopping.set()
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


class _Handover:
    """One delivery call: records into per-partition producer batches, then acks.

    Building aiokafka batches directly (``create_batch``/``send_batch``)
    instead of one ``send()`` per record saves most of the client's per-record
    Python work. Keys are partitioned exactly like aiokafka's (and Java's)
    default partitioner, so a key's events stay in one partition, in order.
    """

    __slots__ = ("_cache", "handed", "open", "pos", "producer", "records", "refused", "topic")

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        records: list[bytes],
        cache: dict[int, dict[bytes, int]],
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.records = records
        self._cache = cache
        self.handed: list[tuple[list[bytes], asyncio.Future[Any]]] = []
        self.open: dict[int, tuple[Any, list[bytes]]] = {}  # partition: (builder, records)
        self.pos = 0  # records[pos:] not looked at yet
        self.refused = 0

    async def run(self) -> None:
        try:
            partitions = sorted(await self.producer.partitions_for(self.topic))
            for record in self.records:
                await self._add(record, partitions)
                self.pos += 1
            for part in sorted(self.open):
                await self._submit(part)
        except KafkaError as exc:
            # Not handed over (no metadata, client buffer full): from here on
            # nothing is sent in this call; outcome() returns it, in order.
            log.debug("kafka-emit: %s: hand-over stopped: %s", self.topic, exc)
        if self.handed:
            # asyncio.wait, not gather: our cancellation must not cancel the futures.
            await asyncio.wait([f for _, f in self.handed])

    async def _add(self, record: bytes, partitions: list[int]) -> None:
        env = unpack(record)
        headers = [("ce_type", env.ce_type), ("ce_id", env.ce_id)]
        size = _estimate(env.key, env.value, headers)
        if size > MAX_EVENT_BYTES:
            self.refused += 1
            log.error("kafka-emit: %s: dropping a %d-byte event (too large)", self.topic, size)
            return
        part = self._partition(env.key, partitions)
        while True:
            entry = self.open.get(part)
            if entry is None:  # an empty batch always takes its first record
                entry = self.open[part] = (self.producer.create_batch(), [])
            if (
                entry[0].append(timestamp=None, key=env.key, value=env.value, headers=headers)
                is not None
            ):
                entry[1].append(record)
                return
            await self._submit(part)  # full: send it, the record opens the next one

    async def _submit(self, part: int) -> None:
        builder, recs = self.open[part]
        builder.close()
        fut = await self.producer.send_batch(builder, self.topic, partition=part)
        del self.open[part]
        self.handed.append((recs, fut))

    def _partition(self, key: bytes, partitions: list[int]) -> int:
        # murmur2 is pure Python in aiokafka: cache it (user ids repeat), per partition count.
        cache = self._cache.setdefault(len(partitions), {})
        part = cache.get(key)
        if part is None:
            if len(cache) > 100_000:
                cache.clear()
            part = cache[key] = _PARTITIONER(key, partitions, partitions)
        return part

    def outcome(self, halted: bool) -> tuple[list[bytes], int]:
        """(records not delivered, in queue order per partition; records refused)."""
        undelivered: list[bytes] = []
        refused = self.refused
        for recs, fut in self.handed:
            exc = fut.exception() if fut.done() and not fut.cancelled() else ProducerClosed()
            if exc is None:
                continue
            if _refused(exc) and not halted:
                refused += len(recs)
                log.error("kafka-emit: %s refused %d events: %s", self.topic, len(recs), exc)
            else:
                undelivered.extend(recs)
        for _, recs in self.open.values():
            undelivered.extend(recs)
        undelivered.extend(self.records[self.pos :])
        return undelivered, refused
