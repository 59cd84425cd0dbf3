"""Which database engine a store runs on, and everything that differs between them.

SQLite (the default: one file under content/) and PostgreSQL (`--database postgresql://...`)
run the same models and the same storage functions. What they do differently lives here and
nowhere else: opening the database, how a write transaction and a consistent read begin,
streaming a large result without holding it, inserting batches, recognising a full disk,
column types, and opening a second connection of its own (for LISTEN, say).

Columns on PostgreSQL behave as on SQLite: floats are 8 bytes; text columns are declared with the "C" collation and no length: SQLite compares
text by its bytes (BINARY), and so must PostgreSQL whatever locale its cluster has, or names
would sort differently per backend and the export's merged listings (sorted by id) would
disagree with Python's string order; and SQLite ignores VARCHAR lengths, so a name the
protocol accepts (or an upstream archive brings) must fit on PostgreSQL too.
"""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Iterable, Iterator

import peewee as pw
from playhouse.pool import PooledPostgresqlDatabase

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# One pool per store: its readers, its writer, and long exports running in worker threads.
POSTGRES_POOL_CONNECTIONS = 16
POSTGRES_POOL_WAIT_S = 60
POSTGRES_CONNECT_TIMEOUT_S = 10
POSTGRES_DISK_FULL = "53100"  # SQLSTATE disk_full
POSTGRES_TEXT_COLLATION = '"C"'
# Rows fetched per round trip from a server-side cursor, and rows per multi-row INSERT.
STREAM_FETCH_ROWS = 2_000
INSERT_STATEMENT_ROWS = 1_000
# Every instance upgrading the schema of one PostgreSQL database takes this advisory lock first.
SCHEMA_LOCK_KEY = 0x63666D73  # "cfms"

_cursor_numbers = itertools.count()


@dataclasses.dataclass(frozen=True)
class DatabaseLocation:
    """Where a store's database is: a SQLite file, or a PostgreSQL database."""

    kind: str
    sqlite_path: Path | None = None
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = None
    dbname: str | None = None

    def describe(self) -> str:
        """For logs and messages: never the password."""
        if self.kind == SQLITE:
            return f"SQLite database {self.sqlite_path}"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"PostgreSQL database postgresql://{user}{self.host or ''}{port}/{self.dbname}"


def sqlite_at(path: Path) -> DatabaseLocation:
    return DatabaseLocation(SQLITE, sqlite_path=Path(path))


def parse_database_url(text: str) -> DatabaseLocation:
    """`postgresql://USER[:PASSWORD]@HOST[:PORT]/DB` or `sqlite:///ABSOLUTE/PATH`; a missing
    password is left to libpq (PGPASSWORD, ~/.pgpass). Raises ValueError naming what is wrong."""
    parsed = urllib.parse.urlsplit(text.strip())
    if parsed.scheme == "sqlite":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ValueError(f"not a SQLite database URL: {text!r} (use sqlite:///ABSOLUTE/PATH)")
        return sqlite_at(Path(urllib.parse.unquote(parsed.path)))
    if parsed.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"unsupported database URL {_without_password(text)!r}: use "
                         "postgresql://USER@HOST:PORT/DATABASE or sqlite:///PATH")
    dbname = urllib.parse.unquote(parsed.path.lstrip("/"))
    if not dbname or "/" in dbname:
        raise ValueError(f"database URL {_without_password(text)!r} names no database "
                         "(postgresql://USER@HOST:PORT/DATABASE)")
    try:
        port = parsed.port
    except ValueError:
        raise ValueError(f"database URL {_without_password(text)!r} has a bad port") from None
    if parsed.query or parsed.fragment:
        raise ValueError(f"database URL {_without_password(text)!r}: options after '?' or '#' "
                         "are not supported")
    return DatabaseLocation(
        POSTGRESQL, host=parsed.hostname or None, port=port,
        user=urllib.parse.unquote(parsed.username) if parsed.username else None,
        password=urllib.parse.unquote(parsed.password) if parsed.password else None,
        dbname=dbname)


def _without_password(text: str) -> str:
    parsed = urllib.parse.urlsplit(text.strip())
    if parsed.password is None:
        return text
    return text.replace(f":{parsed.password}@", ":***@", 1)


def _postgres_params(location: DatabaseLocation) -> dict:
    params = {"host": location.host, "port": location.port, "user": location.user,
              "password": location.password, "connect_timeout": POSTGRES_CONNECT_TIMEOUT_S,
              "application_name": "cfms-trio"}
    return {key: value for key, value in params.items() if value is not None}


def open_database(location: DatabaseLocation) -> pw.Database:
    """The peewee database of a store: SQLite in WAL mode, or a PostgreSQL connection pool."""
    if location.kind == SQLITE:
        return pw.SqliteDatabase(
            str(location.sqlite_path),
            pragmas={"journal_mode": "wal", "synchronous": "normal", "foreign_keys": 1,
                     "busy_timeout": SQLITE_BUSY_TIMEOUT_MS, "cache_size": -32_000},
            check_same_thread=False)
    return PooledPostgresqlDatabase(
        location.dbname, max_connections=POSTGRES_POOL_CONNECTIONS,
        timeout=POSTGRES_POOL_WAIT_S, **_postgres_params(location))


