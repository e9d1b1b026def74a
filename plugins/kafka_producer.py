"""kafka-emit's producer: connects in the background, delivers queue batches.

Delivery guarantee (what a record handed to :meth:`EventProducer.deliver` gets):

* Records go to one ``AIOKafkaProducer`` as per-partition batches
  (:mod:`plugins.kafka_handover`), each partition's in order, one batch in
  flight per partition.
* Delivered (acknowledged by the broker, per ``acks``): never sent again.
* Never handed to the client (no metadata, buffer full, producer down), or
  sent and provably not written: reported undelivered, so the delivery queue
  retries it, in order (memory, then spool).
* Sent without an answer (connection dropped, timeout): the partition is read
  back until the broker answers; written means delivered, not written means
  retried. So a lost answer duplicates nothing, without broker idempotence.
* Refused by the broker (too large, invalid topic, not authorised): dropped,
  logged and counted ``dropped``; retrying cannot help and would stop every
  later event of the topic.
* The one window left: at shutdown, a batch whose answer was lost while the
  broker is still unreachable cannot be verified; it is spooled and may be
  written twice when replayed. ``enable_idempotence = true`` (Apache Kafka)
  closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import ProducerClosed
from aiokafka.helpers import create_ssl_context

from .kafka_handover import Handover, Verifier, send_once

__all__ = ["EventProducer", "ProducerSettings"]

log = logging.getLogger("aiogateway.plugins.kafka_emit")

TOPIC_ALREADY_EXISTS = 36


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
        self._verifier: Verifier | None = None

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
            # With idempotence the client's own retries are safe (and needed).
            if not self.settings.enable_idempotence and not send_once(producer):
                log.warning("aiokafka internals changed: a lost answer may duplicate events")
            self._verifier = Verifier(
                self.settings.connection_kwargs(), self.settings.request_timeout
            )
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
        verifier = self._verifier
        assert verifier is not None  # set together with _producer
        batch = Handover(
            producer,
            topic,
            records,
            self._partitions,
            max_bytes=self.settings.max_batch_size,
            compression=self.settings.compression,
        )
        work = asyncio.ensure_future(batch.run(verifier))
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
        if work.done() and not work.cancelled() and (exc := work.exception()) is not None:
            log.error("kafka-emit: %s: delivery failed", topic, exc_info=exc)
        undelivered, refused = batch.outcome()
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
        if self._verifier is not None:
            await self._verifier.close()
