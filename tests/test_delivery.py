"""DeliveryQueue and Spool against a real in-process sink that can be made to fail.

Every test checks the two promises end to end: the sink sees each record
exactly once, in the order it was put, whatever failed in between.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiogateway.delivery import DeliveryQueue
from aiogateway.spool import HEADER, MAGIC, Spool
from aiogateway.telemetry import Telemetry


class FlakySink:
    """Records what it accepted; ``fail`` raises, ``accept`` caps records taken per call."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.batches: list[int] = []
        self.fail = False
        self.accept: int | None = None
        self.hang: asyncio.Event | None = None
        self.budget: int | None = None  # records accepted in all, then it goes down

    async def __call__(self, batch: list[bytes]) -> list[bytes]:
        self.batches.append(len(batch))
        await asyncio.sleep(0)
        if self.hang is not None:
            await self.hang.wait()
        if self.fail or self.budget == 0:
            raise ConnectionError("sink down")
        n = len(batch) if self.accept is None else self.accept
        if self.budget is not None:
            n = min(n, self.budget)
            self.budget -= min(n, len(batch))
        self.received.extend(batch[:n])
        return batch[n:]


class DepthRecorder:
    def __init__(self) -> None:
        self.depths: list[int] = []

    def upstream_error(self, upstream: str, kind: str) -> None: ...
    def plugin_rejection(self, plugin: str, route: str, status: int) -> None: ...
    def plugin_failure(self, plugin: str, hook: str) -> None: ...
    def event_outcome(self, topic: str, outcome: str, count: int) -> None: ...
    def audit_outcome(self, outcome: str, count: int) -> None: ...

    def queue_depth(self, queue: str, depth: int) -> None:
        assert queue == "q"
        self.depths.append(depth)


class Outcomes(dict[str, int]):
    def __call__(self, outcome: str, count: int) -> None:
        self[outcome] = self.get(outcome, 0) + count


def records(start: int, stop: int) -> list[bytes]:
    return [b"rec-%06d" % i for i in range(start, stop)]


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def make_queue(
    tmp_path: Path, sink: FlakySink, telemetry: Telemetry | None = None, **kw: object
) -> tuple[DeliveryQueue, Outcomes]:
    outcomes = Outcomes()
    opts: dict[str, object] = {
        "max_queue": 50,
        "batch_size": 20,
        "flush_interval": 0.02,
        "retry_initial": 0.01,
        "retry_max": 0.05,
    }
    opts.update(kw)
    q = DeliveryQueue(
        "test",
        sink,
        spool_dir=tmp_path / "spool",
        telemetry=telemetry or Telemetry(),
        queue_name="q",
        on_outcome=outcomes,
        **opts,  # type: ignore[arg-type]
    )
    return q, outcomes


def segments(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "spool").glob("*.seg"))


async def test_delivers_everything_in_order_in_batches(tmp_path: Path) -> None:
    sink = FlakySink()
    rec = DepthRecorder()
    tel = Telemetry()
    tel.add_sink(rec)
    q, outcomes = make_queue(tmp_path, sink, tel, max_queue=10_000)
    await q.start()
    for r in records(0, 1000):
        q.put(r)
    await until(lambda: len(sink.received) == 1000)
    await q.close(5)
    assert sink.received == records(0, 1000)
    assert max(sink.batches) <= 20
    assert outcomes == {"delivered": 1000}
    assert max(rec.depths) > 0
    assert rec.depths[-1] == 0
    assert segments(tmp_path) == []


async def test_a_lone_record_waits_at_most_about_flush_interval(tmp_path: Path) -> None:
    sink = FlakySink()
    q, _ = make_queue(tmp_path, sink, flush_interval=0.05)
    await q.start()
    t0 = time.monotonic()
    q.put(b"one")
    await until(lambda: sink.received == [b"one"])
    assert time.monotonic() - t0 < 0.5
    await q.close(1)


async def test_outage_spools_then_recovers_in_order_without_duplicates(tmp_path: Path) -> None:
    sink = FlakySink()
    sink.fail = True
    q, outcomes = make_queue(tmp_path, sink)
    await q.start()
    for r in records(0, 1000):
        q.put(r)
        if r.endswith(b"0"):
            await asyncio.sleep(0)
    await until(lambda: outcomes.get("failed", 0) > 0)
    assert not q.healthy
    assert q.depth == 1000
    await until(lambda: outcomes.get("spooled", 0) >= 900 and bool(segments(tmp_path)))
    assert q.spooled_bytes == outcomes["spooled"] * (4 + 10)
    sink.fail = False
    await until(lambda: q.depth == 0)
    assert q.healthy
    # While spooled, newer records go behind the spool, even once memory has room.
    for r in records(1000, 1100):
        q.put(r)
    await until(lambda: len(sink.received) == 1100)
    await q.close(5)
    assert sink.received == records(0, 1100)
    assert outcomes["delivered"] == 1100
    assert outcomes["spooled"] >= 900
    assert segments(tmp_path) == []
    assert q.spooled_bytes == 0


