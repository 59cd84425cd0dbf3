"""BackupTask rows and the file tasks that belong to them (blocking; run through Store).

An import task owns two upload tasks (archive and key) whose File rows point into the import
upload folder; an export task, once done, owns two download tasks for the archive and key it
wrote. Both are created and finished here, so handlers never build rows.
"""

from __future__ import annotations

import json

from .. import paths
from ..conventions import (
    DELETED_OWNER,
    OPERATION_EXPORT,
    OPERATION_IMPORT,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STARTABLE_STATUSES,
    STATUS_PENDING,
    STATUS_PLANNED,
    STATUS_PROCESSING,
    new_id,
)
from ..errors import Conflict, NotFound
from . import transfers

ARCHIVE_UPLOAD = "backup_archive"
KEY_UPLOAD = "backup_key"


def backup_task_dict(task) -> dict:
    return {"backup_task_id": task.id, "username": task.username, "operation": task.operation,
            "status": task.status, "current_step": task.current_step,
            "progress_percent": task.progress_percent,
            "archive_file_id": task.archive_file_id, "key_file_id": task.key_file_id,
            "documents_count": task.documents_count, "folders_count": task.folders_count,
            "files_count": task.files_count, "created_time": task.created_time,
            "started_time": task.started_time, "completed_time": task.completed_time,
            "timeout_time": task.timeout_time, "error_message": task.error_message,
            "backup_name": task.backup_name, "warnings": json.loads(task.warnings),
            "plan": json.loads(task.plan) if task.plan else None}


def get_backup_task(m, task_id: str) -> dict:
    task = m.BackupTask.get_or_none(m.BackupTask.id == task_id)
    if task is None:
        raise NotFound(f"backup task '{task_id}' does not exist")
    return backup_task_dict(task)


def update_backup_task(m, task_id: str, **fields) -> None:
    """Set `fields` of a task (`warnings` as a list of strings, `plan` as an object)."""
    m.BackupTask.update(**encoded_task_fields(fields)).where(m.BackupTask.id == task_id).execute()


def encoded_task_fields(fields: dict) -> dict:
    """`fields` of a task as its columns hold them (warnings and plan as JSON)."""
    if "warnings" in fields:
        fields["warnings"] = json.dumps(fields["warnings"])
    if fields.get("plan") is not None:
        fields["plan"] = json.dumps(fields["plan"])
    return fields


def transition_backup_task(m, task_id: str, from_status: str, **fields) -> dict:
    """Change a task only if it is still in `from_status` (compare-and-set), else 409;
    `fields` as for `update_backup_task`."""
    updated = (m.BackupTask.update(**encoded_task_fields(fields))
               .where((m.BackupTask.id == task_id) & (m.BackupTask.status == from_status))
               .execute())
    if not updated:
        task = m.BackupTask.get_or_none(m.BackupTask.id == task_id)
        if task is None:
            raise NotFound(f"backup task '{task_id}' does not exist")
        raise Conflict(f"backup task '{task_id}' is {task.status}, not {from_status}")
    return get_backup_task(m, task_id)


def tasks_in_status(m, operation: str, status: str) -> list[dict]:
    return [backup_task_dict(t) for t in m.BackupTask.select().where(
        (m.BackupTask.operation == operation) & (m.BackupTask.status == status))]


# -- imports ------------------------------------------------------------------------------------

def create_import_task(m, owner: str, now: float, deadline: float, *, pending_limit: int,
                       archive_max_bytes: int, key_max_bytes: int) -> dict:
    """A pending import with its two upload tasks, unless `owner` holds `pending_limit`
    imports pending or running already (409). Returns the three task ids.

    Running imports count too: each holds its uploads on disk and a worker for as long as it
    runs, so starting them must not make room for more."""
    unfinished = (m.BackupTask.select().where(
        (m.BackupTask.username == owner) & (m.BackupTask.operation == OPERATION_IMPORT)
        & (m.BackupTask.status.in_((STATUS_PENDING, STATUS_PLANNED, STATUS_PROCESSING)))).count())
    if unfinished >= pending_limit:
        raise Conflict(f"you already have {unfinished} imports pending or running (the limit "
                       f"is {pending_limit}); let them finish or time out before initiating "
                       "another")
    archive_file_id, key_file_id = new_id(), new_id()
    m.File.create(id=archive_file_id, path=paths.import_archive_relative(archive_file_id),
                  created_time=now, active=False)
    m.File.create(id=key_file_id, path=paths.import_key_relative(key_file_id),
                  created_time=now, active=False)
    archive_task = transfers.create_task(m, archive_file_id, "upload", owner, now, deadline,
                                         purpose=ARCHIVE_UPLOAD, max_size=archive_max_bytes)
    key_task = transfers.create_task(m, key_file_id, "upload", owner, now, deadline,
                                     purpose=KEY_UPLOAD, max_size=key_max_bytes)
    task_id = new_id()
    m.BackupTask.create(id=task_id, username=owner, operation=OPERATION_IMPORT,
                        status=STATUS_PENDING, current_step="Waiting for uploads",
                        archive_file_id=archive_file_id, key_file_id=key_file_id,
                        created_time=now, timeout_time=deadline)
    return {"backup_task_id": task_id, "archive_task_id": archive_task,
            "key_task_id": key_task}


