"""The ``aiogateway`` command: serve, check, migrate, openapi."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiogateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, default=Path("config.toml"))
    serve.add_argument("--host", help="overrides server.host")
    serve.add_argument("--port", type=int, help="overrides server.port")
    serve.add_argument("--workers", type=int, help="overrides server.workers")
    # Internal: how the supervisor starts each worker process.
    serve.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="validate config.toml and print the route table")
    check.add_argument("--config", type=Path, default=Path("config.toml"))

    openapi = sub.add_parser("openapi", help="print the gateway's OpenAPI document")
    openapi.add_argument("--config", type=Path, default=Path("config.toml"))
    openapi.add_argument(
        "--fetch", action="store_true", help="merge the upstreams' own documents (fetched now)"
    )
    openapi.add_argument("--output", type=Path, help="write to this file instead of stdout")

    migrate = sub.add_parser("migrate", help="apply the audit-log database migrations")
    migrate.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="PostgreSQL URL (default: $DATABASE_URL)",
    )
    migrate.add_argument("--rollback", type=int, metavar="N", help="roll back the last N instead")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .config import load_table

    if args.worker_id is not None:
        from .runner import run_gateway

        return run_gateway(
            args.config,
            host=args.host,
            port=args.port,
            worker_id=args.worker_id,
            reuse_port=args.reuse_port,
            parent_pid=os.getppid(),  # the supervisor: stop if it dies
        )
    try:
        # The whole table, not only the settings: plugin types, chains and
        # upstream references must be checked before a supervisor starts
        # workers that would each fail on them and be restarted forever.
        settings = load_table(args.config).settings
    except ConfigError as exc:
        print(f"aiogateway: {exc}", file=sys.stderr)
        return 2
    server = settings.server
    workers = args.workers if args.workers is not None else server.workers
    if workers > 1:
        from .supervisor import supervise

        host = args.host if args.host is not None else server.host
        port = args.port if args.port is not None else server.port
        return supervise(args.config, host, port, workers, server.shutdown_timeout)
    from .runner import run_gateway

    return run_gateway(args.config, host=args.host, port=args.port)


def _check(args: argparse.Namespace) -> int:
    from .build import format_route_table
    from .config import load_table

    try:
        table = load_table(args.config)
    except ConfigError as exc:
        print(f"aiogateway: {exc}", file=sys.stderr)
        return 2
    print(format_route_table(table))
    print(f"{args.config}: OK, {len(table.routes)} routes")
    return 0


def _openapi(args: argparse.Namespace) -> int:
    import asyncio

    import orjson

    from .config import load_table
    from .docs import fetch_documents
    from .openapi import build_document

    try:
        table = load_table(args.config)
    except ConfigError as exc:
        print(f"aiogateway: {exc}", file=sys.stderr)
        return 2
    docs = table.settings.docs
    fetched = asyncio.run(fetch_documents(table, docs.fetch_timeout)) if args.fetch else {}
    text = orjson.dumps(build_document(table, docs, fetched), option=orjson.OPT_INDENT_2) + b"\n"
    if args.output is not None:
        args.output.write_bytes(text)
    else:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .migrate import apply_migrations, rollback_migrations

    if not args.database_url:
        print("aiogateway: migrate needs --database-url or $DATABASE_URL", file=sys.stderr)
        return 2
    try:
        if args.rollback:
            done = rollback_migrations(args.database_url, args.rollback)
            print(f"rolled back: {', '.join(done) or 'nothing'}")
        else:
            done = apply_migrations(args.database_url)
            print(f"applied: {', '.join(done) or 'nothing (up to date)'}")
    except Exception as exc:
        print(f"aiogateway: migrate failed: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"serve": _serve, "check": _check, "migrate": _migrate, "openapi": _openapi}
    return commands[args.command](args)
