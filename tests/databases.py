"""Which database the tests run servers on, and a fresh one per server root.

CFMS_TEST_DATABASE is unset (or `sqlite`): every server uses its default SQLite file. Set to a
PostgreSQL URL of a role allowed to create databases (`.ci/run` starts a private cluster and
sets it), every server root gets a database of its own, created on first use and dropped when
the test ends (`drop_test_databases`, an autouse fixture in conftest.py). Servers get it as
`--database` (subprocesses) or `Settings.database_url` (in-process), as an operator's would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from pathlib import Path

import pytest

TEST_DATABASE_ENV = "CFMS_TEST_DATABASE"
_databases_by_root: dict[Path, str] = {}


def admin_url() -> str | None:
    value = os.environ.get(TEST_DATABASE_ENV, "").strip()
    return None if value in ("", "sqlite") else value


def on_postgresql() -> bool:
    return admin_url() is not None


skip_on_postgresql = pytest.mark.skipif(
    on_postgresql(), reason="exercises the SQLite file itself")


def _with_dbname(url: str, dbname: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + dbname))


@contextlib.contextmanager
def _admin_connection():
    import psycopg2

    connection = psycopg2.connect(admin_url())
    connection.autocommit = True
    try:
        yield connection
    finally:
        connection.close()


def database_url_for(root: Path) -> str | None:
    """The database URL of the server on `root` (the same on every start of that root), or
    None on SQLite (the server's default file under `root`)."""
    if not on_postgresql():
        return None
    root = Path(root).resolve()
    url = _databases_by_root.get(root)
    if url is None:
        name = f"cfms_test_{secrets.token_hex(6)}"
        with _admin_connection() as connection:
            connection.cursor().execute(f'CREATE DATABASE "{name}"')
        url = _databases_by_root[root] = _with_dbname(admin_url(), name)
    return url


def serve_arguments(root: Path) -> list[str]:
    """`--database URL` for a `cfms-trio serve` subprocess on `root` ([] on SQLite)."""
    url = database_url_for(root)
    return [] if url is None else ["--database", url]


def roots_with_databases() -> set[Path]:
    return set(_databases_by_root)


def drop_databases(keep: set[Path] = frozenset()) -> None:
    """Drop the databases of every root but `keep` (their servers are stopped, or are forced
    off)."""
    doomed = [root for root in _databases_by_root if root not in keep]
    if not doomed:
        return
    with _admin_connection() as connection:
        cursor = connection.cursor()
        for root in doomed:
            name = urllib.parse.urlsplit(_databases_by_root.pop(root)).path.lstrip("/")
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def dump_tables(root: Path, tables: tuple[str, ...]) -> dict[str, list[tuple]]:
    """Every row of `tables` of the server on `root`, by id, through a connection of our own
    (blocking)."""
    url = database_url_for(root)
    if url is None:
        import sqlite3

        with contextlib.closing(sqlite3.connect(Path(root) / "content" / "cfms.db",
                                                timeout=30)) as db:
            return {table: db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
                    for table in tables}
    import psycopg2

    with contextlib.closing(psycopg2.connect(url)) as db:
        cursor = db.cursor()
        out = {}
        for table in tables:
            cursor.execute(f'SELECT * FROM "{table}" ORDER BY id')
            out[table] = cursor.fetchall()
        db.rollback()
        return out


def free_loopback_port() -> int:
    """A loopback port nobody listens on (for a database that is not there)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
