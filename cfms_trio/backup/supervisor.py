"""The import supervisor: the one owner of backup imports, from deadline to outcome.

It is a long-lived service (`await nursery.start(supervisor.run)`). Started, it first recovers
what a previous run left: imports that were processing are failed and cleaned up, finished
ones that still hold their uploads (a crash right after a restore committed) are cleaned up,
and pending ones get their deadline watchers back. Then it runs, in its own nursery:

- a watcher per pending import that sleeps until the task's deadline; if the task is still
  pending then, it becomes `timeout` by itself: uploads in flight are aborted, its upload tasks
  are closed and whatever was uploaded is removed;
- a job per started import (`importer.run_import`), whose live progress it alone holds and
  reports through `progress_of`;
- `backup_import_progress` events while a job runs (at most four a second), and the
  `backup_import_completed` event when an import ends, whichever way (also `cancelled`);
- cancelling an import (`cancel`): a pending or planned one at once, a processing one by
  telling its job to stop, which its threads notice between batches (a job on another
  instance is told through the cluster relay, and the answer waits for the store to show
  the outcome).

When the server shuts down, every running job is told to stop, so its threads end and it rolls
back.

Several instances on one PostgreSQL database (issue 16): an import runs under a lease of the
instance that started it (owner id and expiry, renewed every third of `lease_s` by `_leases`).
Every instance, every third of the lease time, also fails the processing imports whose lease
expired (their instance died: the restore never committed) and cleans what it can reach of
them, and claims the pending imports past their deadline that nobody is timing out (a row lock
with SKIP LOCKED, then a lease), so each deadline is enforced by exactly one instance, whether
the instance that created the task lives or not. Outcomes reach the listeners of every
instance through the event hub's relay.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import AsyncIterator

import trio

from ..config import ArchiveLimits
from ..conventions import (
    OPERATION_EXPORT,
    OPERATION_IMPORT,
    STARTABLE_STATUSES,
    STATUS_CANCELLED,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_PLANNED,
    STATUS_PROCESSING,
    STATUS_TIMEOUT,
)
from ..deadlines import trio_deadline
from ..errors import Conflict
from ..events import Audience, EventHub
from ..paths import VERIFY_DIR_PREFIX, Paths, partial_backups
from ..protocol import event
from ..cluster import ClusterRelay
from ..content.local import unlink_quietly
from ..reaper import remove_tree
from ..storage import Store, backup_tasks, leases, restore_rows
from ..storage.backends import SQLITE
from ..transfer.registry import TransferRegistry
from .importer import ImportEnvironment, ImportJob, discard_uploads, run_import
from .restore import RestoreOptions

log = logging.getLogger(__name__)

TIMEOUT_MESSAGE = "the uploads were not completed and the import not started before the deadline"
RESTART_MESSAGE = "server restarted during the import"
LEASE_EXPIRED_MESSAGE = ("the server instance running the import stopped (its lease expired); "
                         "nothing was imported")
EXPORT_RESTART_MESSAGE = "server restarted during the export"
EXPORT_LEASE_EXPIRED_MESSAGE = ("the server instance running the export stopped (its lease "
                                "expired)")
COMPLETED_EVENT = "backup_import_completed"
PROGRESS_EVENT = "backup_import_progress"
PROGRESS_INTERVAL_S = 0.25  # at most four progress events a second per import
# How long a timed-out import waits for its aborted uploads to unwind before removing them.
UPLOAD_UNWIND_TIMEOUT_S = 5.0
# A cancel of an import another instance runs: how often the store is read for its outcome,
# and how long beyond one lease it is waited for.
CANCEL_POLL_S = 0.2
CANCEL_ELSEWHERE_SLACK_S = 5.0


def backup_event_audience(owner: str) -> Audience:
    """Who may see a backup task's events: its owner and backup administrators."""
    return Audience(owner, ("import_backup", "export_backup"))