def open_side_connection(location: DatabaseLocation) -> pw.Database:
    """A database of its own, outside the store's pool and writer, for work that keeps a
    connection to itself (PostgreSQL LISTEN). The caller connects and closes it."""
    if location.kind == SQLITE:
        return pw.SqliteDatabase(str(location.sqlite_path), check_same_thread=False,
                                 pragmas={"busy_timeout": SQLITE_BUSY_TIMEOUT_MS})
    return pw.PostgresqlDatabase(location.dbname, **_postgres_params(location))


def is_postgresql(database: pw.Database) -> bool:
    return isinstance(database, pw.PostgresqlDatabase)


def write_transaction(database: pw.Database):
    """A write transaction. SQLite takes its one write lock at the start (IMMEDIATE), so a
    write never fails half-way on a lock; PostgreSQL locks rows as it writes them."""
    if is_postgresql(database):
        return database.atomic()
    return database.atomic("IMMEDIATE")


def snapshot_transaction(database: pw.Database):
    """A read transaction that sees one consistent state however long it lasts (WAL on
    SQLite; REPEATABLE READ on PostgreSQL)."""
    if is_postgresql(database):
        return database.atomic("REPEATABLE READ")
    return database.atomic()


def lock_schema(database: pw.Database) -> None:
    """Inside the schema upgrade's transaction: one instance upgrades at a time (SQLite's
    IMMEDIATE transaction already excludes every other writer)."""
    if is_postgresql(database):
        database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))


def columns_as_on_sqlite(models: Iterable[type[pw.Model]]) -> None:
    """Before the tables are created on PostgreSQL: text columns compare and sort by their
    bytes and hold any length, floats (every time stamp) and sequences have 8 bytes, as
    SQLite's do (peewee's FloatField would be a 4-byte REAL there, a time off by minutes)."""
    for model in models:
        for field in model._meta.sorted_fields:
            if field.field_type == "FLOAT":
                field.field_type = "DOUBLE"
            elif field.field_type == "AUTO":  # SQLite's INTEGER PRIMARY KEY has 8 bytes
                field.field_type = "BIGAUTO"
            if field.field_type in ("VARCHAR", "TEXT", "CHAR"):
                field.collation = POSTGRES_TEXT_COLLATION
                if isinstance(field, pw.CharField):
                    field.max_length = None


def streamed_rows(database: pw.Database, query) -> Iterator[tuple]:
    """The rows of `query` as tuples, fetched a piece at a time: SQLite steps its cursor;
    PostgreSQL reads a server-side cursor, which needs the caller's open transaction and
    ends with it."""
    if not is_postgresql(database):
        return iter(database.execute(query))
    return _server_side_rows(database, query)


def _server_side_rows(database: pw.Database, query) -> Iterator[tuple]:
    if not database.in_transaction():
        raise RuntimeError("a streamed read needs an open transaction")
    sql, params = query.sql()
    name = f"cfms_stream_{next(_cursor_numbers)}"
    cursor = database.cursor()
    cursor.execute(f"DECLARE {name} NO SCROLL CURSOR FOR {sql}", params)
    while True:
        cursor.execute(f"FETCH FORWARD {STREAM_FETCH_ROWS} FROM {name}")
        rows = cursor.fetchall()
        if not rows:
            break
        yield from rows
    cursor.execute(f"CLOSE {name}")


def insert_batch(database: pw.Database, table: str, columns: list[str],
                 rows: list[tuple]) -> None:
    """Insert `rows` (tuples in the order of `columns`) through the store's own connection,
    in the caller's transaction: executemany on SQLite (it runs in-process); multi-row
    INSERTs on PostgreSQL (one round trip per INSERT_STATEMENT_ROWS rows, not per row)."""
    names = ", ".join(f'"{column}"' for column in columns)
    one_row = "(" + ", ".join([database.param] * len(columns)) + ")"
    cursor = database.cursor()
    if not is_postgresql(database):
        cursor.executemany(f'INSERT INTO "{table}" ({names}) VALUES {one_row}', rows)
        return
    for start in range(0, len(rows), INSERT_STATEMENT_ROWS):
        piece = rows[start:start + INSERT_STATEMENT_ROWS]
        values = ", ".join([one_row] * len(piece))
        cursor.execute(f'INSERT INTO "{table}" ({names}) VALUES {values}',
                       [value for row in piece for value in row])


def is_database_full(exc: BaseException) -> bool:
    """The disk under the database is full: SQLITE_FULL, or PostgreSQL's disk_full. peewee
    keeps the driver's exception as its first argument; SQLite rolls the transaction back
    itself, so what reaches us may be peewee's failed rollback, with the full write as its
    context."""
    seen: BaseException | None = exc
    while seen is not None:
        original = seen.args[0] if seen.args else seen
        for candidate in (seen, original):
            if getattr(candidate, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                return True
            if getattr(candidate, "pgcode", None) == POSTGRES_DISK_FULL:
                return True
        seen = seen.__context__
    return False
