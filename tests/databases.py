"""Which database the tests run servers on, and a fresh one per server root.

CFMS_TEST_DATABASE is unset (or `sqlite`): every server uses its default SQLite file. Set to a
PostgreSQL URL of a role allowed to create databases (`.ci/run` starts a private cluster and
sets it), every server root gets an empty database of its own on first use; when the test
ends it is emptied and kept for a later root (`release_test_databases`, autouse in
conftest.py), and dropped at the end of the session. Servers get it as
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
_emptied: list[str] = []  # databases of this process that no root uses now, empty


def admin_url() -> str | None:
    value = os.environ.get(TEST_DATABASE_ENV, "").strip()
    return None if value in ("", "sqlite") else value


def on_postgresql() -> bool:
    return admin_url() is not None


def skip_on_postgresql_run(reason: str):
    """For a test that is the same on every backend or about SQLite alone: the PostgreSQL run
    skips it, saying why."""
    return pytest.mark.skipif(on_postgresql(), reason=reason)


skip_on_postgresql = skip_on_postgresql_run("exercises the SQLite file itself")


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
        if _emptied:
            name = _emptied.pop()
        else:
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


def release_databases(keep: set[Path] = frozenset()) -> None:
    """Give up the databases of every root but `keep`: their sessions are ended (a server that
    is still stopping is forced off) and everything in them is dropped, so the next root gets
    an empty database. Creating a database costs PostgreSQL far more than emptying one."""
    doomed = [root for root in _databases_by_root if root not in keep]
    if not doomed:
        return
    import psycopg2

    with _admin_connection() as admin:
        for root in doomed:
            url = _databases_by_root.pop(root)
            name = urllib.parse.urlsplit(url).path.lstrip("/")
            admin.cursor().execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            with contextlib.closing(psycopg2.connect(url)) as connection:
                connection.autocommit = True
                connection.cursor().execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            _emptied.append(name)


def drop_all_databases() -> None:
    """At the end of the session: every database this process made."""
    release_databases()
    if not _emptied:
        return
    with _admin_connection() as connection:
        while _emptied:
            connection.cursor().execute(f'DROP DATABASE IF EXISTS "{_emptied.pop()}" '
                                        "WITH (FORCE)")


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
