"""initiate_backup_import, start_backup_import, get_backup_import_status (SPEC §8)."""

from __future__ import annotations

from ..backup.importer import FIRST_STEP, STEP_PERCENT
from ..conventions import OPERATION_IMPORT, STATUS_PENDING, STATUS_PROCESSING, STATUS_TIMEOUT
from ..dispatch import Context
from ..errors import BadRequest, DeadlinePassed, Forbidden
from ..storage import backup_tasks

START_MESSAGE = "Import started. Use get_backup_import_status to check progress."


async def initiate_backup_import(ctx: Context, data: dict) -> dict:
    app = ctx.app
    now = app.now()
    timeout = data["timeout_seconds"]
    limits = app.settings.limits
    created = await app.store.write(
        backup_tasks.create_import_task, ctx.user.username, now, now + timeout,
        pending_limit=limits.pending_imports_per_user,
        archive_max_bytes=limits.archive.archive_bytes,
        key_max_bytes=limits.archive.key_file_bytes)
    ctx.audit_target = created["backup_task_id"]
    app.imports.watch(created["backup_task_id"], now + timeout)
    return {**created, "timeout": timeout}


async def _own_import_task(ctx: Context, task_id: str, *, may_view: bool = False) -> dict:
    task = await ctx.app.store.read(backup_tasks.get_backup_task, task_id)
    if task["operation"] != OPERATION_IMPORT:
        raise BadRequest(f"backup task '{task_id}' is not an import")
    if task["username"] != ctx.user.username and not (may_view and ctx.user.is_sysop):
        raise Forbidden(f"backup task '{task_id}' belongs to another user")
    return task


async def start_backup_import(ctx: Context, data: dict) -> dict:
    app = ctx.app
    task_id = data["backup_task_id"]
    ctx.audit_target = task_id
    # A start and the deadline's timeout of the same task never interleave.
    async with app.imports.deciding(task_id):
        task = await _own_import_task(ctx, task_id)
        if task["status"] == STATUS_TIMEOUT:
            raise DeadlinePassed(f"backup task '{task_id}' timed out; initiate a new import")
        if task["status"] == STATUS_PENDING and task["timeout_time"] <= app.now():
            raise DeadlinePassed(f"the deadline of backup task '{task_id}' has passed")
        passphrase = data["passphrase"]
        with_key = True
        if task["status"] == STATUS_PENDING:
            uploads = await app.store.read(backup_tasks.import_upload_tasks,
                                           task["archive_file_id"], task["key_file_id"])
            missing = sorted(u["what"] for u in uploads if not u["done"])
            if passphrase is not None and "key" in missing:
                # A passphrase stands in for the key upload (format 3 archives).
                missing.remove("key")
                with_key = False
            if missing:
                verb = "uploads are" if len(missing) > 1 else "upload is"
                raise BadRequest(f"the {' and '.join(missing)} {verb} not complete; "
                                 "upload them with upload_file first")
        # Compare-and-set: a task that is no longer pending (started already) gets 409 here.
        task = await app.imports.begin(task_id, started_time=app.now(),
                                       current_step=FIRST_STEP,
                                       progress_percent=STEP_PERCENT[FIRST_STEP][0])
        app.imports.start(task, passphrase=passphrase, with_key=with_key,
                          allow_missing_content=data["allow_missing_content"],
                          accounts=data["accounts"])
    return {"backup_task_id": task_id, "status": STATUS_PROCESSING, "message": START_MESSAGE}


STATUS_FIELDS = ("backup_task_id", "status", "current_step", "progress_percent",
                 "documents_count", "folders_count", "files_count", "created_time",
                 "started_time", "completed_time", "error_message", "warnings")


async def get_backup_import_status(ctx: Context, data: dict) -> dict:
    task = await _own_import_task(ctx, data["backup_task_id"], may_view=True)
    progress = ctx.app.imports.progress_of(task["backup_task_id"])
    if progress is not None and task["status"] == STATUS_PROCESSING:
        task["current_step"], task["progress_percent"] = progress
    out = {field: task[field] for field in STATUS_FIELDS}
    out["timeout_time"] = task["timeout_time"]
    return out
