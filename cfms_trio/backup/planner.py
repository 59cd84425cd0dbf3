"""Planning a restore into a live store: what each archive object becomes (blocking).

`build_plan` compares the chosen part of an archive (its staging index) with the store and
decides, object by object, what the import does: `create` it under its own id, `skip` it
(an object with its id exists and is kept), `overwrite` the existing one, or `rename` it (an
object of another id holds its name among its new siblings). It runs in the restore's write
transaction before anything is written, and alone for a dry run, so the plan a dry run shows is
the one the real run applies to the same store. docs/BACKUP_RESTORE.md defines the policies.

A conflict is an archive folder or document whose id exists in the store, or whose name is held
by another object among its destination siblings; also a revision, file or access rule whose id
exists. Revisions and files are never rewritten: under `skip` and `overwrite` an existing
revision is kept, and a new revision's file or rule whose id is taken gets a fresh id.

The plan is held in memory: a few hundred bytes per object chosen.
"""

from __future__ import annotations

from typing import Callable

from ..conventions import MAX_TREE_DEPTH, NAME_MAX_CHARS, new_id
from ..errors import BadRequest, Conflict, Forbidden, NotFound
from ..storage import accounts, restore_lookup as lookup
from .staging_index import ROOT_KEY, StagingIndex

CONFLICTS_SHOWN = 50  # conflicts listed one by one in a plan; the rest are counted
ACTIONS = ("create", "skip", "overwrite", "rename")
KINDS = ("folder", "document", "revision", "file", "rule")


class Placement:
    """Where one archive folder or document goes, and under which id and name."""

    __slots__ = ("archive_id", "local_id", "action", "parent", "name", "created_time")

    def __init__(self, archive_id, local_id, action, parent, name, created_time):
        self.archive_id, self.local_id, self.action = archive_id, local_id, action
        self.parent, self.name, self.created_time = parent, name, created_time


class RestorePlan:
    """What an import will do; `summary()` is its wire form (docs/PROTOCOL.md)."""

    def __init__(self, policy: str, include: list, target_folder_id: str | None):
        self.policy, self.include, self.target_folder_id = policy, include, target_folder_id
        self.folders: list[Placement] = []  # parents first
        self.documents: list[Placement] = []
        self.revisions: list[tuple] = []  # (id, document, file, created_time, seq) rows
        self.files: dict[str, str] = {}  # archive file id -> id here, for every file written
        self.rules: list[tuple] = []  # (id, object_type, object_id, access_type, data, seq)
        self.rules_replaced: list[tuple[str, str]] = []  # (object type, id) losing their rules
        self.counts = {action: dict.fromkeys(KINDS, 0) for action in ACTIONS}
        self.conflicts: list[dict] = []
        self.conflicts_count = 0
        self._first: dict[tuple[str, str], str] = {}  # (reason, kind) -> first message
        self.bytes_to_write = 0
        self.whole_archive = not include and target_folder_id is None

    def conflict(self, entry: dict, message: str) -> None:
        self.conflicts_count += 1
        if len(self.conflicts) < CONFLICTS_SHOWN:
            self.conflicts.append(entry)
        self._first.setdefault((entry["reason"], entry["kind"]), message)

    @property
    def refusal(self) -> str | None:
        """Policy fail: why the real run refuses, naming the first taken id (folders first,
        then documents, revisions, files, rules), else the first taken name."""
        if self.policy != "fail":
            return None
        for key in [("id", kind) for kind in KINDS] + [("name", kind) for kind in KINDS]:
            if key in self._first:
                return self._first[key]
        return None

    def imported(self, kind: str) -> int:
        return sum(self.counts[action][kind] for action in ("create", "overwrite", "rename"))

    def summary(self, *, free_bytes_needed: int = 0, free_bytes_available: int = 0) -> dict:
        return {"conflict_policy": self.policy, "include": self.include,
                "target_folder_id": self.target_folder_id, "actions": self.counts,
                "conflicts": self.conflicts, "conflicts_count": self.conflicts_count,
                "refusal": self.refusal, "bytes_to_write": self.bytes_to_write,
                "free_bytes_needed": free_bytes_needed,
                "free_bytes_available": free_bytes_available}