class ImportSupervisor:
    def __init__(self, store: Store, paths: Paths, hub: EventHub,
                 transfers: TransferRegistry, io_limiter: trio.CapacityLimiter,
                 limits: ArchiveLimits, content, relay: ClusterRelay, lease_s: float):
        self._store = store
        self._paths = paths
        self._content = content
        self._hub = hub
        self._transfers = transfers
        self._relay = relay
        self._lease_s = lease_s
        self._instance_id = relay.instance_id
        self._env = ImportEnvironment(store, paths, content, limits, io_limiter,
                                      relay.instance_id)
        self._nursery: trio.Nursery | None = None
        self._watchers: dict[str, trio.CancelScope] = {}
        self._deciding: dict[str, trio.Lock] = {}
        self._jobs: dict[str, ImportJob] = {}

    # -- life -------------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Recover, report readiness, then supervise until cancelled (server shutdown)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover()
            task_status.started()
            try:
                await self._leases()
            finally:
                for job in self._jobs.values():
                    job.abort.set()

    def progress_of(self, task_id: str) -> dict | None:
        """The live progress of an import running now (step, percent, bytes and objects
        done), or None."""
        job = self._jobs.get(task_id)
        return None if job is None else job.progress.snapshot()

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

    async def begin(self, task_id: str, from_status: str, **fields) -> dict:
        """Compare-and-set an import in `from_status` to `processing` under this instance's
        lease (409 when it has moved on, or its deadline has passed); then `start` it."""
        now = time.time()
        return await self._store.write(leases.start_import, task_id, from_status,
                                       self._instance_id, now, now + self._lease_s, **fields)

    # -- leases -----------------------------------------------------------------------------------

    async def _leases(self) -> None:
        """Every third of the lease time: renew this instance's imports, end the imports of
        instances that died, time out pending imports nobody else times out."""
        while True:
            await trio.sleep(self._lease_s / 3)
            try:
                await self._lease_round()
            except Exception:
                log.exception("import lease round failed")

    async def _lease_round(self) -> None:
        now = time.time()
        running = sorted(self._jobs)
        still_mine = await self._store.write(leases.renew_imports, running, self._instance_id,
                                             now + self._lease_s)
        for task_id in set(running) - still_mine:
            job = self._jobs.get(task_id)
            if job is not None:
                # Either another instance ended it (the lease had expired), or the job itself
                # recorded its outcome just now and is finishing. Stopping it is right in both
                # cases; whether the lease was lost is for the job's own guarded writes to
                # say (`_commit`, `finish_held_import`), so a finished import still announces
                # its outcome.
                log.info("import %s: no longer processing under this instance's lease; "
                         "telling its job to stop", task_id)
                job.abort.set()
        for task_id in await self._store.write(leases.fail_expired_exports, now,
                                               EXPORT_LEASE_EXPIRED_MESSAGE):
            log.warning("export %s: its instance stopped (lease expired); marked failed",
                        task_id)
        for task in await self._store.write(leases.fail_expired_imports, now,
                                            LEASE_EXPIRED_MESSAGE):
            log.warning("import %s: its instance stopped (lease expired); marked failed",
                        task["backup_task_id"])
            await self._clean_after_other_instance(task)
            await self._publish_outcome(task)
        for task_id in await self._store.write(leases.claim_due_imports, self._instance_id,
                                               now, now + self._lease_s):
            self._stop_watching(task_id)
            await self._expire(task_id, claimed=True)

    async def _clean_after_other_instance(self, task: dict) -> None:
        """What a failed import of a dead instance left where this one can reach it: its
        uploads, its staging (when the instances share a content folder), its restored files
        (in S3 storage: everything under its restore prefix; in a shared content folder: the
        restored files no row claims, when no import runs anywhere)."""
        task_id = task["backup_task_id"]
        try:
            await discard_uploads(self._env, task)
            await trio.to_thread.run_sync(remove_tree, self._paths.import_staging(task_id))
            others = bool(await self._store.read(leases.live_import_ids, time.time()))
            known = await self._store.read(restore_rows.restored_file_ids)
            await trio.to_thread.run_sync(functools.partial(
                self._content.remove_interrupted_restores, [task_id], known,
                others_running=others))
        except Exception:
            log.exception("could not clean up after import %s", task_id)

    # -- deadlines --------------------------------------------------------------------------------

    def watch(self, task_id: str, timeout_time: float) -> None:
        """Start the deadline watcher of a pending import."""
        scope = trio.CancelScope(deadline=trio_deadline(timeout_time))
        self._watchers[task_id] = scope
        self._nursery.start_soon(self._watch, task_id, scope)

    def _stop_watching(self, task_id: str) -> None:
        scope = self._watchers.pop(task_id, None)
        if scope is not None:
            scope.cancel()

    async def _watch(self, task_id: str, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep_forever()
        if self._watchers.get(task_id) is scope:
            del self._watchers[task_id]
            await self._expire(task_id)

    async def _expire(self, task_id: str, *, claimed: bool = False) -> None:
        """Time out a task that is still pending; do nothing if it has moved on, or another
        instance is timing it out (the claim takes its lease; `claimed`: taken already).

        The uploads are aborted (on every instance) and removed before the status becomes
        `timeout`, so a client that sees `timeout` never finds them still there. No instance
        can start the import meanwhile: `begin` refuses a task past its deadline.
        """
        async with self.deciding(task_id):
            if not claimed:
                now = time.time()
                if not await self._store.write(leases.claim_due_imports, self._instance_id,
                                               now, now + self._lease_s, task_id):
                    return
            task = await self._store.read(backup_tasks.get_backup_task, task_id)
            if await self._store.read(backup_tasks.failed_holding_uploads, task):
                # Refused because of its options and never started again: the uploads go,
                # the failure stays as it was.
                await self._discard_quietly(task)
                await self._store.write(leases.release_import, task_id, self._instance_id)
                log.info("import %s: the deadline passed; its kept uploads were removed",
                         task_id)
                return
            if task["status"] not in STARTABLE_STATUSES:
                return
            uploads = await self._store.read(backup_tasks.import_upload_tasks,
                                             task["archive_file_id"], task["key_file_id"])
            for upload in uploads:
                reason = "the backup import timed out; the upload was aborted"
                self._transfers.abort(upload["task_id"], reason)
                await self._relay.send("abort_transfer",
                                       {"task_id": upload["task_id"], "reason": reason})
            missing = sorted(u["what"] for u in uploads if not u["done"])
            message = (f"upload deadline passed before the {' and '.join(missing)} "
                       f"upload{'s were' if len(missing) > 1 else ' was'} completed"
                       if missing else TIMEOUT_MESSAGE)
            # Let aborted uploads unwind (they close their partial files) before removing data.
            with trio.move_on_after(UPLOAD_UNWIND_TIMEOUT_S):
                await self._transfers.wait_ended([u["task_id"] for u in uploads])
            try:
                await discard_uploads(self._env, task)
            except Exception:
                log.exception("could not remove the uploads of timed-out import %s", task_id)
            try:
                task = await self._store.write(
                    backup_tasks.transition_backup_task, task_id, task["status"],
                    status=STATUS_TIMEOUT, error_message=message, completed_time=time.time(),
                    lease_owner=None, lease_expires_time=None)
            except Conflict:
                return  # cannot happen while we decide; never report a timeout twice
        log.info("import %s timed out: %s", task_id, message)
        await self._publish_outcome(task)

    async def _discard_quietly(self, task: dict) -> None:
        try:
            await discard_uploads(self._env, task)
        except Exception:
            log.exception("could not remove the uploads of import %s", task["backup_task_id"])

    async def close_abandoned(self, tasks: list[dict]) -> None:
        """Close imports whose owner was deleted. They are `failed` in the store already (in
        the transaction that deleted the account), and their upload tasks are gone; here their
        watchers stop, uploads still running are aborted and allowed to unwind, what was
        uploaded is removed, and the outcome is published."""
        for task in tasks:
            task_id = task["backup_task_id"]
            self._stop_watching(task_id)
            async with self.deciding(task_id):
                for upload_id in task["upload_task_ids"]:
                    self._transfers.abort(upload_id, "the account that owned this import "
                                                     "was deleted; the upload was aborted")
                with trio.move_on_after(UPLOAD_UNWIND_TIMEOUT_S):
                    await self._transfers.wait_ended(task["upload_task_ids"])
                try:
                    await discard_uploads(self._env, task)
                except Exception:
                    log.exception("could not remove the uploads of abandoned import %s",
                                  task_id)
            log.info("import %s closed: its account was deleted", task_id)
            await self._publish_outcome(task)

    # -- running ----------------------------------------------------------------------------------

    def start(self, task: dict, *, passphrase: str | None = None, with_key: bool = True,
              allow_missing_content: bool = False, dry_run: bool = False,
              options: RestoreOptions | None = None) -> None:
        """Run a task that just became `processing` in the background. The passphrase, if
        any, lives only in the job's memory; `with_key` is False when no key was uploaded;
        `allow_missing_content`: see `read_backup_archive`; `dry_run`: end `planned` with
        the plan; `options`: accounts and conflict policies, include, target
        (`RestoreOptions`)."""
        self._stop_watching(task["backup_task_id"])
        job = ImportJob(task, passphrase=passphrase, with_key=with_key,
                        allow_missing_content=allow_missing_content, dry_run=dry_run,
                        options=options)
        self._jobs[job.task_id] = job
        self._nursery.start_soon(self._run_job, job)

    async def cancel(self, task_id: str, username: str) -> dict:
        """Cancel an import that is pending, planned or processing, or that failed because of
        its options and still holds its uploads; return its final row.

        A pending or planned one: its uploads in flight are aborted, what was uploaded is
        removed, and it becomes `cancelled`. A processing one: its job is told to stop (its
        threads stop at their next check between batches, its transaction rolls back, its
        moved files are taken back) and the answer waits for it to end. Raises Conflict for a
        task in any other state, or one whose import committed before it could stop."""
        job = self._jobs.get(task_id)
        if job is not None:
            job.cancel(username)
            await job.ended.wait()
            task = await self._store.read(backup_tasks.get_backup_task, task_id)
            if task["status"] == STATUS_CANCELLED:
                return task
            if task["status"] not in STARTABLE_STATUSES:
                raise Conflict(f"backup task '{task_id}' is {task['status']}: it ended before "
                               "it could be cancelled")
            # A dry run that ended as it was told to stop is cancelled as a planned task.
        else:
            task = await self._store.read(backup_tasks.get_backup_task, task_id)
            if task["status"] == STATUS_PROCESSING:
                return await self._cancel_elsewhere(task, username)
        async with self.deciding(task_id):
            task = await self._store.read(backup_tasks.get_backup_task, task_id)
            if task["status"] not in STARTABLE_STATUSES and not await self._store.read(
                    backup_tasks.failed_holding_uploads, task):
                raise Conflict(f"backup task '{task_id}' is {task['status']}; only a pending, "
                               "planned or processing import, or one refused because of its "
                               "options, can be cancelled")
            self._stop_watching(task_id)
            await self._abort_uploads(task, "the backup import was cancelled; the upload "
                                            "was aborted")
            task = await self._store.write(
                backup_tasks.transition_backup_task, task_id, task["status"],
                status=STATUS_CANCELLED, error_message=f"cancelled by {username!r}",
                completed_time=time.time())
        log.info("import %s cancelled by %s", task_id, username)
        await self._publish_outcome(task)
        return task

    async def _cancel_elsewhere(self, task: dict, username: str) -> dict:
        """Cancel an import another instance runs: ask it through the relay (its job stops
        as a local cancel would), then wait for the store to show the outcome. 409 when it
        ended otherwise, or the instance did not act within a lease (it may have died: its
        lease expires and the import is failed anyway)."""
        task_id = task["backup_task_id"]
        await self._relay.send("cancel_import", {"task_id": task_id, "username": username})
        with trio.move_on_after(self._lease_s + CANCEL_ELSEWHERE_SLACK_S):
            while task["status"] == STATUS_PROCESSING:
                await trio.sleep(CANCEL_POLL_S)
                task = await self._store.read(backup_tasks.get_backup_task, task_id)
        if task["status"] == STATUS_CANCELLED:
            return task
        if task["status"] == STATUS_PROCESSING:
            raise Conflict(f"backup task '{task_id}' is running on another server instance, "
                           "which did not answer the cancel in time; try again")
        if task["status"] == STATUS_PLANNED:
            # A dry run that ended as it was told to stop: cancelled as a planned task.
            return await self.cancel(task_id, username)
        raise Conflict(f"backup task '{task_id}' is {task['status']}: it ended before it "
                       "could be cancelled")

    async def cancel_from_elsewhere(self, body: dict) -> None:
        """The cluster relay's `cancel_import` message: stop the job if it runs here (its
        outcome is recorded and published as for a local cancel)."""
        job = self._jobs.get(str(body["task_id"]))
        if job is not None:
            log.info("import %s: cancelled from another instance", job.task_id)
            job.cancel(str(body["username"]))

    async def _abort_uploads(self, task: dict, reason: str) -> None:
        """Abort an import's uploads in flight, let them unwind, and remove what was
        uploaded."""
        uploads = await self._store.read(backup_tasks.import_upload_tasks,
                                         task["archive_file_id"], task["key_file_id"])
        for upload in uploads:
            self._transfers.abort(upload["task_id"], reason)
        with trio.move_on_after(UPLOAD_UNWIND_TIMEOUT_S):
            await self._transfers.wait_ended([u["task_id"] for u in uploads])
        try:
            await discard_uploads(self._env, task)
        except Exception:
            log.exception("could not remove the uploads of import %s", task["backup_task_id"])

    async def _run_job(self, job: ImportJob) -> None:
        final = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publish_progress, job)
                with job.scope:
                    final = await run_import(self._env, job)
                nursery.cancel_scope.cancel()
            if final is None:  # cancelled: run_import recorded it, then re-raised
                final = await self._store.read(backup_tasks.get_backup_task, job.task_id)
        except Exception:
            log.exception("could not record the outcome of import %s", job.task_id)
            return
        finally:
            del self._jobs[job.task_id]
            job.ended.set()
        if final["status"] == STATUS_PLANNED or job.uploads_kept:
            self.watch(job.task_id, final["timeout_time"])  # the uploads wait for a real run
        if job.lease_lost:
            return  # the instance that ended it published the outcome
        await self._publish_outcome(final)

    async def _publish_progress(self, job: ImportJob) -> None:
        """`backup_import_progress` to the task's listeners whenever the progress moved, at
        most every PROGRESS_INTERVAL_S (each publish reads the store once for its
        audience)."""
        last = None
        audience = backup_event_audience(job.task["username"])
        while True:
            await trio.sleep(PROGRESS_INTERVAL_S)
            now = job.progress.snapshot()
            if now == last:
                continue
            last = now
            try:
                await self._hub.publish(event(PROGRESS_EVENT, {
                    "backup_task_id": job.task_id, **now}), audience)
            except Exception:
                log.exception("could not publish the progress of import %s", job.task_id)

    async def _publish_outcome(self, task: dict) -> None:
        completed = task["status"] == STATUS_COMPLETED
        message = event(COMPLETED_EVENT, {
            "backup_task_id": task["backup_task_id"], "status": task["status"],
            "documents_imported": task["documents_count"] if completed else 0,
            "folders_imported": task["folders_count"] if completed else 0,
            "files_imported": task["files_count"] if completed else 0,
            "error": task["error_message"]})
        try:
            await self._hub.publish(message, backup_event_audience(task["username"]))
        except Exception:
            # The outcome is in the store either way; only the notification is lost.
            log.exception("could not publish the outcome of import %s", task["backup_task_id"])

    # -- start-up ---------------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Fail what a previous run left half done, remove its traces, re-arm deadlines."""
        store, paths = self._store, self._paths
        # SQLite has one instance (a lock file in the root sees to it): whatever is processing
        # was this server's before the restart. On PostgreSQL other instances may be running
        # imports now: those whose lease expired, and those this instance (the same instance
        # name) held before it restarted, are failed at once; the others stay theirs.
        alone = store.backend == SQLITE
        failed = await store.write(leases.fail_expired_imports, time.time(), RESTART_MESSAGE,
                                   every_lease=alone, held_by=None if alone else
                                   self._instance_id)
        if not alone:
            failed += await store.write(leases.fail_expired_imports, time.time(),
                                        LEASE_EXPIRED_MESSAGE)
        interrupted = []
        for task in failed:
            interrupted.append(task["backup_task_id"])
            await discard_uploads(self._env, task)
            log.warning("import %s was interrupted by a restart; marked failed",
                        task["backup_task_id"])
        for task in await store.read(backup_tasks.finished_imports_holding_uploads):
            if task["status"] == STATUS_FAILED and task["timeout_time"] > time.time():
                # Refused because of its options: startable again until its deadline.
                self.watch(task["backup_task_id"], task["timeout_time"])
                continue
            await discard_uploads(self._env, task)
            log.warning("import %s ended before a restart but kept its uploads; removed them",
                        task["backup_task_id"])
        if alone:
            for task in await store.read(backup_tasks.tasks_in_status, OPERATION_EXPORT,
                                         STATUS_PROCESSING):
                await store.write(backup_tasks.update_backup_task, task["backup_task_id"],
                                  status=STATUS_FAILED, error_message=EXPORT_RESTART_MESSAGE,
                                  completed_time=time.time(), lease_owner=None,
                                  lease_expires_time=None)
        else:
            # This instance's own exports of before the restart, and those of dead instances.
            for message, held_by in ((EXPORT_RESTART_MESSAGE, self._instance_id),
                                     (EXPORT_LEASE_EXPIRED_MESSAGE, None)):
                for task_id in await store.write(leases.fail_expired_exports, time.time(),
                                                 message, held_by=held_by):
                    log.warning("export %s: %s; marked failed", task_id, message)
        # No import of this instance runs yet: staging that no live lease claims is left
        # over, and a restored file with no row is from an import that never committed (in
        # S3 storage: under the prefix of an interrupted import; in a local content folder,
        # only removed when no instance runs an import now, since the folder is shared).
        live = await store.read(leases.live_import_ids, time.time())
        await trio.to_thread.run_sync(_clear_staging, paths, live, alone)
        await trio.to_thread.run_sync(self._content.clear_set_aside)
        known = await store.read(restore_rows.restored_file_ids)
        removed = await trio.to_thread.run_sync(functools.partial(
            self._content.remove_interrupted_restores, interrupted, known,
            others_running=bool(live)))
        if removed:
            log.warning("removed %d restored files left by an interrupted import", removed)
        if alone:
            await trio.to_thread.run_sync(
                lambda: unlink_quietly(partial_backups(paths.backups)))
        for status in STARTABLE_STATUSES:
            for task in await store.read(backup_tasks.tasks_in_status, OPERATION_IMPORT,
                                         status):
                self.watch(task["backup_task_id"], task["timeout_time"])


def _clear_staging(paths: Paths, live_imports: set[str], alone: bool) -> None:
    """Remove the staging left by interrupted work: all of it when this instance is alone;
    otherwise the staging of every import no instance holds a live lease on (a shared content
    folder also holds the running imports and verifications of other instances)."""
    if alone:
        remove_tree(paths.staging)
    elif paths.staging.is_dir():
        for entry in paths.staging.iterdir():
            if (not entry.name.startswith(VERIFY_DIR_PREFIX)
                    and entry.name.split(".")[0] not in live_imports):
                remove_tree(entry)
    paths.staging.mkdir(parents=True, exist_ok=True)
