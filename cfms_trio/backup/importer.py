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
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import trio

from ..config import ArchiveLimits
from ..conventions import STATUS_CANCELLED, STATUS_COMPLETED, STATUS_FAILED, STATUS_PLANNED
from ..errors import (
    ArchiveError,
    CfmsError,
    ImportAborted,
    InsufficientStorage,
    describe_os_error,
    internal_error,
)
from ..paths import Paths, import_archive_relative, import_key_relative
from ..reaper import remove_tree
from ..storage import Store, backup_tasks, leases
from .restore import (
    RestoreOptions,
    commit_restore,
    plan_restore,
    unpack,
)

log = logging.getLogger(__name__)

# Each step's share of the progress bar: (percent at its start, highest percent inside it).
STEP_PERCENT = {
    "Decrypting archive": (10, 10),
    "Extracting archive": (30, 39),
    "Loading metadata": (40, 49),  # the archive's checks, then the plan against the store
    "Importing files": (50, 59),
    "Importing folders": (60, 79),
    "Importing documents": (80, 94),
    "Finalizing import": (95, 99),
    "Restore completed": (100, 100),
    "Plan completed": (100, 100),
}
FIRST_STEP = "Decrypting archive"  # where start_backup_import leaves a task (SPEC §8)
COMPLETED_STEP = "Restore completed"  # recorded with the restored rows, reported after them
PLANNED_STEP = "Plan completed"  # where a dry run ends
SHUTDOWN_MESSAGE = "the server shut down during the import"
LEASE_LOST_MESSAGE = ("this server instance lost its lease on the import (it could not reach "
                      "the database in time) and another instance ended it")


class ImportProgress:
    """Monotonic progress, written from worker threads and read by status requests and the
    supervisor's progress events: the step, its percent, and the archive bytes read (while
    extracting) or the objects written in the current step."""

    def __init__(self) -> None:
        self.step = FIRST_STEP
        self.percent = STEP_PERCENT[self.step][0]
        self.bytes_done = 0
        self.bytes_total = 0
        self.objects_done = 0
        self._lock = threading.Lock()

    def report(self, step: str, fraction: float, *, bytes_done: int | None = None,
               bytes_total: int | None = None, objects_done: int | None = None) -> None:
        low, high = STEP_PERCENT[step]
        percent = low + int((high - low) * max(0.0, min(1.0, fraction)))
        with self._lock:
            if percent >= self.percent:
                if step != self.step:
                    self.objects_done = 0
                self.step, self.percent = step, percent
                if bytes_done is not None:
                    self.bytes_done = bytes_done
                if bytes_total is not None:
                    self.bytes_total = bytes_total
                if objects_done is not None:
                    self.objects_done = objects_done

    def snapshot(self) -> dict:
        """The progress as a progress event carries it (docs/PROTOCOL.md)."""
        with self._lock:
            return {"step": self.step, "percent": self.percent, "bytes_done": self.bytes_done,
                    "bytes_total": self.bytes_total, "objects_done": self.objects_done}


class ImportJob:
    """One running import: its task row as started, its progress, its abort flag (set when
    the server shuts down or the import is cancelled; the stages check it between pieces of
    work), who cancelled it, and the options of start_backup_import (`allow_missing_content`,
    see `read_backup_archive`; `dry_run`: stop with the plan; the rest, see
    `RestoreOptions`)."""

    def __init__(self, task: dict, *, passphrase: str | None = None, with_key: bool = True,
                 allow_missing_content: bool = False, dry_run: bool = False,
                 options: RestoreOptions | None = None):
        self.task = task
        self.passphrase = passphrase  # never stored: a restart fails the import anyway
        self.with_key = with_key
        self.task_id = task["backup_task_id"]
        self.allow_missing_content = allow_missing_content
        self.dry_run = dry_run
        # The importer is the task's owner: their account is never replaced by the archive's.
        self.options = dataclasses.replace(options or RestoreOptions(),
                                           importer=task["username"])
        self.progress = ImportProgress()
        self.abort = threading.Event()
        # Another instance ended the task after this one's lease expired: this job only
        # cleans up, records nothing and announces nothing.
        self.lease_lost = False
        self.cancelled_by: str | None = None  # set with `abort` by cancel_backup_import
        self.uploads_kept = False  # set when it failed because of its options (run_import)
        self.uploads_forgotten = False  # set once the commit accepted the plan
        # Removes for good the uploads the commit set aside (content `set_aside`); called by
        # `run_import` once the transaction has ended, whichever way.
        self.remove_set_aside: Callable[[], None] | None = None
        self.scope = trio.CancelScope()  # the job's own; cancel() cancels it
        self.ended = trio.Event()

    def cancel(self, username: str) -> None:
        """Stop this import: its threads stop at their next check, its trio side at once."""
        self.cancelled_by = username
        self.abort.set()
        self.scope.cancel()


