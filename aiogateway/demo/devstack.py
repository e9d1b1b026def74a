"""``make dev``: the whole stack on one machine, no Docker; Ctrl-C stops all of it.

1. PostgreSQL: ``DATABASE_URL`` when it answers, else an embedded throwaway
   server under the run directory (:mod:`.backing`); migrations applied.
2. Kafka: ``KAFKA_BOOTSTRAP_SERVERS`` when it answers, else a Tansu broker;
   the topics config.toml's routes emit to are created.
3. The sample services: auth-service (8001) and the echo service standing in
   for billing/chat/tpl/user (8003-8006).
4. The gateway (``aiogateway serve``) on 8002 with config.toml, the variables
   pointing at all of the above; then the URLs and a curl walkthrough.

``--demo`` (``make demo``) runs the walkthrough itself and stops; when a dev
stack is already up (``.run/devstack.json``), it runs against that one.
Children run in their own sessions, so Ctrl-C reaches only this launcher,
which stops them in order: gateway (drains, flushes events and audit rows),
services, broker, database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ..config import load_settings
from ..errors import ConfigError
from ..migrate import apply_migrations
from . import backing
from .walkthrough import Stack, curl_walkthrough, run

__all__ = ["SERVICE_VARS", "main"]

DEFAULT_DATABASE_URL = "postgresql://user:password@db:5432/gateway_db"
DEFAULT_KAFKA = "kafka:29092"
DEFAULT_SERVICE_KEY = "gateway-secret-key-2024"
#: upstream variable -> the echo port (index into --echo-ports) that stands in for it
SERVICE_VARS = ("BILLING_SERVICE_URL", "CHAT_SERVICE_URL", "TPL_SERVICE_URL", "USER_SERVICE_URL")


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path


class DevStack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_dir: Path = args.run_dir
        self.logs = self.run_dir / "logs"
        self.children: list[Child] = []
        self.postgres: backing.EmbeddedPostgres | None = None
        self.broker: backing.TansuBroker | None = None
        self.env = dict(os.environ)
        self.notes: dict[str, str] = {}

    def say(self, text: str) -> None:
        print(text, flush=True)

    # -- backing services ----------------------------------------------------------

    async def start_postgres(self) -> str:
        url = self.env.get("DATABASE_URL") or DEFAULT_DATABASE_URL
        why = await backing.postgres_reachable(url)
        if why is None:
            self.notes["postgres"] = "from DATABASE_URL"
            return url
        self.say(f"PostgreSQL at {url} not reachable ({why}); starting an embedded one")
        self.postgres = backing.EmbeddedPostgres(
            self.run_dir / f"postgres-{os.getpid()}", None if self.args.free_ports else 5455
        )
        url = await asyncio.to_thread(self.postgres.start)
        await self.postgres.create_database()
        self.notes["postgres"] = f"embedded, throwaway, data in {self.postgres.base}"
        return url

    async def start_kafka(self) -> str:
        bootstrap = self.env.get("KAFKA_BOOTSTRAP_SERVERS") or DEFAULT_KAFKA
        if await asyncio.to_thread(backing.kafka_reachable, bootstrap):
            self.notes["kafka"] = "from KAFKA_BOOTSTRAP_SERVERS"
            return bootstrap
        self.say(f"Kafka at {bootstrap} not reachable; starting a Tansu broker")
        self.broker = backing.TansuBroker(
            self.logs / "kafka.log", None if self.args.free_ports else 9092
        )
        bootstrap = await asyncio.to_thread(self.broker.start)
        self.notes["kafka"] = "Tansu, memory only"
        return bootstrap

    # -- processes -------------------------------------------------------------------

    async def spawn(self, name: str, *argv: str) -> Child:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *argv, env=self.env, stdout=out, stderr=out,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    async def wait_http(self, child: Child, url: str, within: float = 60.0) -> None:
        """Until ``url`` answers 200; fails early if ``child`` exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        last = "no answer"
        async with aiohttp.ClientSession() as session:
            while True:
                if child.proc.returncode is not None:
                    tail = child.log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{tail}")
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                        last = f"{r.status} {await r.text()}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = str(exc) or type(exc).__name__
                if loop.time() > deadline:
                    raise RuntimeError(f"{child.name}: {url} not ready after {within}s: {last}")
                await asyncio.sleep(0.1)

    def port(self, preferred: int) -> int:
        return backing.pick_port() if self.args.free_ports else preferred

    async def up(self) -> Stack:
        self.logs.mkdir(parents=True, exist_ok=True)
        if not self.env.get("JWT_SECRET"):
            self.env["JWT_SECRET"] = secrets.token_urlsafe(48)
            self.notes["jwt"] = "generated for this run"
        self.env.setdefault("INTERNAL_SERVICE_KEY", DEFAULT_SERVICE_KEY)
        host = "127.0.0.1"
        auth_port = self.port(self.args.auth_port)
        echo_ports = [self.port(p) for p in self.args.echo_ports]
        gw_port = self.port(self.args.gateway_port)
        busy = [p for p in (gw_port, auth_port, *echo_ports) if backing.pick_port(p) != p]
        if busy:
            raise RuntimeError(
                f"port(s) {', '.join(map(str, busy))} already in use (another `make dev`?); "
                "stop it, or choose others: --gateway-port, --auth-port, --echo-ports"
            )
        self.env["AUTH_SERVICE_URL"] = f"http://{host}:{auth_port}"
        for var, port in zip(SERVICE_VARS, echo_ports, strict=True):
            self.env[var] = f"http://{host}:{port}"
        self.env["DATABASE_URL"] = await self.start_postgres()
        self.env["KAFKA_BOOTSTRAP_SERVERS"] = await self.start_kafka()
        try:
            settings = load_settings(self.args.config, self.env)
        except ConfigError as exc:
            raise RuntimeError(str(exc)) from None
        topics = sorted({r.event.topic for r in settings.routes if r.event is not None})
        await backing.create_topics(self.env["KAFKA_BOOTSTRAP_SERVERS"], topics)
        applied = await asyncio.to_thread(apply_migrations, self.env["DATABASE_URL"])
        self.notes["migrations"] = ", ".join(applied) or "up to date"
        auth = await self.spawn(
            "auth-service", "-m", "aiogateway.demo.auth_service", "--host", host,
            "--port", str(auth_port),
        )  # fmt: skip
        echo_args = [a for p in echo_ports for a in ("--port", str(p))]
        echo = await self.spawn(
            "echo-service", "-m", "aiogateway.demo.echo_service", "--host", host, *echo_args
        )
        await self.wait_http(auth, f"{self.env['AUTH_SERVICE_URL']}/healthz")
        await self.wait_http(echo, f"{self.env['BILLING_SERVICE_URL']}/healthz")
        gateway = await self.spawn(
            "gateway", "-m", "aiogateway", "serve", "--config", str(self.args.config),
            "--host", self.args.host, "--port", str(gw_port),
        )  # fmt: skip
        gw_url = f"http://127.0.0.1:{gw_port}"
        await self.wait_http(gateway, f"{gw_url}/readyz")
        stack = Stack(
            gateway=gw_url,
            database_url=self.env["DATABASE_URL"],
            kafka=self.env["KAFKA_BOOTSTRAP_SERVERS"],
            service_key=self.env["INTERNAL_SERVICE_KEY"],
        )
        stack.save(self.run_dir / "devstack.json")
        self.banner(stack, auth_port, echo_ports, topics)
        return stack

    def banner(
        self, stack: Stack, auth_port: int, echo_ports: list[int], topics: list[str]
    ) -> None:
        e = self.env
        self.say(
            f"""
aiogateway dev stack is up. Ctrl-C stops everything it started.

  gateway       {stack.gateway}  ({self.args.config}; /healthz /readyz /metrics)
  API docs      {stack.gateway}/docs  (Swagger UI of {stack.gateway}/openapi.json)
  auth-service  http://127.0.0.1:{auth_port}
  echo service  ports {", ".join(map(str, echo_ports))} (billing, chat, tpl, user)
  PostgreSQL    {stack.database_url}  ({self.notes["postgres"]}; migrations: \
{self.notes["migrations"]})
  Kafka         {stack.kafka}  ({self.notes["kafka"]}; topics: {", ".join(topics)})
  logs          {self.logs}/
  JWT_SECRET    {e["JWT_SECRET"]}  ({self.notes.get("jwt", "from the environment")})

Try it (copy-paste into another terminal, in this directory):

{curl_walkthrough(stack.gateway, stack.service_key)}"""
        )

    async def down(self) -> None:
        """Stop what was started, in order: gateway first (it flushes), the database last."""
        for child in reversed(self.children):
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(child.proc.wait(), 45 if child.name == "gateway" else 10)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
                    await child.proc.wait()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)
        (self.run_dir / "devstack.json").unlink(missing_ok=True)

    async def until_stopped(self) -> int:
        """Wait for SIGINT/SIGTERM, or for a child to die (then say so)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waits = {asyncio.ensure_future(c.proc.wait()): c for c in self.children}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
        for task in [stopper, *waits]:
            task.cancel()
        code = 0
        for task in done:
            if task in waits:
                child = waits[task]
                self.say(f"{child.name} exited unexpectedly; see {child.log}")
                code = 1
        self.say("stopping the dev stack ...")
        return code


async def _running_stack(path: Path) -> Stack | None:
    """The stack a running ``make dev`` described in ``path``, if it answers."""
    try:
        stack = Stack.load(path)
        async with aiohttp.ClientSession() as s, s.get(f"{stack.gateway}/healthz") as r:
            return stack if r.status == 200 else None
    except (OSError, ValueError, TypeError, aiohttp.ClientError):
        return None


async def _main(args: argparse.Namespace) -> int:
    if args.demo and (stack := await _running_stack(args.run_dir / "devstack.json")):
        print(f"using the running dev stack ({args.run_dir / 'devstack.json'})")
        await run(stack)
        return 0
    dev = DevStack(args)
    try:
        stack = await dev.up()
        if args.demo:
            await run(stack)
            return 0
        return await dev.until_stopped()
    except (RuntimeError, OSError, AssertionError, TimeoutError) as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    finally:
        await dev.down()
        print("dev stack stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiogateway.demo.devstack", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("config.toml"))
    parser.add_argument("--run-dir", type=Path, default=Path(".run"))
    parser.add_argument("--host", default="127.0.0.1", help="the gateway's listen address")
    parser.add_argument("--gateway-port", type=int, default=8002)
    parser.add_argument("--auth-port", type=int, default=8001)
    parser.add_argument("--echo-ports", type=int, nargs=4, default=[8003, 8004, 8005, 8006])
    parser.add_argument("--free-ports", action="store_true", help="any free ports (tests)")
    parser.add_argument("--demo", action="store_true", help="run the walkthrough, then stop")
    args = parser.parse_args(argv)
    args.config = args.config.resolve()
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
