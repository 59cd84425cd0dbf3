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

The per-object decisions go to the plan tables of the staging index (`plan_index.py`), and
every lookup is made by batch, so planning a million documents holds a few batches in memory;
`RestorePlan` itself keeps only counts, the first conflicts and byte totals.
"""

from __future__ import annotations

from typing import Callable

from ..conventions import MAX_TREE_DEPTH, NAME_MAX_CHARS, new_id
from ..errors import BadRequest, Conflict, Forbidden, NotFound
from ..storage import accounts, restore_lookup as lookup
from .plan_index import KEPT, NEW_ACTIONS, PlanIndex
from .staging_index import ROOT_KEY, StagingIndex

CONFLICTS_SHOWN = 50  # conflicts listed one by one in a plan; the rest are counted
ACTIONS = ("create", "skip", "overwrite", "rename")
KINDS = ("folder", "document", "revision", "file", "rule")


class RestorePlan:
    """What an import will do; `summary()` is its wire form (docs/PROTOCOL.md)."""

    def __init__(self, policy: str, include: list, target_folder_id: str | None,
                 rows: PlanIndex):
        self.policy, self.include, self.target_folder_id = policy, include, target_folder_id
        self.rows = rows  # the per-object decisions, on disk
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


def build_plan(m, index: StagingIndex, absent_file_ids: set[str], *, policy: str,
               include: list, target_folder_id: str | None, importer: str,
               check_abort: Callable[[], None]) -> RestorePlan:
    """The plan of importing the chosen part of `index` into the store `m` (module docstring).
    Raises BadRequest for an include that matches nothing, NotFound/Forbidden for a target
    folder that is missing or not writable, Forbidden when a non-sysop would write where they
    may not, Conflict for a tree that would be too deep or cyclic."""
    rows = PlanIndex(index)
    rows.reset()
    # No importer: an offline plan against a throw-away store (`backup verify --deep`).
    principal = accounts.principal_of(m, importer) if importer else None
    planner = _Planner(m, index, RestorePlan(policy, include, target_folder_id, rows),
                       principal, check_abort)
    planner.run(absent_file_ids)
    return planner.plan


CACHE_ENTRIES = 10_000  # lookups kept across batches (paths, depths, access); cleared when full
OWN_DEPTH = -1  # depth recorded for a folder left where it is here (skipped, kept)


class _Planner:
    """One plan in the making. Everything it keeps across batches is bounded: the include's
    chosen tops (a few), and caches cleared at CACHE_ENTRIES."""

    def __init__(self, m, index: StagingIndex, plan: RestorePlan, principal, check_abort):
        self.m, self.index, self.plan, self.principal = m, index, plan, principal
        self.rows = plan.rows
        self.check_abort = check_abort
        self.new_ids = plan.policy == "new_ids"
        self.target = plan.target_folder_id
        self.top_folders: set[str] = set()  # with an include: its chosen tops
        self.top_documents: set[str] = set()
        self.paths: dict[str, str] = {}  # archive folder id -> archive path (cache)
        self.depths: dict[str, int] = {}  # folder id here -> its depth here (cache)
        self.allowed: dict[tuple, str | None] = {}  # (kind, id, access) -> refusal (cache)
        # The batch being placed: its folders' decisions, its parents' (decided before), the
        # names it gave, and the names already held here at its destinations.
        self.batch: dict[str, tuple] = {}
        self.parents: dict[str, tuple] = {}
        self.batch_names: dict[tuple, str] = {}
        self.local_holders: dict[tuple, str] = {}

    # -- which objects

    def run(self, absent_file_ids: set[str]) -> None:
        if self.target is not None:
            if not lookup.local_folders(self.m, [self.target]):
                raise NotFound(f"target folder '{self.target}' does not exist")
            self._require(("folder", self.target, "write"), "import into it")
        if self.plan.include:
            folders, documents = self._resolve_include()
            self.index.select_subtrees(folders, documents)
            self.top_folders = {f for f in folders if not self.index.is_chosen(
                "folder", self.index.folder(f)[1])}
            self.top_documents = {d for d in documents if not self.index.is_chosen(
                "folder", self.index.document(d)[1])}
            if self.target is None:
                self._place_batch("folder", self._ancestors(), ancestor=True)
        else:
            self.index.select_all()
        for batch in self.index.chosen_rows("folder"):
            self.check_abort()
            self._place_batch("folder", batch)
        self._check_cycles()
        for batch in self.index.chosen_rows("document"):
            self.check_abort()
            self._place_batch("document", batch)
        self._plan_revisions()
        self._plan_rules()
        self._plan_file_bytes(absent_file_ids)

    def _resolve_include(self) -> tuple[list[str], list[str]]:
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
        """Folders above the chosen tops that are not chosen themselves, parents first (a few
        per include entry)."""
        ordered: dict[str, tuple] = {}
        for kind, top in ([("folder", f) for f in self.top_folders]
                          + [("document", d) for d in self.top_documents]):
            parent = (self.index.folder(top) if kind == "folder" else self.index.document(top))[1]
            chain = []
            while parent != ROOT_KEY:
                name, grandparent = self.index.folder(parent)
                chain.append((parent, name, grandparent,
                              self.index.created_time("folder", parent)))
                parent = grandparent
            for row in reversed(chain):
                ordered.setdefault(row[0], row)
        return list(ordered.values())

    # -- folders and documents

    def _is_top(self, kind: str, archive_id: str, parent_key: str) -> bool:
        if not self.plan.include:
            return parent_key == ROOT_KEY
        return archive_id in (self.top_folders if kind == "folder" else self.top_documents)

    def _place_batch(self, kind: str, batch: list[tuple], *, ancestor: bool = False) -> None:
        """Decide a batch of folders (parents first) or documents, with one lookup per kind of
        question for the whole batch, and write the decisions."""
        local = (lookup.local_folders if kind == "folder" else lookup.local_documents)(
            self.m, [row[0] for row in batch])
        ids = {row[0] for row in batch}
        self.parents = self.rows.placements(
            "folder", {row[2] for row in batch if row[2] != ROOT_KEY and row[2] not in ids})
        self.batch, self.batch_names = {}, {}
        # Where each row may go among existing folders (a new parent has no siblings to meet).
        pairs = []
        for archive_id, name, parent_key, _ in batch:
            if self.target is not None and not ancestor and self._is_top(kind, archive_id,
                                                                         parent_key):
                pairs.append((self.target, name))
            elif parent_key == ROOT_KEY:
                pairs.append((None, name))
            elif parent_key in ids:
                if parent_key in local and not self.new_ids:
                    pairs.append((parent_key, name))
            elif self.parents[parent_key][1] not in NEW_ACTIONS:
                pairs.append((self.parents[parent_key][0], name))
        self.local_holders = lookup.sibling_holders(self.m, kind, pairs)
        for row in batch:
            self._place(kind, row, row[0] in local, ancestor)
        self.rows.flush()

    def _destination(self, kind: str, archive_id: str, parent_key: str, ancestor: bool
                     ) -> tuple[str | None, bool, int | None]:
        """(folder here, whether this plan creates it, its depth if this plan places it)."""
        if self.target is not None and not ancestor and self._is_top(kind, archive_id,
                                                                     parent_key):
            return self.target, False, None
        if parent_key == ROOT_KEY:
            return None, False, 0
        local_id, action, depth = self.batch.get(parent_key) or self.parents[parent_key]
        return local_id, action in NEW_ACTIONS, None if depth == OWN_DEPTH else depth

    def _place(self, kind: str, row: tuple, exists: bool, ancestor: bool) -> None:
        archive_id, name, parent_key, created_time = row
        dest, dest_created, dest_depth = self._destination(kind, archive_id, parent_key,
                                                           ancestor)
        plan = self.plan
        if ancestor and exists:  # the way to the chosen objects, kept as it is
            self._record(kind, archive_id, archive_id, KEPT, dest, name, created_time,
                         OWN_DEPTH)
            return
        if exists and not self.new_ids:
            action = {"fail": "skip", "skip": "skip", "overwrite": "overwrite"}[plan.policy]
            plan.conflict({"kind": kind, "id": archive_id, "path": self._path(parent_key, name),
                           "reason": "id", "existing_id": archive_id, "action": action},
                          f"{kind} id '{archive_id}' already exists on this server")
            if action == "skip":
                plan.counts["skip"][kind] += 0 if plan.policy == "fail" else 1
                self._record(kind, archive_id, archive_id, "skip", None, name, created_time,
                             OWN_DEPTH)
                return
            self._require((kind, archive_id, "write"), "overwrite it")
            self._require((kind, archive_id, "manage"), "overwrite its access rules")
            local_id = archive_id
            final = self._free_name(kind, dest, dest_created, name, archive_id)
        else:
            exists = False  # new_ids: a copy, however many objects of its id exist
            local_id = new_id() if self.new_ids else archive_id
            final = self._free_name(kind, dest, dest_created, name, None)
            if final != name:
                noun = "name" if kind == "folder" else "title"
                plan.conflict({"kind": kind, "id": archive_id,
                               "path": self._path(parent_key, name), "reason": "name",
                               "existing_id": self._holder(kind, dest, name),
                               "action": "rename", "new_name": final},
                              f"a {kind} with the {noun} {name!r} already exists "
                              + ("at the root of this server" if dest is None
                                 else f"in folder '{dest}' on this server"))
                if plan.policy == "fail":
                    final = name
            action = "rename" if final != name else ("overwrite" if exists else "create")
        if not dest_created:
            self._require(("folder", dest, "write"), "import into it")
        self.batch_names[(kind, dest, final)] = local_id
        plan.counts[action][kind] += 1
        depth = 0
        if kind == "folder":
            depth = (self._depth_here(dest) if dest_depth is None else dest_depth) + 1
            if depth > MAX_TREE_DEPTH:
                raise Conflict(f"folder {self._path(parent_key, name, always=True)!r} would be "
                               f"nested {depth} levels deep; this server allows at most "
                               f"{MAX_TREE_DEPTH}")
        self._record(kind, archive_id, local_id, action, dest, final, created_time, depth)

    def _record(self, kind, archive_id, local_id, action, dest, name, created_time,
                depth) -> None:
        self.rows.add_object(kind, archive_id, local_id, action, dest, name, created_time, depth)
        if kind == "folder":
            self.batch[archive_id] = (local_id, action, depth)

    def _holder(self, kind: str, parent: str | None, name: str) -> str | None:
        """The id of what holds `name` in `parent` here: placed by this plan, or existing."""
        key = (kind, parent, name)
        if key in self.batch_names:
            return self.batch_names[key]
        placed = self.rows.name_holder(kind, parent, name)
        if placed is not None:
            return placed
        if (parent, name) in self.local_holders:
            return self.local_holders[(parent, name)]
        return lookup.sibling_holders(self.m, kind, [(parent, name)]).get((parent, name))

    def _free_name(self, kind: str, parent: str | None, parent_created: bool, name: str,
                   own_id: str | None) -> str:
        """`name`, or the first free `name (N)` among the siblings in `parent`. A folder this
        plan creates holds only the children of one archive folder, whose names are unique."""
        if parent_created:
            return name
        holder = self._holder(kind, parent, name)
        if holder is None or holder == own_id:
            return name
        number = 2
        while self._holder(kind, parent, f"{name} ({number})") is not None:
            number += 1
        renamed = f"{name} ({number})"
        if len(renamed) > NAME_MAX_CHARS:
            raise Conflict(f"{kind} {name[:40]!r}...: the name is taken and too long to make "
                           "unique")
        return renamed

    def _path(self, parent_key: str, name: str, *, always: bool = False) -> str | None:
        """The archive path of an object, for the conflicts listed one by one."""
        if not always and len(self.plan.conflicts) >= CONFLICTS_SHOWN:
            return None
        return f"{self._archive_path(parent_key)}/{name}"

    def _archive_path(self, parent_key: str) -> str:
        if parent_key == ROOT_KEY:
            return ""
        if parent_key not in self.paths:
            if len(self.paths) >= CACHE_ENTRIES:
                self.paths.clear()
            name, grandparent = self.index.folder(parent_key)
            self.paths[parent_key] = f"{self._archive_path(grandparent)}/{name}"
        return self.paths[parent_key]

    def _depth_here(self, folder_id: str | None) -> int:
        """Levels from the root to an existing folder, as it is here."""
        if folder_id is None:
            return 0
        if folder_id not in self.depths:
            if len(self.depths) >= CACHE_ENTRIES:
                self.depths.clear()
            self.depths[folder_id] = lookup.folder_depth(self.m, folder_id)
        return self.depths[folder_id]

    def _require(self, what: tuple, doing: str) -> None:
        """A non-sysop importer needs the access an API request would need."""
        kind, object_id, access = what
        if object_id is None or self.principal is None or self.principal.is_sysop:
            return
        if what not in self.allowed:
            if len(self.allowed) >= CACHE_ENTRIES:
                self.allowed.clear()
            self.allowed[what] = lookup.may(self.m, self.principal, kind, object_id, access)
        reason = self.allowed[what]
        if reason is not None:
            raise Forbidden(f"the import may not {doing} ({kind} '{object_id}'): {reason}")

    def _check_cycles(self) -> None:
        """An overwritten folder moved below one of its own descendants here would cut a
        loop out of the tree; refuse it."""
        if not self.plan.counts["overwrite"]["folder"]:
            return
        for batch in self.rows.overwritten_folders():
            for local_id, parent in batch:
                seen, node = {local_id}, parent
                while node is not None:
                    if node in seen:
                        raise Conflict(f"overwriting folder '{local_id}' would move it below "
                                       f"itself (through folder '{node}')")
                    seen.add(node)
                    placed, planned_parent = self.rows.planned_parent(node)
                    node = planned_parent if placed else lookup.local_folders(
                        self.m, [node]).get(node, (None, None))[1]
                    if len(seen) > MAX_TREE_DEPTH + 1:
                        raise Conflict("the folder tree would be too deep")

    # -- revisions, files and rules

    def _file_for(self, archive_file_id: str, taken: set[str], planned: dict[str, str]) -> str:
        """The id here of an archive file (`planned`: those decided so far, this batch's)."""
        if archive_file_id not in planned:
            if self.new_ids:
                local_id = new_id()
            elif archive_file_id in taken:
                self.plan.conflict({"kind": "file", "id": archive_file_id, "reason": "id",
                                    "existing_id": archive_file_id, "action": "new id"},
                                   f"file id '{archive_file_id}' already exists on this server")
                local_id = new_id()
            else:
                local_id = archive_file_id
            planned[archive_file_id] = local_id
            self.rows.add_file(archive_file_id, local_id)
            self.plan.counts["create"]["file"] += 1
        return planned[archive_file_id]

    def _plan_revisions(self) -> None:
        plan, rows = self.plan, self.rows
        carried: dict[str, int] = {}  # next seq of the document the last batch ended inside
        for batch in self.index.rows("revisions"):
            self.check_abort()
            decided = rows.placements("document", [row[1] for row in batch])
            wanted = [row for row in batch if decided.get(row[1], (0, KEPT))[1] != KEPT]
            taken_revisions = lookup.existing_ids(self.m, "revision", [r[0] for r in wanted])
            taken_files = lookup.existing_ids(self.m, "file", [r[2] for r in wanted])
            planned_files = rows.files(row[2] for row in wanted)
            overwritten = {decided[r[1]][0] for r in wanted if decided[r[1]][1] == "overwrite"}
            next_seq = {doc: seq + 1 for doc, seq in
                        lookup.last_revision_seq(self.m, overwritten - set(carried)).items()}
            next_seq.update(carried)
            for revision_id, document_id, file_id, created_time, position in wanted:
                local_document, action = decided[document_id][:2]
                if action == "skip":
                    plan.counts["skip"]["revision"] += plan.policy != "fail"
                    continue
                if action == "overwrite":
                    if revision_id in taken_revisions:
                        plan.counts["skip"]["revision"] += 1
                        continue
                    seq = next_seq.get(local_document, 0)
                    next_seq[local_document] = seq + 1
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
                rows.add_revision((local_id, local_document,
                                   self._file_for(file_id, taken_files, planned_files),
                                   created_time, seq))
            last = decided.get(batch[-1][1], (None,))[0]
            carried = {last: next_seq[last]} if last in next_seq else {}
            rows.flush()
        if plan.whole_archive:
            for batch in self.index.unreferenced_files():
                taken = lookup.existing_ids(self.m, "file", batch)
                for file_id in batch:
                    if file_id in taken and not self.new_ids and plan.policy != "fail":
                        plan.counts["skip"]["file"] += 1
                    else:
                        self._file_for(file_id, taken, {})
                rows.flush()

    def _plan_rules(self) -> None:
        plan, rows = self.plan, self.rows
        for batch in self.index.rows("rules"):
            self.check_abort()
            decided = {kind: rows.placements(kind, [r[2] for r in batch if r[1] == kind])
                       for kind in ("folder", "document")}
            wanted = [row for row in batch
                      if decided[row[1]].get(row[2], (0, KEPT))[1] != KEPT]
            owners = lookup.rule_owners(self.m, [row[0] for row in wanted])
            for rule_id, object_type, object_id, access_type, rule_data, position in wanted:
                local_object, action = decided[object_type][object_id][:2]
                if action == "skip":
                    plan.counts["skip"]["rule"] += plan.policy != "fail"
                    continue
                local_id = new_id() if self.new_ids else rule_id
                owner = owners.get(rule_id)
                if owner is not None and not self.new_ids and not (
                        action == "overwrite" and owner == (object_type, local_object)):
                    plan.conflict({"kind": "rule", "id": rule_id, "reason": "id",
                                   "existing_id": rule_id, "action": "new id"},
                                  f"access rule id '{rule_id}' already exists on this server")
                    local_id = new_id()
                plan.counts["overwrite" if action == "overwrite" else "create"]["rule"] += 1
                rows.add_rule((local_id, object_type, local_object, access_type, rule_data,
                               position))
            rows.flush()

    def _plan_file_bytes(self, absent_file_ids: set[str]) -> None:
        for batch in self.rows.file_rows():
            for archive_id, _, _, size, _ in batch:
                if archive_id not in absent_file_ids:
                    self.plan.bytes_to_write += size or 0
