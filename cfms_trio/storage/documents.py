"""Folders, documents, revisions, files and access rules (blocking; run through Store).

Authorization by access rules happens here, inside the same transaction that reads or changes
the objects, so a check and the change it guards can never see different trees.
"""

from __future__ import annotations

import json

from ..conventions import MAX_TREE_DEPTH, new_id
from ..errors import BadRequest, Conflict, Forbidden, NotFound
from ..permissions import Principal, rules_allow



# -- access rules ------------------------------------------------------------------------------

def _rules_of(m, object_type: str, object_id: str, access_type: str) -> list[dict]:
    rows = (m.AccessRule.select(m.AccessRule.rule_data)
            .where((m.AccessRule.object_type == object_type)
                   & (m.AccessRule.object_id == object_id)
                   & (m.AccessRule.access_type == access_type))
            .order_by(m.AccessRule.seq))
    return [json.loads(r.rule_data) for r in rows]


def folder_chain(m, folder_id: str | None) -> list[str]:
    """Ids from `folder_id` up to its root folder (empty for the root itself)."""
    chain = []
    while folder_id is not None:
        if len(chain) > MAX_TREE_DEPTH or folder_id in chain:
            raise Conflict("folder tree is corrupt (cycle or too deep)")
        chain.append(folder_id)
        row = m.Folder.select(m.Folder.parent).where(m.Folder.id == folder_id).first()
        if row is None:
            break
        folder_id = row.parent_id
    return chain


def _allowed(m, principal: Principal, object_type: str, object_id: str,
             folder_id: str | None, access_type: str) -> bool:
    """The object's rules of `access_type` and those of every ancestor folder all allow.

    Members of the `sysop` group pass every rule: an administrator can always repair rules
    that locked everybody else out.
    """
    if principal.is_sysop:
        return True
    perms, groups = set(principal.permissions), set(principal.groups)
    if not rules_allow(_rules_of(m, object_type, object_id, access_type), perms, groups):
        return False
    for ancestor in folder_chain(m, folder_id):
        if not rules_allow(_rules_of(m, "folder", ancestor, access_type), perms, groups):
            return False
    return True


def _require_access(m, principal, object_type, object_id, folder_id, access_type) -> None:
    # Reading is the base of every other kind of access.
    kinds = ("read",) if access_type == "read" else ("read", access_type)
    for kind in kinds:
        if not _allowed(m, principal, object_type, object_id, folder_id, kind):
            what = "folder" if object_type == "folder" else "document"
            raise Forbidden(f"no {kind} access to {what} '{object_id}'")


def _get_folder(m, folder_id: str):
    folder = m.Folder.get_or_none(m.Folder.id == folder_id)
    if folder is None:
        raise NotFound(f"folder '{folder_id}' does not exist")
    return folder


def _get_document(m, document_id: str):
    document = m.Document.get_or_none(m.Document.id == document_id)
    if document is None:
        raise NotFound(f"document '{document_id}' does not exist")
    return document


def _check_folder_access(m, principal, folder_id: str, access_type: str):
    folder = _get_folder(m, folder_id)
    _require_access(m, principal, "folder", folder.id, folder.parent_id, access_type)
    return folder


def _check_document_access(m, principal, document_id: str, access_type: str):
    document = _get_document(m, document_id)
    _require_access(m, principal, "document", document.id, document.folder_id, access_type)
    return document


def check_access(m, principal, object_type: str, object_id: str, access_type: str) -> None:
    """Raise Forbidden (or NotFound) unless `principal` has `access_type` to the folder or
    document `object_id`, by the same rules as every request (the restore planner uses it)."""
    if object_type == "folder":
        _check_folder_access(m, principal, object_id, access_type)
    else:
        _check_document_access(m, principal, object_id, access_type)


def _check_container_write(m, principal, folder_id: str | None) -> None:
    """Creating or moving something into `folder_id` needs write access to it (root is open)."""
    if folder_id is not None:
        _check_folder_access(m, principal, folder_id, "write")


# Rows per INSERT statement: a few statements for the most rules an object may have, each well
# under SQLite's limit of bound variables (6 columns a row).
RULE_INSERT_BATCH_ROWS = 500


def _replace_rules(m, object_type: str, object_id: str, rules: dict[str, list]) -> None:
    """Replace an object's rules (validated and bounded by the caller) in a few bulk inserts."""
    m.AccessRule.delete().where((m.AccessRule.object_type == object_type)
                                & (m.AccessRule.object_id == object_id)).execute()
    rows = [{"id": new_id(), "object_type": object_type, "object_id": object_id,
             "access_type": access_type, "rule_data": json.dumps(rule), "seq": seq}
            for access_type, items in rules.items() for seq, rule in enumerate(items)]
    for start in range(0, len(rows), RULE_INSERT_BATCH_ROWS):
        m.AccessRule.insert_many(rows[start:start + RULE_INSERT_BATCH_ROWS]).execute()


