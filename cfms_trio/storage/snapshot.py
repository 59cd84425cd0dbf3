"""Reading the whole store for an export, as one consistent snapshot (blocking; run via Store)."""

from __future__ import annotations

import json
import operator

from ..tree import parents_first


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
        folder_rows = (m.Folder.select(m.Folder.id, m.Folder.name, m.Folder.parent,
                                       m.Folder.created_time)
                       .order_by(m.Folder.created_time, m.Folder.id))
        folders = [{"id": folder_id, "name": name, "parent_id": parent,
                    "created_time": created_time,
                    "access_rules": folder_rules.get(folder_id, [])}
                   for folder_id, name, parent, created_time in parents_first(
                       _raw_rows(m, folder_rows), operator.itemgetter(0),
                       operator.itemgetter(2))]

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
