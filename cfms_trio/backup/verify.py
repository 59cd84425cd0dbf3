"""Verifying a published backup where it is stored (`verify_backup`, rolling re-verification).

Blocking; the server runs it in a worker thread. The archive is read once, as a stream, from
its target, and hashed on the way. What can be checked depends on what opens it:

- **archive** (a recipient-only backup, no identity given): its size and sha256 against those
  recorded when the export read it back in full (so a match means these are the very bytes
  that passed the self-check), and its envelope's structure: magic, recipient block version,
  stanza count, types and lengths, the payload header's fields. The recipient block's MAC, the
  payload key check, every segment's tag, the listings and the file hashes need the file key,
  which only an identity of a recipient (or the passphrase) unwraps: they are reported as not
  checked.
- **full** (a format 2 backup whose key file the server holds, or any backup with an identity
  or passphrase): everything an import's first stage checks: every segment, every listing and
  reference, every file's size and sha256, this server's name and depth rules.
- **deep** (`deep` with key material): then the import's commit (`restore.commit_restore`)
  runs against an empty temporary database in a private folder, which is removed afterwards:
  the backup would restore. The server's own store is never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

from ..config import ArchiveLimits
from ..errors import ArchiveError, BackupTargetError, CfmsError
from ..reaper import remove_tree
from ..storage import Store, backup_tasks, backups
from .format import KeyInfo, Unlock, summarize_archive
from ..content.local import LocalRestoredFiles
from .restore import checked_archive, commit_restore
from .staging_index import StagingIndex

LEVEL_SELF_CHECK = "self-check"
LEVEL_ARCHIVE = "archive"
LEVEL_FULL = "full"
LEVEL_DEEP = "deep"
READ_BYTES = 1024 * 1024

WITHOUT_KEY = ["the recipient block's MAC", "the payload key check",
               "every segment's authentication tag", "the listings and references",
               "every file's size and sha256"]


@dataclasses.dataclass
class VerifyReport:
    """What a verification found. `ok` False with `damaged` True: the archive is not what was
    published (the backup is marked failed). `ok` False with `damaged` False: it could not be
    checked (a wrong identity, the target unreachable); its recorded state is left alone."""

    name: str
    ok: bool
    level: str
    checked: list[str]
    not_checked: list[str]
    error: str | None = None
    damaged: bool = False
    unreachable: bool = False  # the target could not be read (a failure to report as well)
    counts: dict | None = None
    time: float = 0.0

    def as_answer(self) -> dict:
        return {"name": self.name, "result": "ok" if self.ok else "failed",
                "level": self.level, "complete": self.ok and self.level in (LEVEL_FULL,
                                                                            LEVEL_DEEP),
                "damaged": self.damaged, "unreachable": self.unreachable, "checked": self.checked,
                "not_checked": self.not_checked, "error": self.error, "counts": self.counts,
                "verified_time": self.time}


class _HashingReader:
    """Reads a stream on, counting and hashing every byte that passes."""

    def __init__(self, source: BinaryIO):
        self._source = source
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._hash.update(data)
        self.size += len(data)
        return data

    def finish(self) -> tuple[int, str]:
        """Read what is left (so the hash covers the whole archive); (size, sha256)."""
        while self.read(READ_BYTES):
            pass
        return self.size, self._hash.hexdigest()


def _hash_problem(backup: dict, size: int, sha256: str) -> str | None:
    if size != backup["size"]:
        return (f"the stored archive is {size} bytes; {backup['size']} were published "
                "(truncated or replaced)")
    if sha256 != backup["archive_sha256"]:
        return ("the stored archive's sha256 differs from the one recorded when it was "
                "published and verified (the archive was modified or damaged)")
    return None


def verify_archive(backup: dict, open_archive: Callable[[], BinaryIO], work_dir: Path,
                   limits: ArchiveLimits, *, key_info: KeyInfo | Unlock | None = None,
                   deep: bool = False) -> VerifyReport:
    """Verify one catalogued backup (see the module docstring); never raises for what it
    finds, only for the server's own failures (an OSError of its work folder)."""
    report = VerifyReport(backup["name"], False, LEVEL_ARCHIVE, [], [])
    work_dir.mkdir(mode=0o700, parents=True)
    try:
        with open_archive() as raw:
            source = _HashingReader(raw)
            try:
                if key_info is None:
                    _check_structure(backup, source, report)
                else:
                    _check_contents(backup, source, key_info, work_dir, limits, deep, report)
            except ArchiveError as exc:
                report.error = exc.message
            size, sha256 = source.finish()
        problem = _hash_problem(backup, size, sha256)
        if problem is not None:
            report.ok, report.damaged = False, True
            report.error = problem if report.error is None else f"{problem}; {report.error}"
        else:
            report.checked.insert(0, "the archive's size and sha256 (the bytes that passed "
                                     "the export's self-check)")
            if report.error is not None and key_info is None:
                report.damaged = True  # intact bytes that do not parse cannot happen
            elif report.error is not None:
                report.error += ("; the archive itself is intact (its sha256 matches), so "
                                 "the identity or passphrase given does not open it")
            else:
                report.ok = True
    except BackupTargetError as exc:
        report.ok, report.unreachable, report.error = False, True, exc.message
    except FileNotFoundError:
        report.ok, report.damaged = False, True
        report.error = "the archive is missing from its target"
    finally:
        remove_tree(work_dir)
    report.time = time.time()
    return report


