"""Where the gateway's CPU goes: py-spy samples aggregated per function.

``record()`` samples a running process with ``py-spy record -f raw``
(collapsed stacks, ``--nonblocking``: the target is not stopped) while the
caller loads it; ``summarize()`` turns the stacks into self and inclusive
shares per function, and µs per request given the CPU µs/request measured
over the same run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Profile", "py_spy", "record", "summarize"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: int, out: Path, native: bool = False) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds``; the caller waits on the result."""
    exe = py_spy()
    assert exe is not None
    cmd = [exe, "record", "-p", str(pid), "-d", str(seconds), "-f", "raw", "-o", str(out)]
    # --native (C frames: uvloop, aiohttp's extensions, syscalls) must pause the
    # target for each sample: fewer samples, and the CPU figures of that run inflate.
    cmd += ["--native", "-r", "100"] if native else ["--nonblocking", "-r", "250"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    return f"{m.group('func')} ({_short(m.group('file'))})"


def _short(path: str) -> str:
    if "/site-packages/" in path:
        path = path.split("/site-packages/", 1)[1]
    elif "/lib/python3." in path:
        path = "stdlib/" + path.split("/lib/python3.", 1)[1].split("/", 1)[-1]
    else:
        path = re.sub(r"^.*?/(aiogateway|plugins|bench)/", r"\1/", path)
    return path


# Leaf frames of native stacks (py-spy --native gives bare file names) by component.
_COMPONENTS: list[tuple[str, str]] = [
    (r"^(libc\.so|\[vdso\])", "kernel: syscalls via libc (socket read/write, epoll)"),
    (
        r"^(loop|core|stream|loop-watcher|linux|queue|uv-common|tcp|poll|timer|handle)\.[ch]$",
        "uvloop/libuv (event loop, transports)",
    ),
    (r"^_asynciomodule\.c", "asyncio C (tasks, futures)"),
    (r"^(parser|llhttp|api|http)\.c$", "llhttp parsers (httptools, aiohttp)"),
    (
        r"^(_multidict\.c|identity\.h|istr\.h|hashtable\.h|htkeys\.h|iter\.h|pair_list\.h)",
        "multidict (headers)",
    ),
    (r"^(_helpers_c|_http_parser|_http_writer|_websocket)\.c$|^aiohttp/", "aiohttp"),
    (r"^aiogateway/upstream", "aiogateway upstream client (Python)"),
    (r"^aiogateway/", "aiogateway core (Python)"),
    (r"^plugins/", "plugins (Python)"),
    (r"^stdlib/", "stdlib (Python)"),
    (r"\.h$|^libpython|\.c$", "CPython runtime (refcounts, GC, alloc, calls)"),
]


def component(frame: str) -> str:
    """The component a leaf frame ``func (file:line)`` belongs to."""
    m = _FRAME.match(frame)
    func, file = (m.group("func"), _short(m.group("file"))) if m else ("", frame)
    if func.startswith(("gc_collect", "gc_", "deduce_unreachable", "move_unreachable")):
        return "CPython cyclic GC"
    for pattern, name in _COMPONENTS:
        if re.search(pattern, file):
            return name
    return "other"


@dataclass
class Profile:
    samples: int
    self_share: list[tuple[str, float]]
    inclusive_share: list[tuple[str, float]]
    components: list[tuple[str, float]]


def summarize(raw: Path, top: int = 15) -> Profile:
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    comp_c: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        if _BLOCKED.search(stack):
            continue  # a thread parked on a lock (log/executor threads): not CPU
        raw_frames = stack.split(";")
        frames = [_name(f) for f in raw_frames]
        total += count
        self_c[frames[-1]] += count
        comp_c[component(raw_frames[-1])] += count
        for name in set(frames):
            incl_c[name] += count
    if not total:
        return Profile(0, [], [], [])
    selfs = [(n, c / total) for n, c in self_c.most_common(top)]
    ours = [
        (n, c / total)
        for n, c in incl_c.most_common()
        if re.search(r"\((aiogateway|plugins)/", n) and not _ENTRY.search(n)
    ][:top]
    comps = [(n, c / total) for n, c in comp_c.most_common()]
    return Profile(total, selfs, ours, comps)


# Native samples of threads waiting on a lock: py-spy --native counts them, they burn nothing.
_BLOCKED = re.compile(r"PyThread_acquire_lock_timed|pthread_cond_(timed)?wait|sem_(timed)?wait")

# Frames every sample passes through: the process entry, not the request path.
_ENTRY = re.compile(r"\(aiogateway/(__main__|cli|runner)\.py\)")