@dataclasses.dataclass(frozen=True)
class ImportEnvironment:
    """What an import needs from the server."""

    store: Store
    paths: Paths
    content: object  # the content storage (`content`): uploads and restored files live there
    limits: ArchiveLimits
    io_limiter: trio.CapacityLimiter
    instance_id: str  # the owner of the leases this instance's imports run under


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
    """Restore `job`'s uploaded backup; always ends in `completed`, `planned` (a dry run),
    `failed` or `cancelled`, and returns the task's final row (on cancellation, records the
    outcome and re-raises).

    Success is recorded by the restore's own transaction (`commit_restore`), which also
    removes the uploads once the plan is accepted. A failure
    because of the options (the plan refused: an include that matches nothing, a missing or
    unwritable target, conflicts under policy fail, ...) keeps the uploads until the deadline,
    so the same task can be started again with other options (`job.uploads_kept`); any other
    failure removes them.
    """
    task_id = job.task_id
    staging = env.paths.import_staging(task_id)
    mover = env.content.restored_files(staging, task_id)
    report = job.progress.report
    index = None
    outcome: dict = {}
    try:
        contents, index = await trio.to_thread.run_sync(
            functools.partial(_unpack_uploads, env, job, staging), limiter=env.io_limiter)
        counts = {f"{kind}_count": contents.counts.get(kind, 0)
                  for kind in ("documents", "folders", "files")}
        await env.store.write(backup_tasks.update_backup_task, task_id,
                              current_step=job.progress.step,
                              progress_percent=job.progress.percent, **counts)
        space = await trio.to_thread.run_sync(staging_space, staging)
        if job.dry_run:
            report("Loading metadata", 0.5)  # planning
            plan = await env.store.read(plan_restore, contents, index, job.options, job.abort)
            return await _finish_planned(env, job, staging, index, plan, space)
        outcome = {"status": STATUS_COMPLETED, "current_step": COMPLETED_STEP,
                   "progress_percent": STEP_PERCENT[COMPLETED_STEP][0],
                   "error_message": None, "warnings": contents.warnings, "space": space,
                   "lease_owner": None, "lease_expires_time": None, **counts}
        await env.store.write(_commit, env.instance_id, staging, contents, index, mover,
                              report, job.abort, task_id, outcome, job.options,
                              functools.partial(_forget_uploads, env, job))
        del contents
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(mover.take_back)
            if index is not None:
                await trio.to_thread.run_sync(index.close)
            await _remove_set_aside(env, job)  # the transaction failed after setting them aside
        message = failure_message(exc)
        status = STATUS_FAILED
        if isinstance(exc, (ImportAborted, trio.Cancelled)):
            message = SHUTDOWN_MESSAGE
            if job.cancelled_by is not None:
                status, message = STATUS_CANCELLED, f"cancelled by {job.cancelled_by!r}"
        # Read and checked, but refused by the plan: the options are at fault, not the archive.
        job.uploads_kept = (index is not None and not job.uploads_forgotten
                            and isinstance(exc, CfmsError)
                            and not isinstance(exc, (ImportAborted, ArchiveError)))
        log.warning("import %s %s: %s", task_id, status, message)
        # Nothing was imported, so the counts say so; the step shows where it stopped.
        failed = {"status": status, "current_step": job.progress.step,
                  "progress_percent": job.progress.percent, "error_message": message,
                  "documents_count": 0, "folders_count": 0, "files_count": 0, "warnings": []}
        if not isinstance(exc, Exception):
            with trio.CancelScope(shield=True):
                await _finish_failed(env, job, staging, failed)
            raise
        with trio.CancelScope(shield=True):
            return await _finish_failed(env, job, staging, failed)
    # Committed: no checkpoint before the shield, so a shutdown cannot turn this into a failure.
    with trio.CancelScope(shield=True):
        log.info("import %s completed: %s", task_id, counts)
        await _remove_set_aside(env, job)
        await trio.to_thread.run_sync(functools.partial(report, COMPLETED_STEP, 1.0))
        return await env.store.read(backup_tasks.get_backup_task, task_id)


async def _remove_set_aside(env: ImportEnvironment, job: ImportJob) -> None:
    """Remove for good the uploads the commit set aside, outside its transaction (the
    database's writer is free meanwhile), before the outcome is recorded or announced."""
    if job.remove_set_aside is None:
        return
    remove, job.remove_set_aside = job.remove_set_aside, None
    try:
        await trio.to_thread.run_sync(remove, limiter=env.io_limiter)
    except Exception:
        log.exception("could not remove the uploads of import %s", job.task_id)


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