async def test_partial_delivery_resends_only_the_rest(tmp_path: Path) -> None:
    sink = FlakySink()
    sink.accept = 7
    q, outcomes = make_queue(tmp_path, sink)
    await q.start()
    for r in records(0, 300):
        q.put(r)
    await until(lambda: len(sink.received) == 300)
    await q.close(5)
    assert sink.received == records(0, 300)
    assert outcomes["delivered"] == 300
    assert outcomes["failed"] > 0


@pytest.mark.parametrize("seed", range(6))
async def test_random_failures_keep_exact_order(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    sink = FlakySink()
    q, outcomes = make_queue(
        tmp_path, sink, max_queue=rng.choice([1, 5, 30]), segment_bytes=rng.choice([64, 4096])
    )
    await q.start()
    sent: list[bytes] = []
    for _ in range(60):
        sink.fail = rng.random() < 0.4
        sink.accept = rng.choice([None, None, 0, 1, 3])
        batch = records(len(sent), len(sent) + rng.randrange(0, 40))
        for r in batch:
            q.put(r)
        sent.extend(batch)
        await asyncio.sleep(rng.choice([0, 0.001, 0.01]))
    sink.fail = False
    sink.accept = None
    await until(lambda: q.depth == 0)
    await q.close(5)
    assert sink.received == sent
    assert outcomes["delivered"] == len(sent)
    assert segments(tmp_path) == []


async def test_close_flushes_memory_to_a_healthy_sink(tmp_path: Path) -> None:
    sink = FlakySink()
    q, _ = make_queue(tmp_path, sink, max_queue=10_000, flush_interval=1.0)
    await q.start()
    for r in records(0, 555):
        q.put(r)
    await q.close(5)
    assert sink.received == records(0, 555)
    assert segments(tmp_path) == []


async def test_close_spools_what_cannot_be_delivered_and_restart_replays(tmp_path: Path) -> None:
    sink = FlakySink()
    sink.fail = True
    q, outcomes = make_queue(tmp_path, sink)
    await q.start()
    for r in records(0, 200):  # 50 in memory, 150 spooled
        q.put(r)
    await until(lambda: outcomes.get("failed", 0) > 0)
    t0 = time.monotonic()
    await q.close(5)
    assert time.monotonic() - t0 < 1  # a failing sink does not hold shutdown for the timeout
    assert outcomes["spooled"] == 200
    assert sum(p.stat().st_size for p in segments(tmp_path)) >= 200 * 14

    sink2 = FlakySink()
    q2, outcomes2 = make_queue(tmp_path, sink2)
    q2.put(b"new-0")  # put before start: still after the replay
    await q2.start()
    assert q2.depth == 201
    q2.put(b"new-1")  # after the replay, never before it
    await until(lambda: len(sink2.received) == 202)
    await q2.close(5)
    assert sink2.received == [*records(0, 200), b"new-0", b"new-1"]
    assert outcomes2["delivered"] == 202
    assert segments(tmp_path) == []


async def test_close_timeout_cancels_a_hung_delivery_and_spools_it(tmp_path: Path) -> None:
    sink = FlakySink()
    sink.hang = asyncio.Event()
    q, _ = make_queue(tmp_path, sink)
    await q.start()
    for r in records(0, 30):
        q.put(r)
    await until(lambda: bool(sink.batches))
    t0 = time.monotonic()
    await q.close(0.2)
    assert time.monotonic() - t0 < 1
    assert sink.received == []

    sink2 = FlakySink()
    q2, _ = make_queue(tmp_path, sink2)
    await q2.start()
    await until(lambda: len(sink2.received) == 30)
    await q2.close(5)
    assert sink2.received == records(0, 30)


async def test_replay_resumes_after_what_was_acknowledged(tmp_path: Path) -> None:
    sink = FlakySink()
    sink.fail = True
    q, _ = make_queue(tmp_path, sink, max_queue=1)
    await q.start()
    for r in records(0, 500):
        q.put(r)
    await q.close(5)

    # Second life: the sink takes 7 records per call, 101 in all, then goes down again.
    sink2 = FlakySink()
    sink2.accept = 7
    sink2.budget = 101
    q2, _ = make_queue(tmp_path, sink2)
    await q2.start()
    await until(lambda: sink2.budget == 0 and not q2.healthy)
    await q2.close(5)
    got = list(sink2.received)
    assert got == records(0, 101)

    sink3 = FlakySink()
    q3, _ = make_queue(tmp_path, sink3)
    await q3.start()
    await until(lambda: q3.depth == 0)
    await q3.close(5)
    assert got + sink3.received == records(0, 500)
    assert segments(tmp_path) == []


async def test_a_live_owners_segments_are_not_adopted(tmp_path: Path) -> None:
    sink_a = FlakySink()
    sink_a.fail = True
    a, _ = make_queue(tmp_path, sink_a, max_queue=1)
    await a.start()
    for r in records(0, 100):
        a.put(r)
    await until(lambda: bool(segments(tmp_path)))

    sink_b = FlakySink()
    b, _ = make_queue(tmp_path, sink_b)
    await b.start()
    assert b.depth == 0  # a's files are flock'd by a
    b.put(b"b-only")
    await until(lambda: sink_b.received == [b"b-only"])
    await b.close(5)

    await a.close(5)  # a stops with its records spooled: now they are orphans
    sink_c = FlakySink()
    c, _ = make_queue(tmp_path, sink_c)
    await c.start()
    await until(lambda: len(sink_c.received) == 100)
    await c.close(5)
    assert sink_c.received == records(0, 100)


async def test_a_running_queue_adopts_what_a_replaced_one_left(tmp_path: Path) -> None:
    # A config reload: the new instance runs while the old one closes with a spool.
    sink_old = FlakySink()
    sink_old.fail = True
    old, _ = make_queue(tmp_path, sink_old)
    await old.start()
    sink_new = FlakySink()
    new, _ = make_queue(tmp_path, sink_new, adopt_interval=0.05)
    await new.start()
    for r in records(0, 100):
        old.put(r)
    await old.close(1)
    await until(lambda: len(sink_new.received) == 100)
    await new.close(5)
    assert sink_new.received == records(0, 100)
    assert segments(tmp_path) == []


async def test_spool_cap_drops_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = FlakySink()
    sink.fail = True
    # Records are 10 bytes + 4 of framing: a 1400-byte cap holds exactly 100.
    q, outcomes = make_queue(tmp_path, sink, max_queue=10, spool_max_bytes=1400)
    await q.start()
    with caplog.at_level(logging.ERROR, logger="aiogateway.delivery"):
        for r in records(0, 300):
            q.put(r)
        await until(lambda: outcomes.get("dropped", 0) == 190)
    assert outcomes["spooled"] == 100
    assert q.spooled_bytes == 1400
    assert any("dropped 190 records" in m for m in caplog.messages)
    sink.fail = False
    await until(lambda: q.depth == 0)
    await q.close(5)
    assert sink.received == records(0, 110)


async def test_torn_last_record_is_cut_at_adoption(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    body = b"".join(len(r).to_bytes(4, "big") + r for r in records(0, 3))
    torn = (100).to_bytes(4, "big") + b"only-part"
    (spool_dir / f"{1:020d}-1-1.seg").write_bytes(MAGIC + HEADER.to_bytes(8, "big") + body + torn)
    sink = FlakySink()
    q, _ = make_queue(tmp_path, sink)
    await q.start()
    await until(lambda: len(sink.received) == 3)
    await q.close(5)
    assert sink.received == records(0, 3)
    assert segments(tmp_path) == []


async def test_a_foreign_file_is_set_aside_not_replayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / f"{1:020d}-1-1.seg").write_bytes(b"something else entirely")
    sink = FlakySink()
    q, _ = make_queue(tmp_path, sink, adopt_interval=0.01)
    with caplog.at_level(logging.ERROR, logger="aiogateway.spool"):
        await q.start()
        q.put(b"x")
        await until(lambda: sink.received == [b"x"])
        await asyncio.sleep(0.05)  # several rescans
    await q.close(1)
    assert [p.name for p in spool_dir.iterdir()] == [f"{1:020d}-1-1.seg.bad"]
    assert len([m for m in caplog.messages if "cannot adopt" in m]) == 1


def test_spool_take_handles_records_larger_than_a_read_chunk(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30, segment_bytes=1 << 30)
    big = os.urandom(3 << 20)
    assert spool.append(b"a")
    assert spool.append(big)
    assert spool.append(b"z")
    got, token = spool.take(10)
    assert got == [b"a", big, b"z"]
    assert token is not None
    spool.ack(token)
    assert spool.records == 0
    assert spool.size == 0
    spool.close()
    assert list(tmp_path.glob("*.seg")) == []


CRASHER = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from aiogateway.delivery import DeliveryQueue
    from aiogateway.telemetry import Telemetry

    async def down(batch):
        raise ConnectionError("down")

    async def main():
        q = DeliveryQueue("crash", down, spool_dir=Path(sys.argv[1]), telemetry=Telemetry(),
                          queue_name="q", max_queue=1, flush_interval=0.01)
        await q.start()
        for i in range(1000):
            q.put(b"rec-%06d" % i)
        while not any(Path(sys.argv[1]).glob("*.seg")):  # the worker writes the spool
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


async def test_segments_of_a_killed_process_are_adopted(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(spool_dir)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line == b"ready\n"
        # Alive: its segments are locked, nobody else may take them.
        probe = FlakySink()
        p, _ = make_queue(tmp_path, probe)
        await p.start()
        assert p.depth == 0
        await p.close(1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    sink = FlakySink()
    q, _ = make_queue(tmp_path, sink)
    await q.start()
    # The first record was in the crashed process's memory (max_queue=1): lost with it.
    await until(lambda: len(sink.received) == 999)
    await q.close(5)
    assert sink.received == records(1, 1000)


# Spool, as a property: whatever the interleaving of appends, reads, acks and
# restarts (close, then a new Spool adopting the files), the acknowledged
# records are exactly the appended ones, in order.

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.binary(max_size=300)),
        st.tuples(st.just("deliver"), st.integers(1, 20)),
        st.tuples(st.just("read-no-ack"), st.integers(1, 20)),
        st.tuples(st.just("write"), st.just(0)),
        st.tuples(st.just("restart"), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops=_OPS, segment_bytes=st.sampled_from([1, 100, 1000, 1 << 20]))
def test_spool_acknowledges_exactly_what_was_appended_in_order(
    ops: list[tuple[str, Any]], segment_bytes: int
) -> None:
    with tempfile.TemporaryDirectory() as d:
        directory = Path(d)

        def open_spool() -> Spool:
            s = Spool(directory, max_bytes=1 << 30, segment_bytes=segment_bytes)
            s.adopt()
            return s

        spool = open_spool()
        appended: list[bytes] = []
        acked: list[bytes] = []
        for op, arg in ops:
            if op == "append":
                assert spool.append(arg)
                appended.append(arg)
            elif op == "deliver":
                got, token = spool.take(arg)
                if token is not None:
                    spool.ack(token)
                acked.extend(got)
            elif op == "read-no-ack":
                spool.take(arg)  # then "crash" before acking: the restart replays them
                spool.close()
                spool = open_spool()
            elif op == "write":
                spool.write_pending()
            else:
                spool.close()
                spool = open_spool()
            assert spool.records == len(appended) - len(acked)
        while True:
            got, token = spool.take(7)
            if token is None:
                break
            spool.ack(token)
            acked.extend(got)
        assert acked == appended
        assert spool.size == 0
        spool.close()
        assert list(directory.glob("*.seg")) == []


async def test_after_a_partial_batch_the_next_waits_to_fill(tmp_path: Path) -> None:
    """A record that came while a short batch was in the sink is not sent alone:
    the worker waits (at most flush_interval) for the batch to fill, so a
    batch's own cost is shared by more records."""
    batches: list[list[bytes]] = []
    gates: list[asyncio.Event] = []

    async def gated(batch: list[bytes]) -> list[bytes]:
        gate = asyncio.Event()
        gates.append(gate)
        batches.append(list(batch))
        await gate.wait()
        return []

    async def until(n: int) -> None:
        for _ in range(500):
            if len(batches) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(batches)} batches, waited for {n}")

    q = DeliveryQueue(
        "test",
        gated,
        spool_dir=tmp_path / "spool",
        telemetry=Telemetry(),
        queue_name="q",
        batch_size=4,
        flush_interval=5.0,
    )
    await q.start()
    for r in records(0, 4):
        q.put(r)
    await until(1)  # a full batch, in the sink
    q.put(b"rec-000004")
    gates[0].set()
    await until(2)  # the short batch [4], in the sink
    q.put(b"rec-000005")
    gates[1].set()
    await asyncio.sleep(0.2)
    assert batches == [records(0, 4), records(4, 5)], "a lone record waits for more"
    for r in records(6, 9):
        q.put(r)  # fills the batch: it goes at once, long before flush_interval
    await until(3)
    assert batches[2] == records(5, 9)
    gates[2].set()
    await q.close(5)
