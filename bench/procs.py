"""Processes under benchmark: start pinned, wait until they answer, account CPU.

Every server runs as its own process (a tree, for nginx or gateway workers),
pinned with ``sched_setaffinity`` before exec. CPU time and RSS come from
``/proc/<pid>/stat`` summed over the process and its descendants.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Proc", "ProcSet", "cores", "free_port", "keep_awake", "pin_running", "wait_http"]

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # fields from 'state' on


def _tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def pin_running(pid: int, cpus: set[int] | None) -> None:
    """Move a process started elsewhere (a broker, a database), every thread of its
    tree, onto ``cpus``: it then competes with the upstream, not with the proxy."""
    if not cpus:
        return
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """user + system CPU of the process tree so far."""
        total = 0
        for pid in _tree(self.pid):
            fields = _stat(pid)
            if fields is not None:
                total += int(fields[11]) + int(fields[12])
        return total / _TICK

    def rss_bytes(self) -> int:
        total = 0
        for pid in _tree(self.pid):
            fields = _stat(pid)
            if fields is not None:
                total += int(fields[21]) * _PAGE
        return total

    def log_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-n:]
        return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class ProcSet:
    """Starts processes into ``workdir``; stops them all (reverse order) on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        cpus: set[int] | None,
        env: Mapping[str, str] | None = None,
        stdout_pipe: bool = False,
    ) -> Proc:
        log = self.workdir / f"{name}.log"
        preexec: Callable[[], None] | None = None
        if cpus:
            pinned = set(cpus)

            def preexec() -> None:
                os.sched_setaffinity(0, pinned)

        with log.open("ab") as f:
            popen = subprocess.Popen(
                list(cmd),
                stdout=subprocess.PIPE if stdout_pipe else f,
                stderr=f,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=self.workdir,
                preexec_fn=preexec,  # noqa: PLW1509 - single-threaded bench
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()

    def __enter__(self) -> ProcSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_http(url: str, proc: Proc, timeout: float = 30.0, headers: Mapping[str, str] = {}) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            req = urllib.request.Request(url, headers=dict(headers))
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    resp.read()
                    return
                last = f"status {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} not answering {url} ({last}):\n{proc.log_tail()}")
        time.sleep(0.1)


_SPIN = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
while True:
    pass
"""


@contextlib.contextmanager
def keep_awake(cpus: set[int] | None) -> Iterator[None]:
    """Keep ``cpus`` out of idle with a SCHED_IDLE busy loop while the block runs.

    A vCPU with nothing to run halts; waking it for the next request costs tens
    of µs per hop, which at -c1 dominates a proxy's added latency (nginx adds
    ~140 µs here on an idle core, ~65 µs on a busy one). A SCHED_IDLE task never
    takes CPU from the proxy (any normal task preempts it at once) and its time
    is not the proxy's: the proxy is measured as on a host with other work.
    """
    if not cpus:
        yield
        return
    spinners = [subprocess.Popen([sys.executable, "-c", _SPIN, str(c)]) for c in sorted(cpus)]
    try:
        time.sleep(0.2)
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()
