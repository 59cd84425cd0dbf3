"""Exporting the whole store into an encrypted archive and its key file (SPEC §7).

`export_store` is blocking: the server runs it in a worker thread, the offline
`cfms-trio backup export` command calls it directly. The archive is written under a hidden
temporary name and linked into place only when complete, and an existing backup is never
replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
import time
from pathlib import Path

from .. import __version__
from ..conventions import BACKUP_NAME_MAX_CHARS, is_backup_name
from ..errors import BadRequest, Conflict
from ..storage import Store
from ..paths import backup_pair, partial_backup_pair
from ..storage.snapshot import snapshot
from .format import (
    FORMAT_NAME,
    KEY_BYTES,
    VERSION_V2,
    HashingWriter,
    WriteBehind,
    make_key_file,
    write_backup_archive,
)
from .gc_pause import cyclic_gc_paused



@dataclasses.dataclass
class ExportResult:
    name: str
    archive_path: Path
    key_path: Path
    archive_size: int
    archive_sha256: str
    key_size: int
    key_sha256: str
    metadata: dict


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
                 *, now: float | None = None, chunk_log2: int = 20) -> ExportResult:
    """Write `<out_dir>/<name>.cfms.enc` and `<name>.key` from one consistent snapshot."""
    check_backup_name(name)
    now = time.time() if now is None else now
    out_dir.mkdir(parents=True, exist_ok=True)
    archive_path, key_path = backup_pair(out_dir, name)
    if archive_path.exists() or key_path.exists():
        raise Conflict(f"a backup named '{name}' already exists")

    # The listings of a large store would make every full collection stall the event loop.
    with cyclic_gc_paused():
        snap = store.run_read(snapshot)
        metadata = {
            "format": FORMAT_NAME, "version": VERSION_V2, "created_at": now, "backup_name": name,
            "server_version": __version__, "documents_count": len(snap["documents"]),
            "folders_count": len(snap["folders"]), "files_count": len(snap["files"]),
            "total_file_bytes": sum(f["size"] for f in snap["files"]),
        }
        file_paths = snap["file_paths"]
        content_root = str(content_dir.resolve())
        resolved_folders: dict[str, str] = {}

        def open_file(file_id: str):
            # Stored files share a few hundred folders: each folder is resolved once, not every
            # component of every path (eight system calls a file), and a file is resolved in
            # full only when it is itself a link.
            folder, _, name = file_paths[file_id].rpartition("/")
            resolved = resolved_folders.get(folder)
            if resolved is None:
                resolved = resolved_folders[folder] = os.path.realpath(content_dir / folder)
            path = os.path.join(resolved, name)
            if name in ("", ".", "..") or os.path.islink(path):
                path = os.path.realpath(path)
            if path != content_root and not path.startswith(content_root + os.sep):
                raise ValueError(f"stored path of file {file_id} escapes the content folder")
            return open(path, "rb")

        key = secrets.token_bytes(KEY_BYTES)
        temp_archive, temp_key = partial_backup_pair(out_dir, name)
        try:
            fd = os.open(temp_archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as raw:
                out = HashingWriter(raw)
                with WriteBehind(out) as behind:
                    write_backup_archive(behind, key, compression=compression, metadata=metadata,
                                         folders=snap["folders"], documents=snap["documents"],
                                         files=snap["files"], open_file=open_file,
                                         chunk_log2=chunk_log2)
                raw.flush()
                os.fsync(raw.fileno())
            digest = out.hexdigest()
            key_file = make_key_file(key, name, now, digest)
            _write_exclusive(temp_key, key_file, 0o600)
            _publish(temp_key, key_path)
            try:
                _publish(temp_archive, archive_path)
            except Conflict:
                key_path.unlink(missing_ok=True)
                raise
        finally:
            temp_archive.unlink(missing_ok=True)
            temp_key.unlink(missing_ok=True)
    return ExportResult(name, archive_path, key_path, out.size, digest, len(key_file),
                        hashlib.sha256(key_file).hexdigest(), metadata)