def _rules_dict(m, object_type: str, object_id: str) -> dict[str, list]:
    out: dict[str, list] = {}
    rows = (m.AccessRule.select()
            .where((m.AccessRule.object_type == object_type)
                   & (m.AccessRule.object_id == object_id))
            .order_by(m.AccessRule.access_type, m.AccessRule.seq))
    for row in rows:
        out.setdefault(row.access_type, []).append(json.loads(row.rule_data))
    return out


def get_rules(m, principal, object_type: str, object_id: str) -> dict:
    if object_type == "folder":
        _check_folder_access(m, principal, object_id, "read")
    else:
        _check_document_access(m, principal, object_id, "read")
    return {"access_rules": _rules_dict(m, object_type, object_id)}


def set_rules(m, principal, object_type: str, object_id: str, rules: dict) -> dict:
    if object_type == "folder":
        _check_folder_access(m, principal, object_id, "manage")
    else:
        _check_document_access(m, principal, object_id, "manage")
    _replace_rules(m, object_type, object_id, rules)
    return {"access_rules": _rules_dict(m, object_type, object_id)}


# -- folders ------------------------------------------------------------------------------------

def _in_folder(parent_field, folder_id: str | None):
    """The condition "directly in `folder_id`" (None: at the root)."""
    return (parent_field == folder_id) if folder_id else parent_field.is_null()


def _sibling_exists(model, parent_field, name_field, folder_id, name, exclude=None) -> bool:
    """Whether `folder_id` (None: the root) already holds an object of `model` named `name`,
    other than `exclude`."""
    query = model.select().where(_in_folder(parent_field, folder_id) & (name_field == name))
    if exclude:
        query = query.where(model.id != exclude)
    return query.exists()


def _sibling_folder_exists(m, parent_id, name, exclude=None) -> bool:
    return _sibling_exists(m.Folder, m.Folder.parent, m.Folder.name, parent_id, name, exclude)


def _sibling_document_exists(m, folder_id, title, exclude=None) -> bool:
    return _sibling_exists(m.Document, m.Document.folder, m.Document.title, folder_id, title,
                           exclude)


def folder_dict(folder) -> dict:
    return {"id": folder.id, "name": folder.name, "parent_id": folder.parent_id,
            "created_time": folder.created_time}


def _check_depth(m, parent_id: str | None, levels: int) -> None:
    """Placing `levels` levels of folders under `parent_id` must stay within MAX_TREE_DEPTH."""
    depth = len(folder_chain(m, parent_id)) + levels
    if depth > MAX_TREE_DEPTH:
        raise BadRequest(f"folders may be nested at most {MAX_TREE_DEPTH} levels deep "
                         f"(this would make {depth})")


def create_folder(m, principal, name: str, parent_id: str | None, rules: dict, now: float) -> dict:
    _check_container_write(m, principal, parent_id)
    _check_depth(m, parent_id, 1)
    if _sibling_folder_exists(m, parent_id, name):
        raise Conflict(f"a folder named '{name}' already exists here")
    folder = m.Folder.create(id=new_id(), name=name, parent=parent_id, created_time=now)
    _replace_rules(m, "folder", folder.id, rules)
    return folder_dict(folder)


def folder_info(m, principal, folder_id: str) -> dict:
    folder = _check_folder_access(m, principal, folder_id, "read")
    chain = folder_chain(m, folder.id)
    names = {f.id: f.name for f in m.Folder.select(m.Folder.id, m.Folder.name)
             .where(m.Folder.id.in_(chain))}
    info = folder_dict(folder)
    info["path"] = "/" + "/".join(names[i] for i in reversed(chain))
    return info


def list_folder(m, principal, folder_id: str | None) -> dict:
    """Children of a folder (None: the root) that the caller may read."""
    if folder_id is not None:
        _check_folder_access(m, principal, folder_id, "read")
    folders_q = (m.Folder.select().where(_in_folder(m.Folder.parent, folder_id))
                 .order_by(m.Folder.name))
    docs_q = (m.Document.select().where(_in_folder(m.Document.folder, folder_id))
              .order_by(m.Document.title))
    folders = [folder_dict(f) for f in folders_q
               if _allowed(m, principal, "folder", f.id, None, "read")]
    documents = []
    for d in docs_q:
        if not _allowed(m, principal, "document", d.id, None, "read"):
            continue
        current = _current_revision(m, d.id)
        documents.append({"id": d.id, "title": d.title, "folder_id": d.folder_id,
                          "created_time": d.created_time,
                          "size": current["size"] if current else None,
                          "last_modified": current["created_time"] if current else None})
    return {"folder_id": folder_id, "folders": folders, "documents": documents}


