"""Running one backup import in the background: stages, progress, outcome, cleanup, event.

A job's progress lives in memory while it runs (the restore's write transaction holds
SQLite's single writer, so progress cannot be written to the database meanwhile) and is written
to the BackupTask row at stage boundaries and at the end.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import TYPE_CHECKING

import trio

from ..errors import CfmsError
from ..protocol import event
from ..storage import backup_rows
from .gc_pause import cyclic_gc_paused
from .restore import FileMover, ImportAborted, commit_restore, describe_os_error, remove_tree, unpack

if TYPE_CHECKING:
    from ..app import App

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
RESTORE_PREFIX = "restore/files"
COMPLETED_EVENT = "backup_import_completed"
# Crash tests only: an import reaching the step named here holds still (until the server shuts
# down, at most PAUSE_LIMIT_S), so a test can kill the process at exactly that point.
PAUSE_AT_STEP_ENV = "CFMS_TEST_PAUSE_AT_STEP"
PAUSE_LIMIT_S = 600


class ImportProgress:
    """Monotonic progress, written from worker threads and read by status requests."""

    def __init__(self) -> None:
        # Where start_backup_import leaves the task: the first step of SPEC §8.
        self.step = "Decrypting archive"
        self.percent = STEP_PERCENT[self.step][0]
        self._lock = threading.Lock()

    def report(self, step: str, fraction: float) -> None:
        low, high = STEP_PERCENT[step]
        percent = low + int((high - low) * max(0.0, min(1.0, fraction)))
        with self._lock:
            if percent >= self.percent:
                self.step, self.percent = step, percent


class ImportJob:
    def __init__(self, task: dict):
        self.task = task
        self.task_id = task["backup_task_id"]
        self.progress = ImportProgress()
        self.abort = threading.Event()

    def stage_reporter(self):
        """The progress callback handed to the stages, which run in worker threads.

        With $CFMS_TEST_PAUSE_AT_STEP set it blocks its caller at that step, which is why it
        must never be called on the event loop's thread.
        """
        pause_at = os.environ.get(PAUSE_AT_STEP_ENV)
        if not pause_at:
            return self.progress.report

        def report(step: str, fraction: float) -> None:
            self.progress.report(step, fraction)
            if step == pause_at:
                log.warning("import %s paused at %r ($%s)", self.task_id, step,
                            PAUSE_AT_STEP_ENV)
                self.abort.wait(PAUSE_LIMIT_S)

        return report


def backup_event_audience(owner: str):
    """Who may see a backup task's events: its owner and backup administrators."""
    def visible(principal) -> bool:
        return (principal.username == owner or principal.has("import_backup")
                or principal.has("export_backup"))
    return visible


def publish_outcome(app: "App", task: dict) -> None:
    app.hub.publish(event(COMPLETED_EVENT, {
        "backup_task_id": task["backup_task_id"], "status": task["status"],
        "documents_imported": task["documents_count"] if task["status"] == "completed" else 0,
        "folders_imported": task["folders_count"] if task["status"] == "completed" else 0,
        "files_imported": task["files_count"] if task["status"] == "completed" else 0,
        "error": task["error_message"]}), backup_event_audience(task["username"]))


async def discard_uploads(app: "App", task: dict) -> None:
    """Delete an import's uploaded archive and key (and any partial uploads of them)."""
    if not task["archive_file_id"]:
        return
    gone = await app.store.write(backup_rows.discard_import_uploads, task["archive_file_id"],
                                 task["key_file_id"])
    paths = [app.paths.resolve(rel) for rel in gone["paths"]]
    paths += [app.paths.uploads / f"{task_id}.part" for task_id in gone["task_ids"]]

    def unlink_all():
        for path in paths:
            path.unlink(missing_ok=True)

    await trio.to_thread.run_sync(unlink_all)


def failure_message(exc: BaseException) -> str:
    if isinstance(exc, CfmsError):
        return exc.message
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    reference = secrets.token_hex(6)
    log.error("import failed [ref %s]", reference, exc_info=exc)
    return f"internal error while restoring (log reference {reference})"


async def run_import(app: "App", job: ImportJob) -> None:
    """Restore `job`'s uploaded backup; always ends in `completed` or `failed`."""
    task = job.task
    task_id = job.task_id
    staging = app.paths.staging / task_id
    archive_path = app.paths.backup_imports / f"{task['archive_file_id']}.cfms.enc"
    key_path = app.paths.backup_imports / f"{task['key_file_id']}.key"
    mover = FileMover(staging, app.paths.restore_files)
    limits = app.settings.limits.archive
    report = job.stage_reporter()
    outcome: dict = {}
    try:
        # The listings of a large backup would make every full collection stall the event
        # loop; they are dropped before collection resumes.
        with cyclic_gc_paused():
            contents = await trio.to_thread.run_sync(
                unpack, archive_path, key_path, staging, limits, report, job.abort,
                limiter=app.io_limiter)
            counts = {"documents_count": len(contents.documents),
                      "folders_count": len(contents.folders), "files_count": len(contents.files)}
            await app.store.write(backup_rows.update_backup_task, task_id,
                                  current_step=job.progress.step,
                                  progress_percent=job.progress.percent, **counts)
            await app.store.write(commit_restore, contents, mover, RESTORE_PREFIX, report,
                                  job.abort)
            del contents
        job.progress.report("Restore completed", 1.0)
        outcome = {"status": "completed", "current_step": "Restore completed",
                   "progress_percent": 100, "error_message": None, **counts}
        log.info("import %s completed: %s", task_id, counts)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(mover.take_back)
        message = failure_message(exc)
        if isinstance(exc, ImportAborted) or isinstance(exc, trio.Cancelled):
            message = "the server shut down during the import"
        log.warning("import %s failed: %s", task_id, message)
        # Nothing was imported, so the counts say so; the step shows where it stopped.
        outcome = {"status": "failed", "current_step": job.progress.step,
                   "progress_percent": job.progress.percent, "error_message": message,
                   "documents_count": 0, "folders_count": 0, "files_count": 0}
        if not isinstance(exc, Exception):
            with trio.CancelScope(shield=True):
                await _finish(app, job, staging, outcome)
            raise
    with trio.CancelScope(shield=True):
        await _finish(app, job, staging, outcome)


async def _finish(app: "App", job: ImportJob, staging, outcome: dict) -> None:
    """Remove staging and uploads, record the outcome, tell the listeners.

    Clean-up comes first, so a client that sees the final status never finds the uploads
    still there; a crash in between is failed and cleaned up again by the restart recovery.
    """
    try:
        await trio.to_thread.run_sync(remove_tree, staging)
        await discard_uploads(app, job.task)
    except Exception:
        log.exception("could not clean up after import %s", job.task_id)
    try:
        await app.store.write(backup_rows.update_backup_task, job.task_id,
                              completed_time=app.now(), **outcome)
        final = await app.store.read(backup_rows.get_backup_task, job.task_id)
        publish_outcome(app, final)
    except Exception:
        log.exception("could not record the outcome of import %s", job.task_id)
    finally:
        app.imports.pop(job.task_id, None)
