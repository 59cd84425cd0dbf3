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
from ..conventions import ACCOUNTS_DEFAULT_POLICY, CONFLICT_DEFAULT_POLICY, SYSOP_GROUP
from ..errors import ArchiveError, ArchiveLimitExceeded, Conflict, ImportAborted
from ..storage import backup_tasks, restore_accounts, restore_rows
from .durability import sync_filesystem
from .format import (
    STAGE_DURABLE,
    STAGE_HASH_ONLY,
    VERSION_LEGACY,
    BackupContents,
    DropBehindReader,
    KeyInfo,
    Passphrase,
    Unlock,
    itemised,
    parse_key_upload,
    read_backup_archive,
)
from .plan_index import NEW_ACTIONS
from .planner import RestorePlan, build_plan
from .staging_index import StagingIndex

# (step name, fraction of the step done, and optionally bytes_done= / objects_done=)
StepReporter = Callable[..., None]


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
            report("Extracting archive", consumed / total if total else 0.0,
                   bytes_done=consumed, bytes_total=total)

    index = StagingIndex.create(staging_dir)
    try:
        with open(archive_path, "rb", buffering=0) as archive:
            contents = read_backup_archive(DropBehindReader(archive), key_info, staging_dir,
                                           limits, index, progress=on_bytes,
                                           archive_size=archive_size,
                                           allow_missing_content=allow_missing_content,
                                           staging=STAGE_DURABLE)
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
    """Read `source` with every check an import makes before touching a store
    (`read_backup_archive`, then `check_contents`), its records into a new staging index in
    `staging_dir`; yields (contents, index) and closes the index afterwards. For the export's
    self-check, `verify_backup` and `cfms-trio backup verify/inspect`: none of them needs the
    files' content, so each file is hashed and checked but not written (a deep verify's
    throw-away restore moves none)."""
    index = StagingIndex.create(staging_dir)
    try:
        contents = read_backup_archive(source, key_info, staging_dir, limits, index,
                                       archive_size=archive_size, staging=STAGE_HASH_ONLY)
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
    """How `start_backup_import` asked to apply an archive: the accounts policy, who is
    importing (their own account and sysop membership are never touched, and a non-sysop
    writes only where they may), the conflict policy, the chosen part (`include`) and where
    it goes (`target_folder_id`); see `planner`."""

    accounts: str = ACCOUNTS_DEFAULT_POLICY
    importer: str = ""
    conflict_policy: str = CONFLICT_DEFAULT_POLICY
    include: tuple = ()
    target_folder_id: str | None = None


def plan_restore(m, contents: BackupContents, index: StagingIndex, options: RestoreOptions,
                 abort: threading.Event) -> RestorePlan:
    """The plan of applying `index` to the store `m` with `options` (a read or the commit's
    transaction)."""
    return build_plan(m, index, contents.absent_file_ids, policy=options.conflict_policy,
                      include=list(options.include), target_folder_id=options.target_folder_id,
                      importer=options.importer, check_abort=lambda: _check_abort(abort))


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
                   options: RestoreOptions = RestoreOptions(),
                   forget_uploads: Callable[[object], None] | None = None) -> None:
    """Stage 2, run inside one write transaction: the plan made against the store as it is
    now (`planner`), then its rows in, files into place, accounts by `options`, the audit log
    appended (whole-archive imports under policy fail only), and the task's final `outcome`
    (its completed status, counts, plan and warnings) recorded with them.
    `forget_uploads(m)` is called in the transaction once the plan is accepted (the import's
    uploads go then: from here on, any failure is not the options' fault).

    The task says `completed` exactly when the restored rows exist: a crash after the commit
    leaves only clean-up to do, a crash before it leaves nothing. Raises Conflict naming the
    first conflict under policy fail. `mover` (from the content storage's `restored_files`)
    names each restored file's key and puts the staged files in place. The transaction commits
    when this returns; if anything here or in the commit fails, the caller calls
    `mover.take_back()`.
    """
    report("Loading metadata", 0.5)  # planning
    plan = plan_restore(m, contents, index, options, abort)
    if plan.refusal is not None:
        raise Conflict(plan.refusal)
    if forget_uploads is not None:
        forget_uploads(m)
    warnings = list(outcome.get("warnings", ()))
    if "accounts" in contents.parts:
        warnings += _apply_accounts(m, contents, index, options)
    apply_plan(m, plan, index, contents, mover, report, abort)
    if "audit" in contents.parts:
        if plan.whole_archive and plan.policy == "fail":
            restore_accounts.append_audit(m, index.rows("audit"))
        else:
            warnings.append("the archive's audit log was not appended (only an import of the "
                            "whole archive with conflict_policy fail appends it)")
    warnings += itemised(
        [f"access rules name the group {name!r}, which does not exist on this server"
         for name in restore_accounts.absent_groups(m, index.rows("rule_groups"))],
        "... and {count} more groups named by access rules do not exist on this server")
    _check_abort(abort)
    report("Finalizing import", 0.0)
    counts = {f"{kind}s_count": plan.imported(kind) for kind in ("document", "folder", "file")}
    fields = {key: value for key, value in outcome.items() if key != "space"}
    backup_tasks.update_backup_task(m, task_id, completed_time=time.time(),
                                    **{**fields, **counts, "warnings": warnings,
                                       "plan": plan.summary(**outcome.get("space", {}))})


def apply_plan(m, plan: RestorePlan, index: StagingIndex, contents: BackupContents,
               mover, report: StepReporter, abort: threading.Event) -> None:
    """Write what `plan` decided, reading its decisions back from the staging index in
    batches: files (rows and content), folders and documents (new ones parents first, then
    the overwritten ones), revisions, access rules."""
    rows = plan.rows
    report("Importing files", 0.0)
    restore_rows.insert_rows(m.File, restore_rows.FILE_FIELDS, restore_rows.file_rows(
        rows.file_rows(), mover.key_of, contents.inactive_file_ids))
    mover.move_all(rows.file_rows(), rows.files_count(), contents.absent_file_ids, report,
                   abort)
    for kind, step, model, fields in (
            ("folder", "Importing folders", m.Folder, restore_rows.FOLDER_FIELDS),
            ("document", "Importing documents", m.Document, restore_rows.DOCUMENT_FIELDS)):
        report(step, 0.0)
        overwritten = plan.counts["overwrite"][kind]
        total = max(1, plan.imported(kind))
        done = [0]

        def progress(count: int, step=step, total=total, done=done) -> None:
            done[0] += count
            _check_abort(abort)
            report(step, done[0] / total, objects_done=done[0])

        restore_rows.insert_rows(model, fields, rows.objects(kind, NEW_ACTIONS), progress)
        if overwritten:
            restore_rows.update_placements(model, fields, (
                [(local_id, name, parent) for local_id, name, parent, _ in batch]
                for batch in rows.objects(kind, ("overwrite",))), progress)
    restore_rows.insert_rows(m.Revision, restore_rows.REVISION_FIELDS, rows.revisions())
    if plan.counts["overwrite"]["folder"] or plan.counts["overwrite"]["document"]:
        restore_rows.delete_rules_of(m, rows.overwritten())
    restore_rows.insert_rows(m.AccessRule, restore_rows.RULE_FIELDS, rows.rules())


def _check_abort(abort: threading.Event) -> None:
    """Stop between two pieces of work once the import is told to (cancel or shutdown)."""
    if abort.is_set():
        raise ImportAborted("the import was stopped")

