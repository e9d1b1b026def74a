"""The internal metrics API: what the core and plugins report, and who listens.

Reporters (the proxy core, audit-log, kafka-emit, the queue/spool) call
``Telemetry`` methods; the metrics plugin registers a :class:`TelemetrySink` at
startup. Nobody imports the metrics plugin, and with no sink every call is a
cheap no-op loop over an empty tuple.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Telemetry", "TelemetrySink"]


class TelemetrySink(Protocol):
    """What a metrics backend receives. Every method must be fast and never raise."""

    def upstream_error(self, upstream: str, kind: str) -> None: ...
    def plugin_rejection(self, plugin: str, route: str, status: int) -> None: ...
    def plugin_failure(self, plugin: str, hook: str) -> None: ...
    def event_outcome(self, topic: str, outcome: str, count: int) -> None: ...
    def audit_outcome(self, outcome: str, count: int) -> None: ...
    def queue_depth(self, queue: str, depth: int) -> None: ...


class Telemetry:
    """Fans reports out to the registered sinks (usually zero or one)."""

    __slots__ = ("_sinks",)

    def __init__(self) -> None:
        self._sinks: tuple[TelemetrySink, ...] = ()

    def add_sink(self, sink: TelemetrySink) -> None:
        self._sinks = (*self._sinks, sink)

    def remove_sink(self, sink: TelemetrySink) -> None:
        self._sinks = tuple(s for s in self._sinks if s is not sink)

    def upstream_error(self, upstream: str, kind: str) -> None:
        """kind: connect, timeout or reset."""
        for s in self._sinks:
            s.upstream_error(upstream, kind)

    def plugin_rejection(self, plugin: str, route: str, status: int) -> None:
        for s in self._sinks:
            s.plugin_rejection(plugin, route, status)

    def plugin_failure(self, plugin: str, hook: str) -> None:
        for s in self._sinks:
            s.plugin_failure(plugin, hook)

    def event_outcome(self, topic: str, outcome: str, count: int = 1) -> None:
        """outcome: delivered, spooled, dropped, failed."""
        for s in self._sinks:
            s.event_outcome(topic, outcome, count)

    def audit_outcome(self, outcome: str, count: int = 1) -> None:
        """outcome: written, spooled, dropped, failed."""
        for s in self._sinks:
            s.audit_outcome(outcome, count)

    def queue_depth(self, queue: str, depth: int) -> None:
        for s in self._sinks:
            s.queue_depth(queue, depth)
