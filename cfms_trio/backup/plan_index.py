"""The restore plan's per-object decisions, on disk beside the staged records (blocking).

The planner (`planner.py`) decides, for every chosen folder and document, its action, its id
here, its destination parent and its final name; for every revision, file and access rule it
writes, its id here. A backup of a million documents makes a million such decisions, so they
are tables in the import's staging index (the same SQLite file, `staging_index.py`) rather
than objects in memory: the planner looks them up by batch and the commit reads them back in
batches. Memory is bounded by the batch sizes, not by the size of the archive.

Tables (created empty by `reset`, so a second plan of the same staging never sees the first):
`plan_objects` (kind, archive id, id here, action, parent here, final name, created_time,
depth), `plan_files` (archive file id -> id here), `plan_revisions` and `plan_rules` (the rows
the commit inserts, in their columns of `restore_rows`).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from .staging_index import READ_BATCH_ROWS, StagingIndex

_SCHEMA = """
DROP TABLE IF EXISTS plan_objects; DROP TABLE IF EXISTS plan_files;
DROP TABLE IF EXISTS plan_revisions; DROP TABLE IF EXISTS plan_rules;
CREATE TABLE plan_objects (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL,
    archive_id TEXT NOT NULL, local_id TEXT NOT NULL, action TEXT NOT NULL, parent TEXT,
    name TEXT NOT NULL, created_time REAL NOT NULL, depth INTEGER NOT NULL);
