"""Leases: which server instance runs an import, an export or a transfer now, and until when
(issue 16).

Several instances share one database. A task that must run in exactly one of them carries a
lease: the owner's instance id and an expiry time, renewed by the owner while it works. A
claim takes the task's row with `FOR UPDATE SKIP LOCKED` (see `backends`), so instances
claiming at once never wait on each other and never both win. A lease whose expiry has passed
belongs to an instance that died or lost the database: another instance may take the task
over (an import is then failed, a transfer may start afresh). Blocking; run through Store.
"""

from __future__ import annotations

from ..conventions import (
    OPERATION_EXPORT,
    OPERATION_IMPORT,
    STARTABLE_STATUSES,
    STATUS_FAILED,
    STATUS_PENDING,
    STATUS_PROCESSING,
)
from ..errors import Conflict
from . import backends
from .backup_tasks import backup_task_dict, encoded_task_fields, update_backup_task


def _free(model, owner: str, now: float):
    """The rows whose lease `owner` may take: none, its own, or an expired one."""
    return (model.lease_owner.is_null() | (model.lease_owner == owner)
            | (model.lease_expires_time <= now))


# -- transfers ----------------------------------------------------------------------------------

def claim_transfer(m, task_id: str, owner: str, now: float, expires: float) -> None:
    """Give `owner` the transfer of `task_id` until `expires`, or 409 when another instance
    runs one now (its lease has not expired)."""
    query = m.FileTask.select(m.FileTask.id).where(m.FileTask.id == task_id)
    free = backends.locked_skipping_others(
        m.db, query.where(_free(m.FileTask, owner, now))).first()
    if free is None:
        raise Conflict(f"a transfer for task '{task_id}' is already in progress "
                       "(on another server instance)")
    (m.FileTask.update(lease_owner=owner, lease_expires_time=expires)
     .where(m.FileTask.id == task_id).execute())


def release_transfer(m, task_id: str, owner: str) -> None:
    (m.FileTask.update(lease_owner=None, lease_expires_time=None)
     .where((m.FileTask.id == task_id) & (m.FileTask.lease_owner == owner)).execute())


def renew_transfers(m, task_ids: list[str], owner: str, expires: float) -> None:
    if task_ids:
        (m.FileTask.update(lease_expires_time=expires)
         .where(m.FileTask.id.in_(task_ids) & (m.FileTask.lease_owner == owner)).execute())


def leased_transfer_ids(m, now: float, task_ids: list[str] | None = None) -> set[str]:
    """Tasks (of `task_ids`, or all) whose transfer runs now on some instance."""
    query = m.FileTask.select(m.FileTask.id).where(
        m.FileTask.lease_owner.is_null(False) & (m.FileTask.lease_expires_time > now))
    if task_ids is not None:
        query = query.where(m.FileTask.id.in_(task_ids))
    return {t.id for t in query}


# -- imports ------------------------------------------------------------------------------------

def start_import(m, task_id: str, from_status: str, owner: str, now: float, expires: float,
                 **fields) -> dict:
    """Compare-and-set `from_status` (pending, planned or refused) -> `processing` under
    `owner`'s lease, only before the task's deadline (the instance enforcing the deadline
    removes the uploads once it has passed). 409 when the task has moved on; `fields` as for
    `update_backup_task`."""
    updated = (m.BackupTask.update(status=STATUS_PROCESSING, lease_owner=owner,
                                   lease_expires_time=expires, **encoded_task_fields(fields))
               .where((m.BackupTask.id == task_id) & (m.BackupTask.status == from_status)
                      & (m.BackupTask.timeout_time > now))
               .execute())
    if not updated:
        row = m.BackupTask.get_by_id(task_id)
        if row.status == from_status:
            raise Conflict(f"the deadline of backup task '{task_id}' has passed")
        raise Conflict(f"backup task '{task_id}' is {row.status}, not {from_status}")
    return backup_task_dict(m.BackupTask.get_by_id(task_id))


def renew_imports(m, task_ids: list[str], owner: str, expires: float) -> set[str]:
    """Extend `owner`'s leases on the processing imports `task_ids`; return the ids still
    its own (one missing was failed by another instance that found the lease expired)."""
    if not task_ids:
        return set()
    mine = ((m.BackupTask.id.in_(task_ids)) & (m.BackupTask.lease_owner == owner)
            & (m.BackupTask.status == STATUS_PROCESSING))
    m.BackupTask.update(lease_expires_time=expires).where(mine).execute()
    return {t.id for t in m.BackupTask.select(m.BackupTask.id).where(mine)}


def holds_import(m, task_id: str, owner: str) -> bool:
    """Inside the restore's transaction: the import is still processing under `owner`."""
    return m.BackupTask.select().where(
        (m.BackupTask.id == task_id) & (m.BackupTask.lease_owner == owner)
        & (m.BackupTask.status == STATUS_PROCESSING)).exists()


def finish_held_import(m, task_id: str, owner: str, **fields) -> bool:
    """Record how an import ended (`fields` as for `update_backup_task`: failed, cancelled or
    planned) and drop its lease, if `owner` still holds it; False when another instance
    ended it already."""
    if not holds_import(m, task_id, owner):
        return False
    update_backup_task(m, task_id, lease_owner=None, lease_expires_time=None, **fields)
    return True