def _check_structure(backup: dict, source: _HashingReader, report: VerifyReport) -> None:
    summary = summarize_archive(source)
    if summary.format != backup["format"]:
        raise ArchiveError(f"the stored archive is format {summary.format}, not "
                           f"{backup['format']} as published")
    if summary.format == 3:
        report.checked.append("the envelope's structure (magic, recipient block version, "
                              "stanza count, types and lengths, payload header fields)")
        report.checked.append(f"its recipients: {'; '.join(summary.recipients)}")
    report.not_checked.extend(WITHOUT_KEY)
    report.not_checked.append("a restore plan (deep: give an identity of a recipient)")


def _check_contents(backup: dict, source: _HashingReader, key_info, work_dir: Path,
                    limits: ArchiveLimits, deep: bool, report: VerifyReport) -> None:
    staging = work_dir / "staging"
    with checked_archive(source, key_info, staging, limits,
                         archive_size=backup["size"]) as (contents, index):
        report.level = LEVEL_FULL
        report.checked.extend(["every segment's authentication tag",
                               "the listings and references", "every file's size and sha256",
                               "names and folder depth"])
        if backup["format"] == 3:
            report.checked.insert(0, "the recipient block's MAC and the payload key check")
        report.counts = {kind: contents.counts.get(kind, 0)
                         for kind in ("folders", "documents", "files")}
        if not deep:
            report.not_checked.append("a restore plan (deep)")
            return
        _plan_restore(contents, index, staging, work_dir)
    report.level = LEVEL_DEEP
    report.checked.append("a complete restore into an empty throw-away database (nothing "
                          "committed to this server)")


class _FilesChecked(LocalRestoredFiles):
    """The throw-away restore's files: every row named as an import would name it, nothing
    moved (the check hashed each file's content and wrote none of it)."""

    def move_all(self, files, total, absent, report, abort) -> None:
        for _ in files:  # the plan's batches are read all the same
            pass


def _plan_restore(contents, index: StagingIndex, staging: Path, work_dir: Path) -> None:
    """The import's commit, run against an empty temporary store in `work_dir`."""
    store = Store(work_dir / "plan.db")
    try:
        store.upgrade_schema()
        task_id = store.run_write(backups.create_plan_task, time.time())
        mover = _FilesChecked(staging, work_dir / "restore")
        outcome = {"status": "completed", "error_message": None}
        try:
            store.run_write(commit_restore, contents, index, mover,
                            lambda *step, **counts: None, threading.Event(), task_id, outcome)
        except CfmsError as exc:
            raise ArchiveError(f"the restore plan failed: {exc.message}") from None
        planned = store.run_read(backup_tasks.get_backup_task, task_id)
        if planned["status"] != "completed":
            raise ArchiveError("the restore plan did not complete")
    finally:
        store.close()
