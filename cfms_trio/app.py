"""The server's shared state: settings, paths, store, event hub, background nursery."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from pathlib import Path

import trio

from . import auth
from .config import Settings
from .backup.supervisor import ImportSupervisor
from .events import EventHub
from .reaper import Reaper, unlink_all
from .storage import Store
from .storage import accounts
from .transfer.registry import TransferRegistry

log = logging.getLogger(__name__)
IO_THREADS = 4


@dataclasses.dataclass(frozen=True)
class Paths:
    """Every location the server writes to, all under `<root>/content/`."""

    content: Path

    @property
    def database(self) -> Path:
        return self.content / "cfms.db"

    @property
    def tls(self) -> Path:
        return self.content / "tls"

    @property
    def logs(self) -> Path:
        return self.content / "logs"

    @property
    def files(self) -> Path:
        return self.content / "files"

    @property
    def uploads(self) -> Path:
        """Partial uploads, renamed into place only once verified."""
        return self.content / "tmp" / "uploads"

    @property
    def backups(self) -> Path:
        return self.content / "backups"

    @property
    def backup_imports(self) -> Path:
        return self.content / "backups" / "import"

    @property
    def restore_files(self) -> Path:
        return self.content / "restore" / "files"

    @property
    def staging(self) -> Path:
        return self.content / "tmp" / "staging"

    @property
    def admin_password(self) -> Path:
        return self.content / "admin_password.txt"

    def all_dirs(self) -> list[Path]:
        return [self.content, self.tls, self.logs, self.files, self.uploads, self.backups,
                self.backup_imports, self.restore_files, self.staging]

    def resolve(self, relative: str) -> Path:
        """A stored relative path, checked to stay inside the content folder."""
        path = (self.content / relative).resolve()
        if not path.is_relative_to(self.content.resolve()):
            raise ValueError(f"stored path escapes the content folder: {relative!r}")
        return path


class App:
    """What every request handler can reach. Created by `open_app` before serving."""

    def __init__(self, settings: Settings, store: Store, paths: Paths):
        self.settings = settings
        self.store = store
        self.paths = paths
        self.hub = EventHub(settings.limits.listener_queue_events)
        self.nursery: trio.Nursery | None = None
        self.transfers = TransferRegistry()
        # Disk and crypto work of transfers and backups; bounded so bulk I/O cannot take
        # every worker thread from the database.
        self.io_limiter = trio.CapacityLimiter(IO_THREADS)
        self.reaper = Reaper()
        # Imports running now, by BackupTask id (their live progress and abort flags).
        self.imports: dict = {}
        self.supervisor = ImportSupervisor(self)
        self.started_time = time.time()

    def now(self) -> float:
        return time.time()

    async def remove_files(self, relative_paths: list[str]) -> None:
        """Remove deleted files' content now, or once no export is reading the store."""
        ready = self.reaper.take([self.paths.resolve(rel) for rel in relative_paths])
        if ready:
            await trio.to_thread.run_sync(unlink_all, ready, limiter=self.io_limiter)

    async def release_deferred_files(self) -> None:
        """Called when an export ends: remove what deletions queued meanwhile."""
        await self.remove_files([])


def prepare_root(settings: Settings) -> tuple[Store, Paths, str | None]:
    """Blocking first-start work: folders, database, bootstrap accounts.

    Returns the generated admin password when one was generated on this start, else None.
    """
    paths = Paths(settings.content)
    for directory in paths.all_dirs():
        directory.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.content, 0o700)
    store = Store(paths.database)
    store.create_tables()
    generated = None
    if not store.run_read(accounts.is_initialized):
        password = settings.initial_admin_password
        if not password:
            password = generated = secrets.token_urlsafe(18)
            fd = os.open(paths.admin_password, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            os.chmod(paths.admin_password, 0o600)
        store.run_write(accounts.bootstrap, auth.hash_password(password), time.time())
    return store, paths, generated