CREATE UNIQUE INDEX plan_objects_archive ON plan_objects (kind, archive_id);
CREATE INDEX plan_objects_local ON plan_objects (kind, local_id);
CREATE INDEX plan_objects_names ON plan_objects (kind, parent, name);
CREATE TABLE plan_files (archive_id TEXT PRIMARY KEY, local_id TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE plan_revisions (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, document TEXT NOT NULL,
    file TEXT NOT NULL, created_time REAL NOT NULL, position INTEGER NOT NULL);
CREATE TABLE plan_rules (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, object_type TEXT NOT NULL,
    object_id TEXT NOT NULL, access_type TEXT NOT NULL, rule_data TEXT NOT NULL,
    position INTEGER NOT NULL);
"""
# Actions that make a new row (the others leave the row or update it).
NEW_ACTIONS = ("create", "rename")
# An ancestor on the way to the chosen objects that exists here: neither counted nor written,
# only a parent.
KEPT = "keep"


class PlanIndex:
    """The plan tables of one staging index; see the module docstring."""

    def __init__(self, index: StagingIndex):
        self.db = index.db
        self.pending: dict[str, list[tuple]] = {"objects": [], "files": [], "revisions": [],
                                                "rules": []}

    def reset(self) -> None:
        self.db.executescript(_SCHEMA)

    # -- writing (buffered; `flush` before reading)

    def add_object(self, kind: str, archive_id: str, local_id: str, action: str,
                   parent: str | None, name: str, created_time: float, depth: int) -> None:
        self.pending["objects"].append((kind, archive_id, local_id, action, parent, name,
                                        created_time, depth))

    def add_file(self, archive_id: str, local_id: str) -> None:
        self.pending["files"].append((archive_id, local_id))

    def add_revision(self, row: tuple) -> None:
        self.pending["revisions"].append(row)

    def add_rule(self, row: tuple) -> None:
        self.pending["rules"].append(row)

    def flush(self) -> None:
        sql = {"objects": "INSERT INTO plan_objects (kind, archive_id, local_id, action, "
                          "parent, name, created_time, depth) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               "files": "INSERT INTO plan_files (archive_id, local_id) VALUES (?, ?)",
               "revisions": "INSERT INTO plan_revisions (id, document, file, created_time, "
                            "position) VALUES (?, ?, ?, ?, ?)",
               "rules": "INSERT INTO plan_rules (id, object_type, object_id, access_type, "
                        "rule_data, position) VALUES (?, ?, ?, ?, ?, ?)"}
        if not any(self.pending.values()):
            return
        self.db.execute("BEGIN")
        for table, rows in self.pending.items():
            if rows:
                self.db.executemany(sql[table], rows)
                rows.clear()
        self.db.execute("COMMIT")

    # -- looking up (by batch)

    def placements(self, kind: str, archive_ids: Iterable[str]) -> dict[str, tuple]:
        """{archive id: (id here, action, depth)} of the decided ones of `archive_ids`."""
        self.flush()
        found = {}
        for batch in _chunks(list(dict.fromkeys(archive_ids))):
            marks = ", ".join("?" * len(batch))
            for row in self.db.execute(
                    f"SELECT archive_id, local_id, action, depth FROM plan_objects WHERE "
                    f"kind = ? AND archive_id IN ({marks})", (kind, *batch)):
                found[row[0]] = row[1:]
        return found

    def planned_parent(self, local_id: str) -> tuple[bool, str | None]:
        """(True, parent) if this plan places folder `local_id` (created or moved), else
        (False, None)."""
        self.flush()
        row = self.db.execute("SELECT parent FROM plan_objects WHERE kind = 'folder' AND "
                              "local_id = ? AND action NOT IN ('skip', ?)",
                              (local_id, KEPT)).fetchone()
        return (False, None) if row is None else (True, row[0])

    def name_holder(self, kind: str, parent: str | None, name: str) -> str | None:
        """The id here of the object this plan placed as `name` in `parent` in an earlier
        batch (the planner remembers the current batch's names itself)."""
        row = self.db.execute("SELECT local_id FROM plan_objects WHERE kind = ? AND parent IS ? "
                              "AND name = ? AND action != 'skip' AND action != ?",
                              (kind, parent, name, KEPT)).fetchone()
        return None if row is None else row[0]

    def files(self, archive_ids: Iterable[str]) -> dict[str, str]:
        """{archive file id: id here} of those of `archive_ids` already planned."""
        self.flush()
        found = {}
        for batch in _chunks(list(dict.fromkeys(archive_ids))):
            marks = ", ".join("?" * len(batch))
            found.update(self.db.execute(f"SELECT archive_id, local_id FROM plan_files WHERE "
                                         f"archive_id IN ({marks})", batch).fetchall())
        return found

    # -- reading back (the commit), in batches

    def _batches(self, sql: str, params: tuple = ()) -> Iterator[list[tuple]]:
        self.flush()
        cursor = self.db.execute(sql, params)
        while batch := cursor.fetchmany(READ_BATCH_ROWS):
            yield batch

    def objects(self, kind: str, actions: tuple[str, ...]) -> Iterator[list[tuple]]:
        """(id here, name, parent, created_time) of the planned `kind` objects whose action
        is one of `actions`, in the order decided (folders: parents first)."""
        marks = ", ".join("?" * len(actions))
        return self._batches(f"SELECT local_id, name, parent, created_time FROM plan_objects "
                             f"WHERE kind = ? AND action IN ({marks}) ORDER BY seq",
                             (kind, *actions))

    def overwritten(self) -> Iterator[list[tuple]]:
        """(kind, id here) of the overwritten folders and documents."""
        return self._batches("SELECT kind, local_id FROM plan_objects WHERE action = "
                             "'overwrite' ORDER BY seq")

    def overwritten_folders(self) -> Iterator[list[tuple]]:
        """(id here, parent) of the overwritten folders."""
        return self._batches("SELECT local_id, parent FROM plan_objects WHERE kind = 'folder' "
                             "AND action = 'overwrite' ORDER BY seq")

    def file_rows(self) -> Iterator[list[tuple]]:
        """(archive id, id here, sha256, size, created_time) of every file written, in
        archive order."""
        return self._batches("SELECT f.id, p.local_id, f.sha256, f.size, f.created_time FROM "
                             "files f JOIN plan_files p ON p.archive_id = f.id ORDER BY f.seq")

    def files_count(self) -> int:
        self.flush()
        return self.db.execute("SELECT COUNT(*) FROM plan_files").fetchone()[0]

    def revisions(self) -> Iterator[list[tuple]]:
        return self._batches("SELECT id, document, file, created_time, position FROM "
                             "plan_revisions ORDER BY seq")

    def rules(self) -> Iterator[list[tuple]]:
        return self._batches("SELECT id, object_type, object_id, access_type, rule_data, "
                             "position FROM plan_rules ORDER BY seq")


def _chunks(ids: list[str], size: int = 900) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield ids[start:start + size]
