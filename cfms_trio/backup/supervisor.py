"""Deadlines and restarts for backup imports.

Every pending import has a watcher task in the server's nursery that sleeps until the task's
deadline. If the task is still pending then, it becomes `timeout` by itself: uploads in flight
are aborted, its upload tasks are closed and whatever was uploaded is removed. At start-up,
imports that were processing when the server stopped are failed and cleaned up, and pending
ones get their watchers back with their original deadlines.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, AsyncIterator

import trio

from ..errors import Conflict
from ..reaper import remove_unclaimed
from ..storage import backup_rows, restore_rows
from .importer import ImportJob, discard_uploads, publish_outcome, run_import
from .restore import remove_tree

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger(__name__)

TIMEOUT_MESSAGE = "the uploads were not completed and the import not started before the deadline"
RESTART_MESSAGE = "server restarted during the import"


def trio_deadline(wall_time: float) -> float:
    return trio.current_time() + max(0.0, wall_time - time.time())


class ImportSupervisor:
    def __init__(self, app: "App"):
        self.app = app
        self._watchers: dict[str, trio.CancelScope] = {}
        self._deciding: dict[str, trio.Lock] = {}

    @contextlib.asynccontextmanager
    async def deciding(self, task_id: str) -> AsyncIterator[None]:
        """Held while a pending import is being started or timed out, so the two never
        interleave: a timeout removes the uploads before the status says `timeout`, and a
        start that had to wait finds the task timed out."""
        lock = self._deciding.setdefault(task_id, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._deciding.pop(task_id, None)

    # -- deadlines ------------------------------------------------------------------------------

    def watch(self, task_id: str, timeout_time: float) -> None:
        """Start the deadline watcher of a pending import."""
        scope = trio.CancelScope(deadline=trio_deadline(timeout_time))
        self._watchers[task_id] = scope
        self.app.nursery.start_soon(self._watch, task_id, scope)

    def stop_watching(self, task_id: str) -> None:
        scope = self._watchers.pop(task_id, None)
        if scope is not None:
            scope.deadline = -float("inf")
            scope.cancel()

    async def _watch(self, task_id: str, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep_forever()
        if self._watchers.get(task_id) is scope:
            del self._watchers[task_id]
            await self.expire(task_id)

    async def expire(self, task_id: str) -> None:
        """Time out a task that is still pending; do nothing if it has moved on.

        The uploads are aborted and removed before the status becomes `timeout`, so a client
        that sees `timeout` never finds them still there.
        """
        app = self.app
        async with self.deciding(task_id):
            task = await app.store.read(backup_rows.get_backup_task, task_id)
            if task["status"] != "pending":
                return
            uploads = await app.store.read(backup_rows.import_upload_tasks,
                                           task["archive_file_id"], task["key_file_id"])
            for upload in uploads:
                app.transfers.abort(upload["task_id"],
                                    "the backup import timed out; the upload was aborted")
            missing = [u["purpose"].replace("backup_", "") for u in uploads
                       if u["status"] != "completed"]
            message = (f"upload deadline passed before the {' and '.join(sorted(missing))} "
                       f"upload{'s were' if len(missing) > 1 else ' was'} completed"
                       if missing else TIMEOUT_MESSAGE)
            # Let aborted uploads unwind (they close their partial files) before removing data.
            for _ in range(100):
                if not any(app.transfers.is_active(u["task_id"]) for u in uploads):
                    break
                await trio.sleep(0.01)
            try:
                await discard_uploads(app, task)
            except Exception:
                log.exception("could not remove the uploads of timed-out import %s", task_id)
            try:
                task = await app.store.write(backup_rows.transition_backup_task, task_id,
                                             "pending", status="timeout", error_message=message,
                                             completed_time=app.now())
            except Conflict:
                return  # cannot happen while we decide; never report a timeout twice
        log.info("import %s timed out: %s", task_id, message)
        publish_outcome(app, task)

    # -- running ----------------------------------------------------------------------------------

    def start(self, task: dict) -> None:
        """Hand a task that just became `processing` to a background import."""
        self.stop_watching(task["backup_task_id"])
        job = ImportJob(task)
        self.app.imports[job.task_id] = job
        self.app.nursery.start_soon(run_import, self.app, job)

    async def abort_all_on_shutdown(self) -> None:
        """Runs for the server's lifetime; when the server shuts down, tells every running
        import to stop, so their threads end and they roll back."""
        try:
            await trio.sleep_forever()
        finally:
            for job in list(self.app.imports.values()):
                job.abort.set()

    # -- start-up ---------------------------------------------------------------------------------

    async def recover(self) -> None:
        """Fail what a previous run left half done, remove its traces, re-arm deadlines."""
        app = self.app
        for task in await app.store.read(backup_rows.tasks_in_status, "import", "processing"):
            await app.store.write(backup_rows.update_backup_task, task["backup_task_id"],
                                  status="failed", error_message=RESTART_MESSAGE,
                                  completed_time=app.now())
            await discard_uploads(app, task)
            log.warning("import %s was interrupted by a restart; marked failed",
                        task["backup_task_id"])
        for task in await app.store.read(backup_rows.tasks_in_status, "export", "processing"):
            await app.store.write(backup_rows.update_backup_task, task["backup_task_id"],
                                  status="failed", error_message="server restarted during the export",
                                  completed_time=app.now())
        # No import runs yet: everything in staging is left over, and a restored file with no
        # row is from an import that never committed.
        await trio.to_thread.run_sync(remove_tree, app.paths.staging)
        await trio.to_thread.run_sync(lambda: app.paths.staging.mkdir(parents=True, exist_ok=True))
        known = await app.store.read(restore_rows.restored_file_ids, "restore/files/")
        removed = await trio.to_thread.run_sync(remove_unclaimed, app.paths.restore_files, known)
        if removed:
            log.warning("removed %d restored files left by an interrupted import", removed)
        await trio.to_thread.run_sync(_remove_partial_exports, app.paths.backups)
        for task in await app.store.read(backup_rows.tasks_in_status, "import", "pending"):
            self.watch(task["backup_task_id"], task["timeout_time"])


def _remove_partial_exports(backups_dir) -> None:
    for path in backups_dir.glob(".*.partial-*"):
        path.unlink(missing_ok=True)


async def startup(app: "App") -> None:
    """Server start-up hook: recovery, then the shutdown watcher."""
    await app.supervisor.recover()
    app.nursery.start_soon(app.supervisor.abort_all_on_shutdown)
