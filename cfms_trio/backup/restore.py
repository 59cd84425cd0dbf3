"""The blocking stages of a restore; `importer` runs them in worker threads.

Stage 1, `unpack`: check the key file, decrypt and extract the archive into a private staging
folder, verifying every file's size and sha256 and every reference between the listings.
Stage 2, `commit_restore`: inside one write transaction, check ids against the store, insert
every row, and move the staged files into the restore folder. Nothing outside the staging folder
is touched before stage 2, and stage 2 records every file it moved so a failure can take them
back.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable

from ..config import ArchiveLimits
from ..errors import ArchiveError, ArchiveLimitExceeded, Conflict, ImportAborted
from ..paths import restore_file_relative
from ..storage import backup_tasks, restore_rows
from ..conventions import MAX_TREE_DEPTH, NAME_MAX_CHARS
from .format import (
    VERSION_LEGACY,
    BackupContents,
    KeyInfo,
    Passphrase,
    Unlock,
    itemised,
    parse_key_upload,
    read_backup_archive,
)

StepReporter = Callable[[str, float], None]  # (step name, fraction of the step done)


def read_key_file(path: Path, limits: ArchiveLimits) -> KeyInfo | Unlock:
    """A key file (formats 2 and 1.0) or an identity file (format 3)."""
    size = path.stat().st_size
    if size > limits.key_file_bytes:
        raise ArchiveLimitExceeded(
            f"key file is {size} bytes; the limit is {limits.key_file_bytes} bytes")
    return parse_key_upload(path.read_bytes(), limits)


def key_material(key_path: Path | None, passphrase: str | None,
                 limits: ArchiveLimits) -> KeyInfo | Unlock:
    """What opens the archive: the key upload (key file or identity file), the passphrase, or
    an identity file and a passphrase together."""
    key_info = read_key_file(key_path, limits) if key_path is not None else None
    if passphrase is None:
        if key_info is None:
            raise ArchiveError("no key file, identity file or passphrase was given")
        return key_info
    if isinstance(key_info, KeyInfo):
        raise ArchiveError("a passphrase was given together with a key file; a key file opens "
                           "a format 2 archive by itself, a passphrase only a format 3 one")
    identities = key_info.identities if key_info is not None else ()
    return Unlock(identities=identities, passphrase=Passphrase(passphrase))


def unpack(archive_path: Path, key_path: Path | None, staging_dir: Path, limits: ArchiveLimits,
           report: StepReporter, abort: threading.Event, passphrase: str | None = None, *,
           allow_missing_content: bool = False) -> BackupContents:
    """Stage 1: decrypt, verify and extract into `staging_dir` (which must not exist yet).
    `allow_missing_content`: see `read_backup_archive`."""
    report("Decrypting archive", 0.0)
    key_info = key_material(key_path, passphrase, limits)
    archive_size = archive_path.stat().st_size

    def on_bytes(consumed: int, total: int) -> None:
        _check_abort(abort)
        if consumed:
            report("Extracting archive", consumed / total if total else 0.0)

    with open(archive_path, "rb") as archive:
        contents = read_backup_archive(archive, key_info, staging_dir, limits,
                                       progress=on_bytes, archive_size=archive_size,
                                       allow_missing_content=allow_missing_content)
    report("Loading metadata", 0.0)
    check_contents(contents)
    _check_abort(abort)
    return contents


def check_contents(contents: BackupContents) -> None:
    """The checks of this server's own rules that need no database: tree depth and names.
    Shared by the import and `cfms-trio backup verify`. References and cycles were already
    checked by `read_backup_archive`, which returns only contents that passed them. Sibling
    names an upstream 1.0 archive repeats are made unique first (reported in its warnings)."""
    check_folder_depth(contents.folders)
    if contents.format_version == VERSION_LEGACY:
        contents.warnings += unique_sibling_names(contents)
    check_names(contents)


def check_folder_depth(folders: list[dict]) -> None:
    """Refuse a folder tree deeper than this server serves (MAX_TREE_DEPTH levels): its deepest
    folders would answer "folder tree is corrupt" to everyone. Runs after validate_references,
    so every parent is in the backup and there is no cycle."""
    parent_of = {folder["id"]: folder["parent_id"] for folder in folders}
    depth: dict[str, int] = {}
    for start in parent_of:
        path, node = [], start
        while node is not None and node not in depth:
            path.append(node)
            node = parent_of[node]
        level = 0 if node is None else depth[node]
        for folder_id in reversed(path):
            level += 1
            depth[folder_id] = level
            if level > MAX_TREE_DEPTH:
                raise ArchiveError(f"folder {folder_id!r} is nested {level} levels deep; "
                                   f"this server allows at most {MAX_TREE_DEPTH}")


def unique_sibling_names(contents: BackupContents) -> list[str]:
    """Rename the folders and documents whose name a sibling before them (in archive order)
    already has to `name (2)`, `name (3)`...: the upstream allows repeated names, the API does
    not. A new name is one no sibling has in the archive. Returns a warning per rename."""
    renames: list[str] = []
    for kind, items, name_field, parent_field in (
            ("folder", contents.folders, "name", "parent_id"),
            ("document", contents.documents, "title", "folder_id")):
        taken: set[tuple] = {(item[parent_field], item[name_field]) for item in items}
        kept: set[tuple] = set()
        next_number: dict[tuple, int] = {}  # so 10,000 twins cost 10,000 steps, not 50 million
        for item in items:
            parent, name = item[parent_field], item[name_field]
            if (parent, name) not in kept:
                kept.add((parent, name))
                continue
            number = next_number.get((parent, name), 2)
            while (parent, f"{name} ({number})") in taken:
                number += 1
            next_number[(parent, name)] = number + 1
            new_name = f"{name} ({number})"
            taken.add((parent, new_name))
            kept.add((parent, new_name))
            item[name_field] = new_name
            where = f"folder {parent!r}" if parent else "the root"
            renames.append(f"{kind} {item['id']!r}: another {kind} in {where} is also named "
                           f"{name!r}; imported as {new_name!r}")
    return itemised(renames, "... and {count} more folders and documents renamed the same way")


def check_names(contents: BackupContents) -> None:
    """Hold restored objects to the rules the API keeps: names and titles of 1 to
    NAME_MAX_CHARS characters, unique among siblings. A backup that breaks them (possible only
    from an old or hand-made archive) would leave objects no client can rename or tell apart."""
    seen: set[tuple] = set()
    for kind, items, name_field, parent_field in (
            ("folder", contents.folders, "name", "parent_id"),
            ("document", contents.documents, "title", "folder_id")):
        for item in items:
            name = item[name_field]
            if not 1 <= len(name) <= NAME_MAX_CHARS:
                raise ArchiveError(f"{kind} {item['id']!r}: {name_field} must be 1 to "
                                   f"{NAME_MAX_CHARS} characters long")
            key = (kind, item[parent_field], name)
            if key in seen:
                where = f"folder {item[parent_field]!r}" if item[parent_field] else "the root"
                raise ArchiveError(f"two {kind}s named {name!r} in {where}")
            seen.add(key)


class FileMover:
    """Moves staged files into the restore folder, remembering each one it placed."""

    def __init__(self, staging_dir: Path, restore_dir: Path):
        self.staging_dir = staging_dir
        self.restore_dir = restore_dir
        self.moved: list[str] = []  # file ids, each now restore_dir/<id>

    def move_all(self, file_ids: list[str], report: StepReporter, abort: threading.Event) -> None:
        self.restore_dir.mkdir(parents=True, exist_ok=True)
        # Plain string paths: a backup may hold 100,000 files, and a Path object per name
        # costs more than the rename's own bookkeeping here.
        source_dir, target_dir = os.fspath(self.staging_dir), os.fspath(self.restore_dir)
        for index, file_id in enumerate(file_ids):
            _check_abort(abort)
            os.rename(os.path.join(source_dir, file_id), os.path.join(target_dir, file_id))
            self.moved.append(file_id)
            report("Importing files", (index + 1) / max(1, len(file_ids)))

    def take_back(self) -> None:
        """Remove every file this mover placed (after a failed commit)."""
        for file_id in self.moved:
            try:
                (self.restore_dir / file_id).unlink()
            except FileNotFoundError:
                pass
        self.moved.clear()


def commit_restore(m, contents: BackupContents, mover: FileMover, report: StepReporter,
                   abort: threading.Event, task_id: str, outcome: dict) -> None:
    """Stage 2, run inside one write transaction: rows in, files into place, and the task's
    final `outcome` (its completed status and counts) recorded with them.

    The task says `completed` exactly when the restored rows exist: a crash after the commit
    leaves only clean-up to do, a crash before it leaves nothing. Raises Conflict naming an id
    that already exists. The transaction commits when this returns; if anything here or in the
    commit fails, the caller calls `mover.take_back()`.
    """
    collision = (restore_rows.find_collision(m, contents)
                 or restore_rows.find_root_name_clash(m, contents))
    if collision:
        raise Conflict(collision)
    report("Importing files", 0.0)
    restore_rows.insert_files(m, contents.files, restore_file_relative,
                              contents.inactive_file_ids)
    mover.move_all([f["id"] for f in contents.files if f["id"] not in contents.absent_file_ids],
                   report, abort)
    report("Importing folders", 0.0)
    restore_rows.insert_folders(m, contents.folders,
                                lambda frac: report("Importing folders", frac))
    _check_abort(abort)
    report("Importing documents", 0.0)
    restore_rows.insert_documents(m, contents.documents,
                                  lambda frac: report("Importing documents", frac))
    _check_abort(abort)
    report("Finalizing import", 0.0)
    backup_tasks.update_backup_task(m, task_id, completed_time=time.time(), **outcome)


def _check_abort(abort: threading.Event) -> None:
    if abort.is_set():
        raise ImportAborted("the server shut down during the import")

