"""generate_backup: an encrypted export of the whole store, downloadable by the caller."""

from __future__ import annotations

import logging

import trio

from .. import auth
from ..backup.export import check_backup_name, default_backup_name, export_store
from ..dispatch import Context
from ..errors import CfmsError, InternalError
from ..storage import backup_rows, transfers

log = logging.getLogger(__name__)


async def generate_backup(ctx: Context, data: dict) -> dict:
    app = ctx.app
    now = app.now()
    name = check_backup_name(data["backup_name"] or default_backup_name(now))
    ctx.audit_target = name
    task_id = auth.new_id()
    await app.store.write(backup_rows.create_backup_task, id=task_id,
                          username=ctx.user.username, operation="export", status="processing",
                          current_step="Exporting", created_time=now, started_time=now,
                          backup_name=name)
    try:
        with app.reaper.hold():
            result = await trio.to_thread.run_sync(
                lambda: export_store(app.store, app.paths.content, app.paths.backups, name,
                                     data["compression"], now=now),
                limiter=app.io_limiter)
    except BaseException as exc:
        message = exc.message if isinstance(exc, CfmsError) else "export failed"
        if not isinstance(exc, CfmsError):
            log.exception("export %s failed", name)
        with trio.CancelScope(shield=True):
            await app.store.write(backup_rows.update_backup_task, task_id, status="failed",
                                  error_message=message, completed_time=app.now())
        await app.release_deferred_files()
        if isinstance(exc, (CfmsError, trio.Cancelled)) or not isinstance(exc, Exception):
            raise
        raise InternalError("export failed; see the server log") from exc
    await app.release_deferred_files()

    meta = result.metadata
    expires = app.now() + app.settings.transfer_task_ttl_s

    def record(m):
        archive_file_id, key_file_id = auth.new_id(), auth.new_id()
        rel = app.paths.backups.relative_to(app.paths.content)
        backup_rows.register_file(m, archive_file_id, f"{rel}/{result.archive_path.name}",
                                  result.archive_size, result.archive_sha256, now)
        backup_rows.register_file(m, key_file_id, f"{rel}/{result.key_path.name}",
                                  result.key_size, result.key_sha256, now)
        archive_task = transfers.create_task(m, archive_file_id, "download", ctx.user.username,
                                             now, expires, purpose="export")
        key_task = transfers.create_task(m, key_file_id, "download", ctx.user.username, now,
                                         expires, purpose="export")
        backup_rows.update_backup_task(
            m, task_id, status="completed", current_step="Export completed",
            progress_percent=100, archive_file_id=archive_file_id, key_file_id=key_file_id,
            documents_count=meta["documents_count"], folders_count=meta["folders_count"],
            files_count=meta["files_count"], completed_time=app.now())
        return archive_task, key_task

    archive_task, key_task = await app.store.write(record)
    return {"backup_task_id": task_id, "archive_task_id": archive_task,
            "key_task_id": key_task, "archive_size": result.archive_size,
            "archive_sha256": result.archive_sha256, "backup_name": name, "metadata": meta}

