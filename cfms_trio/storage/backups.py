"""Backup schedules and the catalogue of published backups (blocking; run through Store).

A schedule row says what the scheduler makes and when (`next_run_time`), and how its last run
went. A backup row is one published archive, wherever it lives (the server's backups folder or
an S3 bucket), with what its latest verification found. Rows hold plain JSON for the nested
values (recipients, target, retention), decoded here so callers see dicts and lists.
"""

from __future__ import annotations

import json

from ..conventions import OPERATION_IMPORT, STATUS_PROCESSING, new_id
from ..errors import Conflict, NotFound
from . import backup_tasks

VERIFY_OK = "ok"
VERIFY_FAILED = "failed"


# -- schedules ----------------------------------------------------------------------------------

def schedule_dict(row) -> dict:
    return {"name": row.name, "created_by": row.created_by, "created_time": row.created_time,
            "interval_seconds": row.interval_seconds, "recipients": json.loads(row.recipients),
            "parts": None if row.parts is None else json.loads(row.parts),
            "compression": row.compression, "target": json.loads(row.target),
            "keep": None if row.keep is None else json.loads(row.keep),
            "next_run_time": row.next_run_time, "last_run_time": row.last_run_time,
            "last_success_time": row.last_success_time, "last_backup": row.last_backup,
            "last_error": row.last_error, "last_error_time": row.last_error_time,
            "runs_count": row.runs_count, "failures_count": row.failures_count}


def create_schedule(m, *, name: str, created_by: str, now: float, interval_seconds: int,
                    recipients: list[str], parts: list[str] | None, compression: str,
                    target: dict, keep: dict | None) -> dict:
    """A new schedule whose first run is due at once; 409 if the name is taken."""
    if m.BackupSchedule.get_or_none(m.BackupSchedule.name == name) is not None:
        raise Conflict(f"a backup schedule named '{name}' already exists")
    m.BackupSchedule.create(
        name=name, created_by=created_by, created_time=now, interval_seconds=interval_seconds,
        recipients=json.dumps(recipients), parts=None if parts is None else json.dumps(parts),
        compression=compression, target=json.dumps(target),
        keep=None if keep is None else json.dumps(keep), next_run_time=now)
    return get_schedule(m, name)


def get_schedule(m, name: str) -> dict:
    row = m.BackupSchedule.get_or_none(m.BackupSchedule.name == name)
    if row is None:
        raise NotFound(f"backup schedule '{name}' does not exist")
    return schedule_dict(row)


def list_schedules(m) -> list[dict]:
    return [schedule_dict(row)
            for row in m.BackupSchedule.select().order_by(m.BackupSchedule.name)]


def delete_schedule(m, name: str) -> None:
    """Forget a schedule; the backups it made stay listed (and are never pruned again)."""
    if not m.BackupSchedule.delete().where(m.BackupSchedule.name == name).execute():
        raise NotFound(f"backup schedule '{name}' does not exist")


def start_run(m, name: str, now: float) -> bool:
    """Record that a run of `name` starts now; the next is due one interval later, whatever
    was missed before (runs missed while the server was down collapse into this one). False if
    the schedule was deleted meanwhile, or is not due (another instance on the same database
    started this run: the compare-and-set on the due time lets exactly one of them run it)."""
    row = m.BackupSchedule.get_or_none(m.BackupSchedule.name == name)
    if row is None:
        return False
    return bool(m.BackupSchedule.update(
        last_run_time=now, next_run_time=now + row.interval_seconds,
        runs_count=m.BackupSchedule.runs_count + 1)
        .where((m.BackupSchedule.name == name) & (m.BackupSchedule.next_run_time <= now))
        .execute())


