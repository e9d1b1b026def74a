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
    python bench/run.py --plugins  # ~3 min: each plugin on versus off, and the full chain

The plugin comparison (part of the full run, or alone with --plugins) loads the
empty chain, each plugin alone and the full chain in the same interleaved
rounds, all with the same request (valid HS256 token and service key), then
checks after SIGTERM that audit rows and events match the requests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fullchain
import hotpath
from loadgen import have_wrk, run_count, run_load
from procs import ProcSet, cores, keep_awake
from report import (
    Row,
    commit,
    format_plugin_table,
    format_table,
    ratio,
    targets,
    write_full,
    write_plugins,
    write_quick,
)
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
TAIL = 0.5  # plugin rows: seconds after each load before reading CPU (queues drain)
BURST = 2000  # exact-count requests for the delivery check of rows without metrics
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One plugin row: bench/configs/full.toml cut down to ``keep`` (plugin types)."""

    name: str
    keep: tuple[str, ...]
    overrides: Mapping[str, str] = dataclasses.field(default_factory=dict)
    chain: bool = False  # the full chain (its rows also go in the main table)


VARIANTS = (
    Variant("gateway, metrics only", ("metrics",)),
    Variant("gateway, jwt-check only (valid HS256, cache on)", ("jwt-check",)),
    Variant(
        "gateway, jwt-check only, cache_size = 0", ("jwt-check",), {"jwt-check": "cache_size = 0"}
    ),
    Variant("gateway, service-key only", ("service-key",)),
    Variant("gateway, audit-log only", ("audit-log",)),
    Variant("gateway, kafka-emit only", ("kafka-emit",)),
    Variant("gateway, full chain (5 plugins)", tuple(fullchain.INSTANCES), chain=True),
)


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
        self.plugin_rows: list[Row] = []
        self.plugin_notes: list[str] = []
        self.delivery: dict[str, str] = {}

    def log(self, msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    def measure(
        self,
        t: Target,
        body: str,
        conns: int,
        seconds: float,
        tail: float = 0.0,
        awake: bool = False,
    ) -> Row:
        """One load run; ``tail`` seconds after it count too (background work finishing)."""
        proc = t.proc
        cpu0 = proc.cpu_seconds() if proc else 0.0
        rss0 = proc.rss_bytes() if proc else 0
        load = run_load(
            t.url + BODY_PATHS[body], conns, seconds, t.headers, self.side_cpus, self.use_wrk
        )
        time.sleep(tail)
        cpu = proc.cpu_seconds() - cpu0 if proc else None
        rss = (proc.rss_bytes() - rss0) / 2**20 if proc else None
        self.sent[t.name] = self.sent.get(t.name, 0) + load.requests
        per_req = cpu / load.requests * 1e6 if cpu is not None and load.requests else None
        self.log(
            f"{t.name:<40} {body:>6} c{conns:<3} {load.rps:>9,.0f} req/s  "
            f"p50 {load.p50_us:>7,.0f} µs  CPU {per_req or 0:>6,.0f} µs/req"
            + ("  (core awake)" if awake else "")
        )
        note = "proxy core kept awake" if awake else ""
        return Row(t.name, body, conns, load, per_req, rss, SIZES[body], note=note, awake=awake)

    def best_of(
        self,
        targets: list[Target],
        body: str,
        conns: int,
        seconds: float,
        keep: bool = True,
        tail: float = 0.0,
        awake: bool = False,
    ) -> dict[str, Row]:
        """Interleaved rounds; per target the round with the most req/s is kept."""
        best: dict[str, Row] = {}
        for _ in range(self.args.rounds):
            for t in targets:
                row = self.measure(t, body, conns, seconds, tail, awake)
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
            naive = self._row(NAIVE, r.body, r.conns, r.awake)
            direct = self._row("upstream", r.body, r.conns, r.awake)
            if r.proxy != NAIVE and naive is not None:
                r.x_naive = ratio(r.load.rps, naive.load.rps)
            if direct is not None and r is not direct:
                r.x_direct = ratio(r.load.rps, direct.load.rps)
                if r.conns == 1:
                    r.added_p50_us = r.load.p50_us - direct.load.p50_us

    def _row(self, prefix: str, body: str, conns: int, awake: bool = False) -> Row | None:
        return next(
            (
                r
                for r in self.rows
                if r.proxy.startswith(prefix) and (r.body, r.conns, r.awake) == (body, conns, awake)
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
    with keep_awake(b.proxy_cpus):
        b.best_of([upstream, gw], "100 B", 1, 3, awake=True)


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
    with keep_awake(b.proxy_cpus):
        b.best_of([upstream, gw, naive, *natives], "100 B", 1, secs, awake=True)
    _workers2(b, upstream, gw, secs)
    if not b.args.no_profile:
        _profile(b, gw)
        _profile(b, gw, "64 KiB", native=False)
    _plugins(b, upstream, secs, off=gw)


def _plugins_only(b: Bench, upstream: Target) -> None:
    _plugins(b, upstream, b.args.seconds or 5)


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
def _maybe(flag: bool, ctx: contextlib.AbstractContextManager[T]) -> Iterator[T | None]:
    if not flag:
        yield None
        return
    with ctx as value:
        yield value


def _variants(b: Bench) -> list[Variant]:
    """The plugin rows whose plugins are merged; the chain runs those it can."""
    missing = fullchain.missing_plugins()
    out = []
    for variant in VARIANTS:
        v = variant
        gone = [p for p in v.keep if p in missing]
        if v.chain and gone and len(gone) < len(v.keep):
            kept = tuple(p for p in v.keep if p not in missing)
            v = Variant(f"gateway, chain of {len(kept)} plugins", kept, chain=True)
            b.plugin_notes.append(
                f"full chain not measured: {', '.join(gone)} not merged yet; the chain row "
                f"runs {', '.join(kept)} (bench/configs/full.toml minus the missing plugins)"
            )
        elif gone:
            b.plugin_notes.append(f"{v.name} skipped: {', '.join(gone)} not merged yet")
            continue
        out.append(v)
    return out


def _plugins(b: Bench, upstream: Target, secs: float, off: Target | None = None) -> None:
    """Each plugin alone and the full chain against the empty chain, in the same rounds.

    Every row sends the same request (token and service key). ``off`` is the
    empty-chain gateway when one runs already. The full chain's c64 row also goes in
    the main table, and in the full run its c1 row and profile too.
    """
    variants = _variants(b)
    if not variants:
        b.plugin_notes.append("plugin rows skipped: no plugin available")
        return
    headers = [
        f"Authorization: Bearer {fullchain.token()}",
        f"X-Service-Key: {fullchain.SERVICE_KEY}",
    ]
    audit = [v.name for v in variants if "audit-log" in v.keep]
    topics = {
        v.name: f"{fullchain.TOPIC}-{i}"
        for i, v in enumerate(v for v in variants if "kafka-emit" in v.keep)
    }
    try:
        with (
            _maybe(bool(audit), fullchain.postgres(len(audit), b.side_cpus)) as pg,
            _maybe(bool(topics), fullchain.kafka(list(topics.values()), b.side_cpus)) as kafka,
        ):
            dsns = dict(zip(audit, pg.urls if pg else [], strict=True))
            if pg is not None:
                b.plugin_notes.append(f"audit-log: PostgreSQL at {pg.where}, one database per row")
            if kafka is not None:
                b.plugin_notes.append(f"kafka-emit: broker {kafka.where}, one topic per row")
            if off is None:
                off = start_gateway(b.procs, b.proxy_cpus, upstream.url, CONFIGS / "empty.toml", GW)
            off = dataclasses.replace(off, headers=headers)
            gws: dict[str, Target] = {}
            for i, v in enumerate(variants):
                cfg = fullchain.chain_config(
                    CONFIGS / "full.toml",
                    v.keep,
                    b.procs.workdir / f"plugins-{i}.toml",
                    v.overrides,
                    topics.get(v.name, fullchain.TOPIC),
                )
                env = {
                    "BENCH_DATABASE_URL": dsns.get(v.name, ""),
                    "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap if kafka else "",
                    "BENCH_JWT_SECRET": fullchain.JWT_SECRET,
                    "BENCH_SERVICE_KEY": fullchain.SERVICE_KEY,
                }
                gws[v.name] = start_gateway(
                    b.procs, b.proxy_cpus, upstream.url, cfg, v.name, env=env, headers=headers
                )
            for t in [off, *gws.values()]:
                b.warm(t)
            best = b.best_of([off, *gws.values()], "100 B", 64, secs, keep=False, tail=TAIL)
            b.plugin_rows = list(best.values())
            chain = next((gws[v.name] for v in variants if v.chain), None)
            if chain is not None:
                b.rows.append(best[chain.name])
                b.notes.append(
                    f"{chain.name}, c64: from the rounds of the plugin comparison (next "
                    "section), where its audit rows and events are counted"
                )
                if not b.args.plugins:
                    b.best_of([chain], "100 B", 1, secs)
                    if not b.args.no_profile:
                        _profile(b, chain, native=False)
            for v in variants:
                if "audit-log" in v.keep or "kafka-emit" in v.keep:
                    b.delivery[v.name] = _delivered(
                        b,
                        gws[v.name],
                        "metrics" in v.keep,
                        dsns.get(v.name),
                        kafka.bootstrap if kafka and v.name in topics else None,
                        topics.get(v.name, fullchain.TOPIC),
                    )
    except Exception as exc:  # PostgreSQL/broker unavailable: the rows are skipped, said so
        b.plugin_notes.append(f"plugin rows failed/skipped: {type(exc).__name__}: {exc}")


def _delivered(
    b: Bench, t: Target, metrics: bool, dsn: str | None, bootstrap: str | None, topic: str
) -> str:
    """Stop ``t`` with SIGTERM (it flushes), then count its audit rows and events.

    With metrics on, they must equal the requests in gateway_requests_total (rows)
    and its 2xx (events: on = "success"). Without, wrk's count is short of what the
    gateway saw (requests in flight when wrk stops): once the stores settle, exactly
    BURST more requests are sent, all answered, and rows/events must grow by that.
    """
    wrk = b.sent.get(t.name, 0)
    base: tuple[int | None, int | None] = (0 if dsn else None, 0 if bootstrap else None)
    if metrics:
        total, ok = fullchain.served(t.url)
        how = f"gateway_requests_total {total:,} (2xx: {ok:,})"
        sane = True
    else:
        base = fullchain.settled(dsn, bootstrap, topic)
        burst = run_count(t.url + "/100b", BURST, 16, t.headers, b.side_cpus)
        total, ok = burst.requests, burst.requests - burst.non_2xx
        sane = burst.errors == 0 and all(n is None or n >= wrk for n in base)
        how = (
            f"settled after the timed runs at {base[0] if dsn else base[1]:,} "
            f"(wrk completed {wrk:,}), then {total:,} more requests (2xx: {ok:,}, "
            f"socket errors: {burst.errors})"
        )
    if t.proc is not None:
        b.procs.stop(t.proc)  # SIGTERM: the gateway flushes audit rows and events
    rows, events = fullchain.delivered(dsn, bootstrap, topic)
    got = [
        None if n is None or n0 is None else n - n0
        for n, n0 in ((rows, base[0]), (events, base[1]))
    ]
    want = [total if dsn else None, ok if bootstrap else None]
    verdict = "all delivered" if sane and got == want else "MISMATCH"
    counts = "; ".join(
        f"{what} {'+' if not metrics else ''}{g:,} for {w:,} {of}"
        for what, g, w, of in (
            ("rows", got[0], want[0], "requests"),
            ("events", got[1], want[1], "2xx"),
        )
        if g is not None and w is not None
    )
    stored = ", ".join(
        f"{n:,} {what}" for n, what in ((rows, "audit rows"), (events, "events")) if n is not None
    )
    b.plugin_notes.append(f"{t.name}: {how}; after SIGTERM: {stored}: {verdict}")
    return f"{verdict} ({counts})"


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


def _plugin_section(b: Bench, header: str) -> str:
    """The plugin table with its notes, or "" when it did not run."""
    off = next((r for r in b.plugin_rows if r.proxy == GW), None)
    if off is None:
        return "\n".join(f"- note: {n}" for n in b.plugin_notes)
    about = (
        f"{header}; 100 B, wrk -c64, {TAIL} s after each load counted in CPU (queues "
        "drain); every row sends the same request: a valid HS256 token and the service key"
    )
    table = format_plugin_table(b.plugin_rows, off, b.delivery)
    notes = "\n".join(f"- note: {n}" for n in b.plugin_notes)
    return f"{about}\n\n{table}\n{notes}\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="< 1 min regression guard")
    mode.add_argument(
        "--plugins", action="store_true", help="only the plugin on/off comparison (~3 min)"
    )
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
        (_quick if args.quick else _plugins_only if args.plugins else _full)(b, upstream)
        procs.close()
    b.finish_ratios()
    order: dict[tuple[str, int], int] = {}
    for i, r in enumerate(b.rows):
        order.setdefault((r.body, r.conns), i)
    b.rows.sort(key=lambda r: order[(r.body, r.conns)])
    tool = "wrk -t1" if b.use_wrk else "bench/loadgen.py (Python client: slower than wrk)"
    pin = "proxy on core 0, upstream and load on core 1" if b.proxy_cpus else "not pinned"
    command = " ".join(["python bench/run.py", *sys.argv[1:]])
    header = (
        f"{started:%Y-%m-%d %H:%M} UTC, commit {commit()}, {upstream.name}, load: {tool}, {pin}, "
        f"best of {args.rounds} interleaved rounds, command: `{command}`"
    )
    table = format_table(b.rows)
    checks = targets(b.rows, b.scaling)
    if not args.plugins:
        print(f"\n{header}\n\n{table}")
        print("\n".join(checks + [f"- note: {n}" for n in b.notes]))
        if b.profile:
            print(f"\n{b.profile}")
    plugins = _plugin_section(b, header)
    if plugins:
        print(f"\n{plugins}")
    if args.no_write:
        return 0
    if plugins:
        write_plugins(plugins)
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
    elif not args.plugins:
        notes = "\n".join(checks + [f"- note: {n}" for n in b.notes])
        profile = f"\n\n### Profiles (py-spy)\n\n{b.profile}" if b.profile else ""
        write_full(f"{header}\n\n{table}\n{notes}{profile}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
