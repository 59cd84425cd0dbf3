"""Blocking disk work for transfers; async code runs these through trio.to_thread."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..backup.format import DropBehindWriter, release_pages
from .crypto import open_chunk, seal_chunk

HASH_READ_BYTES = 1024 * 1024
# A download releases the pages it has sent every this many chunks.
RELEASE_EVERY_CHUNKS = 8


class PartialUpload:
    """The verified prefix of an upload, kept in `<uploads>/<task_id>.part`.

    Only chunks that passed authentication are ever written, so after a dropped connection the
    file holds exactly the bytes a resumed upload can keep.
    """

    def __init__(self, path: Path, *, keep_cached: bool = False):
        self.path = path
        self.keep_cached = keep_cached  # see DropBehindWriter
        self.hasher = hashlib.sha256()
        self._file = None
        self._writer = None
        self.size = 0

    def open(self, keep_bytes: int) -> int:
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

    def write_sealed(self, key: bytes, prefix: bytes, index: int, sealed: bytes) -> None:
        """Authenticate and decrypt one chunk, then append it (raises ChunkTagError)."""
        plaintext = open_chunk(key, prefix, index, sealed)
        self._writer.write(plaintext)
        self.hasher.update(plaintext)
        self.size += len(plaintext)

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

    def commit(self, final: Path) -> None:
        """Make the verified file durable and move it into place in one rename."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self.close()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, final)


class SealedReader:
    """Reads a stored file chunk by chunk and seals each chunk for the wire."""

    def __init__(self, path: Path, chunk_size: int, key: bytes, prefix: bytes):
        self._file = open(path, "rb")
        self._released = 0  # pages before this offset were released
        self.chunk_size = chunk_size
        self.key = key
        self.prefix = prefix

    def seek_chunk(self, index: int) -> None:
        self._file.seek(index * self.chunk_size)
        self._released = index * self.chunk_size

    def read_sealed(self, index: int) -> bytes:
        plaintext = self._file.read(self.chunk_size)
        # What was sent leaves the page cache, as an upload's writes do: refilling fresh pages
        # costs more than reading again from disk (docs/PERFORMANCE.md).
        if index % RELEASE_EVERY_CHUNKS == RELEASE_EVERY_CHUNKS - 1:
            end = index * self.chunk_size
            release_pages(self._file.fileno(), self._released, end - self._released)
            self._released = end
        return seal_chunk(self.key, self.prefix, index, plaintext)

    def close(self) -> None:
        self._file.close()
