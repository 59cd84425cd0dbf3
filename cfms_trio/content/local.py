"""Content in local files under `<root>/content/` (the default storage; see `content`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from ..backup.durability import sync_directory
from ..backup.format import DropBehindWriter
from ..errors import ImportAborted
from ..paths import PART_SUFFIX, Paths, restore_file_relative

log = logging.getLogger(__name__)

HASH_READ_BYTES = 1024 * 1024


def unlink_quietly(paths: Iterable[str | Path]) -> int:
    """Remove each file; a missing one is fine, any other failure is logged. Returns how many
    were removed."""
    removed = 0
    for path in paths:
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("could not remove %s", path)
    return removed


class LocalContent:
    """Content as files under the content folder; a key is a path relative to it."""

    description = "local files"
    # An import reads its uploaded archive where it is stored (no local copy first).
    reads_uploads_in_place = True

    def __init__(self, paths: Paths):
        self._paths = paths
        # An export reads stored files under the content folder itself (export_store's own
        # fast path), so it needs no reader from here.
        self.export_reader = None

    def check(self) -> None:
        """The folders exist (`prepare_root` made them); nothing more to check."""

    def open_read(self, key: str) -> BinaryIO:
        return open(self._paths.resolve(key), "rb")

    def delete(self, keys: Iterable[str]) -> None:
        unlink_quietly(self._paths.resolve(key) for key in keys)

    def set_aside(self, keys: Iterable[str]) -> Callable[[], None]:
        """Take content out of reach now, by a rename into `tmp/removed` (whatever its size),
        and return what removes it for good: removing a file of hundreds of megabytes takes
        tens of milliseconds on ext4, too long inside a transaction. What a crash leaves set
        aside goes at the next start (`clear_set_aside`)."""
        moved = []
        for key in keys:
            source = self._paths.resolve(key)
            target = self._paths.set_aside / f"{secrets.token_hex(8)}.{source.name}"
            try:
                os.rename(source, target)
                moved.append(target)
            except FileNotFoundError:
                pass
            except OSError:
                unlink_quietly([source])  # as `delete` would
        return functools.partial(unlink_quietly, moved)

    def clear_set_aside(self) -> int:
        """Remove what was set aside and never removed (a crash came first)."""
        try:
            return unlink_quietly([entry.path for entry in os.scandir(self._paths.set_aside)])
        except FileNotFoundError:
            return 0

    def partial_upload(self, task_id: str, final_key: str, chunk_bytes: int) -> LocalPartial:
        # A backup being imported is read whole right after its upload: it keeps its pages.
        for_import = self._paths.resolve(final_key).parent == self._paths.backup_imports
        return LocalPartial(self._paths.partial_upload(task_id), self._paths,
                            keep_cached=for_import)

    def discard_partial_uploads(self, task_ids: Iterable[str]) -> None:
        unlink_quietly(self._paths.partial_upload(task_id) for task_id in task_ids)

    def remove_unclaimed_uploads(self, claimed_task_ids: set[str]) -> int:
        return remove_unclaimed(self._paths.uploads, claimed_task_ids, PART_SUFFIX)

    def restored_files(self, staging_dir: Path, task_id: str) -> LocalRestoredFiles:
        return LocalRestoredFiles(staging_dir, self._paths.restore_files)

    def remove_interrupted_restores(self, task_ids: Iterable[str],
                                    known_restored_ids: set[str], *,
                                    others_running: bool = False) -> int:
        """Restored files with no row are from an import that never committed; while other
        imports run (`others_running`, instances sharing this folder) they may be theirs, so
        none is removed then (a later start with none running removes them)."""
        if others_running:
            return 0
        return remove_unclaimed(self._paths.restore_files, known_restored_ids)

    def adopt(self, paths: Iterable[Path]) -> None:
        """Files written under the content folder are already stored."""

    @contextlib.contextmanager
    def local_copy(self, key: str, spool_dir: Path) -> Iterator[Path]:
        yield self._paths.resolve(key)


def remove_unclaimed(directory: Path, claimed: set[str], suffix: str = "") -> int:
    """Remove the files in `directory` named `<key><suffix>` whose key is not in `claimed`
    (left-overs nothing refers to any more); return how many. A missing folder holds none."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        if entry.name.endswith(suffix) and entry.name.removesuffix(suffix) not in claimed:
            try:
                os.unlink(entry.path)
                removed += 1
            except (FileNotFoundError, IsADirectoryError):
                pass
    return removed


