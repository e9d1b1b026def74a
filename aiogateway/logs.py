"""Logging setup: every log line is one JSON object (orjson) on stderr.

The access log writes one line per request, so the path is kept cheap: no
caller/thread/process lookups in LogRecord (the logging HOWTO's documented
optimisations), a cached timestamp prefix, and lines buffered and flushed
every ``FLUSH_INTERVAL`` (warnings and errors are flushed at once).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Any

import orjson

__all__ = ["FLUSH_INTERVAL", "BufferedJsonHandler", "JsonFormatter", "flush_logs", "setup_logging"]

FLUSH_INTERVAL = 0.1


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...fields}``; ``extra={"fields": {...}}`` adds keys."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._prefix = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class BufferedJsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes into a block-buffered stream; ``flush()`` runs on a timer, not per line."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:
            self.handleError(record)


_handler: BufferedJsonHandler | None = None


def setup_logging(level: str = "info") -> BufferedJsonHandler:
    """Route every logger to one buffered JSON handler on stderr; returns it."""
    global _handler
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup per record (documented in the HOWTO)
    if _handler is None:
        stream = open(  # noqa: SIM115 - lives as long as the process
            os.dup(sys.stderr.fileno()), "w", buffering=1 << 16, encoding="utf-8"
        )
        _handler = BufferedJsonHandler(stream)
    root = logging.getLogger()
    root.handlers[:] = [_handler]
    root.setLevel(level.upper())
    # aiohttp's own access logger would duplicate ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return _handler


def flush_logs() -> None:
    if _handler is not None:
        _handler.flush()
