"""Blocking disk work for transfers; async code runs these through trio.to_thread."""

from __future__ import annotations

import io
from typing import BinaryIO

from ..backup.format import release_pages
from .crypto import open_chunk, seal_chunk

# A download from a local file releases the pages it has sent every this many chunks.
RELEASE_EVERY_CHUNKS = 8


class PartialUpload:
    """The receiving end of an upload: authenticated, decrypted chunks appended to a partial
    upload of the content storage (`content`: a local `.part` file or an S3 multipart upload).

    Only chunks that passed authentication are ever appended, so after a dropped connection
    the partial upload holds exactly the bytes a resumed upload can keep.
    """

    def __init__(self, content):
        self.content = content

    def open(self, keep_bytes: int, file_size: int) -> int:
        """Keep at most `keep_bytes` of what is there (a chunk boundary); return how many."""
        return self.content.open(keep_bytes, file_size)

    def existing_bytes(self) -> int:
        return self.content.existing_bytes()

    def write_sealed(self, key: bytes, prefix: bytes, index: int, sealed: bytes) -> None:
        """Authenticate and decrypt one chunk, then append it (raises ChunkTagError)."""
        self.content.append(open_chunk(key, prefix, index, sealed))

    def digest(self) -> str | None:
        """The sha256 of what was received, or None when known only once stored."""
        return self.content.digest()

    def close(self) -> None:
        self.content.close()

    def discard(self) -> None:
        self.content.discard()

    def commit(self, final_key: str) -> str:
        """Store the verified content durably at `final_key`; the stored content's sha256."""
        return self.content.commit(final_key)


class SealedReader:
    """Reads stored content (from `content.open_read`) chunk by chunk and seals each chunk for the wire."""

    def __init__(self, source: BinaryIO, chunk_size: int, key: bytes, prefix: bytes):
        self._file = source
        self._fd = _file_descriptor(source)  # None for content not in a local file (S3)
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
        if self._fd is not None and index % RELEASE_EVERY_CHUNKS == RELEASE_EVERY_CHUNKS - 1:
            end = index * self.chunk_size
            release_pages(self._fd, self._released, end - self._released)
            self._released = end
        return seal_chunk(self.key, self.prefix, index, plaintext)

    def close(self) -> None:
        self._file.close()


def _file_descriptor(source: BinaryIO) -> int | None:
    try:
        return source.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