def _commit(m, instance_id: str, staging: Path, contents, index, mover, report, abort,
            task_id: str, *args) -> None:
    """`commit_restore`, only while this instance still holds the import's lease (an
    instance that failed it after the lease expired has the last word), then, last inside
    its transaction, the staging folder removed: a client that sees `completed` finds neither
    the uploads nor the staging (if the commit itself then fails, the failure removes what
    remains anyway)."""
    if not leases.holds_import(m, task_id, instance_id):
        raise ImportAborted(LEASE_LOST_MESSAGE)
    commit_restore(m, contents, index, mover, report, abort, task_id, *args)
    index.close()
    remove_tree(staging)


def _forget_uploads(env: ImportEnvironment, job: ImportJob, m) -> None:
    """In the restore's transaction, once its plan is accepted: the uploads' rows go and their
    files are set aside, so a client that sees `completed` never finds them (blocking, the
    writer thread); the files are removed for good once the transaction has ended
    (`job.remove_set_aside`). If the transaction then fails, the failure removes the rows that
    come back."""
    job.uploads_forgotten = True
    gone = backup_tasks.discard_import_uploads(m, job.task["archive_file_id"],
                                               job.task["key_file_id"])
    job.remove_set_aside = env.content.set_aside(gone["paths"])
    env.content.discard_partial_uploads(gone["task_ids"])


async def _finish_planned(env: ImportEnvironment, job: ImportJob, staging: Path, index,
                          plan, space: dict) -> dict:
    """A dry run's end: staging removed, uploads kept (until the deadline), the plan recorded,
    status `planned`."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(index.close)
        await trio.to_thread.run_sync(remove_tree, staging)
        job.progress.report(PLANNED_STEP, 1.0)
        if not await env.store.write(
                leases.finish_held_import, job.task_id, env.instance_id,
                status=STATUS_PLANNED, current_step=PLANNED_STEP,
                progress_percent=STEP_PERCENT[PLANNED_STEP][0], completed_time=time.time(),
                error_message=None, plan=plan.summary(**space)):
            job.lease_lost = True
        log.info("import %s planned", job.task_id)
        return await env.store.read(backup_tasks.get_backup_task, job.task_id)


def staging_space(staging: Path) -> dict:
    """What an import needs on disk (its staging folder holds every extracted file and the
    index; restored files are renamed from there, on the same file system) and what was
    available to it: the free space now plus what its staging takes."""
    used = 0
    for folder, _, names in os.walk(staging):
        for name in names:
            try:
                used += os.stat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    free = shutil.disk_usage(staging).free
    return {"free_bytes_needed": used, "free_bytes_available": free + used}


def preflight_space(paths: Paths, archive_bytes: int, *, copied_first: bool) -> None:
    """Refuse, before anything is written, an import that cannot fit: extracting the archive
    needs at least its own size (`archive_bytes`) free in the staging area (content is only
    ever larger once decompressed), twice that when the archive is first copied there from
    the content storage (`copied_first`, S3). Raises InsufficientStorage giving the bytes
    needed and available."""
    needed = archive_bytes * (2 if copied_first else 1)
    paths.staging.mkdir(parents=True, exist_ok=True)
    available = shutil.disk_usage(paths.staging).free
    if needed > available:
        raise InsufficientStorage(
            f"not enough free space for this import: it needs at least {needed} bytes (the "
            f"archive's size, extracted into {paths.staging}), and {available} bytes are "
            "available", data={"free_bytes_needed": needed, "free_bytes_available": available})


async def _clean_up_uploads(env: ImportEnvironment, job: ImportJob) -> None:
    try:
        await discard_uploads(env, job.task)
    except Exception:
        log.exception("could not clean up after import %s", job.task_id)


async def _finish_failed(env: ImportEnvironment, job: ImportJob, staging: Path,
                         outcome: dict) -> dict:
    """Remove staging and (unless `job.uploads_kept`) the uploads, record the failure; return
    the final row.

    Clean-up comes first, so a client that sees `failed` never finds removed uploads still
    there; a crash in between leaves the task `processing`, which the restart recovery fails
    and cleans up again.
    """
    try:
        await trio.to_thread.run_sync(remove_tree, staging)
    except Exception:
        log.exception("could not clean up after import %s", job.task_id)
    if not job.uploads_kept:
        await _clean_up_uploads(env, job)
    if not await env.store.write(leases.finish_held_import, job.task_id, env.instance_id,
                                 completed_time=time.time(), **outcome):
        job.lease_lost = True
    return await env.store.read(backup_tasks.get_backup_task, job.task_id)
