"""Reading the whole store for an export, and the BackupTask rows (blocking; run via Store)."""

from __future__ import annotations

import json

from ..errors import Conflict, NotFound


def _raw_rows(m, query):
    """The rows of `query` straight from the sqlite3 cursor: plain tuples, without peewee's
    per-value conversions (these columns already come back as the right Python types)."""
    return m.db.execute(query)


def _rules_by_object(m, object_type: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    rows = (m.AccessRule.select(m.AccessRule.object_id, m.AccessRule.id,
                                m.AccessRule.access_type, m.AccessRule.rule_data)
            .where(m.AccessRule.object_type == object_type)
            .order_by(m.AccessRule.object_id, m.AccessRule.access_type, m.AccessRule.seq))
    for object_id, rule_id, access_type, rule_data in _raw_rows(m, rows):
        out.setdefault(object_id, []).append(
            {"id": rule_id, "access_type": access_type, "rule_data": json.loads(rule_data)})
    return out


def snapshot(m) -> dict:
    """Everything a backup holds, read in one transaction so it is one consistent state.

    Revisions whose content was never uploaded are left out: they hold nothing to restore.
    Folders come parents first; revisions oldest first. Files carry relative paths for the
    exporter only; the archive never contains them. Rows are read as plain tuples: a model
    instance per row took most of the time of an export of 100,000 small documents.
    """
    with m.db.atomic():
        folder_rules = _rules_by_object(m, "folder")
        document_rules = _rules_by_object(m, "document")
        children: dict[str | None, list] = {}
        folder_rows = (m.Folder.select(m.Folder.id, m.Folder.name, m.Folder.parent,
                                       m.Folder.created_time)
                       .order_by(m.Folder.created_time, m.Folder.id))
        for row in _raw_rows(m, folder_rows):
            children.setdefault(row[2], []).append(row)
        folders, frontier = [], [None]
        while frontier:
            next_frontier = []
            for parent_id in frontier:
                for folder_id, name, parent, created_time in children.get(parent_id, []):
                    folders.append({"id": folder_id, "name": name, "parent_id": parent,
                                    "created_time": created_time,
                                    "access_rules": folder_rules.get(folder_id, [])})
                    next_frontier.append(folder_id)
            frontier = next_frontier

        revisions: dict[str, list] = {}
        files, file_paths = [], {}
        query = (m.Revision.select(m.Revision.document, m.Revision.id, m.Revision.created_time,
                                   m.File.id, m.File.sha256, m.File.size, m.File.created_time,
                                   m.File.path)
                 .join(m.File)
                 .where(m.File.active == True)  # noqa: E712
                 .order_by(m.Revision.document, m.Revision.seq))
        for (document_id, revision_id, revision_time, file_id, sha256, size, file_time,
             path) in _raw_rows(m, query):
            revisions.setdefault(document_id, []).append(
                {"id": revision_id, "file_id": file_id, "created_time": revision_time})
            if file_id not in file_paths:
                files.append({"id": file_id, "sha256": sha256, "size": size,
                              "created_time": file_time})
                file_paths[file_id] = path
        document_rows = (m.Document.select(m.Document.id, m.Document.title, m.Document.folder,
                                           m.Document.created_time)
                         .order_by(m.Document.created_time, m.Document.id))
        documents = [{"id": document_id, "title": title, "folder_id": folder_id,
                      "created_time": created_time,
                      "access_rules": document_rules.get(document_id, []),
                      "revisions": revisions.get(document_id, [])}
                     for document_id, title, folder_id, created_time
                     in _raw_rows(m, document_rows)]
    return {"folders": folders, "documents": documents, "files": files,
            "file_paths": file_paths}


# -- BackupTask ---------------------------------------------------------------------------------

def backup_task_dict(task) -> dict:
    return {"backup_task_id": task.id, "username": task.username, "operation": task.operation,
            "status": task.status, "current_step": task.current_step,
            "progress_percent": task.progress_percent,
            "archive_file_id": task.archive_file_id, "key_file_id": task.key_file_id,
            "documents_count": task.documents_count, "folders_count": task.folders_count,
            "files_count": task.files_count, "created_time": task.created_time,
            "started_time": task.started_time, "completed_time": task.completed_time,
            "timeout_time": task.timeout_time, "error_message": task.error_message,
            "backup_name": task.backup_name}


def create_backup_task(m, **fields) -> None:
    m.BackupTask.create(**fields)


def get_backup_task(m, task_id: str) -> dict:
    task = m.BackupTask.get_or_none(m.BackupTask.id == task_id)
    if task is None:
        raise NotFound(f"backup task '{task_id}' does not exist")
    return backup_task_dict(task)


def update_backup_task(m, task_id: str, **fields) -> None:
    m.BackupTask.update(**fields).where(m.BackupTask.id == task_id).execute()


def transition_backup_task(m, task_id: str, from_status: str, **fields) -> dict:
    """Change a task only if it is still in `from_status` (compare-and-set), else 409."""
    updated = (m.BackupTask.update(**fields)
               .where((m.BackupTask.id == task_id) & (m.BackupTask.status == from_status))
               .execute())
    if not updated:
        task = m.BackupTask.get_or_none(m.BackupTask.id == task_id)
        if task is None:
            raise NotFound(f"backup task '{task_id}' does not exist")
        raise Conflict(f"backup task '{task_id}' is {task.status}, not {from_status}")
    return get_backup_task(m, task_id)


def register_file(m, file_id: str, path: str, size: int, sha256: str, now: float) -> None:
    """A File row for server-made content (an export archive or key), ready to download."""
    m.File.create(id=file_id, path=path, size=size, sha256=sha256, created_time=now, active=True)


def import_upload_tasks(m, archive_file_id: str, key_file_id: str) -> list[dict]:
    """The upload tasks of an import, with their state."""
    return [{"task_id": t.id, "file_id": t.__data__["file"], "status": t.status,
             "purpose": t.purpose}
            for t in m.FileTask.select().where(m.FileTask.file.in_([archive_file_id,
                                                                    key_file_id]))]


def discard_import_uploads(m, archive_file_id: str, key_file_id: str) -> dict:
    """Forget an import's uploads: tasks and File rows. Returns the task ids and relative paths
    whose files the caller removes from disk."""
    file_ids = [archive_file_id, key_file_id]
    task_ids = [t.id for t in m.FileTask.select(m.FileTask.id)
                .where(m.FileTask.file.in_(file_ids))]
    paths = [f.path for f in m.File.select(m.File.path).where(m.File.id.in_(file_ids))]
    m.FileTask.delete().where(m.FileTask.file.in_(file_ids)).execute()
    m.File.delete().where(m.File.id.in_(file_ids)).execute()
    return {"task_ids": task_ids, "paths": paths}


def tasks_in_status(m, operation: str, status: str) -> list[dict]:
    return [backup_task_dict(t) for t in m.BackupTask.select().where(
        (m.BackupTask.operation == operation) & (m.BackupTask.status == status))]


def pending_imports_of(m, username: str) -> int:
    return m.BackupTask.select().where((m.BackupTask.username == username)
                                       & (m.BackupTask.operation == "import")
                                       & (m.BackupTask.status == "pending")).count()
