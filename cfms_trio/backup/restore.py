"""The blocking stages of a restore; `importer` runs them in worker threads.

Stage 1, `unpack`: check the key file, decrypt and extract the archive into a private staging
folder, verifying every file's size and sha256 and every reference between the listings.
Stage 2, `commit_restore`: inside one write transaction, check ids against the store, insert
every row, and move the staged files into the restore folder. Nothing outside the staging folder
is touched before stage 2, and stage 2 records every file it moved so a failure can take them
back. (Content storage without a rename, S3, uploads the staged files just before stage 2 to
the keys the rows name; `content.s3.S3RestoredFiles`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from ..config import ArchiveLimits
from ..conventions import ACCOUNTS_DEFAULT_POLICY, SYSOP_GROUP
from ..errors import ArchiveError, ArchiveLimitExceeded, Conflict, ImportAborted
from ..storage import backup_tasks, restore_accounts, restore_rows
from .durability import sync_filesystem
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
from .staging_index import StagingIndex

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
           allow_missing_content: bool = False) -> tuple[BackupContents, StagingIndex]:
    """Stage 1: decrypt, verify and extract into `staging_dir` (which must not exist yet),
    every record into the staging index there, then check the whole set. The caller closes
    the index (and removes the staging folder). `allow_missing_content`: see
    `read_backup_archive`."""
    report("Decrypting archive", 0.0)
    key_info = key_material(key_path, passphrase, limits)
    archive_size = archive_path.stat().st_size

    def on_bytes(consumed: int, total: int) -> None:
        _check_abort(abort)
        if consumed:
            report("Extracting archive", consumed / total if total else 0.0)

    index = StagingIndex.create(staging_dir)
    try:
        with open(archive_path, "rb") as archive:
            contents = read_backup_archive(archive, key_info, staging_dir, limits, index,
                                           progress=on_bytes, archive_size=archive_size,
                                           allow_missing_content=allow_missing_content,
                                           durable=True)
        # Every staged file on disk before anything is committed (see durability.py).
        sync_filesystem(staging_dir)
        report("Loading metadata", 0.0)
        check_contents(contents, index)
        _check_abort(abort)
    except BaseException:
        index.close()
        raise
    return contents, index


@contextlib.contextmanager
def checked_archive(source: BinaryIO, key_info: KeyInfo | Unlock, staging_dir: Path,
                    limits: ArchiveLimits, *, archive_size: int
                    ) -> Iterator[tuple[BackupContents, StagingIndex]]:
    """Read `source` into `staging_dir` and a new staging index with every check an import
    makes before touching a store (`read_backup_archive`, then `check_contents`); yields
    (contents, index) and closes the index afterwards. For the export's self-check,
    `verify_backup` and `cfms-trio backup verify/inspect`."""
    index = StagingIndex.create(staging_dir)
    try:
        contents = read_backup_archive(source, key_info, staging_dir, limits, index,
                                       archive_size=archive_size)
        check_contents(contents, index)
        yield contents, index
    finally:
        index.close()


def check_contents(contents: BackupContents, index: StagingIndex) -> None:
    """The checks of the whole set that need no store (staging index): references, cycles,
    tree depth, names. Shared by the import and `cfms-trio backup verify`. Sibling names an
    upstream 1.0 archive repeats are made unique (reported in its warnings)."""
    contents.warnings += index.check(rename_twins=contents.format_version == VERSION_LEGACY)


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """How `start_backup_import` asked to apply an archive: the accounts policy and who is
    importing (their own account and sysop membership are never touched)."""

    accounts: str = ACCOUNTS_DEFAULT_POLICY
    importer: str = ""


def _check_collisions(m, index: StagingIndex) -> None:
    for kind, model, field, root_parent, message in restore_rows.collision_checks(m):
        for keys in index.keys(kind, restore_rows.LOOKUP_BATCH_IDS):
            found = restore_rows.existing_keys(model, field, keys, root_only=root_parent)
            if found:
                raise Conflict(message.format(sorted(found)[0]))


def _apply_accounts(m, contents: BackupContents, index: StagingIndex,
                    options: RestoreOptions) -> list[str]:
    """Groups, users and memberships by the accounts policy; what it did, as warnings."""
    users, groups = index.count("users"), index.count("groups")
    if options.accounts == "none":
        return [f"accounts not imported (accounts=none): the archive's {users} users and "
                f"{groups} groups were left out"]

    def groups_of(usernames: list[str]) -> list[tuple]:
        return index.memberships_of(usernames)

    group_outcome = restore_accounts.apply_groups(m, index.rows("groups"), options.accounts)
    user_outcome = restore_accounts.apply_users(m, index.rows("users"), groups_of,
                                                options.accounts, options.importer)
    warnings = []
    if options.importer in user_outcome["kept"] and options.accounts == "replace":
        warnings.append(f"user {options.importer!r}: your own account was kept as it is on "
                        "this server (accounts=replace never replaces the importing "
                        "administrator)")
    if SYSOP_GROUP in group_outcome["kept"] and options.accounts == "replace":
        warnings.append(f"group {SYSOP_GROUP!r}: kept its permissions on this server "
                        "(accounts=replace never changes them)")
    return warnings


def commit_restore(m, contents: BackupContents, index: StagingIndex, mover,
                   report: StepReporter, abort: threading.Event, task_id: str, outcome: dict,
                   options: RestoreOptions = RestoreOptions()) -> None:
    """Stage 2, run inside one write transaction: rows in (from the staging index, in
    batches), files into place, accounts by `options`, the audit log appended, and the task's
    final `outcome` (its completed status, counts and warnings) recorded with them.

    `mover` (from the content storage's `restored_files`) names each restored file's key
    and puts the staged files in place. The task says `completed` exactly when the restored rows exist: a crash after the commit
    leaves only clean-up to do, a crash before it leaves nothing. Raises Conflict naming an id
    that already exists. The transaction commits when this returns; if anything here or in the
    commit fails, the caller calls `mover.take_back()`.
    """
    _check_collisions(m, index)
    warnings = list(outcome.get("warnings", ()))
    if "accounts" in contents.parts:
        warnings += _apply_accounts(m, contents, index, options)
    report("Importing files", 0.0)
    restore_rows.insert_rows(m.File, restore_rows.FILE_FIELDS, restore_rows.file_rows(
        index.rows("files"), mover.key_of, contents.inactive_file_ids))
    mover.move_all(index, contents.absent_file_ids, report, abort)
    for step, model, fields, kinds in (
            ("Importing folders", m.Folder, restore_rows.FOLDER_FIELDS, ("folders",)),
            ("Importing documents", m.Document, restore_rows.DOCUMENT_FIELDS,
             ("documents", "revisions"))):
        report(step, 0.0)
        total = max(1, sum(index.count(kind) for kind in kinds[:1]))
        done = [0]

        def progress(rows: int, step=step, total=total, done=done) -> None:
            done[0] += rows
            _check_abort(abort)
            report(step, done[0] / total)

        restore_rows.insert_rows(model, fields, index.rows(kinds[0]), progress)
        if len(kinds) > 1:
            restore_rows.insert_rows(m.Revision, restore_rows.REVISION_FIELDS,
                                     index.rows("revisions"))
    restore_rows.insert_rows(m.AccessRule, restore_rows.RULE_FIELDS, index.rows("rules"))
    if "audit" in contents.parts:
        restore_accounts.append_audit(m, index.rows("audit"))
    warnings += itemised(
        [f"access rules name the group {name!r}, which does not exist on this server"
         for name in restore_accounts.absent_groups(m, index.rows("rule_groups"))],
        "... and {count} more groups named by access rules do not exist on this server")
    _check_abort(abort)
    report("Finalizing import", 0.0)
    backup_tasks.update_backup_task(m, task_id, completed_time=time.time(),
                                    **{**outcome, "warnings": warnings})


def _check_abort(abort: threading.Event) -> None:
    if abort.is_set():
        raise ImportAborted("the server shut down during the import")

