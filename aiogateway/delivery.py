"""The one queue behind audit-log and kafka-emit: memory, then disk, then the sink.

``on_complete`` hooks only call :meth:`DeliveryQueue.put` (never awaits); a
worker task batches records and hands them to the sink (``deliver``), retrying
failures at the head with exponential backoff.

Order is kept end to end: records wait in a bounded memory queue; once it is
full (typically because the sink is failing) records go to an on-disk
:class:`~aiogateway.spool.Spool`, and every later record follows them there
until the spool has drained, so the sink sees memory first, then the spool,
then newer records. ``deliver(batch)`` returns the records it could NOT deliver
(``[]``: all delivered; raising: none), so whatever was delivered is never sent
again by the queue. A spool batch is acknowledged on disk only once all of it
is delivered: only a hard crash in that window can replay a batch, which is
why sinks should still be idempotent where they can (audit-log is).

Outcomes reported through ``on_outcome(outcome, count)``:
  delivered  records the sink accepted
  spooled    records written to the spool
  dropped    records refused because the spool was past ``spool_max_bytes``
             (or the disk failed); also logged, at most every 10 s
  failed     records in a delivery attempt that failed (each retry counts again)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .spool import Spool, SpoolToken

if TYPE_CHECKING:
    from .telemetry import Telemetry

__all__ = ["DeliveryQueue", "Sink"]

log = logging.getLogger("aiogateway.delivery")

Sink = Callable[[list[bytes]], Awaitable[list[bytes]]]
_DROP_LOG_INTERVAL = 10.0


def _no_outcome(outcome: str, count: int) -> None:
    return None


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class DeliveryQueue:
    """Bounded memory queue + on-disk spool + batching worker in front of ``deliver``."""

    def __init__(
        self,
        name: str,
        deliver: Sink,
        *,
        spool_dir: Path,
        telemetry: Telemetry,
        queue_name: str,
        max_queue: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        spool_max_bytes: int = 1 << 30,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        segment_bytes: int | None = None,
        adopt_interval: float = 2.0,
        on_outcome: Callable[[str, int], None] | None = None,
    ) -> None:
        if max_queue < 1 or batch_size < 1:
            raise ValueError("max_queue and batch_size must be >= 1")
        self.name = name
        self.on_outcome: Callable[[str, int], None] = (
            on_outcome if on_outcome is not None else _no_outcome
        )
        self._deliver = deliver
        self._telemetry = telemetry
        self._queue_name = queue_name
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        # How often the worker looks for orphaned segments, e.g. left by the instance
        # a config reload replaced while the sink was down (startup alone misses those).
        self._adopt_interval = adopt_interval
        if segment_bytes is None:
            segment_bytes = min(64 << 20, max(1 << 20, spool_max_bytes // 8))
        self._spool = Spool(spool_dir, max_bytes=spool_max_bytes, segment_bytes=segment_bytes)
        self._mem: deque[bytes] = deque()
        self._head: list[bytes] = []  # the batch being delivered / retried
        self._head_token: SpoolToken | None = None
        self._spooling = False  # once set, puts go to the spool until it drains
        # put() appends without further checks while the memory queue is shorter
        # than this: open, not spooling, room left, and no batch filled by it.
        self._fast_limit = min(max_queue, batch_size - 1)
        # Set while the worker sleeps: a full batch or close() wakes it early.
        self._waiter: asyncio.Future[None] | None = None
        self._linger = False  # the batch in hand was not full: wait for the next to fill
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._failures = 0
        self._healthy = True
        self._last_error = ""
        self._n_spooled = 0
        self._n_dropped = 0
        self._last_drop_log = -_DROP_LOG_INTERVAL
        self._dropped_unlogged = 0
        self._reported_depth = -1
        self._last_sync = 0.0
        self._last_adopt = 0.0

    # Public state ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Records not yet delivered: memory, the batch in flight and the spool."""
        return len(self._mem) + len(self._head) + self._spool.records - self._head_spooled()

    @property
    def spooled_bytes(self) -> int:
        return self._spool.size

    @property
    def healthy(self) -> bool:
        """Whether the last delivery attempt succeeded (for /readyz)."""
        return self._healthy

    @property
    def last_error(self) -> str:
        return self._last_error

    def _head_spooled(self) -> int:
        # Records of a spool batch are in _head and still counted by the spool.
        return len(self._head) if self._head_token is not None else 0

    # Lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt orphaned spool segments (replayed before new records) and start the worker."""
        await self._adopt()
        self._worker = asyncio.create_task(self._run(), name=f"delivery:{self.name}")
        self._report_depth()

    async def _adopt(self) -> None:
        self._last_adopt = time.monotonic()
        found = await asyncio.to_thread(self._spool.find_orphans, self._spool.names())
        adopted = self._spool.add(found)
        if adopted:
            log.info("%s: replaying %d spooled records", self.name, adopted)
            # They are older than anything this queue holds in memory (put before
            # start, or during a reload's overlap): those go behind them.
            self._set_spooling(True)
            while self._mem:
                self.put(self._mem.popleft())

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 (the shared interface)
        """Deliver what is in memory within ``timeout``; spool (fsync'd) whatever is left."""
        if self._closed:
            return
        self._closing = True
        if self._waiter is not None:
            _wake(self._waiter)
        worker = self._worker
        if worker is not None and not worker.done():
            try:
                await asyncio.wait_for(asyncio.shield(worker), timeout)
            except TimeoutError:
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
        self._closed = True
        self._fast_limit = 0
        self._flush_counters()
        # Memory is older than the spool (see put), so it goes ahead of it; a spool
        # batch in _head moves to that new first segment and is acked in its own.
        leftovers = [*self._head, *self._mem]
        newly = len(leftovers) - self._head_spooled()
        self._mem.clear()
        try:
            if leftovers:
                self._spool.prepend(leftovers)
            if newly:
                self.on_outcome("spooled", newly)
            if self._head_token is not None:
                # The batch lives in the prepended segment (or was delivered).
                self._spool.ack(self._head_token)
            self._head, self._head_token = [], None
            self._spool.sync()
        except OSError:
            log.exception("%s: could not spool %d records at close", self.name, newly)
            self.on_outcome("dropped", newly)
        finally:
            with contextlib.suppress(OSError):
                self._spool.close()  # releases the locks: the next owner may adopt
        self._report_depth()

    # Request path ---------------------------------------------------------------

    def put(self, record: bytes) -> None:
        """Enqueue ``record``; never blocks, never raises.

        ``record`` is kept as given until delivered: make it an exact-size
        ``bytes`` (a ``b"".join`` result). ``orjson.dumps`` output is carved from
        a larger allocation; thousands of those kept alive cost ~5x more per
        record (fresh pages each time) than a ``bytes(memoryview(r))`` copy.
        """
        mem = self._mem
        if len(mem) < self._fast_limit:  # the common case: one check (see _fast_limit)
            mem.append(record)
            return
        if self._closed:
            self._put_after_close(record)
            return
        if not self._spooling:
            if len(mem) < self._max_queue:
                mem.append(record)
                if len(mem) >= self._batch_size and self._waiter is not None:
                    _wake(self._waiter)
                return
            self._set_spooling(True)
        try:
            stored = self._spool.append(record)
        except OSError:
            log.exception("%s: spool write failed", self.name)
            stored = False
        if stored:
            self._n_spooled += 1
        else:
            self._n_dropped += 1

    def _set_spooling(self, spooling: bool) -> None:
        self._spooling = spooling
        self._fast_limit = (
            0 if spooling or self._closed else min(self._max_queue, self._batch_size - 1)
        )

    def _put_after_close(self, record: bytes) -> None:
        # Rare (a hook finishing after shutdown): a one-off segment the next start adopts.
        spool = Spool(self._spool.directory, max_bytes=self._spool.max_bytes, segment_bytes=1)
        try:
            spool.prepend([record])
            spool.close()
            self.on_outcome("spooled", 1)
        except OSError:
            log.exception("%s: record after close could not be spooled", self.name)
            self.on_outcome("dropped", 1)

    # Worker ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
                if self._closing and not self._head and not self._mem:
                    return
                if (
                    self._linger
                    and not self._head
                    and not self._closing
                    and len(self._mem) < self._batch_size
                ):
                    # The last batch was not full: give this one up to flush_interval
                    # to fill (a batch's own cost, a COPY or a Produce request, is
                    # then shared by more records), as when the worker was idle.
                    self._linger = False
                    await self._idle()
                    continue
                if not self._head and not self._fill_head():
                    if self._closing:
                        return
                    await self._idle()
                    continue
                if await self._attempt():
                    continue
                if self._closing:
                    return  # sink failing at shutdown: spool the rest now, don't wait it out
                await self._sleep(self._backoff())
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the worker die; the queue would silently stop
                log.exception("%s: delivery worker error", self.name)
                await self._sleep(self._flush_interval)

    def _fill_head(self) -> bool:
        if self._mem:
            n = min(len(self._mem), self._batch_size)
            popleft = self._mem.popleft
            self._head = [popleft() for _ in range(n)]
            self._linger = n < self._batch_size
            return True
        if self._spool:
            self._head, self._head_token = self._spool.take(self._batch_size)
            if self._head:
                return True
        if self._spooling and not self._spool and not self._mem:
            self._set_spooling(False)  # drained: new records may use memory again
        return False

    async def _idle(self) -> None:
        """Sleep for ``flush_interval``, or until a batch is full or close() is called.

        Records that arrive meanwhile wait for the end of the sleep (at most
        flush_interval), so the worker wakes once per batch, not per record.
        A plain future and timer: ``asyncio.wait_for`` costs a task per wait.
        """
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._flush_interval, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def _attempt(self) -> bool:
        batch = self._head
        try:
            undelivered = await self._deliver(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            undelivered = batch
            self._last_error = f"{type(exc).__name__}: {exc}"
            if self._healthy or self._failures % 20 == 0:
                log.warning("%s: delivery of %d records failed: %s", self.name, len(batch), exc)
        delivered = len(batch) - len(undelivered)
        if delivered:
            self.on_outcome("delivered", delivered)
        if undelivered:
            if len(undelivered) < len(batch):
                self._last_error = f"{len(undelivered)} of {len(batch)} records not delivered"
            self.on_outcome("failed", len(undelivered))
            self._head = list(undelivered)
            self._healthy = False
            self._failures += 1
            return False
        if self._head_token is not None:
            self._spool.ack(self._head_token)
        self._head, self._head_token = [], None
        if not self._healthy:
            log.info("%s: delivering again", self.name)
        self._healthy = True
        self._failures = 0
        self._last_error = ""
        return True

    def _backoff(self) -> float:
        return min(self._retry_max, self._retry_initial * 2.0 ** min(self._failures - 1, 30))

    async def _sleep(self, delay: float) -> None:
        # Sleep in flush_interval slices so spool writes and reports keep flowing.
        deadline = time.monotonic() + delay
        while not self._closing and (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self._flush_interval))
            await self._tick()

    async def _tick(self) -> None:
        """Periodic housekeeping: write and fsync the spool, report counters and depth."""
        try:
            self._spool.write_pending()
        except OSError:
            log.exception("%s: spool write failed", self.name)
        now = time.monotonic()
        if now - self._last_sync >= self._flush_interval:
            self._last_sync = now
            fds = self._spool.dirty_fds()
            if fds:
                await asyncio.to_thread(self._spool.fsync, fds)
        if now - self._last_adopt >= self._adopt_interval and not self._closing:
            await self._adopt()
        self._flush_counters()
        self._report_depth()

    def _flush_counters(self) -> None:
        if self._n_spooled:
            n, self._n_spooled = self._n_spooled, 0
            self.on_outcome("spooled", n)
        if self._n_dropped:
            n, self._n_dropped = self._n_dropped, 0
            self.on_outcome("dropped", n)
            self._dropped_unlogged += n
        now = time.monotonic()
        if self._dropped_unlogged and now - self._last_drop_log >= _DROP_LOG_INTERVAL:
            self._last_drop_log = now
            log.error(
                "%s: spool full (%d of %d bytes) or failing: dropped %d records",
                self.name,
                self._spool.size,
                self._spool.max_bytes,
                self._dropped_unlogged,
            )
            self._dropped_unlogged = 0

    def _report_depth(self) -> None:
        depth = self.depth
        if depth != self._reported_depth:
            self._reported_depth = depth
            self._telemetry.queue_depth(self._queue_name, depth)
