"""Writing a restored backup's rows: collision checks and bulk inserts (blocking).

These run inside the restore's single write transaction, so either every row of the backup
lands or none does. They speak SQL to the store's own sqlite3 connection (the one holding that
transaction) rather than through peewee queries: for a backup of 100,000 documents, building
each batch's SQL value by value in peewee took several times longer than SQLite's own work.
"""

from __future__ import annotations

import json
import operator
from typing import Callable, Iterable

from ..paths import RESTORE_FILES_RELATIVE
from ..tree import parents_first


INSERT_BATCH_ROWS = 5000  # rows per executemany call (one progress report each)
LOOKUP_BATCH_IDS = 900  # ids per IN (...) lookup; SQLite allows at least 999 parameters


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _existing_ids(model, ids: list[str]) -> list[str]:
    meta = model._meta
    cursor = meta.database.cursor()
    found = []
    for batch in _batches(ids, LOOKUP_BATCH_IDS):
        marks = ", ".join("?" * len(batch))
        cursor.execute(f'SELECT "{meta.primary_key.column_name}" FROM "{meta.table_name}" '
                       f'WHERE "{meta.primary_key.column_name}" IN ({marks})', batch)
        found.extend(row[0] for row in cursor)
    return found


def _rule_ids(contents) -> list[str]:
    return [rule["id"] for owner in (*contents.folders, *contents.documents)
            for rule in owner["access_rules"]]


def find_collision(m, contents) -> str | None:
    """A description of the first id of the backup that already exists here, or None."""
    checks = (
        (m.Folder, "folder", [f["id"] for f in contents.folders]),
        (m.Document, "document", [d["id"] for d in contents.documents]),
        (m.Revision, "revision", [r["id"] for d in contents.documents for r in d["revisions"]]),
        (m.File, "file", [f["id"] for f in contents.files]),
        (m.AccessRule, "access rule", _rule_ids(contents)),
    )
    for model, kind, ids in checks:
        existing = _existing_ids(model, ids)
        if existing:
            return f"{kind} id '{sorted(existing)[0]}' already exists on this server"
    return None


def _rule_rows(object_type: str, owner: dict) -> list[dict]:
    rows, seq_of = [], {}
    for rule in owner["access_rules"]:
        seq = seq_of.get(rule["access_type"], 0)
        seq_of[rule["access_type"]] = seq + 1
        rows.append({"id": rule["id"], "object_type": object_type, "object_id": owner["id"],
                     "access_type": rule["access_type"],
                     "rule_data": json.dumps(rule["rule_data"]), "seq": seq})
    return rows


def _insert(model, rows: list[dict], progress: Callable[[int], None] | None = None) -> None:
    """Insert `rows` (dicts keyed by field name, all with the same fields) with executemany."""
    if not rows:
        return
    meta = model._meta
    fields = list(rows[0])
    columns = ", ".join(f'"{meta.fields[name].column_name}"' for name in fields)
    sql = f'INSERT INTO "{meta.table_name}" ({columns}) VALUES ({", ".join("?" * len(fields))})'
    values_of = operator.itemgetter(*fields)
    cursor = meta.database.cursor()
    for batch in _batches(rows, INSERT_BATCH_ROWS):
        cursor.executemany(sql, map(values_of, batch))
        if progress:
            progress(len(batch))


def insert_files(m, files: list[dict], file_path_of: Callable[[str], str],
                 inactive_ids: set[str]) -> None:
    """File rows, active unless in `inactive_ids` (never served: upstream uploads that never
    happened, content missing from the archive)."""
    _insert(m.File, [{"id": f["id"], "sha256": f["sha256"], "size": f["size"],
                      "path": file_path_of(f["id"]), "created_time": f["created_time"],
                      "active": f["id"] not in inactive_ids} for f in files])


def insert_folders(m, folders: list[dict], progress: Callable[[float], None]) -> None:
    """Insert folders parents first, then their access rules."""
    ordered = parents_first(folders, operator.itemgetter("id"), operator.itemgetter("parent_id"))
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        progress(done[0] / max(1, len(ordered)))

    _insert(m.Folder, [{"id": f["id"], "name": f["name"], "parent": f["parent_id"],
                        "created_time": f["created_time"]} for f in ordered], step)
    _insert(m.AccessRule, [row for f in ordered for row in _rule_rows("folder", f)])


def insert_documents(m, documents: list[dict], progress: Callable[[float], None]) -> None:
    """Insert documents, their revisions in history order, and their access rules."""
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        progress(done[0] / max(1, len(documents)))

    _insert(m.Document, [{"id": d["id"], "title": d["title"], "folder": d["folder_id"],
                          "created_time": d["created_time"]} for d in documents], step)
    _insert(m.Revision, [{"id": r["id"], "document": d["id"], "file": r["file_id"],
                          "created_time": r["created_time"], "seq": seq}
                         for d in documents for seq, r in enumerate(d["revisions"])])
    _insert(m.AccessRule, [row for d in documents for row in _rule_rows("document", d)])


def restored_file_ids(m) -> set[str]:
    """Ids of File rows whose content lives in the restore folder (for the orphan sweep)."""
    return {f.id for f in m.File.select(m.File.id)
            .where(m.File.path.startswith(RESTORE_FILES_RELATIVE + "/"))}


def find_root_name_clash(m, contents) -> str | None:
    """A description of a restored top-level folder or document whose name is already taken
    at the root of this store, or None. (Below the root every parent is new, and the archive
    itself was checked for duplicate sibling names.)"""
    checks = (
        (m.Folder, m.Folder.name, m.Folder.parent, "folder", "name",
         [f["name"] for f in contents.folders if f["parent_id"] is None]),
        (m.Document, m.Document.title, m.Document.folder, "document", "title",
         [d["title"] for d in contents.documents if d["folder_id"] is None]),
    )
    for model, column, parent, kind, what, names in checks:
        for batch in _batches(names, LOOKUP_BATCH_IDS):
            row = model.select(column).where(parent.is_null() & column.in_(batch)).first()
            if row is not None:
                return (f"a {kind} with the {what} {getattr(row, what)!r} already exists at "
                        "the root of this server")
    return None