def import_upload_tasks(m, archive_file_id: str, key_file_id: str) -> list[dict]:
    """The upload tasks of an import: `what` ("archive" or "key"), whether it is `done`, and
    the `size` the client announced for it (None before its transfer began)."""
    what_of = {ARCHIVE_UPLOAD: "archive", KEY_UPLOAD: "key"}
    return [{"task_id": t.id, "file_id": t.__data__["file"], "done": t.status == "completed",
             "what": what_of[t.purpose], "size": t.file.size}
            for t in m.FileTask.select().where(m.FileTask.file.in_([archive_file_id,
                                                                    key_file_id]))]


def abandon_tasks_of(m, username: str, message: str, now: float) -> list[dict]:
    """Part of deleting `username`: its pending imports end `failed` with `message`, and every
    task it owned passes to no account (`DELETED_OWNER`), so a later account of the same name
    can neither read nor start them. Returns the failed imports, each with the ids of its
    upload tasks (`upload_task_ids`), for the supervisor to close."""
    owned = (m.BackupTask.username == username)
    pending = [backup_task_dict(t) for t in m.BackupTask.select().where(
        owned & (m.BackupTask.operation == OPERATION_IMPORT)
        & (m.BackupTask.status.in_(STARTABLE_STATUSES)))]
    for task in pending:
        task["upload_task_ids"] = [u["task_id"] for u in import_upload_tasks(
            m, task["archive_file_id"], task["key_file_id"])]
    (m.BackupTask.update(status=STATUS_FAILED, error_message=message, completed_time=now)
     .where(m.BackupTask.id.in_([t["backup_task_id"] for t in pending])).execute())
    m.BackupTask.update(username=DELETED_OWNER).where(owned).execute()
    for task in pending:
        task.update(status=STATUS_FAILED, error_message=message, completed_time=now,
                    username=DELETED_OWNER)
    return pending


def finished_imports_holding_uploads(m) -> list[dict]:
    """Import tasks past pending and processing whose uploads are still stored: a crash came
    between recording the outcome and removing them (a completed import records its status in
    the restore's transaction and cleans up after)."""
    stored = m.File.select(m.File.id)
    return [backup_task_dict(t) for t in m.BackupTask.select().where(
        (m.BackupTask.operation == OPERATION_IMPORT)
        & m.BackupTask.status.not_in([STATUS_PENDING, STATUS_PLANNED, STATUS_PROCESSING])
        & (m.BackupTask.archive_file_id.in_(stored) | m.BackupTask.key_file_id.in_(stored)))]


def failed_holding_uploads(m, task: dict) -> bool:
    """Whether a failed import still holds its uploaded archive: it was refused because of its
    options (the archive itself was fine), and may be started again until its deadline."""
    return (task["operation"] == OPERATION_IMPORT and task["status"] == STATUS_FAILED
            and task["archive_file_id"] is not None
            and m.File.select().where(m.File.id == task["archive_file_id"]).exists())


def discard_import_uploads(m, archive_file_id: str, key_file_id: str) -> dict:
    """Forget an import's uploads: tasks and File rows. Returns the task ids and relative paths
    whose files the caller removes from disk."""
    file_ids = [archive_file_id, key_file_id]
    task_ids = [t.id for t in m.FileTask.select(m.FileTask.id)
                .where(m.FileTask.file.in_(file_ids))]
    stored = [f.path for f in m.File.select(m.File.path).where(m.File.id.in_(file_ids))]
    m.FileTask.delete().where(m.FileTask.file.in_(file_ids)).execute()
    m.File.delete().where(m.File.id.in_(file_ids)).execute()
    return {"task_ids": task_ids, "paths": stored}


# -- exports ------------------------------------------------------------------------------------

def create_export_task(m, owner: str, name: str, now: float, instance_id: str,
                       lease_expires: float) -> str:
    """A processing export under `instance_id`'s lease until `lease_expires` (renewed while it
    runs, see `leases.renew_export`)."""
    task_id = new_id()
    m.BackupTask.create(id=task_id, username=owner, operation=OPERATION_EXPORT,
                        status=STATUS_PROCESSING, current_step="Exporting", created_time=now,
                        started_time=now, backup_name=name, lease_owner=instance_id,
                        lease_expires_time=lease_expires)
    return task_id


def complete_export(m, task_id: str, owner: str, now: float, expires: float,
                    completed_time: float, *, archive: tuple[str, int, str],
                    key: tuple[str, int, str] | None, counts: dict) -> dict:
    """Record a backup written from the snapshot taken at `now`: File rows for its archive
    and key (each `(relative path, size, sha256)`; `key` is None for an archive made for
    recipients, which has no key file), download tasks for `owner` until `expires`, the task
    completed."""
    archive_file_id = new_id()
    key_file_id = key_task = None
    transfers.register_file(m, archive_file_id, *archive, now)
    archive_task = transfers.create_task(m, archive_file_id, "download", owner, now, expires,
                                         purpose="export")
    if key is not None:
        key_file_id = new_id()
        transfers.register_file(m, key_file_id, *key, now)
        key_task = transfers.create_task(m, key_file_id, "download", owner, now, expires,
                                         purpose="export")
    update_backup_task(m, task_id, status=STATUS_COMPLETED, current_step="Export completed",
                       progress_percent=100, archive_file_id=archive_file_id,
                       key_file_id=key_file_id, completed_time=completed_time,
                       lease_owner=None, lease_expires_time=None, **counts)
    return {"archive_task_id": archive_task, "key_task_id": key_task}
