"""64 KiB responses only: the gateway (this tree, and optionally another tree
as a same-run baseline) against HAProxy and nginx as reverse proxies.

    python bench/bench_large.py [--baseline DIR] [--rounds 3] [--seconds 5] [--conns 64]

The focused slice of ``make bench`` for large bodies: same upstream (nginx
serving a 64 KiB file), same load (wrk -t1), same pinning and /proc CPU
accounting (bench/servers.py, procs.py, loadgen.py). ``--baseline DIR`` runs a
second gateway from DIR (a tree holding ``aiogateway/`` and ``plugins/``, e.g.
``git archive HEAD aiogateway plugins | tar -x -C DIR``), interleaved with the
rest, so before/after are compared on the same noisy machine. Per target the
median round is shown (CPU µs/request and MB/s), and MB/s against HAProxy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import have_wrk, run_load
from procs import ProcSet, cores
from servers import Target, start_gateway, start_haproxy, start_nginx_proxy, start_upstream

__all__ = ["main"]

CONFIG = Path(__file__).resolve().parent / "configs" / "empty.toml"
SIZE = 65536


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", type=Path, help="tree with aiogateway/ to run as a baseline")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--path", default="/64k", help="upstream path (nginx serves /64k, /100b)")
    args = p.parse_args()
    cpu = cores()
    proxy_cpus, side_cpus = ({cpu[0]}, {cpu[1]}) if len(cpu) >= 2 else (None, None)
    with tempfile.TemporaryDirectory(prefix="aiogw-large-") as tmp, ProcSet(Path(tmp)) as procs:
        up = start_upstream(procs, side_cpus, False)
        targets: list[Target] = [up, start_gateway(procs, proxy_cpus, up.url, CONFIG, "gateway")]
        if args.baseline is not None:
            env = {"PYTHONPATH": str(args.baseline.resolve())}
            targets.append(
                start_gateway(procs, proxy_cpus, up.url, CONFIG, "gateway (baseline)", env=env)
            )
        targets += [t for t in (start_haproxy(procs, proxy_cpus, up.url),) if t]
        targets += [t for t in (start_nginx_proxy(procs, proxy_cpus, up.url),) if t]
        results: dict[str, list[tuple[float, float | None]]] = {t.name: [] for t in targets}
        for t in targets:  # warm-up
            run_load(t.url + args.path, args.conns, 1, (), side_cpus, have_wrk())
        for rnd in range(args.rounds):
            for t in targets:
                cpu0 = t.proc.cpu_seconds() if t.proc else 0.0
                load = run_load(t.url + args.path, args.conns, args.seconds, (), side_cpus)
                used = t.proc.cpu_seconds() - cpu0 if t.proc else None
                per_req = used / load.requests * 1e6 if used is not None and load.requests else None
                mbs = load.rps * SIZE / 1e6
                results[t.name].append((mbs, per_req))
                print(
                    f"round {rnd + 1} {t.name:<32} {mbs:>8.1f} MB/s "
                    f"CPU {per_req or 0:>6.0f} µs/req  errors {load.errors + load.non_2xx}",
                    file=sys.stderr,
                    flush=True,
                )
    ha = next((statistics.median(m for m, _ in r) for n, r in results.items() if "HAProxy" in n), 0)
    print(f"\n{args.path}, c{args.conns}, median of {args.rounds} rounds")
    print("| target | MB/s | CPU µs/req | MB/s x HAProxy |\n| --- | ---: | ---: | ---: |")
    for name, rows in results.items():
        mbs = statistics.median(m for m, _ in rows)
        cpus = [c for _, c in rows if c is not None]
        c = f"{statistics.median(cpus):.0f}" if cpus else "-"
        print(f"| {name} | {mbs:.1f} | {c} | {mbs / ha if ha else 0:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
