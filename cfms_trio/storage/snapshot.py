"""Reading the store for an export as streams of records (blocking; run via Store).

The caller holds one read transaction around everything (`consistent_read`, used by
`export.export_store`): SQLite in WAL mode, or PostgreSQL in REPEATABLE READ, gives that
transaction one consistent snapshot however long the export streams, while other connections
keep writing. Each listing is one cursor (or a few, merged on their
common sort key) stepped row by row, so an export holds a piece of records, never a table.

Revisions whose content was never uploaded are left out: they hold nothing to restore, and
neither do files no revision refers to. Rows come as plain tuples from the driver's cursor (a
server-side cursor on PostgreSQL, so memory stays bounded there too): a model instance per row
took most of the time of an export of 100,000 small documents.
"""

from __future__ import annotations

import json
from typing import Iterator

import peewee as pw

from . import backends


def consistent_read(m):
    """The read transaction an export holds around all its listings: one snapshot."""
    return backends.snapshot_transaction(m.db)


def _rows(m, query) -> Iterator[tuple]:
    """The rows of `query` straight from the driver's cursor, stepped lazily."""
    return backends.streamed_rows(m.db, query)


def _grouped(rows: Iterator[tuple]) -> Iterator[tuple[str, list[tuple]]]:
    """(key, rows) runs of rows sorted by their first column."""
    key, run = None, []
    for row in rows:
        if row[0] != key and run:
            yield key, run
            run = []
        key = row[0]
        run.append(row[1:])
    if run:
        yield key, run


class _Merge:
    """Rows of a second cursor sorted by the same key as the main one, taken key by key."""

    def __init__(self, rows: Iterator[tuple]):
        self.runs = _grouped(rows)
        self.current = next(self.runs, None)

    def take(self, key: str) -> list[tuple]:
        # Both sides are sorted by their bytes (BINARY on SQLite, "C" on PostgreSQL): for
        # UTF-8 text that is code point order, Python's order.
        while self.current is not None and self.current[0] < key:
            self.current = next(self.runs, None)
        if self.current is not None and self.current[0] == key:
            run, self.current = self.current[1], next(self.runs, None)
            return run
        return []


def _live_files(m):
    """Files with content that some revision refers to."""
    used = m.Revision.select(m.Revision.id).where(m.Revision.file == m.File.id)
    return (m.File.active == True) & pw.fn.EXISTS(used)  # noqa: E712


def counts(m, parts: tuple[str, ...]) -> dict:
    """metadata.json's counts for an archive of `parts` (0 for a part left out)."""
    out = dict.fromkeys(("folders_count", "documents_count", "files_count", "total_file_bytes",
                         "groups_count", "users_count", "audit_count"), 0)
    if "documents" in parts:
        out["folders_count"] = m.Folder.select().count()
        out["documents_count"] = m.Document.select().count()
        files = m.File.select().where(_live_files(m))
        out["files_count"] = files.count()
        out["total_file_bytes"] = sum(row[0] or 0 for row in _rows(
            m, m.File.select(m.File.size).where(_live_files(m))))
    if "accounts" in parts:
        out["groups_count"] = m.Group.select().count()
        out["users_count"] = m.User.select().count()
    if "audit" in parts:
        out["audit_count"] = m.AuditLog.select().count()
    return out


def _rules(m, object_type: str) -> _Merge:
    return _Merge(_rows(m, m.AccessRule.select(
        m.AccessRule.object_id, m.AccessRule.id, m.AccessRule.access_type,
        m.AccessRule.rule_data).where(m.AccessRule.object_type == object_type)
        .order_by(m.AccessRule.object_id, m.AccessRule.access_type, m.AccessRule.seq)))


def _rule_records(run: list[tuple]) -> list[dict]:
    return [{"id": rule_id, "access_type": access_type, "rule_data": json.loads(rule_data)}
            for rule_id, access_type, rule_data in run]


