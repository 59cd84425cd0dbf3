"""Owns the database, its models and the threads that may use it.

Driver errors are translated here, once, into the project's error hierarchy: a constraint the
database enforces (a duplicate id or name written by two requests at once) is a 409 Conflict for
the client, never a 500.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import peewee as pw
import trio

from ..errors import Conflict, InsufficientStorage, StartupError
from . import backends, migrations
from . import models as models_module
from .backends import DatabaseLocation

log = logging.getLogger(__name__)
T = TypeVar("T")

READER_THREADS = 4


DATABASE_FULL_MESSAGE = ("the server ran out of disk space while writing to its database; "
                         "nothing was changed")


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
        if not backends.is_database_full(exc):
            raise
        log.warning("database write failed: %s", exc)
        raise InsufficientStorage(DATABASE_FULL_MESSAGE) from None


class Store:
    """A database plus the limiters that keep blocking work off the event loop.

    Every write goes through a limiter of one thread, inside one transaction per call (SQLite
    allows one writer; on PostgreSQL the one writer keeps the same order of writes within an
    instance). Reads run concurrently on a few threads (WAL mode lets SQLite's proceed while
    a write is in progress). SQLite connections stay open per thread; PostgreSQL ones come
    from a pool for the length of one call. Limiters are created lazily inside `trio.run`.
    """

    def __init__(self, location: DatabaseLocation | Path):
        if isinstance(location, Path):
            location = backends.sqlite_at(location)
        self.location = location
        self.database = backends.open_database(location)
        self.m = models_module.build_models(self.database)
        self._read_limiter: trio.CapacityLimiter | None = None
        self._write_limiter: trio.CapacityLimiter | None = None

    @property
    def backend(self) -> str:
        """backends.SQLITE or backends.POSTGRESQL."""
        return self.location.kind

    # -- lifecycle (blocking) -------------------------------------------------------------

    def upgrade_schema(self) -> int | None:
        """Create the schema of a new database or migrate an older one to this code's version
        (see migrations.py); return the version found (None: the database was empty). Raises
        SchemaTooNew for a database of a newer release, StartupError when the database cannot
        be reached."""
        where = self.location.describe()
        try:
            self.database.connect(reuse_if_open=True)
        except pw.ImproperlyConfigured:
            raise StartupError(f"cannot open the {where}: its driver is not installed (pip "
                               "install 'cfms-trio[postgresql]')") from None
        except pw.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StartupError(f"cannot open the {where}: {reason}") from None
        try:
            return migrations.upgrade(self.database, self.m, where)
        finally:
            if backends.is_postgresql(self.database):
                self.database.close()

    def schema_version(self) -> int | None:
        with self._connection():
            return migrations.current_version(self.database, self.m)

    def open_side_connection(self) -> pw.Database:
        """A database of its own on the same location, outside the pool and the writer (for
        PostgreSQL LISTEN, which holds a connection); the caller connects and closes it."""
        return backends.open_side_connection(self.location)

    def close(self) -> None:
        if isinstance(self.database, backends.PooledPostgresqlDatabase):
            self.database.close_all()
        elif not self.database.is_closed():
            self.database.close()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        """This thread's connection, open for the call: SQLite's stays open for the thread's
        next call; PostgreSQL's goes back to the pool (unless it was open already)."""
        if not backends.is_postgresql(self.database):
            self.database.connect(reuse_if_open=True)
            yield
            return
        opened = self.database.is_closed()
        if opened:
            self.database.connect()
        try:
            yield
        finally:
            if opened:
                self.database.close()

    # -- offloading ----------------------------------------------------------------------

    def _limiters(self) -> tuple[trio.CapacityLimiter, trio.CapacityLimiter]:
        if self._read_limiter is None:
            self._read_limiter = trio.CapacityLimiter(READER_THREADS)
            self._write_limiter = trio.CapacityLimiter(1)
        return self._read_limiter, self._write_limiter

    def run_read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(models, *args)` in the calling thread with a connection open."""
        with self._connection(), translated_driver_errors():
            return fn(self.m, *args, **kwargs)

    def run_write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(models, *args)` in the calling thread inside one write transaction."""
        with self._connection(), translated_driver_errors():
            with backends.write_transaction(self.database):
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
