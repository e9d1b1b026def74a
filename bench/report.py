"""The bench tables, the targets of issue 8, and bench/RESULTS.md."""

from __future__ import annotations

import math
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loadgen import LoadResult

__all__ = [
    "Row",
    "commit",
    "format_plugin_table",
    "format_table",
    "ratio",
    "targets",
    "write_full",
    "write_instructions",
    "write_plugins",
    "write_quick",
]

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = RESULTS.parents[1]
BEGIN, END = "<!-- full-table:begin -->", "<!-- full-table:end -->"
PLUGINS_BEGIN, PLUGINS_END = "<!-- plugins-table:begin -->", "<!-- plugins-table:end -->"
PLUGINS_TITLE = "## Plugins on versus off (make bench, bench/run.py --plugins)"
GUARD_TITLE = "## Regression guard (make bench-quick)"
INSTR_BEGIN, INSTR_END = "<!-- instructions-table:begin -->", "<!-- instructions-table:end -->"
INSTR_TITLE = "## Instructions per request (bench/instructions.py --write)"
QUICK_HEAD = (
    "| date (UTC) | commit | load | gateway req/s | naive req/s | x naive req/s "
    "| gateway CPU µs/req | naive CPU µs/req | x naive CPU | added p50 µs |\n"
    "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
)


@dataclass
class Row:
    proxy: str
    body: str
    conns: int
    load: LoadResult
    cpu_us: float | None  # proxy CPU per request (whole process tree)
    rss_delta_mib: float | None
    body_bytes: int
    x_naive: float | None = None
    x_direct: float | None = None
    added_p50_us: float | None = None
    note: str = ""
    awake: bool = False  # measured with the proxy's core kept out of idle (procs.keep_awake)

    @property
    def mb_s(self) -> float:
        return self.load.rps * self.body_bytes / 1e6


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None or math.isnan(v) else fmt.format(v)


def format_table(rows: list[Row]) -> str:
    head = (
        "| proxy | body | conns | req/s | p50 µs | p99 µs | added p50 µs | CPU µs/req "
        "| errors | x naive | x direct | MB/s | RSS Δ MiB |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |\n"
    )
    lines = []
    for r in rows:
        errors = r.load.non_2xx + r.load.errors
        name = r.proxy + (f" ({r.note})" if r.note else "")
        lines.append(
            f"| {name} | {r.body} | {r.conns} | {_f(r.load.rps)} | {_f(r.load.p50_us)} "
            f"| {_f(r.load.p99_us)} | {_f(r.added_p50_us)} | {_f(r.cpu_us)} | {errors} "
            f"| {_f(r.x_naive, '{:.2f}')} | {_f(r.x_direct, '{:.2f}')} "
            f"| {_f(r.mb_s, '{:,.1f}') if r.body_bytes > 1000 else '-'} "
            f"| {_f(r.rss_delta_mib, '{:+.1f}')} |"
        )
    return head + "\n".join(lines) + "\n"


def format_plugin_table(rows: list[Row], off: Row, delivery: Mapping[str, str]) -> str:
    """One plugin on (or the full chain) against the empty chain, same rounds."""
    head = (
        "| chain | req/s | x off req/s | p50 µs | p99 µs | CPU µs/req | CPU µs vs off "
        "| x off CPU | errors | delivered after SIGTERM |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
    )
    lines = []
    for r in rows:
        added = r.cpu_us - off.cpu_us if r.cpu_us is not None and off.cpu_us is not None else None
        label = r.proxy.removeprefix("gateway, ") + (" (off)" if r is off else "")
        lines.append(
            f"| {label} | {_f(r.load.rps)} | {_f(ratio(r.load.rps, off.load.rps), '{:.2f}')} "
            f"| {_f(r.load.p50_us)} | {_f(r.load.p99_us)} | {_f(r.cpu_us)} "
            f"| {'-' if r is off else _f(added, '{:+,.0f}')} "
            f"| {_f(ratio(r.cpu_us, off.cpu_us), '{:.2f}')} | {r.load.non_2xx + r.load.errors} "
            f"| {delivery.get(r.proxy, '-')} |"
        )
    return head + "\n".join(lines) + "\n"


def _find(rows: list[Row], proxy: str, body: str, conns: int, awake: bool = False) -> Row | None:
    return next(
        (
            r
            for r in rows
            if r.proxy.startswith(proxy) and (r.body, r.conns, r.awake) == (body, conns, awake)
        ),
        None,
    )


