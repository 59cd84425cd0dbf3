#!/usr/bin/env python3
"""Benchmark datasets for scripts/bench_backup.py, written straight into a server root.

For speed the generator does not go through the WebSocket API: it prepares the root exactly as
`cfms-trio serve` does on first start (`prepare_root`), then inserts folders, documents,
revisions, files and access rules through the storage layer (the peewee models of
`Store`, in a few large write transactions) and writes each file's content where an upload
would have put it (`content/files/<id[:2]>/<id>`). A server started on the root afterwards
sees the same rows and files as if every object had been created and uploaded by a client.

Two shapes:

- ``mixed``: a nested folder tree, documents with one to three revisions, access rules on
  about a quarter of the folders and documents, many small files and a few large ones
  (random bytes, the worst case for compression).
- ``meta``: the metadata-heavy set — many documents in many folders, each with one small file.

    python scripts/bench_dataset.py mixed /tmp/root --large-mib 1024 64 64 --small-files 2000
    python scripts/bench_dataset.py meta /tmp/root --documents 100000 --folders 10000
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import secrets
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cfms_trio.server import prepare_root  # noqa: E402
from cfms_trio.config import Settings  # noqa: E402

MiB = 1024 * 1024
INSERT_BATCH_ROWS = 5000
WRITE_BLOCK_BYTES = 4 * MiB
ACCESS_TYPES = ("read", "write", "move", "manage")


@dataclasses.dataclass
class DatasetSummary:
    """What was generated: counts, bytes, and the content-relative paths of every file."""

    folders: int = 0
    documents: int = 0
    revisions: int = 0
    files: int = 0
    access_rules: int = 0
    file_bytes: int = 0
    file_paths: list[str] = dataclasses.field(default_factory=list)
    largest_file: str | None = None  # content-relative path of the largest file
    largest_bytes: int = -1

    @property
    def rows(self) -> int:
        return self.folders + self.documents + self.revisions + self.files + self.access_rules

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("file_paths")
        out["rows"] = self.rows
        return out


def _new_id() -> str:
    return secrets.token_hex(16)


def _rule(rng: random.Random) -> dict:
    """A well-formed access rule (SPEC §4) of the usual shape: a group and/or a right."""
    group = {"match": "any", "groups": {"match": "any", "require": ["user", "sysop"]}}
    if rng.random() < 0.5:
        group["rights"] = {"match": "all", "require": ["view_access_rules"]}
    return {"match": "all", "match_groups": [group]}


class _Builder:
    """Accumulates rows and file contents, flushing rows in batches inside one transaction."""

    def __init__(self, content: Path, rng: random.Random, now: float):
        self.content = content
        self.rng = rng
        self.now = now
        self.summary = DatasetSummary()
        self.rows: dict[str, list[dict]] = {"Folder": [], "Document": [], "File": [],
                                            "Revision": [], "AccessRule": []}
        self._noise = os.urandom(WRITE_BLOCK_BYTES)

    def _tick(self) -> float:
        self.now += 0.001
        return self.now

    def rules_for(self, object_type: str, object_id: str, share: float) -> None:
        if self.rng.random() >= share:
            return
        access_types = self.rng.sample(ACCESS_TYPES, self.rng.randint(1, 2))
        for access_type in access_types:
            self.rows["AccessRule"].append({
                "id": _new_id(), "object_type": object_type, "object_id": object_id,
                "access_type": access_type, "rule_data": json.dumps(_rule(self.rng)), "seq": 0})
            self.summary.access_rules += 1

    def folder(self, name: str, parent_id: str | None, rule_share: float) -> str:
        folder_id = _new_id()
        self.rows["Folder"].append({"id": folder_id, "name": name, "parent": parent_id,
                                    "created_time": self._tick()})
        self.summary.folders += 1
        self.rules_for("folder", folder_id, rule_share)
        return folder_id

    def document(self, title: str, folder_id: str | None, sizes: list[int],
                 rule_share: float) -> str:
        """A document with one revision per entry of `sizes` (oldest first)."""
        document_id = _new_id()
        self.rows["Document"].append({"id": document_id, "title": title, "folder": folder_id,
                                      "created_time": self._tick()})
        self.summary.documents += 1
        self.rules_for("document", document_id, rule_share)
        for seq, size in enumerate(sizes):
            file_id = self._file(size)
            self.rows["Revision"].append({"id": _new_id(), "document": document_id,
                                          "file": file_id, "created_time": self._tick(),
                                          "seq": seq})
            self.summary.revisions += 1
        return document_id

    def _file(self, size: int) -> str:
        file_id = _new_id()
        rel = f"files/{file_id[:2]}/{file_id}"
        path = self.content / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        # Random bytes (incompressible): whole blocks fresh from os.urandom, shorter pieces cut
        # from a random offset of one noise block, which keeps 100,000 small files cheap.
        with open(path, "wb") as f:
            remaining = size
            while remaining:
                n = min(remaining, WRITE_BLOCK_BYTES)
                if n == WRITE_BLOCK_BYTES:
                    piece = os.urandom(n)
                else:
                    start = self.rng.randrange(0, WRITE_BLOCK_BYTES - n + 1)
                    piece = self._noise[start:start + n]
                f.write(piece)
                digest.update(piece)
                remaining -= n
        self.rows["File"].append({"id": file_id, "sha256": digest.hexdigest(), "size": size,
                                  "path": rel, "created_time": self._tick(), "active": True})
        self.summary.files += 1
        self.summary.file_bytes += size
        self.summary.file_paths.append(rel)
        if size > self.summary.largest_bytes:
            self.summary.largest_file, self.summary.largest_bytes = rel, size
        return file_id

    def flush(self, store) -> None:
        order = ("Folder", "File", "Document", "Revision", "AccessRule")

        def insert(m):
            for name in order:
                model, rows = getattr(m, name), self.rows[name]
                for start in range(0, len(rows), INSERT_BATCH_ROWS):
                    model.insert_many(rows[start:start + INSERT_BATCH_ROWS]).execute()

        store.run_write(insert)
        for rows in self.rows.values():
            rows.clear()


def _open_root(root: Path, admin_password: str):
    settings = Settings(root=root, initial_admin_password=admin_password)
    store, paths, _ = prepare_root(settings)
    return store, paths


def build_mixed(root: Path, admin_password: str, *, large_mib: list[int], small_files: int,
                small_max_kib: int = 64, depth: int = 4, fanout: int = 4,
                seed: int = 1) -> DatasetSummary:
    """A nested tree (`fanout` folders per level, `depth` levels), `small_files` small files of
    1..`small_max_kib` KiB spread over documents with 1-3 revisions, plus one document per
    entry of `large_mib`."""
    rng = random.Random(seed)
    store, paths = _open_root(root, admin_password)
    try:
        builder = _Builder(paths.content, rng, time.time() - 86400)
        level, all_folders = [None], []
        for d in range(depth):
            next_level = []
            for parent in level:
                for i in range(fanout):
                    next_level.append(builder.folder(f"folder-{d}-{i}", parent, 0.25))
            all_folders += next_level
            level = next_level
        made, n = 0, 0
        while made < small_files:
            revisions = min(rng.choice((1, 1, 2, 3)), small_files - made)
            sizes = [rng.randint(1, small_max_kib) * 1024 - rng.randrange(1024)
                     for _ in range(revisions)]
            builder.document(f"doc-{n}", rng.choice(all_folders + [None]), sizes, 0.25)
            made += revisions
            n += 1
        for i, mib in enumerate(large_mib):
            builder.document(f"large-{i}.bin", rng.choice(all_folders), [mib * MiB], 0.25)
        builder.flush(store)
        return builder.summary
    finally:
        store.close()


def build_meta(root: Path, admin_password: str, *, documents: int, folders: int,
               file_bytes: int = 512, seed: int = 2, file_share: float = 1.0,
               users: int = 0, audit_entries: int = 0) -> DatasetSummary:
    """`folders` folders (a two-level tree) holding `documents` documents, `file_share` of
    them with one small file of about `file_bytes` bytes (the others have no revision yet),
    and access rules on a tenth of the objects; plus `users` accounts in a few groups and
    `audit_entries` audit log entries (the accounts and audit parts of a backup)."""
    rng = random.Random(seed)
    store, paths = _open_root(root, admin_password)
    try:
        builder = _Builder(paths.content, rng, time.time() - 86400)
        tops = max(1, int(folders ** 0.5))
        top_ids = [builder.folder(f"top-{i}", None, 0.1) for i in range(min(tops, folders))]
        folder_ids = list(top_ids)
        for i in range(folders - len(top_ids)):
            folder_ids.append(builder.folder(f"sub-{i}", top_ids[i % len(top_ids)], 0.1))
        with_file = max(1, round(1 / file_share)) if file_share > 0 else 0
        for i in range(documents):
            size = max(1, file_bytes + rng.randint(-file_bytes // 2, file_bytes // 2))
            sizes = [size] if with_file and i % with_file == 0 else []
            builder.document(f"doc-{i}", folder_ids[i % len(folder_ids)], sizes, 0.1)
            if len(builder.rows["Document"]) >= 20_000:
                builder.flush(store)
        builder.flush(store)
        _accounts(store, rng, users, audit_entries, builder.now)
        return builder.summary
    finally:
        store.close()


def _accounts(store, rng: random.Random, users: int, audit_entries: int, now: float) -> None:
    """`users` users (one shared password hash: hashing is not what is measured) in four
    groups, and `audit_entries` audit entries."""
    from cfms_trio.auth import hash_password

    password_hash = hash_password("bench-user-password")
    groups = [f"team-{i}" for i in range(4)]

    def insert(m):
        m.Group.insert_many([{"name": g, "permissions": json.dumps(["create_document"]),
                              "created_time": now} for g in groups]).execute()
        rows = [{"username": f"user-{i}", "password_hash": password_hash,
                 "nickname": f"User {i}", "permissions": "[]", "created_time": now,
                 "passwd_last_modified": now} for i in range(users)]
        for start in range(0, len(rows), INSERT_BATCH_ROWS):
            m.User.insert_many(rows[start:start + INSERT_BATCH_ROWS]).execute()
        members = [{"user": f"user-{i}", "group": groups[i % len(groups)]} for i in range(users)]
        for start in range(0, len(members), INSERT_BATCH_ROWS):
            m.UserGroup.insert_many(members[start:start + INSERT_BATCH_ROWS]).execute()
        for start in range(0, audit_entries, INSERT_BATCH_ROWS):
            m.AuditLog.insert_many([
                {"time": now + i, "username": f"user-{i % max(1, users)}", "action": "login",
                 "target": None, "result": 200, "address": "127.0.0.1"}
                for i in range(start, min(audit_entries, start + INSERT_BATCH_ROWS))]).execute()

    store.run_write(insert)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=("mixed", "meta"))
    parser.add_argument("root", type=Path, help="server root to create (must not hold a store)")
    parser.add_argument("--admin-password", default="bench-admin-password")
    parser.add_argument("--large-mib", type=int, nargs="*", default=[1024, 64, 64],
                        help="mixed: sizes of the large files in MiB")
    parser.add_argument("--small-files", type=int, default=2000, help="mixed: small files")
    parser.add_argument("--documents", type=int, default=100_000, help="meta: documents")
    parser.add_argument("--folders", type=int, default=10_000, help="meta: folders")
    args = parser.parse_args(argv)
    if (args.root / "content" / "cfms.db").exists():
        parser.error(f"{args.root} already holds a store")
    started = time.perf_counter()
    if args.shape == "mixed":
        summary = build_mixed(args.root, args.admin_password, large_mib=args.large_mib,
                              small_files=args.small_files)
    else:
        summary = build_meta(args.root, args.admin_password, documents=args.documents,
                             folders=args.folders)
    print(json.dumps({**summary.as_dict(), "seconds": round(time.perf_counter() - started, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
