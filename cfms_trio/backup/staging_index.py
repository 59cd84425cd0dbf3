"""The on-disk index of an archive being read: an SQLite database in the import's staging folder.

The archive reader hands it every validated record (it is the reader's ``RecordSink``); it
keeps them on disk, so reading a backup of a million documents holds a batch of rows, not the
listings. ``check`` then runs the checks that need the whole set as queries: unique ids (UNIQUE
columns), parents that exist, no cycles, tree depth, unique sibling names (an upstream 1.0
archive's repeated names renamed instead), revisions' files, users' groups. The restore's
commit reads the rows back from it in batches (``rows``) inside its one write transaction;
``cfms-trio backup verify`` runs the same checks with no store at all.

It belongs to the restore side: the archive format knows nothing of SQLite. One connection,
used by one thread at a time (the unpacking worker, then the store's writer thread).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterator

from ..auth import is_verifiable_hash
from ..conventions import MAX_TREE_DEPTH, NAME_MAX_CHARS
from ..errors import ArchiveError
from .format import itemised

INDEX_FILE_NAME = "index.sqlite"  # not an id (ids never hold a dot): never a staged file
ADD_BATCH_ROWS = 5000
READ_BATCH_ROWS = 5000
ROOT_KEY = ""  # the parent key of top-level objects (ids are never empty)

_SCHEMA = """
CREATE TABLE folders (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    parent_key TEXT NOT NULL, created_time REAL NOT NULL);
CREATE TABLE documents (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL,
    folder_key TEXT NOT NULL, created_time REAL NOT NULL);
CREATE TABLE revisions (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    document_id TEXT NOT NULL, file_id TEXT NOT NULL, created_time REAL NOT NULL,
    position INTEGER NOT NULL);
CREATE TABLE rules (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    object_type TEXT NOT NULL, object_id TEXT NOT NULL, access_type TEXT NOT NULL,
    rule_data TEXT NOT NULL, position INTEGER NOT NULL);
