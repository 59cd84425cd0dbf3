"""initiate_backup_import, start_backup_import, cancel_backup_import, get_backup_import_status
(SPEC §8, issue 14)."""

from __future__ import annotations

import functools

import trio

from ..backup.importer import FIRST_STEP, STEP_PERCENT, preflight_space
from ..backup.restore import RestoreOptions
from ..conventions import (
    OPERATION_IMPORT,
    STARTABLE_STATUSES,
    STATUS_PENDING,
    STATUS_PROCESSING,
    STATUS_TIMEOUT,
    is_id,
)
from ..dispatch import Context
from ..errors import BadRequest, Conflict, DeadlinePassed, Forbidden
from ..storage import backup_tasks

INCLUDE_KEYS = ("folder_id", "document_id", "path")
INCLUDE_PATH_MAX_CHARS = 64 * 1024

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
        # Refused because of its options (the uploads are kept): may be started again.
        retry = await app.store.read(backup_tasks.failed_holding_uploads, task)
        startable = task["status"] in STARTABLE_STATUSES or retry
        if task["status"] == STATUS_TIMEOUT:
            raise DeadlinePassed(f"backup task '{task_id}' timed out; initiate a new import")
        if startable and task["timeout_time"] <= app.now():
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
        elif startable:
            # A planned or refused task keeps its uploads; without a key upload it needs the
            # passphrase again.
            uploads = await app.store.read(backup_tasks.import_upload_tasks,
                                           task["archive_file_id"], task["key_file_id"])
            with_key = any(u["what"] == "key" and u["done"] for u in uploads)
            if not with_key and passphrase is None:
                raise BadRequest("this import was planned with a passphrase and no key "
                                 "upload; give the passphrase again")
        options = RestoreOptions(accounts=data["accounts"],
                                 conflict_policy=data["conflict_policy"],
                                 include=tuple(_checked_include(data["include"])),
                                 target_folder_id=data["target_folder_id"])
        if startable:
            archive_bytes = sum(u["size"] or 0 for u in uploads if u["what"] == "archive")
            await trio.to_thread.run_sync(functools.partial(
                preflight_space, app.paths, archive_bytes,
                copied_first=not app.content.reads_uploads_in_place))
        # Compare-and-set: a task that is no longer pending, planned or refused (started
        # already) gets 409 here.
        from_status = task["status"] if startable else STATUS_PENDING
        task = await app.imports.begin(task_id, from_status, started_time=app.now(),
                                       current_step=FIRST_STEP,
                                       progress_percent=STEP_PERCENT[FIRST_STEP][0],
                                       completed_time=None, plan=None, error_message=None,
                                       warnings=[])
        app.imports.start(task, passphrase=passphrase, with_key=with_key,
                          allow_missing_content=data["allow_missing_content"],
                          dry_run=data["dry_run"], options=options)
    return {"backup_task_id": task_id, "status": STATUS_PROCESSING, "message": START_MESSAGE}


def _checked_include(include: list) -> list[dict]:
    """Each include entry is an object with one of folder_id, document_id (ids) or path."""
    for number, entry in enumerate(include, 1):
        where = f"data.include[{number - 1}]"
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in \
                INCLUDE_KEYS:
            raise BadRequest(f"field '{where}' must be an object with exactly one of "
                             "'folder_id', 'document_id' or 'path'")
        (key, value), = entry.items()
        if not isinstance(value, str) or not value:
            raise BadRequest(f"field '{where}.{key}' must be a non-empty string")
        if key != "path" and not is_id(value):
            raise BadRequest(f"field '{where}.{key}' has an invalid format")
        if key == "path" and (len(value) > INCLUDE_PATH_MAX_CHARS or not value.startswith("/")):
            raise BadRequest(f"field '{where}.path' must start with '/' and be at most "
                             f"{INCLUDE_PATH_MAX_CHARS} characters long")
    return include


async def cancel_backup_import(ctx: Context, data: dict) -> dict:
    task_id = data["backup_task_id"]
    ctx.audit_target = task_id
    task = await _own_import_task(ctx, task_id, may_view=True)
    if task["status"] not in (*STARTABLE_STATUSES, STATUS_PROCESSING) and not \
            await ctx.app.store.read(backup_tasks.failed_holding_uploads, task):
        raise Conflict(f"backup task '{task_id}' is {task['status']}; only a pending, planned "
                       "or processing import, or one refused because of its options, can be "
                       "cancelled")
    task = await ctx.app.imports.cancel(task_id, ctx.user.username)
    return {"backup_task_id": task_id, "status": task["status"],
            "message": task["error_message"]}


STATUS_FIELDS = ("backup_task_id", "status", "current_step", "progress_percent",
                 "documents_count", "folders_count", "files_count", "created_time",
                 "started_time", "completed_time", "error_message", "warnings", "plan")


async def get_backup_import_status(ctx: Context, data: dict) -> dict:
    task = await _own_import_task(ctx, data["backup_task_id"], may_view=True)
    progress = ctx.app.imports.progress_of(task["backup_task_id"])
    if progress is not None and task["status"] == STATUS_PROCESSING:
        task["current_step"], task["progress_percent"] = progress["step"], progress["percent"]
    out = {field: task[field] for field in STATUS_FIELDS}
    out["timeout_time"] = task["timeout_time"]
    # Whether start_backup_import may (re)start it now: pending, planned, or refused because
    # of its options with the uploads kept, and the deadline not passed.
    out["startable"] = task["timeout_time"] > ctx.app.now() and (
        task["status"] in STARTABLE_STATUSES
        or await ctx.app.store.read(backup_tasks.failed_holding_uploads, task))
    return out
