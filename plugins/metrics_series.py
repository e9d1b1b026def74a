"""Pending numbers of the metrics plugin's hot path, and its label and bucket rules.

A prometheus_client update takes a lock per value (and with workers > 1 writes
an mmap file): done per request that is 7-20 µs. The hot path instead adds to
plain numbers in a series bound once per label set, and the store moves them
into the families in bulk (``flush``), before each scrape and, with workers,
every second.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from prometheus_client import Counter, Histogram

__all__ = [
    "DEFAULT_BUCKETS",
    "KNOWN_METHODS",
    "HistogramSeries",
    "RequestSeries",
    "valid_buckets",
]

#: Request durations through a gateway: sub-millisecond cache hits to slow reports.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

#: Methods kept as their own label value; anything else is "OTHER" (bounded cardinality).
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


class HistogramSeries:
    """Pending observations of one histogram child, flushed into it in bulk."""

    __slots__ = ("bounds", "buckets", "child", "sum")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        # prometheus_client's own upper bounds (ending in +Inf): bisect_left finds
        # the bucket observe() would pick, the first bound >= the value.
        self.bounds: list[float] = child._upper_bounds
        self.buckets = [0] * len(self.bounds)
        self.sum = 0.0

    def flush_histogram(self) -> None:
        # Histogram has no public bulk update; its per-bucket values (_buckets,
        # _sum, stable since prometheus_client 0.0.x) are what observe() updates,
        # and in multiprocess mode what the mmap files hold.
        pending = self.buckets
        targets = self.child._buckets
        for i, n in enumerate(pending):
            if n:
                targets[i].inc(n)
                pending[i] = 0
        if self.sum:
            self.child._sum.inc(self.sum)
            self.sum = 0.0


class RequestSeries(HistogramSeries):
    """Pending numbers of one (route, method, status) label set."""

    __slots__ = ("bytes_in", "bytes_out", "count", "request_bytes", "response_bytes", "total")

    def __init__(
        self, duration: Histogram, total: Counter, request_bytes: Counter, response_bytes: Counter
    ) -> None:
        super().__init__(duration)
        self.total = total
        self.request_bytes = request_bytes
        self.response_bytes = response_bytes
        self.count = 0
        self.bytes_in = 0
        self.bytes_out = 0


def valid_buckets(buckets: Sequence[float]) -> tuple[float, ...]:
    """Buckets as a histogram needs them: finite, positive, strictly increasing."""
    out = tuple(float(b) for b in buckets)
    if not out:
        raise ValueError("needs at least one bucket")
    if any(not math.isfinite(b) or b <= 0 for b in out):
        raise ValueError("buckets must be finite and > 0 (+Inf is added automatically)")
    if any(a >= b for a, b in itertools.pairwise(out)):
        raise ValueError("buckets must be strictly increasing")
    return out
