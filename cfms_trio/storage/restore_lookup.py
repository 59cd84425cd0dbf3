"""What the restore planner asks the live store (blocking; inside the restore's transaction or
a read).

Every lookup takes ids in batches of at most LOOKUP_BATCH_IDS, so a plan for 100,000 objects
makes a few hundred queries, not 100,000. The lookups by id speak SQL to the store's own
connection (`_by_ids`), like `restore_rows`: building an IN list of 900 values in peewee costs
more than the query.
"""

from __future__ import annotations

from typing import Iterable

from peewee import fn

from ..errors import Forbidden, NotFound
from ..permissions import Principal
from .documents import check_access, folder_chain
from .restore_rows import LOOKUP_BATCH_IDS


def _batches(ids: Iterable[str]) -> Iterable[list[str]]:
    batch: list[str] = []
    for object_id in ids:
        batch.append(object_id)
        if len(batch) >= LOOKUP_BATCH_IDS:
            yield batch
            batch = []
    if batch:
        yield batch


def _column(model, field: str) -> str:
    return f'"{model._meta.fields[field].column_name}"'


def _by_ids(model, fields: tuple[str, ...], ids: Iterable[str]) -> Iterable[tuple]:
    """Rows (`fields`, the first one the key) of `model` whose key is one of `ids`."""
    meta = model._meta
    columns = ", ".join(_column(model, name) for name in fields)
    cursor = meta.database.cursor()
    for batch in _batches(ids):
        marks = ", ".join([meta.database.param] * len(batch))
        cursor.execute(f'SELECT {columns} FROM "{meta.table_name}" WHERE '
                       f'{_column(model, fields[0])} IN ({marks})', batch)
        yield from cursor.fetchall()


def local_folders(m, ids: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    """{id: (name, parent id)} of the given folder ids that exist here."""
    return {row[0]: (row[1], row[2])
            for row in _by_ids(m.Folder, ("id", "name", "parent"), ids)}


def local_documents(m, ids: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    """{id: (title, folder id)} of the given document ids that exist here."""
    return {row[0]: (row[1], row[2])
            for row in _by_ids(m.Document, ("id", "title", "folder"), ids)}


def existing_ids(m, kind: str, ids: Iterable[str]) -> set[str]:
    """Which of `ids` exist here as `kind` (revision, file or rule)."""
    model = {"revision": m.Revision, "file": m.File, "rule": m.AccessRule}[kind]
    return {row[0] for row in _by_ids(model, ("id",), ids)}


def folder_depth(m, folder_id: str | None) -> int:
    """Levels from the root to `folder_id` (0 for the root itself)."""
    return len(folder_chain(m, folder_id))


def last_revision_seq(m, document_ids: Iterable[str]) -> dict[str, int]:
    """{document id: highest revision seq} of the given documents."""
    found = {}
    for batch in _batches(document_ids):
        for row in (m.Revision.select(m.Revision.document, fn.MAX(m.Revision.seq))
                    .where(m.Revision.document.in_(batch)).group_by(m.Revision.document)
                    .tuples()):
            found[row[0]] = row[1]
    return found


def may(m, principal: Principal, object_type: str, object_id: str | None,
        access_type: str) -> str | None:
    """None if `principal` has `access_type` to the object (the root allows writing to
    everyone), else the reason it has not."""
    if object_id is None:
        return None
    try:
        check_access(m, principal, object_type, object_id, access_type)
    except (Forbidden, NotFound) as exc:
        return exc.message
    return None


def rule_owners(m, ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """{rule id: (object type, object id)} of the given access rule ids that exist here."""
    return {row[0]: (row[1], row[2])
            for row in _by_ids(m.AccessRule, ("id", "object_type", "object_id"), ids)}


def sibling_holders(m, kind: str, pairs: Iterable[tuple[str | None, str]]
                    ) -> dict[tuple[str | None, str], str]:
    """{(parent id, name): id} of the folders (kind "folder") or documents here that hold one
    of the (parent id, name) `pairs` (parent None: the root); one query per parent and batch
    of names."""
    if kind == "folder":
        model, name, parent = m.Folder, m.Folder.name, m.Folder.parent
    else:
        model, name, parent = m.Document, m.Document.title, m.Document.folder
    by_parent: dict[str | None, set[str]] = {}
    for parent_id, wanted in pairs:
        by_parent.setdefault(parent_id, set()).add(wanted)
    found = {}
    for parent_id, names in by_parent.items():
        where = parent.is_null() if parent_id is None else (parent == parent_id)
        for batch in _batches(sorted(names)):
            for row in model.select(model.id, name).where(where & name.in_(batch)).tuples():
                found[(parent_id, row[1])] = row[0]
    return found
