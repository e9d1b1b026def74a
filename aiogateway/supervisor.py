"""``workers = N``: N gateway processes sharing one port with SO_REUSEPORT.

The supervisor starts each worker as ``python -m aiogateway serve --worker-id``
(a fresh interpreter: no event loop or sockets inherited across fork),
forwards SIGTERM/SIGINT/SIGHUP to them, and restarts a worker that dies. For
prometheus-client's multiprocess mode it owns PROMETHEUS_MULTIPROC_DIR: a
fresh directory per run, dead workers' live gauges marked, removed at exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from .logs import flush_logs, setup_logging

__all__ = ["supervise"]

log = logging.getLogger("aiogateway.supervisor")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _bind_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (taken, not a local address), or None.

    Workers bind with SO_REUSEPORT, which would happily share a port with
    another gateway; this probe binds without it, so any listener counts.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:
        return str(exc)
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _Supervisor:
    def __init__(self, config: Path, host: str, port: int, workers: int, shutdown_timeout: float):
        self.config = config
        self.host = host
        self.port = port
        self.workers = workers
        self.shutdown_timeout = shutdown_timeout
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.reload_requested = False
        self.env = dict(os.environ)
        self.own_multiproc_dir: str | None = None

    def start_worker(self, worker_id: int) -> None:
        cmd = [
            sys.executable,
            "-m",
            "aiogateway",
            "serve",
            "--config",
            str(self.config),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--worker-id",
            str(worker_id),
            "--reuse-port",
        ]
        self.procs[worker_id] = subprocess.Popen(cmd, env=self.env)
        log.info(
            "worker started",
            extra={"fields": {"worker": worker_id, "pid": self.procs[worker_id].pid}},
        )

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stopping = True

    def run(self) -> int:
        if MULTIPROC_ENV not in self.env:
            self.own_multiproc_dir = tempfile.mkdtemp(prefix="aiogateway-metrics-")
            self.env[MULTIPROC_ENV] = self.own_multiproc_dir
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        try:
            for i in range(self.workers):
                self.start_worker(i)
            self._watch()
            return self._stop_all()
        finally:
            flush_logs()
            if self.own_multiproc_dir:
                shutil.rmtree(self.own_multiproc_dir, ignore_errors=True)

    def _watch(self) -> None:
        restarts: dict[int, float] = {}
        while not self.stopping:
            if self.reload_requested:
                self.reload_requested = False
                for proc in self.procs.values():
                    proc.send_signal(signal.SIGHUP)
            for worker_id, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or self.stopping:
                    continue
                log.error(
                    "worker exited",
                    extra={"fields": {"worker": worker_id, "pid": proc.pid, "code": code}},
                )
                self._mark_dead(proc.pid)
                # Back off a worker that keeps dying (bad config after a reload, say).
                if time.monotonic() - restarts.get(worker_id, 0.0) < 1.0:
                    time.sleep(1.0)
                restarts[worker_id] = time.monotonic()
                self.start_worker(worker_id)
            flush_logs()
            time.sleep(0.1)

    def _stop_all(self) -> int:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._mark_dead(proc.pid)
        return 0

    def _mark_dead(self, pid: int) -> None:
        if self.env.get(MULTIPROC_ENV):
            try:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(pid, self.env[MULTIPROC_ENV])  # type: ignore[no-untyped-call]
            except Exception:
                log.exception("could not clean metrics of worker pid %s", pid)


def supervise(config: Path, host: str, port: int, workers: int, shutdown_timeout: float) -> int:
    setup_logging("info")
    if port == 0:
        port = _free_port(host)
    else:
        # Otherwise every worker fails to bind and is restarted forever.
        problem = _bind_problem(host, port)
        if problem is not None:
            print(f"aiogateway: cannot listen on {host}:{port}: {problem}", file=sys.stderr)
            return 1
    return _Supervisor(config, host, port, workers, shutdown_timeout).run()
