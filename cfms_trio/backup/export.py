"""Exporting the whole store into an encrypted archive and its key file (SPEC §7), or, for
recipients and passphrases, into a format 3 archive with no key file at all.

`export_store` is blocking: the server runs it in a worker thread, the offline
`cfms-trio backup export` command calls it directly. It holds one read transaction for the
whole export and a piece of records at a time (storage/snapshot.py). The archive is written
under a hidden temporary name, read back end to end (`read_back`: every segment, every listing,
every file's size and sha256, with the key it was just written with, which for a format 3
archive lives only in this process's memory until then) and only then linked into place (or
handed to `publish`, e.g. an upload to S3). A failure leaves no archive, and an existing backup
is never replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import BinaryIO, Callable

from .. import __version__
from ..config import ArchiveLimits
from ..conventions import (
    BACKUP_NAME_MAX_CHARS,
    BACKUP_PARTS,
    is_backup_name,
    with_prerequisites,
)
from ..errors import ArchiveError, BadRequest, CfmsError, Conflict
from ..paths import backup_pair, partial_backup_pair, self_check_dir
from ..reaper import remove_tree
from ..storage import Store, snapshot
from .format import (
    FORMAT_NAME,
    KEY_BYTES,
    PART_OF_KIND,
    VERSION_V3,
    DropBehindReader,
    DropBehindWriter,
    HashingWriter,
    Passphrase,
    Recipient,
    Unlock,
    WriteBehind,
    make_key_file,
    parse_key_file,
    write_backup_archive,
)
from .restore import checked_archive


@dataclasses.dataclass
class ExportResult:
    name: str
    archive_path: Path
    key_path: Path | None  # None for a format 3 archive: its key exists only wrapped inside it
    archive_size: int
    archive_sha256: str
    key_size: int | None
    key_sha256: str | None
    metadata: dict
    recipients: list[str] = dataclasses.field(default_factory=list)
    passphrase: bool = False
    verified_time: float = 0.0  # when the read-back of the complete archive succeeded
    format: int = 2  # 3 for an archive made for recipients or a passphrase


class SelfCheckFailed(CfmsError):
    """The archive just written did not read back: it was removed, never published (500: the
    server's own output is wrong, whatever the cause)."""

    code = 500


def read_back(path: Path, key_info, staging_dir: Path, limits: ArchiveLimits) -> None:
    """Read the archive at `path` end to end as an import would (every segment, listing and
    file hash, the recipient block MAC of format 3) into `staging_dir`, then the checks of
    this server's own rules (`check_contents`). Raises ArchiveError on any difference."""
    with open(path, "rb", buffering=0) as archive, checked_archive(
            DropBehindReader(archive), key_info, staging_dir, limits,
            archive_size=os.fstat(archive.fileno()).st_size):
        pass


def _self_check(path: Path, key_info, out_dir: Path, name: str,
                limits: ArchiveLimits) -> float:
    """`read_back` into a private folder that is removed afterwards; returns the time it
    passed. Every file is hashed and checked as an import would, but not written (see
    `checked_archive`): the check needs no disk space beyond the staging index."""
    staging = self_check_dir(out_dir, name)
    staging.mkdir(mode=0o700)
    try:
        read_back(path, key_info, staging / "files", limits)
    except ArchiveError as exc:
        raise SelfCheckFailed(f"the new backup '{name}' failed its self-check and was not "
                              f"published: {exc.message}") from exc
    finally:
        remove_tree(staging)
    return time.time()


def default_backup_name(now: float) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"backup-{stamp}-{secrets.token_hex(3)}"


def check_backup_name(name: str) -> str:
    """A name that stays inside the backups folder: no separators, no leading dot."""
    if not is_backup_name(name):
        raise BadRequest("field 'data.backup_name' may hold only letters, digits, '.', '_' and "
                         "'-', must start with a letter or digit and be at most "
                         f"{BACKUP_NAME_MAX_CHARS} characters")
    return name


def _publish(temp: Path, final: Path) -> None:
    """Link `temp` to `final` without ever replacing an existing file, then drop `temp`."""
    try:
        os.link(temp, final)
    except FileExistsError:
        raise Conflict(f"a backup named '{final.name}' already exists") from None
    finally:
        temp.unlink(missing_ok=True)


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def export_store(store: Store, content_dir: Path, out_dir: Path, name: str, compression: str,
                 *, now: float | None = None, chunk_log2: int = 20,
                 wrap_for: tuple[Recipient | Passphrase, ...] = (),
                 publish: Callable[[Path], None] | None = None,
                 limits: ArchiveLimits = ArchiveLimits(),
                 parts: tuple[str, ...] = BACKUP_PARTS,
                 open_stored: Callable[[str], BinaryIO] | None = None) -> ExportResult:
    """Write `<out_dir>/<name>.cfms.enc` and `<name>.key` from one consistent snapshot of
    `parts` (and the parts they need, `with_prerequisites`; both recorded in the metadata),
    each published only after the archive read back in full (`SelfCheckFailed` otherwise).

    With `wrap_for` (recipients and/or passphrases) the archive is format 3 and no key file is
    written: the random file key exists only wrapped for them, and in this process's memory
    until the self-check has read the archive back with it; then it is forgotten.
    `publish(temporary_archive)`, for a format 3 archive only, replaces the link into `out_dir`
    (an upload elsewhere); the temporary file is removed after it returns or fails.
    `open_stored(path of a File row)` reads stored content from a content storage that is not
    `content_dir` (an S3 bucket); by default files are read under `content_dir`.
    """
    if publish is not None and not wrap_for:
        raise ValueError("only an archive made for recipients is published elsewhere")
    check_backup_name(name)
    requested = tuple(part for part in BACKUP_PARTS if part in parts)
    now = time.time() if now is None else now
    out_dir.mkdir(parents=True, exist_ok=True)
    archive_path, key_path = backup_pair(out_dir, name)
    if archive_path.exists() or key_path.exists():
        raise Conflict(f"a backup named '{name}' already exists")

    parts = with_prerequisites(parts)
    if not parts:
        raise BadRequest(f"a backup holds at least one part of {', '.join(BACKUP_PARTS)}")
    content_root = str(content_dir.resolve())
    resolved_folders: dict[str, str] = {}
    key = secrets.token_bytes(KEY_BYTES)
    temp_archive, temp_key = partial_backup_pair(out_dir, name)

    def write_archive(m, raw, key: bytes) -> dict:
        """The whole archive from one read transaction: one consistent snapshot (WAL), read
        as streams while the archive is written, never whole."""
        with snapshot.consistent_read(m):
            metadata = {"format": FORMAT_NAME, "version": VERSION_V3, "created_at": now,
                        "backup_name": name, "server_version": __version__,
                        "parts": list(parts), "requested_parts": list(requested),
                        **snapshot.counts(m, parts)}

            def open_file(file_id: str):
                if open_stored is not None:
                    return open_stored(snapshot.file_path(m, file_id))
                # Stored files share a few hundred folders: each folder is resolved once, not
                # every component of every path (eight system calls a file), and a file is
                # resolved in full only when it is itself a link.
                folder, _, base = snapshot.file_path(m, file_id).rpartition("/")
                resolved = resolved_folders.get(folder)
                if resolved is None:
                    resolved = resolved_folders[folder] = os.path.realpath(content_dir / folder)
                path = os.path.join(resolved, base)
                if base in ("", ".", "..") or os.path.islink(path):
                    path = os.path.realpath(path)
                if path != content_root and not path.startswith(content_root + os.sep):
                    raise ValueError(f"stored path of file {file_id} escapes the content folder")
                return open(path, "rb")

            listings = {kind: read(m) for kind, read in snapshot.LISTINGS.items()
                        if PART_OF_KIND[kind] in parts}
            write_backup_archive(raw, key, compression=compression, metadata=metadata,
                                 listings=listings, open_file=open_file,
                                 chunk_log2=chunk_log2, wrap_for=wrap_for)
        return metadata

    try:
        fd = os.open(temp_archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as raw_file:
            # Hashed where it is sealed (SegmentWriter's helper thread), written on the
            # write-behind thread: three threads share reading, sealing and writing. The
            # archive stays cached (only its writeback is started): the self-check reads it
            # back at once, and drops it behind it.
            with WriteBehind(DropBehindWriter(raw_file, keep_cached=True)) as behind:
                out = HashingWriter(behind)
                metadata = store.run_read(write_archive, out, key)
            raw_file.flush()
            os.fsync(raw_file.fileno())
        digest = out.hexdigest()
        key_file = None if wrap_for else make_key_file(key, name, now, digest)
        key_info = Unlock(file_key=key) if wrap_for else parse_key_file(key_file, limits)
        del key
        verified_time = _self_check(temp_archive, key_info, out_dir, name, limits)
        del key_info
        if publish is not None:
            publish(temp_archive)
        else:
            if key_file is not None:
                _write_exclusive(temp_key, key_file, 0o600)
                _publish(temp_key, key_path)
            try:
                _publish(temp_archive, archive_path)
            except Conflict:
                if key_file is not None:
                    key_path.unlink(missing_ok=True)
                raise
    finally:
        temp_archive.unlink(missing_ok=True)
        temp_key.unlink(missing_ok=True)
    recipients = [str(r) for r in wrap_for if isinstance(r, Recipient)]
    passphrase = any(isinstance(r, Passphrase) for r in wrap_for)
    if key_file is None:
        return ExportResult(name, archive_path, None, out.size, digest, None, None, metadata,
                            recipients, passphrase, verified_time, 3)
    return ExportResult(name, archive_path, key_path, out.size, digest, len(key_file),
                        hashlib.sha256(key_file).hexdigest(), metadata,
                        verified_time=verified_time)