CREATE TABLE files (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, sha256 TEXT,
    size INTEGER, created_time REAL NOT NULL, extracted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE account_groups (seq INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    permissions TEXT NOT NULL, created_time REAL NOT NULL);
CREATE TABLE users (seq INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL, nickname TEXT NOT NULL, permissions TEXT NOT NULL,
    created_time REAL NOT NULL, passwd_last_modified REAL NOT NULL);
CREATE TABLE memberships (username TEXT NOT NULL, group_name TEXT NOT NULL);
CREATE TABLE audit (seq INTEGER PRIMARY KEY, time REAL NOT NULL, username TEXT,
    action TEXT NOT NULL, target TEXT, result INTEGER NOT NULL, address TEXT);
CREATE TABLE rule_groups (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE folder_depth (id TEXT PRIMARY KEY, depth INTEGER NOT NULL) WITHOUT ROWID;
"""
# Built once the records are in (cheaper than maintaining them row by row).
_CHECK_INDEXES = """
CREATE INDEX folders_parent ON folders (parent_key, name);
CREATE INDEX documents_folder ON documents (folder_key, title);
CREATE INDEX revisions_document ON revisions (document_id);
CREATE INDEX revisions_file ON revisions (file_id);
CREATE UNIQUE INDEX memberships_user ON memberships (username, group_name);
"""

_INSERT = {
    "folders": "INSERT INTO folders (id, name, parent_key, created_time) VALUES (?, ?, ?, ?)",
    "documents": "INSERT INTO documents (id, title, folder_key, created_time) VALUES (?, ?, ?, ?)",
    "revisions": "INSERT INTO revisions (id, document_id, file_id, created_time, position) "
                 "VALUES (?, ?, ?, ?, ?)",
    "rules": "INSERT INTO rules (id, object_type, object_id, access_type, rule_data, position) "
             "VALUES (?, ?, ?, ?, ?, ?)",
    "files": "INSERT INTO files (id, sha256, size, created_time) VALUES (?, ?, ?, ?)",
    "groups": "INSERT INTO account_groups (name, permissions, created_time) VALUES (?, ?, ?)",
    "users": "INSERT INTO users (username, password_hash, nickname, permissions, created_time, "
             "passwd_last_modified) VALUES (?, ?, ?, ?, ?, ?)",
    "memberships": "INSERT INTO memberships (username, group_name) VALUES (?, ?)",
    "audit": "INSERT INTO audit (time, username, action, target, result, address) "
             "VALUES (?, ?, ?, ?, ?, ?)",
    "rule_groups": "INSERT OR IGNORE INTO rule_groups (name) VALUES (?)",
}
# What a duplicate in each table is called in the error (table -> (kind, key column)).
_UNIQUE_KEY = {
    "folders": ("folder", "id"), "documents": ("document", "id"),
    "revisions": ("revision", "id"), "rules": ("access rule", "id"), "files": ("file", "id"),
    "groups": ("group", "name"), "users": ("user", "username"),
}
# The rows the commit reads back, in insertion order (folders: parents first).
_ROWS = {
    "folders": "SELECT f.id, f.name, NULLIF(f.parent_key, ''), f.created_time FROM folders f "
               "JOIN folder_depth d ON d.id = f.id ORDER BY d.depth, f.seq",
    "documents": "SELECT id, title, NULLIF(folder_key, ''), created_time FROM documents "
                 "ORDER BY seq",
    "revisions": "SELECT id, document_id, file_id, created_time, position FROM revisions "
                 "ORDER BY seq",
    "rules": "SELECT id, object_type, object_id, access_type, rule_data, position FROM rules "
             "ORDER BY seq",
    "files": "SELECT id, sha256, size, created_time FROM files ORDER BY seq",
    "groups": "SELECT name, permissions, created_time FROM account_groups ORDER BY seq",
    "users": "SELECT username, password_hash, nickname, permissions, created_time, "
             "passwd_last_modified FROM users ORDER BY seq",
    "memberships": "SELECT username, group_name FROM memberships ORDER BY username, group_name",
    "audit": "SELECT time, username, action, target, result, address FROM audit ORDER BY seq",
    "rule_groups": "SELECT name FROM rule_groups ORDER BY name",
}
# Ids per kind, for collision checks against a store.
_IDS = {
    "folders": "SELECT id FROM folders", "documents": "SELECT id FROM documents",
    "revisions": "SELECT id FROM revisions", "files": "SELECT id FROM files",
    "rules": "SELECT id FROM rules",
    "root folder names": "SELECT name FROM folders WHERE parent_key = ''",
    "root document titles": "SELECT title FROM documents WHERE folder_key = ''",
}


def _rule_group_names(rule_data: dict) -> Iterator[str]:
    for group in rule_data.get("match_groups", ()):
        yield from group.get("groups", {}).get("require", ())


class StagingIndex:
    """An archive's records on disk; see the module docstring."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "temp_store = FILE",
                       "cache_size = -16000"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(_SCHEMA)
        self.pending: dict[str, list[tuple]] = {table: [] for table in _INSERT}
        self.pending_rows = 0
        self.counts: dict[str, int] = {}
        self.everything_chosen = True  # until `select_subtrees`

    @classmethod
    def create(cls, staging_dir: Path) -> "StagingIndex":
        """A new index in `staging_dir` (made if needed, private)."""
        Path(staging_dir).mkdir(mode=0o700, exist_ok=True)
        return cls(Path(staging_dir) / INDEX_FILE_NAME)

    def close(self) -> None:
        self.db.close()

    # -- the reader's RecordSink

    def add(self, kind: str, record: dict) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        pending = self.pending
        if kind == "documents":
            self._check_name("document", record["id"], "title", record["title"])
            pending["documents"].append((record["id"], record["title"],
                                         record["folder_id"] or ROOT_KEY,
                                         record["created_time"]))
            for position, revision in enumerate(record["revisions"]):
                pending["revisions"].append((revision["id"], record["id"], revision["file_id"],
                                             revision["created_time"], position))
            self._add_rules("document", record)
        elif kind == "folders":
            self._check_name("folder", record["id"], "name", record["name"])
            pending["folders"].append((record["id"], record["name"],
                                       record["parent_id"] or ROOT_KEY, record["created_time"]))
            self._add_rules("folder", record)
        elif kind == "files":
            pending["files"].append((record["id"], record["sha256"], record["size"],
                                     record["created_time"]))
        elif kind == "groups":
            pending["groups"].append((record["name"], json.dumps(record["permissions"]),
                                      record["created_time"]))
        elif kind == "users":
            if not is_verifiable_hash(record["password_hash"]):
                raise ArchiveError(f"user {record['username']!r}: password_hash is not a hash "
                                   "this server can verify (scrypt$N$r$p$salt$digest)")
            pending["users"].append((record["username"], record["password_hash"],
                                     record["nickname"], json.dumps(record["permissions"]),
                                     record["created_time"], record["passwd_last_modified"]))
            pending["memberships"].extend((record["username"], group)
                                          for group in record["groups"])
        elif kind == "audit":
            pending["audit"].append((record["time"], record["username"], record["action"],
                                     record["target"], record["result"], record["address"]))
        else:
            raise ValueError(f"unknown listing kind {kind!r}")
        self.pending_rows += 1
        if self.pending_rows >= ADD_BATCH_ROWS:
            self.flush()

    @staticmethod
    def _check_name(kind: str, object_id: str, field: str, name: str) -> None:
        """The API's rule for names and titles (1 to NAME_MAX_CHARS characters)."""
        if not 1 <= len(name) <= NAME_MAX_CHARS:
            raise ArchiveError(f"{kind} {object_id!r}: {field} must be 1 to {NAME_MAX_CHARS} "
                               "characters long")

    def _add_rules(self, object_type: str, owner: dict) -> None:
        seq_of: dict[str, int] = {}
        for rule in owner["access_rules"]:
            position = seq_of.get(rule["access_type"], 0)
            seq_of[rule["access_type"]] = position + 1
            self.pending["rules"].append((rule["id"], object_type, owner["id"],
                                          rule["access_type"], json.dumps(rule["rule_data"]),
                                          position))
            self.pending["rule_groups"].extend(
                (name,) for name in _rule_group_names(rule["rule_data"]))

    def flush(self) -> None:
        for table, rows in self.pending.items():
            if rows:
                self._insert(table, rows)
                rows.clear()
        self.pending_rows = 0

    def _insert(self, table: str, rows: list[tuple]) -> None:
        try:
            self.db.execute("BEGIN")
            self.db.executemany(_INSERT[table], rows)
            self.db.execute("COMMIT")
        except sqlite3.IntegrityError:
            self.db.execute("ROLLBACK")
            self._name_duplicate(table, rows)
            raise

    def _name_duplicate(self, table: str, rows: list[tuple]) -> None:
        """Raise the ArchiveError naming the first row of `rows` whose key is taken."""
        if table not in _UNIQUE_KEY:
            raise ArchiveError("a user lists a group twice")
        kind, column = _UNIQUE_KEY[table]
        name = "account_groups" if table == "groups" else table
        taken = f"SELECT 1 FROM {name} WHERE {column} = ?"
        seen: set = set()
        for row in rows:
            if row[0] in seen or self.db.execute(taken, (row[0],)).fetchone():
                what = f"{kind} id" if column == "id" else kind
                raise ArchiveError(f"duplicate {what} {row[0]!r}")
            seen.add(row[0])

    def listed_file(self, file_id: str) -> dict | None:
        self.flush()
        row = self.db.execute("SELECT id, sha256, size, created_time FROM files WHERE id = ?",
                              (file_id,)).fetchone()
        if row is None:
            return None
        return {"id": row[0], "sha256": row[1], "size": row[2], "created_time": row[3]}

    def listed_file_at(self, position: int) -> str | None:
        self.flush()
        row = self.db.execute("SELECT id FROM files WHERE seq = ?", (position + 1,)).fetchone()
        return None if row is None else row[0]

    def file_extracted(self, file_id: str, size: int, sha256: str) -> None:
        self.flush()
        self.db.execute("UPDATE files SET extracted = 1, size = COALESCE(size, ?), "
                        "sha256 = COALESCE(sha256, ?) WHERE id = ?", (size, sha256, file_id))

    def files_without_content(self) -> list[str]:
        self.flush()
        return [row[0] for row in self.db.execute(
            "SELECT id FROM files WHERE extracted = 0 ORDER BY seq")]

    # -- checks that need the whole set

    def check(self, *, rename_twins: bool) -> list[str]:
        """Run every check of the whole set (module docstring); return the warnings of the
        renames made when `rename_twins` (upstream 1.0 archives), else refuse repeated names."""
        self.flush()
        db = self.db
        db.executescript(_CHECK_INDEXES)
        row = db.execute("SELECT f.id, f.parent_key FROM folders f WHERE f.parent_key != '' "
                         "AND NOT EXISTS (SELECT 1 FROM folders p WHERE p.id = f.parent_key) "
                         "ORDER BY f.seq LIMIT 1").fetchone()
        if row:
            raise ArchiveError(f"folder {row[0]!r}: parent folder {row[1]!r} is not in the "
                               "backup")
        self._check_tree()
        row = db.execute("SELECT d.id, d.folder_key FROM documents d WHERE d.folder_key != '' "
                         "AND NOT EXISTS (SELECT 1 FROM folders f WHERE f.id = d.folder_key) "
                         "ORDER BY d.seq LIMIT 1").fetchone()
        if row:
            raise ArchiveError(f"document {row[0]!r}: folder {row[1]!r} is not in the backup")
        row = db.execute("SELECT r.document_id, r.id, r.file_id FROM revisions r WHERE NOT "
                         "EXISTS (SELECT 1 FROM files f WHERE f.id = r.file_id) "
                         "ORDER BY r.seq LIMIT 1").fetchone()
        if row:
            raise ArchiveError(f"document {row[0]!r}: revision {row[1]!r} refers to file "
                               f"{row[2]!r}, which is not in the backup")
        row = db.execute("SELECT m.username, m.group_name FROM memberships m WHERE NOT EXISTS "
                         "(SELECT 1 FROM account_groups g WHERE g.name = m.group_name) "
                         "LIMIT 1").fetchone()
        if row:
            raise ArchiveError(f"user {row[0]!r}: group {row[1]!r} is not in the backup")
        return self._sibling_names(rename_twins)

    def _check_tree(self) -> None:
        """Every folder reaches the root within MAX_TREE_DEPTH levels; otherwise name the
        folder too deep, or one on a cycle."""
        db = self.db
        db.execute("DELETE FROM folder_depth")
        db.execute("INSERT INTO folder_depth (id, depth) WITH RECURSIVE tree(id, depth) AS ("
                   "SELECT id, 1 FROM folders WHERE parent_key = '' UNION ALL "
                   "SELECT f.id, t.depth + 1 FROM folders f JOIN tree t ON f.parent_key = t.id "
                   "WHERE t.depth <= ?) SELECT id, depth FROM tree", (MAX_TREE_DEPTH,))
        row = db.execute("SELECT id, depth FROM folder_depth WHERE depth > ? LIMIT 1",
                         (MAX_TREE_DEPTH,)).fetchone()
        if row:
            raise ArchiveError(f"folder {row[0]!r} is nested {row[1]} levels deep; this server "
                               f"allows at most {MAX_TREE_DEPTH}")
        row = db.execute("SELECT f.id FROM folders f WHERE NOT EXISTS (SELECT 1 FROM "
                         "folder_depth d WHERE d.id = f.id) ORDER BY f.seq LIMIT 1").fetchone()
        if row is None:
            return
        # Not reached from the root and every parent exists: a cycle is above it. Walk up.
        seen, node = set(), row[0]
        while node not in seen:
            seen.add(node)
            node = db.execute("SELECT parent_key FROM folders WHERE id = ?", (node,)).fetchone()[0]
        raise ArchiveError(f"folder {node!r} is part of a cycle in the folder hierarchy")

    def _sibling_names(self, rename_twins: bool) -> list[str]:
        renames: list[str] = []
        for kind, table, name_col, parent_col in (("folder", "folders", "name", "parent_key"),
                                                  ("document", "documents", "title",
                                                   "folder_key")):
            twins = self.db.execute(
                f"SELECT t.seq, t.id, t.{parent_col}, t.{name_col} FROM {table} t JOIN "
                f"(SELECT {parent_col} AS parent, {name_col} AS name, MIN(seq) AS first "
                f"FROM {table} GROUP BY {parent_col}, {name_col} HAVING COUNT(*) > 1) d "
                f"ON t.{parent_col} = d.parent AND t.{name_col} = d.name AND t.seq > d.first "
                "ORDER BY t.seq").fetchall()
            if twins and not rename_twins:
                _, _, parent, name = twins[0]
                where = f"folder {parent!r}" if parent else "the root"
                raise ArchiveError(f"two {kind}s named {name!r} in {where}")
            next_number: dict[tuple, int] = {}  # 10,000 twins cost 10,000 steps
            taken = f"SELECT 1 FROM {table} WHERE {parent_col} = ? AND {name_col} = ?"
            for seq, object_id, parent, name in twins:
                number = next_number.get((parent, name), 2)
                while self.db.execute(taken, (parent, f"{name} ({number})")).fetchone():
                    number += 1
                next_number[(parent, name)] = number + 1
                new_name = f"{name} ({number})"
                self._check_name(kind, object_id, name_col, new_name)
                self.db.execute(f"UPDATE {table} SET {name_col} = ? WHERE seq = ?",
                                (new_name, seq))
                where = f"folder {parent!r}" if parent else "the root"
                renames.append(f"{kind} {object_id!r}: another {kind} in {where} is also named "
                               f"{name!r}; imported as {new_name!r}")
        return itemised(renames, "... and {count} more folders and documents renamed the same "
                                 "way")

    # -- reading back

    def count(self, kind: str) -> int:
        return self.counts.get(kind, 0)

    def rows(self, kind: str, batch_rows: int = READ_BATCH_ROWS) -> Iterator[list[tuple]]:
        """The rows of `kind` in insertion order, in batches (see `_ROWS` for the columns)."""
        self.flush()
        cursor = self.db.execute(_ROWS[kind])
        while batch := cursor.fetchmany(batch_rows):
            yield batch

    def keys(self, kind: str, batch_rows: int) -> Iterator[list[str]]:
        """Ids (or root names) of `kind` in batches, for collision checks."""
        self.flush()
        cursor = self.db.execute(_IDS[kind])
        while batch := cursor.fetchmany(batch_rows):
            yield [row[0] for row in batch]

    def listing(self, kind: str) -> Iterator[dict]:
        """The records of `kind` in archive order and the listing shape (§1.6, §1.6a), as
        normalised by the reader; users without their password hash. Streams: revisions and
        rules were added in their owners' order, so each is read alongside its owners."""
        self.flush()
        db = self.db
        if kind in ("folders", "documents"):
            object_type = kind[:-1]
            rules = _GroupedRows(db.execute(
                "SELECT object_id, id, access_type, rule_data FROM rules WHERE object_type = ? "
                "ORDER BY seq", (object_type,)))
            revisions = _GroupedRows(db.execute(
                "SELECT document_id, id, file_id, created_time FROM revisions ORDER BY seq")
                if kind == "documents" else iter(()))
            parent = "parent_id" if kind == "folders" else "folder_id"
            name = "name" if kind == "folders" else "title"
            for object_id, title, parent_key, created_time in db.execute(
                    f"SELECT id, {name}, {'parent_key' if kind == 'folders' else 'folder_key'}, "
                    f"created_time FROM {kind} ORDER BY seq"):
                record = {"id": object_id, name: title, parent: parent_key or None,
                          "created_time": created_time,
                          "access_rules": [{"id": i, "access_type": t,
                                            "rule_data": json.loads(d)}
                                           for i, t, d in rules.take(object_id)]}
                if kind == "documents":
                    record["revisions"] = [{"id": i, "file_id": f, "created_time": t}
                                           for i, f, t in revisions.take(object_id)]
                yield record
        elif kind == "files":
            for file_id, sha256, size, created_time in db.execute(_ROWS["files"]):
                yield {"id": file_id, "sha256": sha256, "size": size,
                       "created_time": created_time}
        elif kind == "groups":
            for group, permissions, created_time in db.execute(_ROWS["groups"]):
                yield {"name": group, "permissions": json.loads(permissions),
                       "created_time": created_time}
        elif kind == "users":
            for username, _, nickname, permissions, created, changed in db.execute(_ROWS["users"]):
                groups = [row[1] for row in self.memberships_of([username])]
                yield {"username": username, "nickname": nickname,
                       "permissions": json.loads(permissions), "groups": groups,
                       "created_time": created, "passwd_last_modified": changed}
        elif kind == "audit":
            for when, username, action, target, result, address in db.execute(_ROWS["audit"]):
                yield {"time": when, "username": username, "action": action, "target": target,
                       "result": result, "address": address}
        else:
            raise ValueError(f"unknown listing kind {kind!r}")

    # -- choosing part of the archive (the restore planner)

    def folder(self, folder_id: str) -> tuple[str, str] | None:
        """(name, parent key) of a listed folder, or None."""
        return self.db.execute("SELECT name, parent_key FROM folders WHERE id = ?",
                               (folder_id,)).fetchone()

    def document(self, document_id: str) -> tuple[str, str] | None:
        """(title, folder key) of a listed document, or None."""
        return self.db.execute("SELECT title, folder_key FROM documents WHERE id = ?",
                               (document_id,)).fetchone()

    def named_child(self, kind: str, parent_key: str, name: str) -> str | None:
        """The id of the folder (kind "folder") or document named `name` in `parent_key`."""
        table, name_col, parent_col = (("folders", "name", "parent_key") if kind == "folder"
                                       else ("documents", "title", "folder_key"))
        row = self.db.execute(f"SELECT id FROM {table} WHERE {parent_col} = ? AND "
                              f"{name_col} = ?", (parent_key, name)).fetchone()
        return None if row is None else row[0]

    def select_all(self) -> None:
        """Choose every folder and document (`chosen_rows` reads them back)."""
        self.everything_chosen = True

    def select_subtrees(self, folder_ids: list[str], document_ids: list[str]) -> None:
        """Mark the subtrees of `folder_ids` and the documents `document_ids` as chosen
        (`chosen_rows` reads them back)."""
        self.everything_chosen = False
        db = self.db
        db.executescript("DROP TABLE IF EXISTS chosen_tops; DROP TABLE IF EXISTS chosen; "
                         "CREATE TABLE chosen_tops (id TEXT PRIMARY KEY) WITHOUT ROWID; "
                         "CREATE TABLE chosen (kind TEXT, id TEXT, PRIMARY KEY (kind, id)) "
                         "WITHOUT ROWID;")
        db.executemany("INSERT OR IGNORE INTO chosen_tops (id) VALUES (?)",
                       [(i,) for i in folder_ids])
        db.execute("INSERT INTO chosen (kind, id) WITH RECURSIVE sub(id) AS (SELECT id FROM "
                   "chosen_tops UNION SELECT f.id FROM folders f JOIN sub ON f.parent_key = "
                   "sub.id) SELECT 'folder', id FROM sub")
        db.execute("INSERT OR IGNORE INTO chosen (kind, id) SELECT 'document', d.id FROM "
                   "documents d JOIN chosen c ON c.kind = 'folder' AND c.id = d.folder_key")
        db.executemany("INSERT OR IGNORE INTO chosen (kind, id) VALUES ('document', ?)",
                       [(i,) for i in document_ids])

    def chosen_rows(self, kind: str) -> Iterator[list[tuple]]:
        """Chosen folders (id, name, parent key, created_time), parents first, or documents
        (id, title, folder key, created_time), in archive order; in batches."""
        chosen = "" if self.everything_chosen else (
            f"JOIN chosen c ON c.kind = '{kind}' AND c.id = {kind[0]}.id ")
        if kind == "folder":
            sql = (f"SELECT f.id, f.name, f.parent_key, f.created_time FROM folders f {chosen}"
                   "JOIN folder_depth d ON d.id = f.id ORDER BY d.depth, f.seq")
        else:
            sql = (f"SELECT d.id, d.title, d.folder_key, d.created_time FROM documents d "
                   f"{chosen}ORDER BY d.seq")
        cursor = self.db.execute(sql)
        while batch := cursor.fetchmany(READ_BATCH_ROWS):
            yield batch

    def created_time(self, kind: str, object_id: str) -> float:
        table = "folders" if kind == "folder" else "documents"
        return self.db.execute(f"SELECT created_time FROM {table} WHERE id = ?",
                               (object_id,)).fetchone()[0]

    def is_chosen(self, kind: str, object_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM chosen WHERE kind = ? AND id = ?",
                               (kind, object_id)).fetchone() is not None

    def unreferenced_files(self) -> Iterator[list[str]]:
        """Ids of listed files no revision refers to, in batches."""
        cursor = self.db.execute("SELECT f.id FROM files f WHERE NOT EXISTS (SELECT 1 FROM "
                                 "revisions r WHERE r.file_id = f.id) ORDER BY f.seq")
        while batch := cursor.fetchmany(READ_BATCH_ROWS):
            yield [row[0] for row in batch]

    def revision_files(self, document_id: str) -> list[tuple]:
        """(file id, size) of a document's revisions, oldest first (`backup inspect`)."""
        return self.db.execute("SELECT r.file_id, f.size FROM revisions r JOIN files f ON "
                               "f.id = r.file_id WHERE r.document_id = ? ORDER BY r.position",
                               (document_id,)).fetchall()

    def memberships_of(self, usernames: list[str]) -> list[tuple]:
        """(username, group) of the given users (at most a lookup batch of them)."""
        if not usernames:
            return []
        marks = ", ".join("?" * len(usernames))
        return self.db.execute(f"SELECT username, group_name FROM memberships WHERE username "
                               f"IN ({marks}) ORDER BY username, group_name",
                               usernames).fetchall()

    def children(self, parent_id: str | None) -> tuple[list[tuple], list[tuple]]:
        """(folders, documents) directly in `parent_id` (None: the root), by name; documents
        with their revision count and their last revision's file size (`backup inspect`)."""
        key = parent_id or ROOT_KEY
        folders = self.db.execute("SELECT id, name FROM folders WHERE parent_key = ? "
                                  "ORDER BY name", (key,)).fetchall()
        documents = self.db.execute(
            "SELECT d.id, d.title, (SELECT COUNT(*) FROM revisions r WHERE r.document_id = d.id),"
            " (SELECT f.size FROM revisions r JOIN files f ON f.id = r.file_id WHERE "
            "r.document_id = d.id ORDER BY r.position DESC LIMIT 1) FROM documents d "
            "WHERE d.folder_key = ? ORDER BY d.title", (key,)).fetchall()
        return folders, documents


class _GroupedRows:
    """Rows (owner, *values) ordered so each owner's rows are contiguous and owners come in
    their own order: `take(owner)` returns that owner's values, reading ahead by one row."""

    def __init__(self, rows):
        self.rows = iter(rows)
        self.ahead = next(self.rows, None)

    def take(self, owner: str) -> list[tuple]:
        taken = []
        while self.ahead is not None and self.ahead[0] == owner:
            taken.append(tuple(self.ahead[1:]))
            self.ahead = next(self.rows, None)
        return taken