def fail_expired_imports(m, now: float, message: str, *, every_lease: bool = False,
                         held_by: str | None = None) -> list[dict]:
    """End `failed` every processing import whose lease expired (its instance died; its
    restore never committed, since a commit ends the processing status in the same
    transaction); with `held_by`, instead those that instance holds (it starts again under
    the same name: what it ran before was interrupted) and those with no lease; with
    `every_lease`, every processing one (SQLite: no other instance can exist). Rows another
    instance is failing right now are skipped."""
    query = m.BackupTask.select().where(
        (m.BackupTask.operation == OPERATION_IMPORT)
        & (m.BackupTask.status == STATUS_PROCESSING))
    if held_by is not None:
        # Also those without a lease: processing since before leases existed (migration 4).
        query = query.where((m.BackupTask.lease_owner == held_by)
                            | m.BackupTask.lease_owner.is_null())
    elif not every_lease:
        query = query.where(m.BackupTask.lease_owner.is_null()
                            | (m.BackupTask.lease_expires_time <= now))
    expired = [backup_task_dict(t) for t in backends.locked_skipping_others(m.db, query)]
    ids = [t["backup_task_id"] for t in expired]
    if ids:
        (m.BackupTask.update(status=STATUS_FAILED, error_message=message, completed_time=now,
                             documents_count=0, folders_count=0, files_count=0,
                             lease_owner=None, lease_expires_time=None)
         .where(m.BackupTask.id.in_(ids)).execute())
    return [backup_task_dict(t) for t in m.BackupTask.select().where(m.BackupTask.id.in_(ids))]


def claim_due_imports(m, owner: str, now: float, expires: float,
                      task_id: str | None = None) -> list[str]:
    """Imports past their deadline that `owner` now times out: pending or planned ones, and
    failed ones still holding their uploads (refused because of their options). It holds
    their lease until `expires` (another instance that died while timing one out leaves an
    expired lease, and the task is claimed again). `task_id` limits the claim to one task."""
    stored = m.File.select(m.File.id)
    due = (m.BackupTask.status.in_(STARTABLE_STATUSES)
           | ((m.BackupTask.status == STATUS_FAILED)
              & m.BackupTask.archive_file_id.in_(stored)))
    query = m.BackupTask.select(m.BackupTask.id).where(
        (m.BackupTask.operation == OPERATION_IMPORT) & due
        & (m.BackupTask.timeout_time <= now) & _free(m.BackupTask, owner, now))
    if task_id is not None:
        query = query.where(m.BackupTask.id == task_id)
    ids = [t.id for t in backends.locked_skipping_others(m.db, query)]
    if ids:
        (m.BackupTask.update(lease_owner=owner, lease_expires_time=expires)
         .where(m.BackupTask.id.in_(ids)).execute())
    return ids


def release_import(m, task_id: str, owner: str) -> None:
    """Drop `owner`'s lease on an import that needs none now (a timed-out refused one)."""
    (m.BackupTask.update(lease_owner=None, lease_expires_time=None)
     .where((m.BackupTask.id == task_id) & (m.BackupTask.lease_owner == owner)).execute())


# -- exports ------------------------------------------------------------------------------------

def renew_export(m, task_id: str, owner: str, expires: float) -> None:
    """Extend `owner`'s lease on its running export `task_id`."""
    (m.BackupTask.update(lease_expires_time=expires)
     .where((m.BackupTask.id == task_id) & (m.BackupTask.lease_owner == owner)
            & (m.BackupTask.status == STATUS_PROCESSING)).execute())


def fail_expired_exports(m, now: float, message: str, *,
                         held_by: str | None = None) -> list[str]:
    """End `failed` every processing export whose lease expired (its instance died during
    it); with `held_by`, also those that instance holds (it starts
    again under the same name) and those with no lease (from a release before export
    leases). Returns their ids; rows another instance is failing right now are skipped."""
    stale = m.BackupTask.lease_owner.is_null(False) & (m.BackupTask.lease_expires_time <= now)
    if held_by is not None:
        stale = stale | (m.BackupTask.lease_owner == held_by) | m.BackupTask.lease_owner.is_null()
    query = m.BackupTask.select(m.BackupTask.id).where(
        (m.BackupTask.operation == OPERATION_EXPORT)
        & (m.BackupTask.status == STATUS_PROCESSING) & stale)
    ids = [t.id for t in backends.locked_skipping_others(m.db, query)]
    if ids:
        (m.BackupTask.update(status=STATUS_FAILED, error_message=message, completed_time=now,
                             lease_owner=None, lease_expires_time=None)
         .where(m.BackupTask.id.in_(ids)).execute())
    return ids


def live_import_ids(m, now: float) -> set[str]:
    """Imports some instance holds a live lease on (running, or being timed out)."""
    return {t.id for t in m.BackupTask.select(m.BackupTask.id).where(
        (m.BackupTask.operation == OPERATION_IMPORT)
        & m.BackupTask.status.in_([STATUS_PENDING, STATUS_PROCESSING])
        & m.BackupTask.lease_owner.is_null(False) & (m.BackupTask.lease_expires_time > now))}
