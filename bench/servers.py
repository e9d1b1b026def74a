"""The servers of a bench run: upstream, gateway, and the baseline proxies.

Each ``start_*`` returns a :class:`Target`: the process to account CPU to (or
None for the direct upstream) and the base URL to load. nginx and HAProxy run
from throwaway configs under the run's work directory, in the foreground,
without access logs.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from procs import Proc, ProcSet, free_port, wait_http

__all__ = [
    "BODY_PATHS",
    "Target",
    "have_fastapi",
    "start_fastapi",
    "start_gateway",
    "start_haproxy",
    "start_naive",
    "start_nginx_proxy",
    "start_upstream",
]

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BODY_PATHS = {"100 B": "/100b", "64 KiB": "/64k"}
_BODY_SIZES = {"/100b": 100, "/64k": 65536}


@dataclass
class Target:
    name: str
    url: str
    proc: Proc | None
    headers: list[str] = field(default_factory=list)


def _nginx_common(prefix: Path) -> str:
    temp = "\n".join(
        f"  {k}_temp_path {prefix}/{k}_temp;"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
{temp}
  default_type application/octet-stream;
"""


def start_upstream(procs: ProcSet, cpus: set[int] | None, force_builtin: bool) -> Target:
    """nginx serving two static files when installed, else bench/fast_upstream.py."""
    nginx = shutil.which("nginx")
    if nginx and not force_builtin:
        prefix = procs.workdir / "nginx-upstream"
        www = prefix / "www"
        www.mkdir(parents=True)
        for path, size in _BODY_SIZES.items():
            (www / path.lstrip("/")).write_bytes(b"x" * size)
        for p in (procs.workdir, prefix, www):
            p.chmod(0o755)  # nginx workers run as nobody when started as root
        port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            _nginx_common(prefix)
            + f"""  sendfile on;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {www};
    location / {{ }}
  }}
}}
"""
        )
        proc = procs.start("upstream-nginx", [nginx, "-c", str(conf), "-p", str(prefix)], cpus)
        target = Target("upstream (nginx)", f"http://127.0.0.1:{port}", None)
    else:
        port = free_port()
        cmd = [sys.executable, str(BENCH / "fast_upstream.py"), "--port", str(port)]
        proc = procs.start("upstream-builtin", cmd, cpus)
        target = Target("upstream (built-in)", f"http://127.0.0.1:{port}", None)
    wait_http(target.url + "/100b", proc)
    return target


def start_gateway(
    procs: ProcSet,
    cpus: set[int] | None,
    upstream: str,
    config: Path,
    name: str = "gateway",
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    headers: list[str] | None = None,
    python_args: tuple[str, ...] = (),
) -> Target:
    port = free_port()
    state = procs.workdir / f"{name}-state"
    full_env = {
        "BENCH_UPSTREAM_URL": upstream,
        "BENCH_STATE_DIR": str(state),
        "PYTHONPATH": str(REPO),
        **(env or {}),
    }
    cmd = [sys.executable, *python_args, "-m", "aiogateway", "serve", "--config", str(config)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    proc = procs.start(name, cmd, cpus, full_env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc, timeout=60)
    return Target(name, url, proc, list(headers or []))


def start_naive(procs: ProcSet, cpus: set[int] | None, upstream: str) -> Target:
    port = free_port()
    cmd = [sys.executable, str(BENCH / "naive_proxy.py"), "--port", str(port)]
    proc = procs.start("naive-aiohttp", [*cmd, "--upstream", upstream], cpus)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/100b", proc)
    return Target("naive aiohttp proxy", url, proc)


def have_fastapi() -> bool:
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


def start_fastapi(procs: ProcSet, cpus: set[int] | None, upstream: str) -> Target:
    port = free_port()
    cmd = [sys.executable, str(BENCH / "fastapi_proxy.py"), "--port", str(port)]
    proc = procs.start("fastapi-httpx", [*cmd, "--upstream", upstream], cpus)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/100b", proc)
    return Target("FastAPI+uvicorn+httpx", url, proc)


def start_nginx_proxy(procs: ProcSet, cpus: set[int] | None, upstream: str) -> Target | None:
    nginx = shutil.which("nginx")
    if nginx is None:
        return None
    prefix = procs.workdir / "nginx-proxy"
    prefix.mkdir()
    prefix.chmod(0o755)
    port = free_port()
    up = upstream.removeprefix("http://")
    conf = prefix / "nginx.conf"
    conf.write_text(
        _nginx_common(prefix)
        + f"""  upstream up {{ server {up}; keepalive 256; keepalive_requests 100000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffers 16 16k;
    }}
  }}
}}
"""
    )
    proc = procs.start("nginx-proxy", [nginx, "-c", str(conf), "-p", str(prefix)], cpus)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/100b", proc)
    return Target("nginx reverse proxy, 1 worker", url, proc)


def start_haproxy(procs: ProcSet, cpus: set[int] | None, upstream: str) -> Target | None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        return None
    port = free_port()
    conf = procs.workdir / "haproxy.cfg"
    conf.write_text(
        f"""global
  nbthread 1
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  http-reuse always
  server s1 {upstream.removeprefix("http://")}
"""
    )
    proc = procs.start("haproxy", [haproxy, "-f", str(conf), "-db"], cpus)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/100b", proc)
    return Target("HAProxy, 1 thread", url, proc)