def rename_folder(m, principal, folder_id: str, name: str) -> dict:
    folder = _check_folder_access(m, principal, folder_id, "write")
    if _sibling_folder_exists(m, folder.parent_id, name, exclude=folder.id):
        raise Conflict(f"a folder named '{name}' already exists here")
    folder.name = name
    folder.save()
    return folder_dict(folder)


def move_folder(m, principal, folder_id: str, parent_id: str | None) -> dict:
    folder = _check_folder_access(m, principal, folder_id, "move")
    if parent_id is not None:
        _get_folder(m, parent_id)
        if folder.id in folder_chain(m, parent_id):
            raise BadRequest("a folder cannot be moved under itself or one of its descendants")
    _check_container_write(m, principal, parent_id)
    _check_depth(m, parent_id, _subtree_levels(m, folder.id))
    if _sibling_folder_exists(m, parent_id, folder.name, exclude=folder.id):
        raise Conflict(f"a folder named '{folder.name}' already exists there")
    folder.parent = parent_id
    folder.save()
    return folder_dict(folder)


def _subtree_levels(m, folder_id: str) -> int:
    """How many levels the folder and its descendants span (1 for a folder with no subfolders)."""
    levels, frontier = 0, [folder_id]
    while frontier:
        levels += 1
        frontier = [f.id for f in m.Folder.select(m.Folder.id).where(m.Folder.parent.in_(frontier))]
    return levels


def _subtree(m, folder_id: str) -> list[str]:
    """The folder and all its descendants, children after parents."""
    out, frontier = [folder_id], [folder_id]
    while frontier:
        children = [f.id for f in m.Folder.select(m.Folder.id).where(m.Folder.parent.in_(frontier))]
        out.extend(children)
        frontier = children
    return out


def _delete_documents(m, document_ids: list[str]) -> dict:
    """Delete documents with their revisions, transfer tasks and rules, and the files no
    revision refers to any more (a restored upstream backup may share one file between the
    revisions of several documents: it goes with the last of them).

    Returns what to remove from disk once committed: `paths` of the files (relative to the
    content folder) and the `task_ids` whose partial uploads may be lying around.
    """
    if not document_ids:
        return {"paths": [], "task_ids": []}
    referenced = {r.file_id for r in m.Revision.select(m.Revision.file)
                  .where(m.Revision.document.in_(document_ids))}
    m.Revision.delete().where(m.Revision.document.in_(document_ids)).execute()
    still_used = {r.file_id for r in m.Revision.select(m.Revision.file)
                  .where(m.Revision.file.in_(list(referenced)))}
    file_ids = sorted(referenced - still_used)
    paths = [f.path for f in m.File.select(m.File.path).where(m.File.id.in_(file_ids))]
    task_ids = [t.id for t in m.FileTask.select(m.FileTask.id)
                .where(m.FileTask.file.in_(file_ids))]
    m.FileTask.delete().where(m.FileTask.file.in_(file_ids)).execute()
    m.File.delete().where(m.File.id.in_(file_ids)).execute()
    m.AccessRule.delete().where((m.AccessRule.object_type == "document")
                                & (m.AccessRule.object_id.in_(document_ids))).execute()
    m.Document.delete().where(m.Document.id.in_(document_ids)).execute()
    return {"paths": paths, "task_ids": task_ids}


def _require_own_rules(m, principal, object_type: str, object_id: str) -> None:
    """Read and write access by the object's own rules (its ancestors are checked apart)."""
    for kind in ("read", "write"):
        if not _allowed(m, principal, object_type, object_id, None, kind):
            raise Forbidden(f"no {kind} access to {object_type} '{object_id}' inside the folder")


def delete_folder(m, principal, folder_id: str) -> dict:
    """Delete a folder and everything below it; return what to unlink after commit (see
    `_delete_documents`).

    Every folder and document below must grant write access too: deleting a parent is no way
    around the rules of what it contains. The check is all or nothing.
    """
    _check_folder_access(m, principal, folder_id, "write")
    folder_ids = _subtree(m, folder_id)
    document_ids = [d.id for d in m.Document.select(m.Document.id)
                    .where(m.Document.folder.in_(folder_ids))]
    for fid in folder_ids[1:]:
        _require_own_rules(m, principal, "folder", fid)
    for did in document_ids:
        _require_own_rules(m, principal, "document", did)
    removed = _delete_documents(m, document_ids)
    m.AccessRule.delete().where((m.AccessRule.object_type == "folder")
                                & (m.AccessRule.object_id.in_(folder_ids))).execute()
    for fid in reversed(folder_ids):  # children first, so no parent is deleted under a child
        m.Folder.delete().where(m.Folder.id == fid).execute()
    return removed