def finish_run(m, name: str, now: float, *, backup: str | None, error: str | None) -> None:
    """A run ended: with its new backup published and verified, or with `error`. A run may
    publish a backup and still fail later (a re-verification, the pruning): both are kept."""
    fields: dict = {}
    if backup is not None:
        fields.update(last_success_time=now, last_backup=backup)
    if error is not None:
        fields.update(last_error=error, last_error_time=now,
                      failures_count=m.BackupSchedule.failures_count + 1)
    if fields:
        m.BackupSchedule.update(**fields).where(m.BackupSchedule.name == name).execute()


# -- the catalogue of backups -------------------------------------------------------------------

def backup_dict(row) -> dict:
    return {"name": row.name, "schedule": row.schedule, "created_time": row.created_time,
            "size": row.size, "archive_sha256": row.sha256, "format": row.format,
            "recipients": json.loads(row.recipients), "target": json.loads(row.target),
            "location": row.location, "key_location": row.key_location,
            "verified_time": row.verified_time, "verify_result": row.verify_result,
            "verify_level": row.verify_level, "last_error": row.verify_detail
            if row.verify_result == VERIFY_FAILED else None}


def record_backup(m, *, name: str, schedule: str | None, created_time: float, size: int,
                  sha256: str, format: int, recipients: list[str], target: dict, location: str,
                  key_location: str | None, verified_time: float, verify_level: str) -> None:
    """List a backup that was just published after its self-check passed."""
    if m.Backup.get_or_none(m.Backup.name == name) is not None:
        raise Conflict(f"a backup named '{name}' already exists")
    m.Backup.create(name=name, schedule=schedule, created_time=created_time, size=size,
                    sha256=sha256, format=format, recipients=json.dumps(recipients),
                    target=json.dumps(target), location=location, key_location=key_location,
                    verified_time=verified_time, verify_result=VERIFY_OK,
                    verify_level=verify_level)


def record_export(m, task_id: str, owner: str, now: float, expires: float,
                  completed_time: float, *, archive, key, counts: dict, backup: dict) -> dict:
    """`backup_tasks.complete_export` and the backup's catalogue row, in one transaction."""
    recorded = backup_tasks.complete_export(m, task_id, owner, now, expires, completed_time,
                                            archive=archive, key=key, counts=counts)
    record_backup(m, **backup)
    return recorded


def get_backup(m, name: str) -> dict:
    row = m.Backup.get_or_none(m.Backup.name == name)
    if row is None:
        raise NotFound(f"backup '{name}' does not exist")
    return backup_dict(row)


def list_backups(m, schedule: str | None = None) -> list[dict]:
    """Every listed backup (or those of one schedule), newest first."""
    query = m.Backup.select()
    if schedule is not None:
        query = query.where(m.Backup.schedule == schedule)
    return [backup_dict(row)
            for row in query.order_by(m.Backup.created_time.desc(), m.Backup.name)]


def least_recently_verified(m, exclude: str | None = None) -> dict | None:
    """The backup whose latest verification is the oldest (never-verified ones first): the
    next one the rolling re-verification checks."""
    query = m.Backup.select()
    if exclude is not None:
        query = query.where(m.Backup.name != exclude)
    row = query.order_by(m.Backup.verified_time.asc(nulls="first"), m.Backup.name).first()
    return None if row is None else backup_dict(row)


def set_verification(m, name: str, *, time: float, ok: bool, level: str,
                     detail: str | None) -> None:
    (m.Backup.update(verified_time=time, verify_result=VERIFY_OK if ok else VERIFY_FAILED,
                     verify_level=level, verify_detail=detail)
     .where(m.Backup.name == name).execute())


def forget_backup(m, name: str) -> None:
    m.Backup.delete().where(m.Backup.name == name).execute()


def create_plan_task(m, now: float) -> str:
    """The task row a throw-away restore plan records its outcome in (deep verification runs
    the import's commit against an empty temporary database, never the server's)."""
    task_id = new_id()
    m.BackupTask.create(id=task_id, username="", operation=OPERATION_IMPORT,
                        status=STATUS_PROCESSING, current_step="Verifying", created_time=now,
                        started_time=now)
    return task_id
