"""make bench / make bench-quick: the gateway against baselines, in one run.

Starts an upstream (nginx serving 100 B and 64 KiB files, else the built-in
bench/fast_upstream.py), the gateway with bench/configs/*.toml, a naive aiohttp
proxy and, when installed, nginx and HAProxy as reverse proxies and the
FastAPI+httpx design; loads each with wrk (else bench/loadgen.py) and prints
one table: req/s, p50/p99, proxy CPU µs per request (from /proc), ratios
against the naive proxy and the direct upstream, MB/s. With two cores or more
the proxy under test runs on the first core, upstream and load on the second.

    python bench/run.py            # full table -> bench/RESULTS.md, then a py-spy profile
    python bench/run.py --quick    # < 1 min: empty chain vs naive, 100 B; guard line
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fullchain
import hotpath
from loadgen import have_wrk, run_load
from procs import ProcSet, cores
from report import Row, commit, format_table, ratio, targets, write_full, write_quick
from servers import (
    BODY_PATHS,
    Target,
    have_fastapi,
    start_fastapi,
    start_gateway,
    start_haproxy,
    start_naive,
    start_nginx_proxy,
    start_upstream,
)

__all__ = ["main"]

BENCH = Path(__file__).resolve().parent
CONFIGS = BENCH / "configs"
SIZES = {"100 B": 100, "64 KiB": 65536}
GW = "gateway, empty chain"
NAIVE = "naive aiohttp proxy"


class Bench:
    def __init__(self, args: argparse.Namespace, procs: ProcSet) -> None:
        self.args = args
        self.procs = procs
        cpu = cores()
        pin = len(cpu) >= 2 and not args.no_pin
        self.proxy_cpus = {cpu[0]} if pin else None
        self.side_cpus = {cpu[1]} if pin else None
        self.all_cpus = set(cpu)
        self.use_wrk = have_wrk() and not args.python_load
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.sent: dict[str, int] = {}
        self.profile = ""
        self.scaling: float | None = None

    def log(self, msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    def measure(self, t: Target, body: str, conns: int, seconds: float) -> Row:
        proc = t.proc
        cpu0 = proc.cpu_seconds() if proc else 0.0
        rss0 = proc.rss_bytes() if proc else 0
        load = run_load(
            t.url + BODY_PATHS[body], conns, seconds, t.headers, self.side_cpus, self.use_wrk
        )
        cpu = proc.cpu_seconds() - cpu0 if proc else None
        rss = (proc.rss_bytes() - rss0) / 2**20 if proc else None
        self.sent[t.name] = self.sent.get(t.name, 0) + load.requests
        per_req = cpu / load.requests * 1e6 if cpu is not None and load.requests else None
        self.log(
            f"{t.name:<40} {body:>6} c{conns:<3} {load.rps:>9,.0f} req/s  "
            f"p50 {load.p50_us:>7,.0f} µs  CPU {per_req or 0:>6,.0f} µs/req"
        )
        return Row(t.name, body, conns, load, per_req, rss, SIZES[body])

    def best_of(
        self, targets: list[Target], body: str, conns: int, seconds: float, keep: bool = True
    ) -> dict[str, Row]:
        """Interleaved rounds; per target the round with the most req/s is kept."""
        best: dict[str, Row] = {}
        for _ in range(self.args.rounds):
            for t in targets:
                row = self.measure(t, body, conns, seconds)
                if t.name not in best or row.load.rps > best[t.name].load.rps:
                    best[t.name] = row
        if keep:
            self.rows.extend(best.values())
        return best

    def warm(self, t: Target) -> None:
        load = run_load(t.url + "/100b", 64, 1, t.headers, self.side_cpus, self.use_wrk)
        self.sent[t.name] = self.sent.get(t.name, 0) + load.requests

    def finish_ratios(self) -> None:
        for r in self.rows:
            naive = self._row(NAIVE, r.body, r.conns)
            direct = self._row("upstream", r.body, r.conns)
            if r.proxy != NAIVE and naive is not None:
                r.x_naive = ratio(r.load.rps, naive.load.rps)
            if direct is not None and r is not direct:
                r.x_direct = ratio(r.load.rps, direct.load.rps)
                if r.conns == 1:
                    r.added_p50_us = r.load.p50_us - direct.load.p50_us

    def _row(self, prefix: str, body: str, conns: int) -> Row | None:
        return next(
            (
                r
                for r in self.rows
                if r.proxy.startswith(prefix) and (r.body, r.conns) == (body, conns)
            ),
            None,
        )


def _quick(b: Bench, upstream: Target) -> None:
    secs = b.args.seconds or 4
    gw = start_gateway(b.procs, b.proxy_cpus, upstream.url, CONFIGS / "empty.toml", GW)
    naive = start_naive(b.procs, b.proxy_cpus, upstream.url)
    for t in (gw, naive):
        b.warm(t)
    b.rows.append(b.measure(upstream, "100 B", 64, 3))
    b.best_of([gw, naive], "100 B", 64, secs)
    b.best_of([upstream, gw], "100 B", 1, 3)


def _full(b: Bench, upstream: Target) -> None:
    secs = b.args.seconds or 5
    pc, up = b.proxy_cpus, upstream.url
    gw = start_gateway(b.procs, pc, up, CONFIGS / "empty.toml", GW)
    naive = start_naive(b.procs, pc, up)
    natives = [t for t in (start_nginx_proxy(b.procs, pc, up), start_haproxy(b.procs, pc, up)) if t]
    logged_cfg = b.procs.workdir / "empty-accesslog.toml"
    logged_cfg.write_text(
        (CONFIGS / "empty.toml").read_text().replace("access_log = false", "access_log = true")
    )
    logged = start_gateway(b.procs, pc, up, logged_cfg, f"{GW}, access_log on")
    fastapi = None
    if have_fastapi():
        fastapi = start_fastapi(b.procs, pc, up)
    else:
        b.notes.append("FastAPI+httpx row skipped: pip install -e '.[bench]' for it")
    for t in [gw, naive, logged, *natives] + ([fastapi] if fastapi else []):
        b.warm(t)
    b.rows.append(b.measure(upstream, "100 B", 64, secs))
    b.best_of([gw, naive, logged, *natives], "100 B", 64, secs)
    if fastapi is not None:
        b.rows.append(b.measure(fastapi, "100 B", 64, secs))
        if fastapi.proc is not None:
            b.procs.stop(fastapi.proc)
    if logged.proc is not None:
        b.procs.stop(logged.proc)
    b.rows.append(b.measure(upstream, "64 KiB", 64, secs))
    b.best_of([gw, naive, *natives], "64 KiB", 64, secs)
    b.best_of([upstream, gw, naive, *natives], "100 B", 1, secs)
    _workers2(b, upstream, gw, secs)
    if not b.args.no_profile:
        _profile(b, gw)
        _profile(b, gw, "64 KiB", native=False)
    _chain(b, upstream, secs)


def _workers2(b: Bench, upstream: Target, gw: Target, secs: float) -> None:
    """workers=2 on both cores against workers=1 on core 0, interleaved."""
    w2 = start_gateway(
        b.procs, b.all_cpus, upstream.url, CONFIGS / "empty.toml", f"{GW}, workers=2", workers=2
    )
    b.warm(w2)
    best = b.best_of([gw, w2], "100 B", 64, secs, keep=False)
    b.rows.append(best[w2.name])
    b.scaling = best[w2.name].load.rps / best[gw.name].load.rps
    if w2.proc is not None:
        b.procs.stop(w2.proc)


@contextlib.contextmanager
def _maybe(flag: bool, ctx: contextlib.AbstractContextManager[str]) -> Iterator[str | None]:
    if not flag:
        yield None
        return
    with ctx as value:
        yield value


def _chain(b: Bench, upstream: Target, secs: float) -> None:
    missing = fullchain.missing_plugins()
    if len(missing) == len(fullchain.INSTANCES):
        b.notes.append("chain row skipped: no plugin available")
        return
    name = "gateway, full chain (5 plugins)"
    if missing:
        kept = [t for t in fullchain.INSTANCES if t not in missing]
        name = f"gateway, chain of {len(kept)} plugins"
        b.notes.append(
            f"full chain not measured: {', '.join(missing)} not merged yet; the chain row "
            f"runs {', '.join(kept)} (bench/configs/full.toml minus the missing plugins)"
        )
    cfg = fullchain.chain_config(CONFIGS / "full.toml", missing, b.procs.workdir / "chain.toml")
    headers = [
        f"Authorization: Bearer {fullchain.token()}",
        f"X-Service-Key: {fullchain.SERVICE_KEY}",
    ]
    try:
        with (
            _maybe("audit-log" not in missing, fullchain.postgres()) as dsn,
            _maybe("kafka-emit" not in missing, fullchain.kafka()) as bootstrap,
        ):
            env = {
                "BENCH_DATABASE_URL": dsn or "",
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap or "",
                "BENCH_JWT_SECRET": fullchain.JWT_SECRET,
                "BENCH_SERVICE_KEY": fullchain.SERVICE_KEY,
            }
            t = start_gateway(
                b.procs, b.proxy_cpus, upstream.url, cfg, name, env=env, headers=headers
            )
            b.warm(t)
            b.best_of([t], "100 B", 64, secs)
            b.best_of([t], "100 B", 1, secs)
            if not b.args.no_profile:
                _profile(b, t, native=False)
            counted = fullchain.served(t.url) if "metrics" not in missing else None
            if t.proc is not None:
                b.procs.stop(t.proc)  # SIGTERM: the gateway flushes audit rows and events
            rows, events = fullchain.delivered(dsn, bootstrap)
            total, ok = counted or (None, None)
            verdict = "all delivered" if (rows, events) == (total, ok) else "MISMATCH"
            b.notes.append(
                f"{name}: wrk completed {b.sent[name]:,} requests; the gateway counted "
                f"{total} (2xx: {ok}) in gateway_requests_total; after SIGTERM: "
                f"{rows} audit rows, {events} events: {verdict}"
            )
    except Exception as exc:  # PostgreSQL/broker unavailable: the row is skipped, said so
        b.notes.append(f"chain row failed/skipped: {type(exc).__name__}: {exc}")


def _profile(b: Bench, t: Target, body: str = "100 B", native: bool = True) -> None:
    """py-spy on ``t`` under c64 load: Python stacks, then (optionally) native ones."""
    if hotpath.py_spy() is None or t.proc is None:
        if "py-spy" not in " ".join(b.notes):
            b.notes.append("profile skipped: py-spy not installed (pip install -e '.[bench]')")
        return
    secs = b.args.profile_seconds
    profiles = []
    for nat in (False, True) if native else (False,):
        out = b.procs.workdir / f"pyspy-{len(b.profile)}-{nat}.raw"
        spy = hotpath.record(t.proc.pid, secs, out, native=nat)
        row = b.measure(t, body, 64, secs + 1)
        _, err = spy.communicate(timeout=120)
        if not out.exists():
            b.notes.append(f"profile failed: {err.decode(errors='replace')[-300:]}")
            return
        profiles.append((hotpath.summarize(out), row.cpu_us or 0.0))
    py, cpu = profiles[0]
    lines = [
        f"#### {t.name}, {body}, c64: {cpu:.0f} µs CPU/request while sampled without "
        f"pausing ({py.samples} samples); µs/req = share x that",
    ]
    if len(profiles) > 1:
        nat_p = profiles[1][0]
        lines += ["", "| where the CPU goes (native stacks, leaf frame) | share | ≈ µs/req |"]
        lines += ["| --- | ---: | ---: |"]
        lines += [f"| {n} | {s:.1%} | {s * cpu:.0f} |" for n, s in nat_p.components]
    lines += ["", "| self, Python-level (C callees folded in) | share | ≈ µs/req |"]
    lines += ["| --- | ---: | ---: |"]
    lines += [f"| `{n}` | {s:.1%} | {s * cpu:.0f} |" for n, s in py.self_share]
    if len(profiles) > 1:
        lines += ["", "| self, native (top leaves) | share | ≈ µs/req |", "| --- | ---: | ---: |"]
        lines += [f"| `{n}` | {s:.1%} | {s * cpu:.0f} |" for n, s in profiles[1][0].self_share]
    lines += ["", "| inclusive, gateway code | share | ≈ µs/req |", "| --- | ---: | ---: |"]
    lines += [f"| `{n}` | {s:.1%} | {s * cpu:.0f} |" for n, s in py.inclusive_share]
    b.profile += ("\n\n" if b.profile else "") + "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="< 1 min regression guard")
    p.add_argument("--seconds", type=float, default=0, help="per load run (default 5, quick 4)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds, best kept")
    p.add_argument("--builtin-upstream", action="store_true", help="not nginx")
    p.add_argument("--python-load", action="store_true", help="bench/loadgen.py, not wrk")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    args = p.parse_args()
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="aiogw-bench-") as tmp, ProcSet(Path(tmp)) as procs:
        b = Bench(args, procs)
        upstream = start_upstream(procs, b.side_cpus, args.builtin_upstream)
        (_quick if args.quick else _full)(b, upstream)
        procs.close()
    b.finish_ratios()
    order: dict[tuple[str, int], int] = {}
    for i, r in enumerate(b.rows):
        order.setdefault((r.body, r.conns), i)
    b.rows.sort(key=lambda r: order[(r.body, r.conns)])
    tool = "wrk -t1" if b.use_wrk else "bench/loadgen.py (Python client: slower than wrk)"
    pin = "proxy on core 0, upstream and load on core 1" if b.proxy_cpus else "not pinned"
    header = (
        f"{started:%Y-%m-%d %H:%M} UTC, commit {commit()}, {upstream.name}, load: {tool}, {pin}, "
        f"best of {args.rounds} interleaved rounds, command: "
        f"`python bench/run.py{' --quick' if args.quick else ''}`"
    )
    table = format_table(b.rows)
    checks = targets(b.rows, b.scaling)
    print(f"\n{header}\n\n{table}")
    print("\n".join(checks + [f"- note: {n}" for n in b.notes]))
    if b.profile:
        print(f"\n{b.profile}")
    if args.no_write:
        return 0
    if args.quick:
        gw, naive = b._row(GW, "100 B", 64), b._row(NAIVE, "100 B", 64)
        g1 = b._row(GW, "100 B", 1)
        if gw and naive:
            write_quick(
                f"| {started:%Y-%m-%d %H:%M} | {commit()} | {'wrk' if b.use_wrk else 'py'} "
                f"| {gw.load.rps:,.0f} | {naive.load.rps:,.0f} "
                f"| {ratio(gw.load.rps, naive.load.rps) or 0:.2f} | {gw.cpu_us or 0:.0f} "
                f"| {naive.cpu_us or 0:.0f} | {ratio(naive.cpu_us, gw.cpu_us) or 0:.2f} "
                f"| {g1.added_p50_us if g1 and g1.added_p50_us is not None else float('nan'):.0f} |"
            )
    else:
        notes = "\n".join(checks + [f"- note: {n}" for n in b.notes])
        profile = f"\n\n### Profiles (py-spy)\n\n{b.profile}" if b.profile else ""
        write_full(f"{header}\n\n{table}\n{notes}{profile}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
