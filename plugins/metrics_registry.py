"""The metrics plugin's metric families: one set per gateway and instance, kept across reloads.

A SIGHUP reload builds new plugin instances, but Prometheus counters must keep
counting: resetting them would show as a counter reset on every reload, and
registering the same names twice in one registry fails. So the families live in
a :class:`MetricFamilies` store that :func:`families_for` caches per gateway
(weakly keyed by the running app, so a gateway that goes away, such as one
started by a test, takes its numbers with it) and per instance name. A new
instance of the same name finds the same store; only a change of buckets
replaces the affected histogram.

The store is also the :class:`~aiogateway.telemetry.TelemetrySink`. It is
registered once however many instances share it (reference counted), so the
overlap of old and new instances during a reload never counts a report twice.

Single process: each store has its own ``CollectorRegistry`` (tests and
reloads never collide on the global one). ``PROMETHEUS_MULTIPROC_DIR`` set
(``workers > 1``): values go to prometheus_client's per-process mmap files and
a scrape merges every worker's files with ``MultiProcessCollector``, so any
worker answers with the totals of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from bisect import bisect_left
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .metrics_series import KNOWN_METHODS, HistogramSeries, RequestSeries

if TYPE_CHECKING:
    from aiogateway.exchange import Exchange
    from aiogateway.telemetry import Telemetry

# DESIGN.md lists no *_created series; they double the output for nothing.
disable_created_metrics()  # type: ignore[no-untyped-call]

__all__ = ["FLUSH_INTERVAL", "MetricFamilies", "families_for", "multiprocess_dir"]

log = logging.getLogger("aiogateway.plugins.metrics")

#: Seconds between flushes of pending numbers with workers > 1 (how stale another
#: worker's numbers can be in a scrape; the scraped worker flushes its own first).
FLUSH_INTERVAL = 1.0


def multiprocess_dir() -> str | None:
    """The prometheus_client multiprocess directory, when that mode is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _ensure_multiprocess_values() -> None:
    """Make new metric values mmap-backed even if prometheus_client was imported early.

    prometheus_client picks its value class from the environment once, at import.
    Our supervisor starts each worker as a fresh interpreter with the variable
    already set, but an embedding process (or a fork after import) may import it
    first, which would leave that process counting in private memory that no
    scrape ever merges.
    """
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class MetricFamilies:
    """The families of one gateway's metrics instance, and its telemetry sink."""

    def __init__(self, buckets: Sequence[float], upstream_buckets: Sequence[float]) -> None:
        self.multiprocess = multiprocess_dir() is not None
        if self.multiprocess:
            _ensure_multiprocess_values()
        reg = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered, by route name, method and status.",
            ("route", "method", "status"),
            registry=reg,
        )
        self.request_bytes = Counter(
            "gateway_request_bytes_total",
            "Request body bytes received from clients.",
            ("route",),
            registry=reg,
        )
        self.response_bytes = Counter(
            "gateway_response_bytes_total",
            "Response body bytes sent to clients.",
            ("route",),
            registry=reg,
        )
        # livesum: each worker tracks its own requests; the total is the sum over
        # the workers alive now (a dead worker's requests are no longer in flight).
        self.in_flight = 0  # raised/lowered per request, copied to the gauge by flush()
        self.in_flight_gauge = Gauge(
            "gateway_requests_in_flight",
            "Proxied requests in progress (routes whose chain includes metrics).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Failed upstream calls, by upstream name and kind (connect, timeout, reset).",
            ("upstream", "kind"),
            registry=reg,
        )
        self.rejections = Counter(
            "gateway_plugin_rejections_total",
            "Requests a plugin answered instead of the upstream (401, 403, 413, 429 ...).",
            ("plugin", "route", "status"),
            registry=reg,
        )
        self.failures = Counter(
            "gateway_plugin_failures_total",
            "Plugin hooks that raised (logged, never shown to the client).",
            ("plugin", "hook"),
            registry=reg,
        )
        self.events = Counter(
            "gateway_events_total",
            "Domain events by topic and outcome (delivered, spooled, dropped, failed).",
            ("topic", "outcome"),
            registry=reg,
        )
        self.audit = Counter(
            "gateway_audit_records_total",
            "Audit rows by outcome (written, spooled, dropped, failed).",
            ("outcome",),
            registry=reg,
        )
        # livesum: every worker has its own audit/event queues, so the backlog the
        # operator cares about is their sum; "max" would hide all but one worker.
        self.queue = Gauge(
            "gateway_queue_depth",
            "Items waiting in a plugin's queue (audit, events), summed over workers.",
            ("queue",),
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._flusher: asyncio.Task[None] | None = None
        self.buckets: tuple[float, ...] = ()
        self.upstream_buckets: tuple[float, ...] = ()
        self.duration: Histogram | None = None
        self.upstream_duration: Histogram | None = None
        self.set_buckets(buckets, upstream_buckets)

        if self.multiprocess:
            self.scrape_registry = CollectorRegistry()
            MultiProcessCollector(self.scrape_registry)  # type: ignore[no-untyped-call]
        else:
            self.scrape_registry = reg
        self.users = 0

    # Configuration -----------------------------------------------------------

    def set_buckets(self, buckets: Sequence[float], upstream_buckets: Sequence[float]) -> None:
        """(Re)create a histogram whose buckets changed; counters are untouched.

        The pending series are flushed and dropped with it, so requests still finishing on an
        old plugin instance record into the current histogram, not an orphan.
        """
        buckets, upstream_buckets = tuple(buckets), tuple(upstream_buckets)
        if self.duration is not None:
            self.flush()  # pending numbers belong to the series about to be dropped
        if buckets != self.buckets:
            if self.duration is not None:
                log.warning("metrics: request-duration buckets changed; histogram restarts")
                self.registry.unregister(self.duration)
            self.duration = Histogram(
                "gateway_request_duration_seconds",
                "Seconds from the request's arrival to its last response byte.",
                ("route", "method"),
                registry=self.registry,
                buckets=buckets,
            )
            self.buckets = buckets
        if upstream_buckets != self.upstream_buckets:
            if self.upstream_duration is not None:
                log.warning("metrics: upstream-duration buckets changed; histogram restarts")
                self.registry.unregister(self.upstream_duration)
            self.upstream_duration = Histogram(
                "gateway_upstream_duration_seconds",
                "Seconds from calling the upstream to its response headers.",
                ("upstream",),
                registry=self.registry,
                buckets=upstream_buckets,
            )
            self.upstream_buckets = upstream_buckets
        # Series bound once per label set: the hot path is one dict lookup.
        self._by_request: dict[tuple[str, str, int], RequestSeries] = {}
        self._by_upstream: dict[str, HistogramSeries] = {}
        self._errors: dict[tuple[str, str], Counter] = {}
        self._rejections: dict[tuple[str, str, int], Counter] = {}

    def acquire(self, telemetry: Telemetry) -> None:
        """A plugin instance starts using the store: the first one registers the sink."""
        self.users += 1
        if self.users == 1:
            telemetry.add_sink(self)
            if self.multiprocess:
                self._flusher = asyncio.get_running_loop().create_task(self._flush_every())

    async def release(self, telemetry: Telemetry) -> None:
        """A plugin instance shut down: the last one removes the sink and flushes."""
        self.users -= 1
        if self.users == 0:
            telemetry.remove_sink(self)
            flusher, self._flusher = self._flusher, None
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            self.flush()

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                self.flush()
            except Exception:  # a bad flush must not end the flushing for good
                log.exception("metrics: flush failed")

    # Per request (the hot path) ------------------------------------------------

    def complete(self, exchange: Exchange) -> None:
        """Record one finished exchange: count, duration, bytes, upstream time.

        Plain arithmetic on pending numbers (about 1 µs); :meth:`flush` moves them
        into the prometheus_client families (whose every update takes a lock, and
        with workers > 1 writes an mmap file: 7-20 µs per request done directly).
        The exchange's route_name, duration and upstream_duration properties are
        inlined: a Python call each per request.
        """
        route = exchange.route
        key = (route.name if route is not None else "unmatched", exchange.method, exchange.status)
        series = self._by_request.get(key)
        if series is None:
            series = self._bind_request(key)
        end = exchange.finished
        duration = (end if end is not None else perf_counter()) - exchange.started
        series.count += 1
        series.sum += duration
        series.buckets[bisect_left(series.bounds, duration)] += 1
        series.bytes_in += exchange.bytes_in
        series.bytes_out += exchange.bytes_out
        started = exchange.upstream_started
        headers_at = exchange.upstream_headers_at
        if started is not None and headers_at is not None and route is not None:
            upstream_time = headers_at - started
            name = route.upstream.name
            up = self._by_upstream.get(name)
            if up is None:
                assert self.upstream_duration is not None
                up = self._by_upstream[name] = HistogramSeries(self.upstream_duration.labels(name))
            up.sum += upstream_time
            up.buckets[bisect_left(up.bounds, upstream_time)] += 1

    def _bind_request(self, key: tuple[str, str, int]) -> RequestSeries:
        route, method, status = key
        if method not in KNOWN_METHODS:
            # Only known methods are keys of their own: a client's made-up ones would
            # grow the dict without bound. They look up OTHER's series each time.
            key = (route, "OTHER", status)
            series = self._by_request.get(key)
            if series is not None:
                return series
            method = "OTHER"
        assert self.duration is not None
        series = RequestSeries(
            self.duration.labels(route, method),
            self.requests.labels(route, method, str(status)),
            self.request_bytes.labels(route),
            self.response_bytes.labels(route),
        )
        self._by_request[key] = series
        return series

    def flush(self) -> None:
        """Move pending numbers into the families: before a scrape, and every
        FLUSH_INTERVAL with workers > 1 so the other workers' scrapes see them."""
        for series in self._by_request.values():
            if series.count:
                series.total.inc(series.count)
                series.count = 0
                if series.bytes_in:
                    series.request_bytes.inc(series.bytes_in)
                    series.bytes_in = 0
                if series.bytes_out:
                    series.response_bytes.inc(series.bytes_out)
                    series.bytes_out = 0
                series.flush_histogram()
        for up in self._by_upstream.values():
            up.flush_histogram()
        self.in_flight_gauge.set(self.in_flight)

    # TelemetrySink: fast, never raising --------------------------------------------

    def upstream_error(self, upstream: str, kind: str) -> None:
        key = (upstream, kind)
        child = self._errors.get(key)
        if child is None:
            child = self._errors[key] = self.upstream_errors.labels(upstream, kind)
        child.inc()

    def plugin_rejection(self, plugin: str, route: str, status: int) -> None:
        key = (plugin, route, status)
        child = self._rejections.get(key)
        if child is None:
            child = self._rejections[key] = self.rejections.labels(plugin, route, str(status))
        child.inc()

    def plugin_failure(self, plugin: str, hook: str) -> None:
        self.failures.labels(plugin, hook).inc()

    def event_outcome(self, topic: str, outcome: str, count: int) -> None:
        if count > 0:
            self.events.labels(topic, outcome).inc(count)

    def audit_outcome(self, outcome: str, count: int) -> None:
        if count > 0:
            self.audit.labels(outcome).inc(count)

    def queue_depth(self, queue: str, depth: int) -> None:
        self.queue.labels(queue).set(depth)

    # Exposition ----------------------------------------------------------------

    def render(self, accept: str, openmetrics: bool) -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics when asked and allowed).

        Thread-safe (prometheus_client values take locks), so it may run off the
        event loop; call :meth:`flush` on the loop first.
        """
        encoder: Callable[[Collector], bytes] = generate_latest
        content_type = CONTENT_TYPE_PLAIN_0_0_4
        if openmetrics and accept:
            encoder, content_type = choose_encoder(accept)
        return encoder(self.scrape_registry), content_type


# Stores per running gateway (weakly: a stopped gateway's numbers go with it), then
# per instance name, so a reload's new instance continues the old one's counters.
_STORES: weakref.WeakKeyDictionary[object, dict[str, MetricFamilies]] = weakref.WeakKeyDictionary()


def families_for(
    app: object, name: str, buckets: Sequence[float], upstream_buckets: Sequence[float]
) -> MetricFamilies:
    """The store of instance ``name`` in gateway ``app``, created on first use."""
    per_app = _STORES.get(app)
    if per_app is None:
        per_app = _STORES[app] = {}
    store = per_app.get(name)
    if store is None:
        if multiprocess_dir() is not None and per_app:
            # mmap values are keyed by metric name and labels only: two stores in one
            # process would overwrite each other's numbers.
            log.warning(
                "metrics: instances %s and %r both record with workers > 1; "
                "their numbers collide, keep one metrics instance",
                sorted(per_app),
                name,
            )
        store = per_app[name] = MetricFamilies(buckets, upstream_buckets)
    else:
        store.set_buckets(buckets, upstream_buckets)
    return store