def targets(rows: list[Row], scaling: float | None = None) -> list[str]:
    """Issue 8's targets, met or not, from the rows of this run."""
    out = []

    def check(label: str, value: float | None, limit: float, le: bool, unit: str = "") -> None:
        if value is None:
            out.append(f"- {label}: not measured")
            return
        ok = value <= limit if le else value >= limit
        sign = "≤" if le else "≥"
        out.append(
            f"- {label}: {value:,.2f}{unit} (target {sign} {limit:g}{unit}) "
            f"{'MET' if ok else 'NOT MET'}"
        )

    g100 = _find(rows, "gateway, empty chain", "100 B", 64)
    g64k = _find(rows, "gateway, empty chain", "64 KiB", 64)
    g1 = _find(rows, "gateway, empty chain", "100 B", 1)
    full = _find(rows, "gateway, full chain", "100 B", 64) or _find(
        rows, "gateway, chain", "100 B", 64
    )
    fastapi = _find(rows, "FastAPI", "100 B", 64)
    hap64 = _find(rows, "HAProxy", "64 KiB", 64)
    naive100 = _find(rows, "naive aiohttp proxy", "100 B", 64)
    check("empty chain CPU/req, 100 B", g100.cpu_us if g100 else None, 130, True, " µs")
    check("empty chain req/s x naive, 100 B", g100.x_naive if g100 else None, 3, False)
    # req/s ratios suffer when other load shares the proxy's core; CPU per request does not.
    cpu_x = ratio(naive100.cpu_us, g100.cpu_us) if naive100 and g100 else None
    check("  same by CPU: naive CPU/req / gateway CPU/req", cpu_x, 3, False)
    check("empty chain CPU/req, 64 KiB", g64k.cpu_us if g64k else None, 200, True, " µs")
    check("empty chain added p50 at -c1", g1.added_p50_us if g1 else None, 150, True, " µs")
    g1a = _find(rows, "gateway, empty chain", "100 B", 1, awake=True)
    check(
        "  same, proxy core kept awake (the condition of the issue's table)",
        g1a.added_p50_us if g1a else None,
        150,
        True,
        " µs",
    )
    refs = []
    for name in ("nginx reverse proxy", "HAProxy", "naive aiohttp proxy"):
        idle, awake = _find(rows, name, "100 B", 1), _find(rows, name, "100 B", 1, awake=True)
        if idle is not None or awake is not None:
            refs.append(
                f"{name} {_f(idle.added_p50_us if idle else None)} idle / "
                f"{_f(awake.added_p50_us if awake else None)} awake"
            )
    if refs:
        out.append(
            "  - added p50 µs of the baselines, same run: " + "; ".join(refs) + " (the issue's "
            "table: nginx 62, HAProxy 67, naive 385)"
        )
    if full is not None:
        check(f"{full.proxy} CPU/req", full.cpu_us, 200, True, " µs")
        check(f"{full.proxy} req/s x naive", full.x_naive, 2, False)
        cpu_x = ratio(naive100.cpu_us, full.cpu_us) if naive100 else None
        check("  same by CPU: naive CPU/req / chain CPU/req", cpu_x, 2, False)
        fa = ratio(full.load.rps, fastapi.load.rps) if fastapi else None
        check(f"{full.proxy} req/s x FastAPI+httpx", fa, 20, False)
        fa_cpu = ratio(fastapi.cpu_us, full.cpu_us) if fastapi else None
        check("  same by CPU: FastAPI CPU/req / chain CPU/req", fa_cpu, 20, False)
    else:
        out.append("- full chain: not measured")
    mbs = ratio(g64k.mb_s, hap64.mb_s) if g64k and hap64 else None
    check("64 KiB MB/s x HAProxy", mbs, 0.8, False)
    mb_cpu = ratio(hap64.cpu_us, g64k.cpu_us) if g64k and hap64 else None
    check("  same by CPU: MB per CPU-second x HAProxy", mb_cpu, 0.8, False)
    if scaling is not None:
        out.append(
            f"- workers=2 scaling: x {scaling:.2f} req/s against workers=1 in the same rounds "
            "(workers=2 on both cores, core 1 shared with wrk and the upstream)"
        )
    return out


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD") or "unknown"
    # Other engineers' uncommitted core changes in the checkout change the figures.
    if git("status", "--porcelain", "--", "aiogateway", "plugins"):
        rev += "+wip"
    return rev


def _read() -> str:
    if RESULTS.exists():
        return RESULTS.read_text()
    return (
        "# Benchmark results\n\n"
        "Written by `make bench` (full table, replaced on each run) and\n"
        "`make bench-quick` (one line appended per run: the regression guard).\n"
        "See bench/README.md for what is measured and how.\n\n"
        "On a machine shared with other jobs req/s swings by ±50% between runs and\n"
        "CPU µs/request by about ±25%: compare the ratios within one run, the CPU\n"
        "ratios first.\n\n"
        f"## Full table (make bench)\n\n{BEGIN}\n_not run yet_\n{END}\n\n"
        f"{PLUGINS_TITLE}\n\n{PLUGINS_BEGIN}\n_not run yet_\n{PLUGINS_END}\n\n"
        f"{GUARD_TITLE}\n\n{QUICK_HEAD}"
    )


def _write_between(begin: str, end: str, title: str, section: str) -> None:
    """Replace what is between ``begin`` and ``end``; a missing section goes in
    before the regression guard (which grows at the end of the file)."""
    text = _read()
    block = f"{begin}\n{section.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    elif GUARD_TITLE in text:
        text = text.replace(GUARD_TITLE, f"{title}\n\n{block}\n\n{GUARD_TITLE}", 1)
    else:
        text = text.rstrip("\n") + f"\n\n{title}\n\n{block}\n"
    RESULTS.write_text(text)


def write_full(section: str) -> None:
    _write_between(BEGIN, END, "## Full table (make bench)", section)


def write_plugins(section: str) -> None:
    _write_between(PLUGINS_BEGIN, PLUGINS_END, PLUGINS_TITLE, section)


def write_instructions(section: str) -> None:
    _write_between(INSTR_BEGIN, INSTR_END, INSTR_TITLE, section)


def write_quick(line: str) -> None:
    text = _read()
    RESULTS.write_text(text.rstrip("\n") + "\n" + line + "\n")
