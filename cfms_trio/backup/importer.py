"""Running one backup import: its stages in worker threads, its progress, its outcome.

The supervisor decides when an import runs and tells the listeners how it ended; this module
is what happens in between. A job's progress lives in memory while it runs (the restore's write
transaction holds SQLite's single writer, so progress cannot be written to the database
meanwhile) and is written to the BackupTask row at stage boundaries and at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from pathlib import Path

import trio

from ..config import ArchiveLimits
from ..conventions import ACCOUNTS_DEFAULT_POLICY, STATUS_COMPLETED, STATUS_FAILED
from ..errors import CfmsError, ImportAborted, describe_os_error, internal_error
from ..paths import Paths
from ..paths import import_archive_relative, import_key_relative
from ..reaper import remove_tree
from ..storage import Store, backup_tasks
from .restore import RestoreOptions, StepReporter, commit_restore, unpack

log = logging.getLogger(__name__)

# Each step's share of the progress bar: (percent at its start, highest percent inside it).
STEP_PERCENT = {
    "Decrypting archive": (10, 10),
    "Extracting archive": (30, 39),
    "Loading metadata": (40, 49),
    "Importing files": (50, 59),
    "Importing folders": (60, 79),
    "Importing documents": (80, 94),
    "Finalizing import": (95, 99),
    "Restore completed": (100, 100),
}
FIRST_STEP = "Decrypting archive"  # where start_backup_import leaves a task (SPEC §8)
COMPLETED_STEP = "Restore completed"  # recorded with the restored rows, reported after them
SHUTDOWN_MESSAGE = "the server shut down during the import"


class ImportProgress:
    """Monotonic progress, written from worker threads and read by status requests."""

    def __init__(self) -> None:
        self.step = FIRST_STEP
        self.percent = STEP_PERCENT[self.step][0]
        self._lock = threading.Lock()

    def report(self, step: str, fraction: float) -> None:
        low, high = STEP_PERCENT[step]
        percent = low + int((high - low) * max(0.0, min(1.0, fraction)))
        with self._lock:
            if percent >= self.percent:
                self.step, self.percent = step, percent


class ImportJob:
    """One running import: its task row as started, its progress and its abort flag (set when
    the server shuts down; the stages check it between pieces of work), and the option of
    start_backup_import (`allow_missing_content`, see `read_backup_archive`; `accounts`, see
    `RestoreOptions`)."""

    def __init__(self, task: dict, *, passphrase: str | None = None, with_key: bool = True,
                 allow_missing_content: bool = False, accounts: str = ACCOUNTS_DEFAULT_POLICY):
        self.task = task
        self.passphrase = passphrase  # never stored: a restart fails the import anyway
        self.with_key = with_key
        self.task_id = task["backup_task_id"]
        self.allow_missing_content = allow_missing_content
        # The importer is the task's owner: their account is never replaced by the archive's.
        self.options = RestoreOptions(accounts=accounts, importer=task["username"])
        self.progress = ImportProgress()
        self.abort = threading.Event()


@dataclasses.dataclass(frozen=True)
class ImportEnvironment:
    """What an import needs from the server."""

    store: Store
    paths: Paths
    content: object  # the content storage (`content`): uploads and restored files live there
    limits: ArchiveLimits
    io_limiter: trio.CapacityLimiter


async def discard_uploads(env: ImportEnvironment, task: dict) -> None:
    """Delete an import's uploaded archive and key (and any partial uploads of them)."""
    if not task["archive_file_id"]:
        return
    gone = await env.store.write(backup_tasks.discard_import_uploads, task["archive_file_id"],
                                 task["key_file_id"])
    await trio.to_thread.run_sync(env.content.delete, gone["paths"])
    await trio.to_thread.run_sync(env.content.discard_partial_uploads, gone["task_ids"])


def failure_message(exc: BaseException) -> str:
    if isinstance(exc, CfmsError):
        return exc.message
    if isinstance(exc, OSError):
        return describe_os_error(exc, "restoring")
    return internal_error(log, "restoring", exc).message