# -- documents ------------------------------------------------------------------------------------

def _current_revision(m, document_id: str) -> dict | None:
    row = (m.Revision.select(m.Revision, m.File).join(m.File)
           .where((m.Revision.document == document_id) & (m.File.active == True))  # noqa: E712
           .order_by(m.Revision.seq.desc()).first())
    return revision_dict(row) if row else None


def revision_dict(revision) -> dict:
    return {"id": revision.id, "file_id": revision.file.id, "created_time": revision.created_time,
            "size": revision.file.size, "sha256": revision.file.sha256,
            "active": revision.file.active}


def document_dict(m, document) -> dict:
    return {"document_id": document.id, "title": document.title,
            "folder_id": document.folder_id, "created_time": document.created_time,
            "current_revision": _current_revision(m, document.id),
            "revisions_count": m.Revision.select().where(m.Revision.document == document.id).count()}


def new_file(m, now: float) -> str:
    """A File row for content still to be uploaded (inactive until verified)."""
    file_id = new_id()
    m.File.create(id=file_id, path=f"files/{file_id[:2]}/{file_id}", created_time=now,
                  active=False)
    return file_id


def _new_revision(m, document_id: str, now: float) -> tuple[str, str]:
    file_id = new_file(m, now)
    last = (m.Revision.select(m.Revision.seq).where(m.Revision.document == document_id)
            .order_by(m.Revision.seq.desc()).first())
    revision_id = new_id()
    m.Revision.create(id=revision_id, document=document_id, file=file_id, created_time=now,
                      seq=(last.seq + 1) if last else 0)
    return revision_id, file_id


def create_document(m, principal, title: str, folder_id: str | None, rules: dict,
                    now: float) -> dict:
    _check_container_write(m, principal, folder_id)
    if _sibling_document_exists(m, folder_id, title):
        raise Conflict(f"a document titled '{title}' already exists here")
    document = m.Document.create(id=new_id(), title=title, folder=folder_id, created_time=now)
    _replace_rules(m, "document", document.id, rules)
    revision_id, file_id = _new_revision(m, document.id, now)
    return {"document_id": document.id, "revision_id": revision_id, "file_id": file_id}


def add_revision(m, principal, document_id: str, now: float) -> dict:
    _check_document_access(m, principal, document_id, "write")
    revision_id, file_id = _new_revision(m, document_id, now)
    return {"document_id": document_id, "revision_id": revision_id, "file_id": file_id}


def document_info(m, principal, document_id: str) -> dict:
    return document_dict(m, _check_document_access(m, principal, document_id, "read"))


def revision_for_download(m, principal, document_id: str, revision_id: str | None) -> dict:
    document = _check_document_access(m, principal, document_id, "read")
    if revision_id is None:
        current = _current_revision(m, document.id)
        if current is None:
            raise NotFound(f"document '{document_id}' has no uploaded content yet")
        return current
    row = (m.Revision.select(m.Revision, m.File).join(m.File)
           .where((m.Revision.id == revision_id) & (m.Revision.document == document.id)).first())
    if row is None:
        raise NotFound(f"revision '{revision_id}' does not exist")
    if not row.file.active:
        raise NotFound(f"revision '{revision_id}' has no uploaded content yet")
    return revision_dict(row)


def list_revisions(m, principal, document_id: str) -> dict:
    _check_document_access(m, principal, document_id, "read")
    rows = (m.Revision.select(m.Revision, m.File).join(m.File)
            .where(m.Revision.document == document_id).order_by(m.Revision.seq))
    return {"document_id": document_id, "revisions": [revision_dict(r) for r in rows]}


def rename_document(m, principal, document_id: str, title: str) -> dict:
    document = _check_document_access(m, principal, document_id, "write")
    if _sibling_document_exists(m, document.folder_id, title, exclude=document.id):
        raise Conflict(f"a document titled '{title}' already exists here")
    document.title = title
    document.save()
    return document_dict(m, document)


def move_document(m, principal, document_id: str, folder_id: str | None) -> dict:
    document = _check_document_access(m, principal, document_id, "move")
    if folder_id is not None:
        _get_folder(m, folder_id)
    _check_container_write(m, principal, folder_id)
    if _sibling_document_exists(m, folder_id, document.title, exclude=document.id):
        raise Conflict(f"a document titled '{document.title}' already exists there")
    document.folder = folder_id
    document.save()
    return document_dict(m, document)


def delete_document(m, principal, document_id: str) -> dict:
    _check_document_access(m, principal, document_id, "write")
    return _delete_documents(m, [document_id])