def build_plan(m, index: StagingIndex, absent_file_ids: set[str], *, policy: str, include: list, target_folder_id: str | None, importer: str,
               check_abort: Callable[[], None]) -> RestorePlan:
    """The plan of importing the chosen part of `index` into the store `m` (module docstring).
    Raises BadRequest for an include that matches nothing, NotFound/Forbidden for a target
    folder that is missing or not writable, Forbidden when a non-sysop would write where they
    may not, Conflict for a tree that would be too deep or cyclic."""
    planner = _Planner(m, index, RestorePlan(policy, include, target_folder_id),
                       accounts.principal_of(m, importer), check_abort)
    planner.run(absent_file_ids)
    return planner.plan


class _Planner:
    def __init__(self, m, index: StagingIndex, plan: RestorePlan, principal, check_abort):
        self.m, self.index, self.plan, self.principal = m, index, plan, principal
        self.check_abort = check_abort
        self.new_ids = plan.policy == "new_ids"
        self.target = plan.target_folder_id
        self.mapping: dict[str, str] = {}  # archive folder id -> folder id here
        self.created: set[str] = set()  # folder ids this import creates
        self.depth: dict[str | None, int] = {None: 0}
        self.names: dict[tuple, dict[str, str]] = {}  # (kind, parent) -> {name: id}
        self.paths: dict[str, str] = {ROOT_KEY: ""}  # archive folder id -> archive path
        self.allowed: dict[tuple, str | None] = {}
        self.decided: dict[tuple[str, str], Placement] = {}  # (kind, archive id)
        self.parent_of: dict[str, str | None] = {}  # planned parent of folders moved/created

    # -- which objects

    def run(self, absent_file_ids: set[str]) -> None:
        if self.target is not None:
            if not lookup.local_folders(self.m, [self.target]):
                raise NotFound(f"target folder '{self.target}' does not exist")
            self._require(("folder", self.target, "write"), "import into it")
        folders, documents = self._resolve_include()
        self.index.select_subtrees(folders, documents)
        self.top_folders = {f for f in folders if not self.index.is_chosen(
            "folder", self.index.folder(f)[1])}
        self.top_documents = {d for d in documents if not self.index.is_chosen(
            "folder", self.index.document(d)[1])}
        if self.target is None:
            for ancestor in self._ancestors():
                self._place_folder(ancestor, ancestor=True)
        for batch in self.index.chosen_rows("folder"):
            self.check_abort()
            self.local = lookup.local_folders(self.m, [row[0] for row in batch])
            for row in batch:
                self._place_folder(row)
        self._check_cycles()
        for batch in self.index.chosen_rows("document"):
            self.check_abort()
            self.local = lookup.local_documents(self.m, [row[0] for row in batch])
            for row in batch:
                self._place_document(row)
        self._plan_revisions()
        self._plan_rules()
        self._plan_file_bytes(absent_file_ids)

    def _resolve_include(self) -> tuple[list[str], list[str]]:
        if not self.plan.include:
            return self.index.root_ids()
        folders, documents = [], []
        for number, entry in enumerate(self.plan.include, 1):
            found = self._resolve_entry(entry, number)
            (folders if found[0] == "folder" else documents).append(found[1])
        return folders, documents

    def _resolve_entry(self, entry, number: int) -> tuple[str, str]:
        where = f"include entry {number}"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise BadRequest(f"{where} must be an object with exactly one of 'folder_id', "
                             "'document_id' or 'path'")
        (key, value), = entry.items()
        if key not in ("folder_id", "document_id", "path") or not isinstance(value, str):
            raise BadRequest(f"{where} must be an object with exactly one of 'folder_id', "
                             "'document_id' or 'path', a string")
        if key == "folder_id" and self.index.folder(value) is not None:
            return "folder", value
        if key == "document_id" and self.index.document(value) is not None:
            return "document", value
        if key == "path":
            found = self._resolve_path(value)
            if found is not None:
                return found
        raise BadRequest(f"{where} ({key} {value!r}) matches nothing in the backup")

    def _resolve_path(self, path: str) -> tuple[str, str] | None:
        names = [part for part in path.split("/") if part]
        if not names:
            return None
        parent = ROOT_KEY
        for name in names[:-1]:
            parent = self.index.named_child("folder", parent, name)
            if parent is None:
                return None
        for kind in ("folder", "document"):
            found = self.index.named_child(kind, parent, names[-1])
            if found is not None:
                return kind, found
        return None

    def _ancestors(self) -> list[tuple]:
        """Folders above the chosen tops that are not chosen themselves, parents first."""
        ordered: dict[str, tuple] = {}
        for kind, top in ([("folder", f) for f in self.top_folders]
                          + [("document", d) for d in self.top_documents]):
            parent = (self.index.folder(top) if kind == "folder" else self.index.document(top))[1]
            chain = []
            while parent != ROOT_KEY:
                name, grandparent = self.index.folder(parent)
                chain.append((parent, name, grandparent, 0.0))
                parent = grandparent
            for row in reversed(chain):
                ordered.setdefault(row[0], row)
        ids = list(ordered)
        self.local = lookup.local_folders(self.m, ids)
        created = {row[0]: row for batch in self.index.rows("folders") for row in batch
                   if row[0] in ordered} if ordered else {}
        return [(i, ordered[i][1], ordered[i][2], created[i][3]) for i in ids]

    # -- folders and documents

    def _archive_path(self, parent_key: str) -> str:
        if parent_key not in self.paths:
            name, grandparent = self.index.folder(parent_key)
            self.paths[parent_key] = f"{self._archive_path(grandparent)}/{name}"
        return self.paths[parent_key]

    def _destination(self, kind: str, archive_id: str, parent_key: str) -> str | None:
        tops = self.top_folders if kind == "folder" else self.top_documents
        if self.target is not None and archive_id in tops:
            return self.target
        return None if parent_key == ROOT_KEY else self.mapping[parent_key]

    def _place_folder(self, row: tuple, *, ancestor: bool = False) -> None:
        archive_id, name, parent_key, created_time = row
        path = f"{self._archive_path(parent_key)}/{name}"
        self.paths[archive_id] = path
        dest = None if ancestor and parent_key == ROOT_KEY else (
            self.mapping[parent_key] if ancestor else
            self._destination("folder", archive_id, parent_key))
        exists = archive_id in self.local
        if ancestor and exists:
            self.mapping[archive_id] = archive_id  # the way to the chosen objects, kept
            return
        self._place("folder", archive_id, exists, dest, name, path, created_time)

    def _place_document(self, row: tuple) -> None:
        archive_id, title, folder_key, created_time = row
        path = f"{self._archive_path(folder_key)}/{title}"
        dest = self._destination("document", archive_id, folder_key)
        self._place("document", archive_id, archive_id in self.local, dest, title, path,
                    created_time)

    def _place(self, kind, archive_id, exists, dest, name, path, created_time) -> None:
        plan = self.plan
        if exists and not self.new_ids:
            action = {"fail": "skip", "skip": "skip", "overwrite": "overwrite"}[plan.policy]
            plan.conflict({"kind": kind, "id": archive_id, "path": path, "reason": "id",
                           "existing_id": archive_id, "action": action},
                          f"{kind} id '{archive_id}' already exists on this server")
            if action == "skip":
                if kind == "folder":
                    self.mapping[archive_id] = archive_id
                plan.counts["skip"][kind] += 0 if plan.policy == "fail" else 1
                self.decided[(kind, archive_id)] = Placement(archive_id, archive_id, "skip",
                                                             None, name, created_time)
                return
            self._require((kind, archive_id, "write"), "overwrite it")
            self._require((kind, archive_id, "manage"), "overwrite its access rules")
            local_id, final = archive_id, self._free_name(kind, dest, name, archive_id)
        else:
            exists = False  # new_ids: a copy, however many objects of its id exist
            local_id = new_id() if self.new_ids else archive_id
            final = self._free_name(kind, dest, name, None)
            if final != name:
                where = f"folder '{dest}'" if dest else "the root"
                noun = "name" if kind == "folder" else "title"
                plan.conflict({"kind": kind, "id": archive_id, "path": path, "reason": "name",
                               "existing_id": self._names(kind, dest)[name],
                               "action": "rename", "new_name": final},
                              f"a {kind} with the {noun} {name!r} already exists "
                              + ("at the root of this server" if dest is None
                                 else f"in {where} on this server"))
                if plan.policy == "fail":
                    final = name
            action = "rename" if final != name else ("overwrite" if exists else "create")
        if dest not in self.created:
            self._require(("folder", dest, "write"), "import into it")
        self._names(kind, dest)[final] = local_id
        plan.counts[action][kind] += 1
        placement = Placement(archive_id, local_id, action, dest, final, created_time)
        self.decided[(kind, archive_id)] = placement
        (plan.folders if kind == "folder" else plan.documents).append(placement)
        if kind == "folder":
            self.mapping[archive_id] = local_id
            if action != "overwrite":
                self.created.add(local_id)
            self.parent_of[local_id] = dest
            depth = self._depth_of(dest) + 1
            if depth > MAX_TREE_DEPTH:
                raise Conflict(f"folder {path!r} would be nested {depth} levels deep; this "
                               f"server allows at most {MAX_TREE_DEPTH}")
            self.depth[local_id] = depth

    def _names(self, kind: str, parent: str | None) -> dict[str, str]:
        key = (kind, parent)
        if key not in self.names:
            self.names[key] = ({} if parent in self.created
                               else lookup.child_names(self.m, kind, parent))
        return self.names[key]

    def _free_name(self, kind: str, parent: str | None, name: str, own_id: str | None) -> str:
        """`name`, or the first free `name (N)` among the siblings in `parent`."""
        taken = self._names(kind, parent)
        if taken.get(name, own_id) == own_id:
            return name
        number = 2
        while f"{name} ({number})" in taken:
            number += 1
        renamed = f"{name} ({number})"
        if len(renamed) > NAME_MAX_CHARS:
            raise Conflict(f"{kind} {name[:40]!r}...: the name is taken and too long to make "
                           "unique")
        return renamed

    def _depth_of(self, folder_id: str | None) -> int:
        if folder_id not in self.depth:
            self.depth[folder_id] = lookup.folder_depth(self.m, folder_id)
        return self.depth[folder_id]

    def _require(self, what: tuple, doing: str) -> None:
        """A non-sysop importer needs the access an API request would need."""
        kind, object_id, access = what
        if object_id is None or self.principal.is_sysop:
            return
        if what not in self.allowed:
            self.allowed[what] = lookup.may(self.m, self.principal, kind, object_id, access)
        reason = self.allowed[what]
        if reason is not None:
            raise Forbidden(f"the import may not {doing} ({kind} '{object_id}'): {reason}")

    def _check_cycles(self) -> None:
        """An overwritten folder moved below one of its own descendants here would cut a
        loop out of the tree; refuse it."""
        for placement in self.plan.folders:
            if placement.action != "overwrite":
                continue
            seen, node = {placement.local_id}, placement.parent
            while node is not None:
                if node in seen:
                    raise Conflict(f"overwriting folder '{placement.local_id}' would move it "
                                   f"below itself (through folder '{node}')")
                seen.add(node)
                if node in self.parent_of:
                    node = self.parent_of[node]
                else:
                    node = lookup.local_folders(self.m, [node]).get(node, (None, None))[1]
                if len(seen) > MAX_TREE_DEPTH + 1:
                    raise Conflict("the folder tree would be too deep")

    # -- revisions, files and rules

    def _file_for(self, archive_file_id: str, taken: set[str]) -> str:
        files = self.plan.files
        if archive_file_id not in files:
            if self.new_ids:
                files[archive_file_id] = new_id()
            elif archive_file_id in taken:
                self.plan.conflict({"kind": "file", "id": archive_file_id, "reason": "id",
                                    "existing_id": archive_file_id, "action": "new id"},
                                   f"file id '{archive_file_id}' already exists on this server")
                files[archive_file_id] = new_id()
            else:
                files[archive_file_id] = archive_file_id
            self.plan.counts["create"]["file"] += 1
        return files[archive_file_id]

    def _plan_revisions(self) -> None:
        plan, decided = self.plan, self.decided
        overwritten = [p.local_id for p in plan.documents if p.action == "overwrite"]
        next_seq = {doc: seq + 1 for doc, seq in
                    lookup.last_revision_seq(self.m, overwritten).items()}
        for batch in self.index.rows("revisions"):
            self.check_abort()
            wanted = [row for row in batch if ("document", row[1]) in decided]
            taken_revisions = lookup.existing_ids(self.m, "revision", [r[0] for r in wanted])
            taken_files = lookup.existing_ids(self.m, "file", [r[2] for r in wanted])
            for revision_id, document_id, file_id, created_time, position in wanted:
                placement = decided[("document", document_id)]
                if placement.action == "skip":
                    plan.counts["skip"]["revision"] += plan.policy != "fail"
                    continue
                if placement.action == "overwrite":
                    if revision_id in taken_revisions:
                        plan.counts["skip"]["revision"] += 1
                        continue
                    seq = next_seq.get(placement.local_id, 0)
                    next_seq[placement.local_id] = seq + 1
                    action = "overwrite"
                else:
                    seq, action = position, "create"
                local_id = revision_id
                if self.new_ids:
                    local_id = new_id()
                elif revision_id in taken_revisions:
                    plan.conflict({"kind": "revision", "id": revision_id, "reason": "id",
                                   "existing_id": revision_id, "action": "new id"},
                                  f"revision id '{revision_id}' already exists on this server")
                    local_id = new_id()
                plan.counts[action]["revision"] += 1
                plan.revisions.append((local_id, placement.local_id,
                                       self._file_for(file_id, taken_files), created_time, seq))
        if plan.whole_archive:
            for batch in self.index.unreferenced_files():
                taken = lookup.existing_ids(self.m, "file", batch)
                for file_id in batch:
                    if file_id in taken and not self.new_ids and plan.policy != "fail":
                        plan.counts["skip"]["file"] += 1
                    else:
                        self._file_for(file_id, taken)

    def _plan_rules(self) -> None:
        plan, decided = self.plan, self.decided
        plan.rules_replaced = [(kind, p.local_id) for kind, placements in
                               (("folder", plan.folders), ("document", plan.documents))
                               for p in placements if p.action == "overwrite"]
        for batch in self.index.rows("rules"):
            self.check_abort()
            wanted = [row for row in batch if (row[1], row[2]) in decided]
            owners = lookup.rule_owners(self.m, [row[0] for row in wanted])
            for rule_id, object_type, object_id, access_type, rule_data, position in wanted:
                placement = decided[(object_type, object_id)]
                if placement.action == "skip":
                    plan.counts["skip"]["rule"] += plan.policy != "fail"
                    continue
                local_id = new_id() if self.new_ids else rule_id
                owner = owners.get(rule_id)
                if owner is not None and not self.new_ids and not (
                        placement.action == "overwrite" and owner == (object_type,
                                                                      placement.local_id)):
                    plan.conflict({"kind": "rule", "id": rule_id, "reason": "id",
                                   "existing_id": rule_id, "action": "new id"},
                                  f"access rule id '{rule_id}' already exists on this server")
                    local_id = new_id()
                action = "overwrite" if placement.action == "overwrite" else "create"
                plan.counts[action]["rule"] += 1
                plan.rules.append((local_id, object_type, placement.local_id, access_type,
                                   rule_data, position))

    def _plan_file_bytes(self, absent_file_ids: set[str]) -> None:
        files = self.plan.files
        for batch in self.index.rows("files"):
            for file_id, _, size, _ in batch:
                if file_id in files and file_id not in absent_file_ids:
                    self.plan.bytes_to_write += size or 0

