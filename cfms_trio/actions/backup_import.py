"""initiate_backup_import, start_backup_import, get_backup_import_status (SPEC §8)."""

from __future__ import annotations

from .. import auth
from ..dispatch import Context
from ..errors import BadRequest, Conflict, DeadlinePassed, Forbidden
from ..storage import backup_rows, transfers

START_MESSAGE = "Import started. Use get_backup_import_status to check progress."
IMPORT_DIR = "backups/import"


async def initiate_backup_import(ctx: Context, data: dict) -> dict:
    app = ctx.app
    now = app.now()
    timeout = data["timeout_seconds"]
    deadline = now + timeout
    limits = app.settings.limits.archive
    owner = ctx.user.username
    task_id = auth.new_id()
    ctx.audit_target = task_id

    def create(m):
        pending = backup_rows.pending_imports_of(m, owner)
        if pending >= app.settings.limits.pending_imports_per_user:
            raise Conflict(f"you already have {pending} pending imports (the limit); start "
                           "or let them time out before initiating another")
        archive_file_id, key_file_id = auth.new_id(), auth.new_id()
        m.File.create(id=archive_file_id, path=f"{IMPORT_DIR}/{archive_file_id}.cfms.enc",
                      created_time=now, active=False)
        m.File.create(id=key_file_id, path=f"{IMPORT_DIR}/{key_file_id}.key",
                      created_time=now, active=False)
        archive_task = transfers.create_task(m, archive_file_id, "upload", owner, now, deadline,
                                             purpose="backup_archive",
                                             max_size=limits.archive_bytes)
        key_task = transfers.create_task(m, key_file_id, "upload", owner, now, deadline,
                                         purpose="backup_key", max_size=limits.key_file_bytes)
        backup_rows.create_backup_task(
            m, id=task_id, username=owner, operation="import", status="pending",
            current_step="Waiting for uploads", archive_file_id=archive_file_id,
            key_file_id=key_file_id, created_time=now, timeout_time=deadline)
        return archive_task, key_task

    archive_task, key_task = await app.store.write(create)
    app.supervisor.watch(task_id, deadline)
    return {"backup_task_id": task_id, "archive_task_id": archive_task,
            "key_task_id": key_task, "timeout": timeout}


async def _own_import_task(ctx: Context, task_id: str, *, may_view: bool = False) -> dict:
    task = await ctx.app.store.read(backup_rows.get_backup_task, task_id)
    if task["operation"] != "import":
        raise BadRequest(f"backup task '{task_id}' is not an import")
    if task["username"] != ctx.user.username and not (may_view and "sysop" in ctx.user.groups):
        raise Forbidden(f"backup task '{task_id}' belongs to another user")
    return task


async def start_backup_import(ctx: Context, data: dict) -> dict:
    app = ctx.app
    task_id = data["backup_task_id"]
    ctx.audit_target = task_id
    # A start and the deadline's timeout of the same task never interleave.
    async with app.supervisor.deciding(task_id):
        task = await _own_import_task(ctx, task_id)
        if task["status"] == "timeout":
            raise DeadlinePassed(f"backup task '{task_id}' timed out; initiate a new import")
        if task["status"] == "pending" and task["timeout_time"] <= app.now():
            raise DeadlinePassed(f"the deadline of backup task '{task_id}' has passed")
        if task["status"] == "pending":
            uploads = await app.store.read(backup_rows.import_upload_tasks,
                                           task["archive_file_id"], task["key_file_id"])
            missing = sorted(u["purpose"].replace("backup_", "") for u in uploads
                             if u["status"] != "completed")
            if missing:
                verb = "uploads are" if len(missing) > 1 else "upload is"
                raise BadRequest(f"the {' and '.join(missing)} {verb} not complete; "
                                 "upload them with upload_file first")
        # Compare-and-set: a task that is no longer pending (started already) gets 409 here.
        task = await app.store.write(backup_rows.transition_backup_task, task_id, "pending",
                                     status="processing", started_time=app.now(),
                                     current_step="Decrypting archive",
                                     progress_percent=10)
        app.supervisor.start(task)
    return {"backup_task_id": task_id, "status": "processing", "message": START_MESSAGE}


STATUS_FIELDS = ("backup_task_id", "status", "current_step", "progress_percent",
                 "documents_count", "folders_count", "files_count", "created_time",
                 "started_time", "completed_time", "error_message")


async def get_backup_import_status(ctx: Context, data: dict) -> dict:
    task = await _own_import_task(ctx, data["backup_task_id"], may_view=True)
    job = ctx.app.imports.get(task["backup_task_id"])
    if job is not None and task["status"] == "processing":
        task["current_step"], task["progress_percent"] = job.progress.step, job.progress.percent
    out = {field: task[field] for field in STATUS_FIELDS}
    out["timeout_time"] = task["timeout_time"]
    return out
