"""ns per call of normalize_path / encode_path / Router.match.

    python bench/bench_router.py

Figures include the ~20 ns of calling through functools.partial. Matching
runs against a seed-like table (~25 routes) and the same table grown
to 1,000 routes: the figures should not move with the table's size.
"""

from __future__ import annotations

import sys
import time
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiogateway.chain import EMPTY_CHAIN
from aiogateway.pathnorm import encode_path, normalize_path
from aiogateway.router import Router
from aiogateway.routes import Route
from aiogateway.settings import RouteSettings
from aiogateway.upstream import UpstreamPool

__all__ = ["main"]

# (methods, path or prefix): an auth service's client, org and internal
# routes plus prefixes for other services, like the seed's table.
SEED: list[tuple[str | None, str]] = [
    ("POST", "/v1/client/sign-up"),
    ("POST", "/v1/client/sign-in"),
    ("POST", "/v1/client/refresh"),
    ("POST", "/v1/client/sign-out"),
    ("POST", "/v1/client/password/forgot"),
    ("POST", "/v1/client/password/reset"),
    ("GET", "/v1/client/me"),
    ("PATCH", "/v1/client/me"),
    ("POST", "/v1/org"),
    ("GET", "/v1/org/{id}"),
    ("PATCH", "/v1/org/{id}"),
    ("DELETE", "/v1/org/{id}"),
    ("GET", "/v1/org/{id}/members"),
    ("POST", "/v1/org/{id}/invite"),
    ("POST", "/v1/org/invite/accept"),
    ("DELETE", "/v1/org/{id}/member/{user_id}"),
    ("PATCH", "/v1/org/{id}/member/{user_id}/role"),
    ("GET", "/auth/validate"),
    ("POST", "/auth/token/introspect"),
    ("GET", "/internal/users/{user_id}"),
    ("POST", "/internal/users/lookup"),
    (None, "prefix:/v1/billing"),
    (None, "prefix:/v1/files"),
    (None, "prefix:/v1/notifications"),
    (None, "prefix:/docs"),
]

UPSTREAM = cast(UpstreamPool, object())


def make_route(index: int, methods: str | None, where: str) -> Route:
    prefix = where.removeprefix("prefix:") if where.startswith("prefix:") else None
    return Route(
        name=f"r{index}",
        methods=frozenset({methods}) if methods else None,
        path=None if prefix else where,
        prefix=prefix,
        upstream=UPSTREAM,
        chain=EMPTY_CHAIN,
        strip_prefix=False,
        upstream_path=None,
        max_body_bytes=0,
        websocket=True,
        event=None,
        settings=RouteSettings.model_construct(upstream="bench"),
        index=index,
    )


def table(size: int) -> Router:
    specs = list(SEED)
    n = 0
    while len(specs) < size:  # a third each: static, param, prefix routes
        kind = n % 3
        if kind == 0:
            specs.append(("GET", f"/v2/svc{n}/items"))
        elif kind == 1:
            specs.append(("GET", f"/v2/svc{n}/items/{{id}}/detail"))
        else:
            specs.append((None, f"prefix:/v3/svc{n}"))
        n += 1
    return Router([make_route(i, m, w) for i, (m, w) in enumerate(specs)])


def ns_per_call(fn: Callable[[], object], number: int = 20_000) -> float:
    # CPU time of many short runs, best kept: the least disturbed by other
    # processes on a shared machine.
    best = min(timeit.repeat(fn, timer=time.process_time, number=number, repeat=30))
    return best / number * 1e9


def main() -> None:
    def show(label: str, fn: Callable[[], object]) -> None:
        print(f"  {label:<48} {ns_per_call(fn):7.0f} ns")

    print("normalize_path / encode_path")
    for raw in ("/v1/org/123/members", "/v1/org/%31%32%33/members", "/v1/%2e%2e/auth/validate"):
        show(f"normalize_path({raw!r})", partial(normalize_path, raw))
    for path in ("/v1/org/123/members", "/v1/files/a b.txt"):
        show(f"encode_path({path!r})", partial(encode_path, path))

    requests = [
        ("static", "POST", "/v1/client/sign-up"),
        ("param (2 params)", "DELETE", "/v1/org/42/member/u-7"),
        ("param, backtracking", "GET", "/v1/org/invite/members"),
        ("prefix", "GET", "/v1/billing/invoices/2026/11"),
        ("404", "GET", "/nope/x/y"),
        ("405", "PUT", "/v1/org/42"),
    ]
    small, large = table(len(SEED)), table(1_000)
    print(f"Router.match{'':<38} {len(SEED):>4} routes {1_000:>5} routes")
    for label, method, path in requests:
        # Interleaved, so both sizes see the same machine load.
        a = ns_per_call(partial(small.match, method, path))
        b = ns_per_call(partial(large.match, method, path))
        print(f"  {label:<48} {a:7.0f} ns {b:9.0f} ns")


if __name__ == "__main__":
    main()
