"""Gateway instructions per request, counted by valgrind's callgrind: a figure
that does not move with whatever else the machine runs (CPU µs do, by ±25%).

Each variant (empty chain, each plugin alone, the full chain) is a gateway
process started under ``valgrind --tool=callgrind``; after a warm-up the
counters are zeroed, exactly ``-n`` requests are sent with the built-in client
(nothing left in flight), the gateway is given ``--tail`` seconds to finish its
background work (audit batches, Kafka sends: they count for the requests that
queued them), and the counters are dumped. User-space instructions only: the
kernel's share (syscalls) is not in these figures.

    python bench/instructions.py                       # empty chain and full chain
    python bench/instructions.py --variants all        # and each plugin alone
    python bench/instructions.py --variants all --write  # table -> bench/RESULTS.md

Slow (valgrind runs the gateway ~50x slower): ~1 min per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fullchain
from loadgen import run_count
from procs import ProcSet, free_port, wait_http
from report import commit, write_instructions
from servers import REPO, start_upstream

__all__ = ["main"]

CONFIGS = Path(__file__).resolve().parent / "configs"
VARIANTS: dict[str, tuple[str, ...]] = {
    "empty chain": (),
    "metrics": ("metrics",),
    "jwt-check": ("jwt-check",),
    "service-key": ("service-key",),
    "audit-log": ("audit-log",),
    "kafka-emit": ("kafka-emit",),
    "full chain": tuple(fullchain.INSTANCES),
}
_TOTALS = re.compile(r"^(?:summary|totals):\s*(\d+)", re.M)


def _dump_total(pid: int, outdir: Path) -> int:
    """Dump the counters of ``pid`` and return the instructions since the last zeroing."""
    before = set(outdir.glob("callgrind.out.*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(outdir.glob("callgrind.out.*")) - before
        for f in new:
            m = _TOTALS.search(f.read_text(errors="replace"))
            if m:
                return int(m.group(1))
        time.sleep(0.2)
    raise RuntimeError("callgrind dump did not appear")


@contextlib.contextmanager
def _services(keep: tuple[str, ...], cpus: set[int] | None) -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        env = {
            "BENCH_JWT_SECRET": fullchain.JWT_SECRET,
            "BENCH_SERVICE_KEY": fullchain.SERVICE_KEY,
        }
        if "audit-log" in keep:
            pg = stack.enter_context(fullchain.postgres(1, cpus))
            env["BENCH_DATABASE_URL"] = pg.urls[0]
        if "kafka-emit" in keep:
            kafka = stack.enter_context(fullchain.kafka([fullchain.TOPIC], cpus))
            env["KAFKA_BOOTSTRAP_SERVERS"] = kafka.bootstrap
        yield env


def measure(
    procs: ProcSet, upstream: str, name: str, keep: tuple[str, ...], args: argparse.Namespace
) -> tuple[float, Path]:
    """Instructions per request of one variant, and its dump file."""
    if keep:
        cfg = fullchain.chain_config(
            CONFIGS / "full.toml", keep, procs.workdir / f"{name}.toml", {}, fullchain.TOPIC
        )
    else:
        cfg = CONFIGS / "empty.toml"
    headers = [
        f"Authorization: Bearer {fullchain.token()}",
        f"X-Service-Key: {fullchain.SERVICE_KEY}",
    ]
    outdir = procs.workdir / name.replace(" ", "-")
    outdir.mkdir()
    with _services(keep, args.side_cpus) as env:
        port = free_port()
        cmd = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={outdir}/callgrind.out.%p",
            "--dump-instr=no", "--compress-strings=no",
            sys.executable, "-m", "aiogateway", "serve", "--config", str(cfg),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        env.update(
            BENCH_UPSTREAM_URL=upstream,
            BENCH_STATE_DIR=str(outdir / "state"),
            PYTHONPATH=str(REPO),
        )
        proc = procs.start(f"gw-{outdir.name}", cmd, args.proxy_cpus, env)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", proc, timeout=180)
        run_count(url + "/100b", args.warmup, args.conns, headers, args.side_cpus)
        time.sleep(args.tail)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        result = run_count(url + "/100b", args.n, args.conns, headers, args.side_cpus)
        if result.errors or result.requests != args.n:
            raise RuntimeError(f"{name}: {result.requests} requests, {result.errors} errors")
        time.sleep(args.tail)
        total = _dump_total(proc.pid, outdir)
        dump = max(outdir.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        procs.stop(proc)
    return total / args.n, dump


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default="empty chain,full chain", help="comma list, or 'all'")
    p.add_argument("-n", type=int, default=2000, help="measured requests per variant")
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--tail", type=float, default=3.0, help="seconds for background work")
    p.add_argument("--write", action="store_true", help="put the table in bench/RESULTS.md")
    args = p.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    two = len(os.sched_getaffinity(0)) >= 2
    args.proxy_cpus, args.side_cpus = ({0}, {1}) if two else (None, None)
    results: dict[str, float] = {}
    with ProcSet(Path(tempfile.mkdtemp(prefix="bench-instr-"))) as procs:
        upstream = start_upstream(procs, args.side_cpus, False)
        for name in names:
            per_req, dump = measure(procs, upstream.url, name, VARIANTS[name], args)
            results[name] = per_req
            print(f"[instructions] {name:<12} {per_req / 1000:9.1f} k/request ({dump})")
    base = results.get("empty chain")
    table = [
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit()}, "
        f"{args.n} requests per variant (c{args.conns}) after {args.warmup} warm-up, "
        f"user-space instructions of the gateway process (callgrind), background work "
        f"included ({args.tail:g} s tail), command: `python bench/instructions.py "
        f"{' '.join(sys.argv[1:])}`",
        "",
        "| variant | k instructions/request | vs empty chain | x empty chain |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, v in results.items():
        rel = f"+{(v - base) / 1000:.1f} k" if base and name != "empty chain" else "-"
        x = f"{v / base:.2f}" if base else "-"
        table.append(f"| {name} | {v / 1000:.1f} | {rel} | {x} |")
    print("\n" + "\n".join(table))
    if args.write:
        write_instructions("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
