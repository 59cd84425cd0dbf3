"""Writing a restored backup's rows: lookups by key, bulk inserts and updates (blocking).

These run inside the restore's single write transaction, so either every row of the backup
lands or none does. They take the rows in batches (from the import's staging index) and speak
SQL to the store's own connection (the one holding that transaction) rather than through
peewee queries: for a backup of 100,000 documents, building each batch's SQL value by value in
peewee took several times longer than SQLite's own work. How a batch is sent differs per
database (`backends.insert_batch`).
"""

from __future__ import annotations

from typing import Callable, Iterable

from ..paths import RESTORE_FILES_RELATIVE
from . import backends

LOOKUP_BATCH_IDS = 900  # ids per IN (...) lookup; SQLite allows at least 999 parameters

# Columns of the rows each insert takes, in order (the staging index reads them this way).
FOLDER_FIELDS = ("id", "name", "parent", "created_time")
DOCUMENT_FIELDS = ("id", "title", "folder", "created_time")
REVISION_FIELDS = ("id", "document", "file", "created_time", "seq")
RULE_FIELDS = ("id", "object_type", "object_id", "access_type", "rule_data", "seq")
FILE_FIELDS = ("id", "sha256", "size", "created_time", "path", "active")
AUDIT_FIELDS = ("time", "username", "action", "target", "result", "address")


def _column(model, field: str) -> str:
    return model._meta.fields[field].column_name


def existing_keys(model, field: str, keys: list[str], *, root_only: str | None = None) -> list:
    """Which of `keys` (at most LOOKUP_BATCH_IDS) `model` already holds in `field`; with
    `root_only` (the parent field), only among top-level rows."""
    meta = model._meta
    marks = ", ".join([meta.database.param] * len(keys))
    where = f'"{_column(model, field)}" IN ({marks})'
    if root_only:
        where += f' AND "{_column(model, root_only)}" IS NULL'
    cursor = meta.database.cursor()
    cursor.execute(f'SELECT "{_column(model, field)}" FROM "{meta.table_name}" WHERE {where}',
                   keys)
    return [row[0] for row in cursor]


def insert_rows(model, fields: tuple[str, ...], batches: Iterable[list[tuple]],
                progress: Callable[[int], None] | None = None) -> int:
    """Insert every batch of `batches` (tuples in the order of `fields`) with executemany;
    return how many rows."""
    meta = model._meta
    columns = [_column(model, name) for name in fields]
    total = 0
    for batch in batches:
        backends.insert_batch(meta.database, meta.table_name, columns, batch)
        total += len(batch)
        if progress:
            progress(len(batch))
    return total


def file_rows(batches: Iterable[list[tuple]], file_path_of: Callable[[str], str],
              inactive_ids: set[str]) -> Iterable[list[tuple]]:
    """File rows from batches of (archive id, id here, sha256, size, created_time), active
    unless the archive id is in `inactive_ids` (never served: upstream uploads that never
    happened, content missing from the archive)."""
    for batch in batches:
        yield [(file_id, sha256, size, created_time, file_path_of(file_id),
                archive_id not in inactive_ids)
               for archive_id, file_id, sha256, size, created_time in batch]


def update_placements(model, fields: tuple[str, ...], batches: Iterable[list[tuple]],
                      progress: Callable[[int], None] | None = None) -> int:
    """Give existing folders or documents (`fields`: id, name, parent, ...) the name and
    parent of each (id, name, parent) row: an overwrite by a restore."""
    meta = model._meta
    mark = meta.database.param
    sql = (f'UPDATE "{meta.table_name}" SET "{_column(model, fields[1])}" = {mark}, '
           f'"{_column(model, fields[2])}" = {mark} WHERE "{_column(model, fields[0])}" = {mark}')
    cursor = meta.database.cursor()
    total = 0
    for batch in batches:
        cursor.executemany(sql, [(name, parent, object_id) for object_id, name, parent in batch])
        total += len(batch)
        if progress:
            progress(len(batch))
    return total


def delete_rules_of(m, batches: Iterable[list[tuple[str, str]]]) -> None:
    """Delete every access rule of the (object type, id) pairs (an overwrite replaces them)."""
    database = m.AccessRule._meta.database
    cursor = database.cursor()
    table, mark = m.AccessRule._meta.table_name, database.param
    for batch in batches:
        cursor.executemany(
            f'DELETE FROM "{table}" WHERE object_type = {mark} AND object_id = {mark}', batch)


def restored_file_ids(m) -> set[str]:
    """Ids of File rows whose content lives in the restore folder (for the orphan sweep)."""
    return {f.id for f in m.File.select(m.File.id)
            .where(m.File.path.startswith(RESTORE_FILES_RELATIVE + "/"))}