def folders(m) -> Iterator[dict]:
    """Every folder with its access rules, by id (readers order the tree themselves)."""
    rules = _rules(m, "folder")
    query = m.Folder.select(m.Folder.id, m.Folder.name, m.Folder.parent,
                            m.Folder.created_time).order_by(m.Folder.id)
    for folder_id, name, parent, created_time in _rows(m, query):
        yield {"id": folder_id, "name": name, "parent_id": parent, "created_time": created_time,
               "access_rules": _rule_records(rules.take(folder_id))}


def documents(m) -> Iterator[dict]:
    """Every document with its access rules and its uploaded revisions, oldest first."""
    rules = _rules(m, "document")
    revisions = _Merge(_rows(m, m.Revision.select(
        m.Revision.document, m.Revision.id, m.Revision.file, m.Revision.created_time)
        .join(m.File).where(m.File.active == True)  # noqa: E712
        .order_by(m.Revision.document, m.Revision.seq)))
    query = m.Document.select(m.Document.id, m.Document.title, m.Document.folder,
                              m.Document.created_time).order_by(m.Document.id)
    for document_id, title, folder_id, created_time in _rows(m, query):
        yield {"id": document_id, "title": title, "folder_id": folder_id,
               "created_time": created_time,
               "access_rules": _rule_records(rules.take(document_id)),
               "revisions": [{"id": revision_id, "file_id": file_id, "created_time": time}
                             for revision_id, file_id, time in revisions.take(document_id)]}


def files(m) -> Iterator[dict]:
    """Every file with content that a revision refers to; no server paths (`file_path`)."""
    query = (m.File.select(m.File.id, m.File.sha256, m.File.size, m.File.created_time)
             .where(_live_files(m)).order_by(m.File.id))
    for file_id, sha256, size, created_time in _rows(m, query):
        yield {"id": file_id, "sha256": sha256, "size": size, "created_time": created_time}


def file_path(m, file_id: str) -> str:
    """A file's stored path, relative to the content folder. Plain SQL: building a peewee
    query per file took a fifth of a 1M-document export (100,000 files)."""
    sql = (f'SELECT "{m.File.path.column_name}" FROM "{m.File._meta.table_name}" '
           f'WHERE "{m.File.id.column_name}" = {m.db.param}')
    row = m.db.execute_sql(sql, (file_id,)).fetchone()
    return None if row is None else row[0]


def groups(m) -> Iterator[dict]:
    query = m.Group.select(m.Group.name, m.Group.permissions, m.Group.created_time).order_by(
        m.Group.name)
    for name, permissions, created_time in _rows(m, query):
        yield {"name": name, "permissions": json.loads(permissions),
               "created_time": created_time}


def users(m) -> Iterator[dict]:
    """Every user with its password hash (scheme and factors included), direct permissions
    and groups."""
    memberships = _Merge(_rows(m, m.UserGroup.select(m.UserGroup.user, m.UserGroup.group)
                               .order_by(m.UserGroup.user, m.UserGroup.group)))
    query = m.User.select(m.User.username, m.User.password_hash, m.User.nickname,
                          m.User.permissions, m.User.created_time,
                          m.User.passwd_last_modified).order_by(m.User.username)
    for username, password_hash, nickname, permissions, created, modified in _rows(m, query):
        yield {"username": username, "password_hash": password_hash, "nickname": nickname,
               "permissions": json.loads(permissions),
               "groups": [group for (group,) in memberships.take(username)],
               "created_time": created, "passwd_last_modified": modified}


def audit(m) -> Iterator[dict]:
    """The audit log, oldest first."""
    query = m.AuditLog.select(m.AuditLog.time, m.AuditLog.username, m.AuditLog.action,
                              m.AuditLog.target, m.AuditLog.result,
                              m.AuditLog.address).order_by(m.AuditLog.id)
    for time, username, action, target, result, address in _rows(m, query):
        yield {"time": time, "username": username, "action": action, "target": target,
               "result": result, "address": address}


LISTINGS = {"folders": folders, "documents": documents, "files": files, "groups": groups,
            "users": users, "audit": audit}
