"""Owns the database, its models and the threads that may use it.

Driver errors are translated here, once, into the project's error hierarchy: a constraint the
database enforces (a duplicate id or name written by two requests at once) is a 409 Conflict for
the client, never a 500.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import peewee as pw
import trio
from playhouse.migrate import SchemaMigrator, migrate

from ..errors import Conflict, InsufficientStorage
from . import models as models_module

log = logging.getLogger(__name__)
T = TypeVar("T")

READER_THREADS = 4
SQLITE_BUSY_TIMEOUT_MS = 30_000


DATABASE_FULL_MESSAGE = ("the server ran out of disk space while writing to its database; "
                         "nothing was changed")


def _is_database_full(exc: BaseException) -> bool:
    """SQLITE_FULL: the disk (or the database's size limit) is full. peewee keeps the
    driver's exception as its first argument; SQLite rolls the transaction back itself, so
    what reaches us may be peewee's failed rollback, with the full write as its context."""
    seen: BaseException | None = exc
    while seen is not None:
        original = seen.args[0] if seen.args else seen
        for candidate in (seen, original):
            if getattr(candidate, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                return True
        seen = seen.__context__
    return False


@contextlib.contextmanager
def translated_driver_errors() -> Iterator[None]:
    """Constraint violations become Conflict (409), a full disk InsufficientStorage (507);
    other driver errors stay internal (500)."""
    try:
        yield
    except pw.IntegrityError as exc:
        log.info("write refused by a database constraint: %s", exc)
        raise Conflict("the change conflicts with an object that already exists "
                       "(same id or name); reload and try again") from None
    except pw.OperationalError as exc:
        if not _is_database_full(exc):
            raise
        log.warning("database write failed: %s", exc)
        raise InsufficientStorage(DATABASE_FULL_MESSAGE) from None


class Store:
    """A database plus the limiters that keep blocking work off the event loop.

    SQLite allows one writer: every write goes through a limiter of one thread, inside one
    transaction per call. Reads run concurrently on a few threads (WAL mode lets them proceed
    while a write is in progress). Limiters are created lazily inside `trio.run`.
    """

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self.database = pw.SqliteDatabase(
            str(db_path),
            pragmas={
                "journal_mode": "wal",
                "synchronous": "normal",
                "foreign_keys": 1,
                "busy_timeout": SQLITE_BUSY_TIMEOUT_MS,
                "cache_size": -32_000,
            },
            check_same_thread=False,
        )
        self.m = models_module.build_models(self.database)
        self._read_limiter: trio.CapacityLimiter | None = None
        self._write_limiter: trio.CapacityLimiter | None = None

    # -- lifecycle (blocking) -------------------------------------------------------------

    def create_tables(self) -> None:
        """Create missing tables, and the columns of ADDED_COLUMNS missing from a database made
        by an earlier version (idempotent: the store has no migrations beyond this)."""
        with self.database.connection_context():
            self.database.create_tables(self.m.all)
            for model_name, field_name in models_module.ADDED_COLUMNS:
                self._add_column_if_missing(getattr(self.m, model_name), field_name)

    def _add_column_if_missing(self, model, field_name: str) -> None:
        field = model._meta.fields[field_name]
        present = {column.name for column in self.database.get_columns(model._meta.table_name)}
        if field.column_name not in present:
            log.info("adding column %s.%s", model._meta.table_name, field.column_name)
            migrator = SchemaMigrator.from_database(self.database)
            with self.database.atomic():
                migrate(migrator.add_column(model._meta.table_name, field.column_name, field))

    def close(self) -> None:
        if not self.database.is_closed():
            self.database.close()

    # -- offloading ----------------------------------------------------------------------

    def _limiters(self) -> tuple[trio.CapacityLimiter, trio.CapacityLimiter]:
        if self._read_limiter is None:
            self._read_limiter = trio.CapacityLimiter(READER_THREADS)
            self._write_limiter = trio.CapacityLimiter(1)
        return self._read_limiter, self._write_limiter

    def run_read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(models, *args)` in the calling thread with a connection open."""
        self.database.connect(reuse_if_open=True)
        with translated_driver_errors():
            return fn(self.m, *args, **kwargs)

    def run_write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(models, *args)` in the calling thread inside one write transaction."""
        self.database.connect(reuse_if_open=True)
        with translated_driver_errors():
            with self.database.atomic("IMMEDIATE"):
                return fn(self.m, *args, **kwargs)

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking read function in a worker thread and return its plain result."""
        read_limiter, _ = self._limiters()
        return await trio.to_thread.run_sync(
            functools.partial(self.run_read, fn, *args, **kwargs), limiter=read_limiter
        )

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking write function in the single writer thread, in one transaction."""
        _, write_limiter = self._limiters()
        return await trio.to_thread.run_sync(
            functools.partial(self.run_write, fn, *args, **kwargs), limiter=write_limiter
        )