async def run_import(env: ImportEnvironment, job: ImportJob) -> dict:
    """Restore `job`'s uploaded backup; always ends in `completed` or `failed`, and returns the
    task's final row (on cancellation, records the failure and re-raises).

    Success is recorded by the restore's own transaction (`commit_restore`); the uploads are
    deleted just before it, once read; what follows the commit is clean-up only, which the
    restart recovery finishes if a crash interrupts it.
    """
    task_id = job.task_id
    staging = env.paths.import_staging(task_id)
    mover = env.content.restored_files(staging, task_id)
    report = job.progress.report
    index = None
    try:
        contents, index = await trio.to_thread.run_sync(
            functools.partial(_unpack_uploads, env, job, staging), limiter=env.io_limiter)
        counts = {f"{kind}_count": contents.counts.get(kind, 0)
                  for kind in ("documents", "folders", "files")}
        await env.store.write(backup_tasks.update_backup_task, task_id,
                              current_step=job.progress.step,
                              progress_percent=job.progress.percent, **counts)
        # Everything is read: the uploads go now, so a client that sees `completed` never
        # finds them (a crash before the commit fails the task, as any crash does).
        await _clean_up_uploads(env, job)
        # Content storage without a rename (S3) stores the staged files now, where the rows
        # about to be committed will point; a failure below takes them back.
        await trio.to_thread.run_sync(mover.before_commit, index, contents.absent_file_ids,
                                      report, job.abort, limiter=env.io_limiter)
        outcome = {"status": STATUS_COMPLETED, "current_step": COMPLETED_STEP,
                   "progress_percent": STEP_PERCENT[COMPLETED_STEP][0],
                   "error_message": None, "warnings": contents.warnings, **counts}
        await env.store.write(commit_restore, contents, index, mover, report, job.abort,
                              task_id, outcome, job.options)
        del contents
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(mover.take_back)
            if index is not None:
                await trio.to_thread.run_sync(index.close)
        message = failure_message(exc)
        if isinstance(exc, (ImportAborted, trio.Cancelled)):
            message = SHUTDOWN_MESSAGE
        log.warning("import %s failed: %s", task_id, message)
        # Nothing was imported, so the counts say so; the step shows where it stopped.
        outcome = {"status": STATUS_FAILED, "current_step": job.progress.step,
                   "progress_percent": job.progress.percent, "error_message": message,
                   "documents_count": 0, "folders_count": 0, "files_count": 0, "warnings": []}
        if not isinstance(exc, Exception):
            with trio.CancelScope(shield=True):
                await _finish_failed(env, job, staging, outcome)
            raise
        with trio.CancelScope(shield=True):
            return await _finish_failed(env, job, staging, outcome)
    # Committed: no checkpoint before the shield, so a shutdown cannot turn this into a failure.
    with trio.CancelScope(shield=True):
        log.info("import %s completed: %s", task_id, counts)
        await trio.to_thread.run_sync(index.close)
        await trio.to_thread.run_sync(_report_completed_and_remove_staging, report, staging)
        return await env.store.read(backup_tasks.get_backup_task, task_id)


def _unpack_uploads(env: ImportEnvironment, job: ImportJob, staging: Path):
    """`restore.unpack` of the job's uploads, read from local files: the content storage's own
    when local, else copies spooled next to the staging folder (removed afterwards)."""
    task = job.task
    spool = staging.with_name(f"{staging.name}.spool")
    try:
        with contextlib.ExitStack() as stack:
            archive_path = stack.enter_context(env.content.local_copy(
                import_archive_relative(task["archive_file_id"]), spool))
            key_path = None
            if job.with_key:
                key_path = stack.enter_context(env.content.local_copy(
                    import_key_relative(task["key_file_id"]), spool))
            return unpack(archive_path, key_path, staging, env.limits, job.progress.report,
                          job.abort, job.passphrase,
                          allow_missing_content=job.allow_missing_content)
    finally:
        if spool.exists():
            remove_tree(spool)


def _report_completed_and_remove_staging(report: StepReporter, staging: Path) -> None:
    """The first step after the commit, in a worker thread like every step of the import."""
    report(COMPLETED_STEP, 1.0)
    remove_tree(staging)


async def _clean_up_uploads(env: ImportEnvironment, job: ImportJob) -> None:
    try:
        await discard_uploads(env, job.task)
    except Exception:
        log.exception("could not clean up after import %s", job.task_id)


async def _finish_failed(env: ImportEnvironment, job: ImportJob, staging: Path,
                         outcome: dict) -> dict:
    """Remove staging and uploads, record the failure; return the final row.

    Clean-up comes first, so a client that sees `failed` never finds the uploads still there;
    a crash in between leaves the task `processing`, which the restart recovery fails and
    cleans up again.
    """
    try:
        await trio.to_thread.run_sync(remove_tree, staging)
    except Exception:
        log.exception("could not clean up after import %s", job.task_id)
    await _clean_up_uploads(env, job)
    await env.store.write(backup_tasks.update_backup_task, job.task_id,
                          completed_time=time.time(), **outcome)
    return await env.store.read(backup_tasks.get_backup_task, job.task_id)
