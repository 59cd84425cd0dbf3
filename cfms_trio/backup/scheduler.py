"""The backup scheduler: the one owner of scheduled backups, their verification and pruning.

A long-lived service (`await nursery.start(scheduler.run)`). Its loop reads the schedules,
starts a run for each one that is due (one run per schedule at a time, in its own nursery) and
sleeps until the next is due or a schedule changes. A run:

1. records that it started; the next run is due one interval later, so runs missed while the
   server was down collapse into this one;
2. exports in a worker thread on the bulk I/O limiter (`export_store`: written, read back in
   full with the file key it holds only in memory, then published: linked into the backups
   folder or uploaded to S3 and read back there) and lists the backup;
3. re-verifies the backup verified longest ago (rolling re-verification, one per run);
4. prunes the schedule's backups by its retention policy, now that a new one is verified.

Every failure (export, upload, verify, prune) is counted (`failures`, shown by `server_info`),
recorded on the schedule or the backup (`last_error`) and published as a `backup_failed` event
to backup administrators. `verify` and `prune` also serve the `verify_backup` and
`prune_backups` requests; a lock keeps verification and pruning from overlapping.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from pathlib import Path

import trio

from ..config import ArchiveLimits
from ..conventions import BACKUP_PARTS
from ..deadlines import trio_deadline
from ..errors import BackupTargetError, CfmsError, describe_os_error, internal_error
from ..events import EventHub
from ..paths import Paths, self_check_dirs
from ..protocol import event
from ..reaper import FileReaper, remove_tree
from ..storage import Store, backups
from .export import export_store
from .format import KeyInfo, Unlock, parse_recipient
from .restore import read_key_file
from .retention import plan_pruning
from .supervisor import backup_event_audience
from .targets import TARGET_S3, S3Options, open_target
from .verify import LEVEL_SELF_CHECK, VerifyReport, verify_archive

log = logging.getLogger(__name__)

FAILED_EVENT = "backup_failed"
STAGES = ("export", "upload", "verify", "prune")


def scheduled_backup_name(schedule: str, now: float) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{schedule}-{stamp}-{secrets.token_hex(3)}"


def failure_text(exc: BaseException, doing: str) -> str:
    if isinstance(exc, CfmsError):
        return exc.message
    if isinstance(exc, OSError):
        return describe_os_error(exc, doing)
    return internal_error(log, doing, exc).message


class _RunFailed(Exception):
    """A stage of a run failed; it has been reported already."""


class BackupScheduler:
    def __init__(self, store: Store, paths: Paths, hub: EventHub, reaper: FileReaper,
                 bulk_io_limiter: trio.CapacityLimiter, limits: ArchiveLimits,
                 s3: S3Options, content):
        self._store = store
        self._paths = paths
        self._content = content  # the content storage: "local" targets live there
        self._hub = hub
        self._reaper = reaper
        self._bulk = bulk_io_limiter
        self._limits = limits
        self._s3 = s3
        self._wake = trio.Event()
        self._running: set[str] = set()
        self._catalogue = trio.Lock()
        self.failures = {stage: 0 for stage in STAGES}  # since this server started

    # -- life -------------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Clear what interrupted self-checks left, report readiness, run schedules."""
        await trio.to_thread.run_sync(
            lambda: [remove_tree(p) for p in self_check_dirs(self._paths.backups)])
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._wake = trio.Event()
                schedules = await self._store.read(backups.list_schedules)
                now = time.time()
                wake_at = math.inf
                for schedule in schedules:
                    if schedule["name"] in self._running:
                        continue
                    if schedule["next_run_time"] <= now:
                        self._running.add(schedule["name"])
                        nursery.start_soon(self._run_schedule, schedule)
                    else:
                        wake_at = min(wake_at, schedule["next_run_time"])
                deadline = math.inf if wake_at == math.inf else trio_deadline(wake_at)
                with trio.move_on_at(deadline):
                    await self._wake.wait()

    @property
    def running(self) -> frozenset[str]:
        """The schedules with a run in progress now."""
        return frozenset(self._running)

    def changed(self) -> None:
        """A schedule was created or deleted: look at the schedules again."""
        self._wake.set()

    # -- one run ----------------------------------------------------------------------------------

    async def _run_schedule(self, schedule: dict) -> None:
        name = schedule["name"]
        try:
            started = time.time()
            if not await self._store.write(backups.start_run, name, started):
                return
            made = error = None
            try:
                made = await self._make_backup(schedule, scheduled_backup_name(name, started))
                if (failure := await self.reverify_next(exclude=made)) is not None:
                    error = failure
                # The policy this run started with: a schedule deleted meanwhile still
                # prunes what its last run made room for.
                pruned = await self._prune([schedule], dry_run=False)
                if pruned["errors"]:
                    error = pruned["errors"][0]
            except _RunFailed as exc:
                error = str(exc)
            except Exception as exc:  # a run never takes the server down with it
                error = failure_text(exc, "running a backup schedule")
                await self.report_failure("export", error, schedule=name,
                                          owner=schedule["created_by"])
            with trio.CancelScope(shield=True):
                await self._store.write(backups.finish_run, name, time.time(), backup=made,
                                        error=error)
        finally:
            self._running.discard(name)
            self.changed()

    async def _make_backup(self, schedule: dict, name: str) -> str:
        """Export, self-check, publish and list one backup; its name, or _RunFailed."""
        target_spec = schedule["target"]
        target = self._target(target_spec)
        wrap_for = tuple(parse_recipient(text) for text in schedule["recipients"])
        publish = None
        if target_spec["type"] == TARGET_S3:
            def publish(temp_archive: Path) -> None:
                target.publish(temp_archive, name)
        parts = tuple(schedule["parts"] or BACKUP_PARTS)  # None: every part
        try:
            with self._reaper.hold():
                try:
                    result = await trio.to_thread.run_sync(
                        lambda: self._export(name, schedule, wrap_for, publish, parts),
                        limiter=self._bulk)
                finally:
                    with trio.CancelScope(shield=True):
                        await self._reaper.remove()
        except Exception as exc:
            stage = "upload" if isinstance(exc, BackupTargetError) else "export"
            message = failure_text(exc, "exporting")
            await self.report_failure(stage, message, schedule=schedule["name"], backup=name,
                                      owner=schedule["created_by"])
            raise _RunFailed(message) from None
        with trio.CancelScope(shield=True):  # published: it must be listed, even at shutdown
            await self._store.write(
                backups.record_backup, name=name, schedule=schedule["name"],
                created_time=result.metadata["created_at"], size=result.archive_size,
                sha256=result.archive_sha256, format=result.format,
                recipients=result.recipients, target=target_spec,
                location=(target.location_of(name) if publish is not None
                          else self._paths.relative(result.archive_path)),
                key_location=None, verified_time=result.verified_time,
                verify_level=LEVEL_SELF_CHECK)
        log.info("scheduled backup %s published (%s bytes)", name, result.archive_size)
        return name

    def _target(self, spec: dict):
        return open_target(spec, self._paths, self._s3, self._content)

    def _export(self, name: str, schedule: dict, wrap_for: tuple, publish, parts: tuple):
        """Blocking: export; a backup for the server's own folder is then taken into the
        content storage (an S3 bucket given by `serve --storage`: uploaded)."""
        result = export_store(self._store, self._paths.content, self._paths.backups, name,
                              schedule["compression"], wrap_for=wrap_for, publish=publish,
                              limits=self._limits, parts=parts,
                              open_stored=self._content.export_reader)
        if publish is None:
            self._content.adopt([result.archive_path])
        return result

    # -- failures ---------------------------------------------------------------------------------

    async def report_failure(self, stage: str, message: str, *, schedule: str | None = None,
                             backup: str | None = None, owner: str = "") -> None:
        """Count a failure, log it and tell the listeners who may see backups."""
        self.failures[stage] += 1
        log.warning("backup %s failed (%s): %s", backup or schedule, stage, message)
        try:
            await self._hub.publish(
                event(FAILED_EVENT, {"stage": stage, "schedule": schedule,
                                     "backup_name": backup, "error": message,
                                     "time": time.time()}),
                backup_event_audience(owner))
        except Exception:
            log.exception("could not publish the failure of backup %s", backup or schedule)

    # -- verification -----------------------------------------------------------------------------

    async def verify(self, name: str, *, deep: bool = False,
                     key_info: KeyInfo | Unlock | None = None) -> VerifyReport:
        """Verify one listed backup where it is stored, record what was found, and report a
        damaged or unreachable one. `key_info` (an identity or passphrase a caller gave) is
        used in memory only; without it a format 2 backup's own key file is used."""
        async with self._catalogue:
            return await self._verify_locked(name, deep, key_info)

    async def _verify_locked(self, name: str, deep: bool, key_info) -> VerifyReport:
        backup = await self._store.read(backups.get_backup, name)
        target = self._target(backup["target"])
        if key_info is None and backup["key_location"]:
            try:
                key_info = await trio.to_thread.run_sync(self._read_key_file,
                                                         backup["key_location"])
            except (CfmsError, OSError):
                key_info = None  # the key file is gone: check what can be checked without it
        report = await trio.to_thread.run_sync(
            lambda: verify_archive(backup, lambda: target.open_archive(backup["location"]),
                                   self._paths.backup_verify_dir(), self._limits,
                                   key_info=key_info, deep=deep),
            limiter=self._bulk)
        if report.ok or report.damaged:
            await self._store.write(backups.set_verification, name, time=report.time,
                                    ok=report.ok, level=report.level,
                                    detail=report.error)
        if report.damaged or report.unreachable:
            owner = ""
            if backup["schedule"]:
                try:
                    schedule = await self._store.read(backups.get_schedule, backup["schedule"])
                    owner = schedule["created_by"]
                except CfmsError:
                    pass
            await self.report_failure("verify", f"backup '{name}': {report.error}",
                                      schedule=backup["schedule"], backup=name, owner=owner)
        return report

    def _read_key_file(self, key_location: str):
        with self._content.local_copy(key_location, self._paths.backup_verify_dir()) as path:
            return read_key_file(path, self._limits)

    async def reverify_next(self, exclude: str | None = None) -> str | None:
        """Rolling re-verification: verify the backup verified longest ago (not `exclude`,
        the one just made). Returns the problem found, if any."""
        async with self._catalogue:
            backup = await self._store.read(backups.least_recently_verified, exclude)
            if backup is None:
                return None
            report = await self._verify_locked(backup["name"], False, None)
        if report.damaged or report.unreachable:
            return f"re-verification of '{backup['name']}': {report.error}"
        return None

    # -- retention --------------------------------------------------------------------------------

    async def prune(self, *, dry_run: bool, schedule: str | None = None) -> dict:
        """Apply each schedule's retention policy (or one schedule's) to its backups."""
        if schedule is None:
            schedules = await self._store.read(backups.list_schedules)
        else:
            schedules = [await self._store.read(backups.get_schedule, schedule)]
        return await self._prune(schedules, dry_run=dry_run)

    async def _prune(self, schedules: list[dict], *, dry_run: bool) -> dict:
        async with self._catalogue:
            pruned, kept, errors = [], [], []
            for entry in schedules:
                listed = await self._store.read(backups.list_backups, entry["name"])
                keep_these, drop = plan_pruning(listed, entry["keep"])
                kept += [b["name"] for b in keep_these]
                for backup in drop:
                    if dry_run:
                        pruned.append(backup["name"])
                        continue
                    target = self._target(backup["target"])
                    try:
                        await trio.to_thread.run_sync(target.delete, backup["location"],
                                                      limiter=self._bulk)
                    except Exception as exc:
                        message = (f"pruning '{backup['name']}': "
                                   f"{failure_text(exc, 'pruning backups')}")
                        errors.append(message)
                        await self.report_failure("prune", message, schedule=entry["name"],
                                                  backup=backup["name"],
                                                  owner=entry["created_by"])
                        continue
                    await self._store.write(backups.forget_backup, backup["name"])
                    pruned.append(backup["name"])
                    log.info("pruned backup %s (schedule %s)", backup["name"], entry["name"])
        return {"dry_run": dry_run, "pruned": pruned, "kept": kept, "errors": errors}
