"""Database schema: apply and roll back the yoyo migrations in ``migrations/``.

``aiogateway migrate`` and the audit-log plugin's ``migrate = true`` both call
:func:`apply_migrations`. yoyo is synchronous and speaks PostgreSQL through
psycopg 3 (``postgresql+psycopg://``); callers in the event loop run these
functions in a thread. Concurrent callers (several workers starting at once)
are serialised by yoyo's lock table, so each migration is applied once.

Where the SQL files are: ``aiogateway/migrations`` is a symlink to the
top-level ``migrations/`` directory, and ``setup.cfg`` ships
``aiogateway/migrations/*.sql`` as package data, so a source checkout and
``pip install .`` resolve the same path; the top-level directory is the
fallback if the symlink did not survive a copy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "MigrationError",
    "applied_migrations",
    "apply_migrations",
    "migrations_dir",
    "rollback_migrations",
    "yoyo_url",
]

log = logging.getLogger("aiogateway.migrate")

_SCHEMES = {"postgres", "postgresql", "postgresql+psycopg"}


class MigrationError(Exception):
    """A migration could not be read, or applied, or the database was unusable."""


def migrations_dir() -> Path:
    """The directory holding the ``NNNN_name.sql`` / ``.rollback.sql`` files."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if any(candidate.glob("*.sql")):
            return candidate
    raise MigrationError(f"no migrations found in {here / 'migrations'} or {here.parent}")


def yoyo_url(database_url: str, connect_timeout: float | None = None) -> str:
    """``postgresql://…`` (asyncpg's form) as yoyo's psycopg 3 backend wants it."""
    parts = urlsplit(database_url)
    if parts.scheme not in _SCHEMES:
        raise MigrationError(
            f"database URL must start with postgresql:// (got {parts.scheme or 'no'} scheme)"
        )
    query = dict(parse_qsl(parts.query))
    if connect_timeout is not None:
        query.setdefault("connect_timeout", str(max(1, round(connect_timeout))))
    return urlunsplit(parts._replace(scheme="postgresql+psycopg", query=urlencode(query)))


def _backend(database_url: str, connect_timeout: float | None) -> Any:
    from yoyo import get_backend

    try:
        return get_backend(yoyo_url(database_url, connect_timeout))
    except MigrationError:
        raise
    except Exception as exc:  # psycopg.OperationalError, yoyo.BadConnectionURI, ...
        raise MigrationError(f"cannot connect to the database: {_one_line(exc)}") from exc


def _read(directory: Path | None) -> Any:
    from yoyo import read_migrations

    return read_migrations(str(directory or migrations_dir()))


def apply_migrations(
    database_url: str,
    *,
    directory: Path | None = None,
    connect_timeout: float | None = 10.0,
    lock_timeout: float = 60.0,
) -> list[str]:
    """Apply every migration not applied yet; return their ids, in order applied."""
    backend = _backend(database_url, connect_timeout)
    try:
        migrations = _read(directory)
        with backend.lock(timeout=lock_timeout):
            todo = backend.to_apply(migrations)
            ids = [m.id for m in todo]
            if ids:
                log.info("applying migrations %s", ", ".join(ids))
            backend.apply_migrations(todo)
        return ids
    except MigrationError:
        raise
    except Exception as exc:
        raise MigrationError(f"migration failed: {_one_line(exc)}") from exc
    finally:
        backend.connection.close()


def rollback_migrations(
    database_url: str,
    count: int = 1,
    *,
    directory: Path | None = None,
    connect_timeout: float | None = 10.0,
    lock_timeout: float = 60.0,
) -> list[str]:
    """Roll back the ``count`` most recently applied migrations; return their ids."""
    backend = _backend(database_url, connect_timeout)
    try:
        migrations = _read(directory)
        with backend.lock(timeout=lock_timeout):
            todo = backend.to_rollback(migrations)[:count]
            ids = [m.id for m in todo]
            if ids:
                log.info("rolling back migrations %s", ", ".join(ids))
            backend.rollback_migrations(todo)
        return ids
    except MigrationError:
        raise
    except Exception as exc:
        raise MigrationError(f"rollback failed: {_one_line(exc)}") from exc
    finally:
        backend.connection.close()


def applied_migrations(
    database_url: str, *, directory: Path | None = None, connect_timeout: float | None = 10.0
) -> list[str]:
    """Ids of the migrations applied to the database, oldest first."""
    backend = _backend(database_url, connect_timeout)
    try:
        migrations = _read(directory)
        applied = backend.get_applied_migration_hashes()
        return [m.id for m in migrations if m.hash in applied]
    finally:
        backend.connection.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
