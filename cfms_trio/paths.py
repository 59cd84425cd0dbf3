"""Every on-disk location the server uses: the one place that spells a path.

Everything lives under `<root>/content/`. File rows store paths relative to that folder (so a
root can move); `Paths.resolve` turns them back into absolute paths and refuses any that would
leave it. Backup pairs (`NAME.cfms.enc` + `NAME.key`) are named here for any folder, because
the offline `cfms-trio backup export --out DIR` writes them outside a server root too.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

from .conventions import ARCHIVE_SUFFIX, KEY_SUFFIX

VERIFY_DIR_PREFIX = "verify-"  # under staging: one verify_backup's folder; others are imports
PART_SUFFIX = ".part"  # the verified prefix of an interrupted upload, kept for resuming
_PARTIAL_BACKUP_MARK = ".partial-"
_SELF_CHECK_MARK = ".self-check-"

# Relative to the content folder (what File rows store).
BACKUP_IMPORTS_RELATIVE = "backups/import"
RESTORE_FILES_RELATIVE = "restore/files"


def backup_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """The archive and key file of the backup `name` in `directory`."""
    return directory / f"{name}{ARCHIVE_SUFFIX}", directory / f"{name}{KEY_SUFFIX}"


def partial_backup_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Hidden temporary names an export writes before publishing `backup_pair`; unique per call."""
    tag = secrets.token_hex(4)
    return (directory / f".{name}{ARCHIVE_SUFFIX}{_PARTIAL_BACKUP_MARK}{tag}",
            directory / f".{name}{KEY_SUFFIX}{_PARTIAL_BACKUP_MARK}{tag}")


def partial_backups(directory: Path) -> list[Path]:
    """What interrupted exports left in `directory` (names made by `partial_backup_pair`)."""
    return list(directory.glob(f".*{_PARTIAL_BACKUP_MARK}*"))


def self_check_dir(directory: Path, name: str) -> Path:
    """The hidden folder an export reads its new archive back into before publishing it
    (removed right after; unique per call)."""
    return directory / f".{name}{_SELF_CHECK_MARK}{secrets.token_hex(4)}"


def self_check_dirs(directory: Path) -> list[Path]:
    """What interrupted self-checks left in `directory` (names made by `self_check_dir`)."""
    return [path for path in directory.glob(f".*{_SELF_CHECK_MARK}*") if path.is_dir()]


def import_archive_relative(file_id: str) -> str:
    return f"{BACKUP_IMPORTS_RELATIVE}/{file_id}{ARCHIVE_SUFFIX}"


def import_key_relative(file_id: str) -> str:
    return f"{BACKUP_IMPORTS_RELATIVE}/{file_id}{KEY_SUFFIX}"


def restore_file_relative(file_id: str) -> str:
    return f"{RESTORE_FILES_RELATIVE}/{file_id}"


@dataclasses.dataclass(frozen=True)
class Paths:
    """The folders of one server root, all under `<root>/content/`."""

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
        return self.content / BACKUP_IMPORTS_RELATIVE

    @property
    def restore_files(self) -> Path:
        return self.content / RESTORE_FILES_RELATIVE

    @property
    def staging(self) -> Path:
        return self.content / "tmp" / "staging"

    @property
    def set_aside(self) -> Path:
        """Content taken out of reach, waiting to be removed (see `LocalContent.set_aside`)."""
        return self.content / "tmp" / "removed"

    @property
    def serve_lock(self) -> Path:
        """Held (flock) by the one server using this root's SQLite database."""
        return self.content / "serve.lock"

    @property
    def admin_password(self) -> Path:
        return self.content / "admin_password.txt"

    def all_dirs(self) -> list[Path]:
        return [self.content, self.tls, self.logs, self.files, self.uploads, self.backups,
                self.backup_imports, self.restore_files, self.staging, self.set_aside]

    def backup_verify_dir(self) -> Path:
        """A private folder for one `verify_backup`: its staging files and throw-away database
        (unique per call, under the staging area that start-up clears)."""
        return self.staging / f"{VERIFY_DIR_PREFIX}{secrets.token_hex(8)}"

    def partial_upload(self, task_id: str) -> Path:
        return self.uploads / f"{task_id}{PART_SUFFIX}"

    def import_archive(self, file_id: str) -> Path:
        """Where the archive uploaded for an import lands (SPEC §8)."""
        return self.content / import_archive_relative(file_id)

    def import_key(self, file_id: str) -> Path:
        return self.content / import_key_relative(file_id)

    def import_staging(self, backup_task_id: str) -> Path:
        """The private folder an import decrypts and verifies files into before its commit."""
        return self.staging / backup_task_id

    def relative(self, path: Path) -> str:
        """`path` (under the content folder) as a File row stores it."""
        return path.relative_to(self.content).as_posix()

    def resolve(self, relative: str) -> Path:
        """A stored relative path, checked to stay inside the content folder."""
        path = (self.content / relative).resolve()
        if not path.is_relative_to(self.content.resolve()):
            raise ValueError(f"stored path escapes the content folder: {relative!r}")
        return path
