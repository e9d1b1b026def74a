"""One delivery call of kafka-emit: records into producer batches, acks, and doubt.

Records are grouped by partition (aiokafka's, i.e. Java's, default key
partitioning, so a key's events stay in one partition, in order) and each
partition's batches are sent one after the other: a batch is handed to the
client only once the previous one of its partition is acknowledged, so a
failure can never let a later batch overtake an earlier one.

The client sends a batch once (see :func:`send_once`). When a send fails
without the broker's answer (connection lost, request timed out) the batch may
or may not have been written: :class:`Verifier` reads the partition back from
the last offset known to precede it and looks for the batch's ``ce_id``
headers. Written: delivered. Not written: retried by the delivery queue. That
is what keeps a dropped connection from duplicating events on a broker without
idempotent producers (the test broker; ``enable_idempotence`` does the same on
Apache Kafka).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import BrokerResponseError, KafkaError, NodeNotReadyError
from aiokafka.partitioner import DefaultPartitioner

from .kafka_records import (
    BATCH_OVERHEAD,
    PreparedBatch,
    batch_records,
    record_fields,
    record_key,
    to_format2,
)

__all__ = ["MAX_EVENT_BYTES", "Handover", "Verifier", "refused", "send_once"]

log = logging.getLogger("aiogateway.plugins.kafka_emit")

# aiokafka's default max_request_size: a larger event can never be sent.
MAX_EVENT_BYTES = 1_048_576
# A record this much below the limit needs no exact size (the batch header and
# the record's own length, attributes and deltas add far less).
_SURELY_SMALL = MAX_EVENT_BYTES - 1024
_PARTITIONER = DefaultPartitioner()


def send_once(producer: AIOKafkaProducer) -> bool:
    """Make aiokafka fail a batch at its first error instead of re-sending it.

    Its own retry re-sends a batch whose answer was lost, which duplicates it
    unless the broker de-duplicates (idempotence: then aiokafka ignores this
    and keeps retrying, safely). We retry instead, after verifying. False if
    aiokafka's internals changed.
    """
    acc = getattr(producer, "_message_accumulator", None)
    if acc is None or not hasattr(acc, "_batch_ttl"):
        return False
    acc._batch_ttl = 0.0  # a batch counts as expired at once: no client-side retry
    return True


def refused(exc: BaseException) -> bool:
    """The broker rejected the records for good (too large, not authorised ...)."""
    return isinstance(exc, BrokerResponseError) and not exc.retriable


class Verifier:
    """Reads partitions back to settle whether a doubtful batch was written."""

    def __init__(self, connection: dict[str, Any], timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout  # one lookup's limit; a stuck client is replaced
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()  # one assignment at a time
        self.ends: dict[TopicPartition, int] = {}  # offsets known to precede our next batch

    async def lower_bound(self, tp: TopicPartition) -> int:
        """An offset no later than where our next batch to ``tp`` can land."""
        end = self.ends.get(tp)
        if end is None:
            async with self._lock:
                try:
                    end = await asyncio.wait_for(self._end(tp), self._timeout)
                except TimeoutError:
                    await self.close()
                    raise
            self.ends[tp] = end
        return end

    async def _end(self, tp: TopicPartition) -> int:
        consumer = await self._client()
        end: int = (await consumer.end_offsets([tp]))[tp]
        return end

    def acknowledged(self, tp: TopicPartition, end: int) -> None:
        self.ends[tp] = max(end, self.ends.get(tp, 0))

    async def written(self, tp: TopicPartition, start: int, ce_ids: set[bytes]) -> bool:
        """Whether the batch with these ids is in ``tp`` (waits for the broker)."""
        delay = 0.1
        while True:
            async with self._lock:
                try:
                    return await asyncio.wait_for(self._scan(tp, start, ce_ids), self._timeout)
                except (KafkaError, OSError, TimeoutError) as exc:
                    log.info("kafka-emit: cannot verify %s yet: %r", tp, exc)
                    await self.close()  # start afresh: the client may be wedged
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _scan(self, tp: TopicPartition, start: int, ce_ids: set[bytes]) -> bool:
        consumer = await self._client()
        end = (await consumer.end_offsets([tp]))[tp]
        if start > end:  # the log is shorter than we knew (a broker that lost it): read it all
            start = 0
        consumer.assign([tp])
        consumer.resume(tp)  # paused after the previous check of the same partition
        consumer.seek(tp, start)
        found = False
        while await consumer.position(tp) < end:
            fetched = await consumer.getmany(tp, timeout_ms=1000)
            for rec in fetched.get(tp, ()):
                if any(k == "ce_id" and v in ce_ids for k, v in rec.headers):
                    found = True  # a batch is written whole or not at all
        consumer.pause(tp)  # no background fetching between verifications
        self.ends[tp] = max(end, self.ends.get(tp, 0))
        return found

    async def _client(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                **self._connection,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            try:
                await consumer.start()
            except BaseException:
                await consumer.stop()
                raise
            self._consumer = consumer
        return self._consumer

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            await consumer.stop()
        except (KafkaError, OSError):
            log.debug("kafka-emit: verifier client closed with an error", exc_info=True)
        except asyncio.CancelledError:
            # aiokafka's fetcher re-raises the cancellation of its own pending
            # fetch (broker unreachable at shutdown); only ours must propagate.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise


class Handover:
    """Delivers one list of queue records; :meth:`outcome` says what became of them."""

    __slots__ = (
        "_cache",
        "compression",
        "done",
        "inflight",
        "max_bytes",
        "parts",
        "producer",
        "records",
        "refused",
        "topic",
    )

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        records: list[bytes],
        cache: dict[int, dict[bytes, int]],
        *,
        max_bytes: int,
        compression: str | None,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.records = records
        self._cache = cache
        self.max_bytes = max_bytes  # producer batch size
        self.compression = compression
        self.parts: dict[int, list[bytes]] | None = None  # None: not split yet
        self.done: dict[int, int] = {}  # per partition: records settled (delivered or refused)
        self.inflight: dict[int, tuple[int, asyncio.Future[Any]]] = {}  # count, future
        self.refused = 0

    async def run(self, verifier: Verifier) -> None:
        try:
            partitions = sorted(await self.producer.partitions_for(self.topic))
        except KafkaError as exc:  # no metadata: nothing handed over, all retried
            log.debug("kafka-emit: %s: no metadata: %s", self.topic, exc)
            return
        parts: dict[int, list[bytes]] = {}
        single = partitions[0] if len(partitions) == 1 else None
        for queued in self.records:
            # Format 1 was spooled by an earlier version.
            record = to_format2(queued) if queued[0] & 1 else queued
            if len(record) > _SURELY_SMALL:
                size = BATCH_OVERHEAD + 16 + len(record)  # record length, attributes, deltas
                if size > MAX_EVENT_BYTES:
                    self.refused += 1
                    log.error("kafka-emit: %s: dropping a %d-byte event", self.topic, size)
                    continue
            part = single if single is not None else self._partition(record, partitions)
            items = parts.get(part)
            if items is None:
                items = parts[part] = []
            items.append(record)
        self.parts = parts
        if len(parts) == 1:  # no task per batch for the common case
            part, items = next(iter(parts.items()))
            await self._run_partition(part, items, verifier)
            return
        await asyncio.gather(
            *(self._run_partition(p, items, verifier) for p, items in parts.items())
        )

    async def _run_partition(self, part: int, items: list[bytes], verifier: Verifier) -> None:
        tp = TopicPartition(self.topic, part)
        self.done[part] = 0
        try:
            start = await verifier.lower_bound(tp)
        except (KafkaError, OSError, TimeoutError) as exc:
            log.debug("kafka-emit: %s: no end offset: %s", tp, exc)
            return
        i = 0
        while i < len(items):
            pieces, n = batch_records(items, i, self.max_bytes)
            batch = PreparedBatch(pieces, n, self.compression)
            try:
                fut = await self.producer.send_batch(batch, self.topic, partition=part)
            except KafkaError as exc:  # not handed over: this and the rest are retried
                log.debug("kafka-emit: %s: batch not accepted: %s", tp, exc)
                return
            self.inflight[part] = (n, fut)
            try:
                # Shielded: our cancellation at shutdown must leave fut's outcome intact.
                meta = await asyncio.shield(fut)
                verifier.acknowledged(tp, meta.offset + n)
            except KafkaError as exc:
                if refused(exc):
                    self.refused += n
                    log.error("kafka-emit: %s refused %d events: %s", tp, n, exc)
                elif isinstance(exc, NodeNotReadyError) or not await verifier.written(
                    tp, start, {record_fields(r)[1] for r in items[i : i + n]}
                ):
                    del self.inflight[part]
                    return  # not written: this batch and the rest are retried, in order
            del self.inflight[part]
            i += n
            self.done[part] = i
            start = verifier.ends.get(tp, start)

    def _partition(self, record: bytes, partitions: list[int]) -> int:
        # murmur2 is pure Python in aiokafka: cache it (user ids repeat), per partition count.
        key = record_key(record)
        cache = self._cache.setdefault(len(partitions), {})
        part = cache.get(key)
        if part is None:
            if len(cache) > 100_000:
                cache.clear()
            part = cache[key] = _PARTITIONER(key, partitions, partitions)
        return part

    def outcome(self) -> tuple[list[bytes], int]:
        """(records not delivered, in queue order per partition; records refused).

        Also right after a cancelled :meth:`run` (shutdown, once the client was
        halted): a batch whose future succeeded counts as delivered, any other
        batch in flight as not delivered.
        """
        if self.parts is None:
            return list(self.records), self.refused
        undelivered: list[bytes] = []
        for part, items in self.parts.items():
            settled = self.done.get(part, 0)
            flight = self.inflight.get(part)
            if flight is not None:
                n, fut = flight
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    settled += n
            undelivered.extend(items[settled:])
        return undelivered, self.refused