class LocalPartial:
    """The verified prefix of an upload, kept in `<uploads>/<task_id>.part`.

    Only chunks that passed authentication are ever appended, so after a dropped connection
    the file holds exactly the bytes a resumed upload can keep.
    """

    def __init__(self, path: Path, paths: Paths, *, keep_cached: bool = False):
        self.path = path
        self._paths = paths
        self.keep_cached = keep_cached  # see DropBehindWriter
        self.hasher = hashlib.sha256()
        self._file = None
        self._writer = None
        self.size = 0

    def open(self, keep_bytes: int, file_size: int) -> int:
        """Open for appending, keeping at most `keep_bytes` of what is there (rounded by the
        caller to a chunk boundary); return how many bytes were kept and hashed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.path, flags, 0o600)
        self._file = os.fdopen(fd, "r+b")
        existing = os.fstat(fd).st_size
        kept = min(existing, keep_bytes)
        self._file.truncate(kept)
        self._file.seek(0)
        remaining = kept
        while remaining:
            block = self._file.read(min(HASH_READ_BYTES, remaining))
            if not block:
                break
            self.hasher.update(block)
            remaining -= len(block)
        self._file.seek(kept)
        self._writer = DropBehindWriter(self._file, kept, keep_cached=self.keep_cached)
        self.size = kept
        return kept

    def existing_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, plaintext: bytes) -> None:
        self._writer.write(plaintext)
        self.hasher.update(plaintext)
        self.size += len(plaintext)

    def digest(self) -> str:
        return self.hasher.hexdigest()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        try:
            self.close()
        except OSError:
            pass  # flushing the last buffered bytes failed (a full disk): they are unwanted
        finally:
            self._file = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def commit(self, final_key: str) -> str:
        """Make the verified file durable and move it into place in one rename; its sha256."""
        final = self._paths.resolve(final_key)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, final)
        return self.hasher.hexdigest()


class LocalRestoredFiles:
    """Moves an import's staged files into the restore folder inside its commit's transaction,
    remembering each one it placed (so a failed commit can take them back)."""

    def __init__(self, staging_dir: Path, restore_dir: Path):
        self.staging_dir = staging_dir
        self.restore_dir = restore_dir
        self.moved: list[str] = []  # file ids, each now restore_dir/<id>

    @staticmethod
    def key_of(file_id: str) -> str:
        return restore_file_relative(file_id)

    def move_all(self, files: Iterable[list[tuple]], total: int, absent: set[str], report,
                 abort: threading.Event) -> None:
        """Move the staged files of the batches `files` ((archive id, id here, ...) rows, of
        `total` in all; except the `absent` ones, which have no content) into the restore
        folder, each under its id here."""
        self.restore_dir.mkdir(parents=True, exist_ok=True)
        # Plain string paths: a backup may hold 100,000 files, and a Path object per name
        # costs more than the rename's own bookkeeping here.
        source_dir, target_dir = os.fspath(self.staging_dir), os.fspath(self.restore_dir)
        total, done = max(1, total), 0
        for batch in files:
            if abort.is_set():
                raise ImportAborted("the server shut down during the import")
            report("Importing files", done / total, objects_done=done)
            for archive_id, file_id, *_ in batch:
                done += 1
                if archive_id in absent:
                    continue
                os.rename(os.path.join(source_dir, archive_id),
                          os.path.join(target_dir, file_id))
                self.moved.append(file_id)
        report("Importing files", 1.0, objects_done=done)
        sync_directory(self.restore_dir)  # the renames are on disk before the commit

    def take_back(self) -> None:
        """Remove every file this mover placed (after a failed commit)."""
        unlink_quietly(self.restore_dir / file_id for file_id in self.moved)
        self.moved.clear()
