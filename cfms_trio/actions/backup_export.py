"""generate_backup: an encrypted export of the whole store, downloadable by the caller."""

from __future__ import annotations

import logging
import time

import trio

from ..backup.export import check_backup_name, default_backup_name, export_store
from ..backup.format import Passphrase, parse_recipient
from ..conventions import BACKUP_PARTS, STATUS_FAILED
from ..dispatch import Context
from ..errors import ArchiveError, BadRequest, CfmsError, Conflict, disk_error, internal_error
from ..backup.targets import TARGET_LOCAL
from ..backup.verify import LEVEL_SELF_CHECK
from ..nurseries import single_error_unwrapped
from ..storage import backup_tasks, backups, leases

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 16
PASSPHRASE_MAX_CHARS = 1024


def wrap_targets(data: dict) -> tuple:
    """The recipients and passphrase a backup is made for (empty: a plain key file)."""
    targets = []
    for index, text in enumerate(data["recipients"] or ()):
        try:
            targets.append(parse_recipient(text))
        except ArchiveError as exc:
            raise BadRequest(f"field 'data.recipients[{index}]': {exc.message}") from None
    if data["passphrase"] is not None:
        targets.append(Passphrase(data["passphrase"]))
    return tuple(targets)


def checked_parts(values: list | None) -> tuple[str, ...] | None:
    """The `parts` a request names, in BACKUP_PARTS order (None: every part; the export adds
    their prerequisites), or 400 naming the first unknown one. Shared by generate_backup and
    create_backup_schedule."""
    if values is None:
        return None
    for index, part in enumerate(values):
        if part not in BACKUP_PARTS:
            raise BadRequest(f"field 'data.parts[{index}]': {part!r} is not a part this server "
                             f"exports (it exports: {', '.join(BACKUP_PARTS)})")
    if not values:
        raise BadRequest("field 'data.parts' must name at least one part; leave it out for "
                         "every part")
    return tuple(part for part in BACKUP_PARTS if part in values)


def _export_and_store(app, name: str, compression: str, now: float, wrap_for: tuple,
                      parts: tuple[str, ...]):
    """The export, written and self-checked in the backups folder, then taken into the content
    storage (an S3 bucket: uploaded, and removed locally)."""
    result = export_store(app.store, app.paths.content, app.paths.backups, name, compression,
                          now=now, wrap_for=wrap_for, limits=app.settings.limits.archive,
                          parts=parts, open_stored=app.content.export_reader)
    app.content.adopt([path for path in (result.archive_path, result.key_path)
                       if path is not None])
    return result


async def _renew_lease(app, task_id: str, instance: str, lease_s: float) -> None:
    """While the export runs: every third of the lease time, this instance still runs it
    (another instance fails an export whose lease expired: its instance died)."""
    while True:
        await trio.sleep(lease_s / 3)
        try:
            await app.store.write(leases.renew_export, task_id, instance, time.time() + lease_s)
        except Exception:
            log.exception("could not renew the lease of export %s", task_id)


async def generate_backup(ctx: Context, data: dict) -> dict:
    app = ctx.app
    now = app.now()
    name = check_backup_name(data["backup_name"] or default_backup_name(now))
    wrap_for = wrap_targets(data)
    parts = checked_parts(data["parts"]) or BACKUP_PARTS
    ctx.audit_target = name
    instance, lease_s = app.relay.instance_id, app.settings.lease_s
    task_id = await app.store.write(backup_tasks.create_export_task, ctx.user.username, name,
                                    now, instance, time.time() + lease_s)
    try:
        with app.reaper.hold(), single_error_unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_renew_lease, app, task_id, instance, lease_s)
                result = await trio.to_thread.run_sync(
                    lambda: _export_and_store(app, name, data["compression"], now, wrap_for,
                                              parts),
                    limiter=app.bulk_io_limiter)
                nursery.cancel_scope.cancel()
    except BaseException as exc:
        failure = exc if isinstance(exc, CfmsError) else None
        if failure is None and isinstance(exc, OSError):
            failure = disk_error(log, exc, "exporting")  # a full disk is a 507, not a 500
        elif failure is None and isinstance(exc, Exception):
            failure = internal_error(log, "exporting", exc)
        with trio.CancelScope(shield=True):
            await app.store.write(backup_tasks.update_backup_task, task_id,
                                  status=STATUS_FAILED,
                                  error_message=failure.message if failure else "export failed",
                                  completed_time=app.now(), lease_owner=None,
                                  lease_expires_time=None)
            await app.reaper.remove()
        if failure is None:
            raise
        if not isinstance(failure, Conflict | BadRequest):  # the caller's mistakes are not
            await app.backups.report_failure("export", failure.message, backup=name,
                                             owner=ctx.user.username)
        raise failure from None
    await app.reaper.remove()

    meta = result.metadata
    archive_location = app.paths.relative(result.archive_path)
    key_location = None if result.key_path is None else app.paths.relative(result.key_path)
    recorded = await app.store.write(
        backups.record_export, task_id, ctx.user.username, now,
        app.now() + app.settings.transfer_task_ttl_s, app.now(),
        archive=(archive_location, result.archive_size, result.archive_sha256),
        key=(None if key_location is None else
             (key_location, result.key_size, result.key_sha256)),
        counts={field: meta[field]
                for field in ("documents_count", "folders_count", "files_count")},
        backup={"name": name, "schedule": None, "created_time": now,
                "size": result.archive_size, "sha256": result.archive_sha256,
                "format": result.format, "recipients": result.recipients,
                "target": {"type": TARGET_LOCAL}, "location": archive_location,
                "key_location": key_location, "verified_time": result.verified_time,
                "verify_level": LEVEL_SELF_CHECK})
    return {"backup_task_id": task_id, **recorded, "archive_size": result.archive_size,
            "archive_sha256": result.archive_sha256, "backup_name": name, "metadata": meta,
            "recipients": result.recipients, "passphrase": result.passphrase}
