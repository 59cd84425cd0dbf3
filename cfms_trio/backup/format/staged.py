"""Streaming one file member of a backup into the staging folder, hashing it on the way."""

from __future__ import annotations

import hashlib
import os
import tarfile

from cfms_trio.errors import ArchiveError

from .streams import WRITEBACK_START_BYTES, TarSource, release_pages

STAGING_FILE_MODE = 0o600  # of extracted files, and of the members the writer creates

# What a reader does with each file's content (`staging`):
STAGE_DURABLE = "durable"  # an import: written, kept and synced before its commit
STAGE_BRIEFLY = "briefly"  # a check that uses the files and deletes them at once
STAGE_HASH_ONLY = "hash-only"  # a check that needs only sizes and hashes: nothing written
STAGING_USES = (STAGE_DURABLE, STAGE_BRIEFLY, STAGE_HASH_ONLY)


def write_staging_file(tar: tarfile.TarFile, member: tarfile.TarInfo, file_id: str,
                       staging_fd: int, *, staging: str) -> tuple[int, str]:
    """Stream a member into ``staging/<file_id>``, hashing it; return (size, sha256).

    ``staging`` says what the content is for. ``STAGE_DURABLE`` (an import, which syncs
    staging before its commit): the file's writeback is started every
    ``WRITEBACK_START_BYTES`` as it is written, so that sync finds little left.
    ``STAGE_BRIEFLY`` (a check that deletes the files at once): its pages stay in memory
    unwritten. ``STAGE_HASH_ONLY`` (the export's self-check, a plain verify): the content is
    hashed and no file is created. A repeated member or file id never gets this far in any
    reader (member names seen for 2.0 and 1.0, the listed order for 3.0, and unique ids in
    the staging index); creating 2,000 empty files took a mixed-set self-check 1 to 3 s on a
    VM whose file creation is slow.

    The id is validated to be a plain name, the file is created relative to the staging
    folder's descriptor, and O_EXCL|O_NOFOLLOW refuse anything already there, links included.
    """
    # The content comes straight from the tar stream's pieces (no copy, see TarSource):
    # tarfile has just read the member's header, so the stream is at its first byte.
    data: TarSource = tar.fileobj
    if data.tell() != member.offset_data:
        raise ArchiveError(f"file {file_id}: the tar stream is not at the member's data")
    if staging == STAGE_HASH_ONLY:
        return _hash_only(data, member, file_id)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(file_id, flags, STAGING_FILE_MODE, dir_fd=staging_fd)
    except FileExistsError:
        raise ArchiveError(f"file {file_id}: already present in the staging folder") from None
    digest = hashlib.sha256()
    size = 0
    written_back = 0
    durable = staging == STAGE_DURABLE
    with os.fdopen(fd, "wb") as target:
        for piece in data.pieces(member.size):
            digest.update(piece)
            target.write(piece)
            size += len(piece)
            if durable and size - written_back >= WRITEBACK_START_BYTES:
                target.flush()
                release_pages(fd, written_back, size - written_back)
                written_back = size
        if written_back:  # smaller files are left to the sync after extraction
            target.flush()
            release_pages(fd, written_back, size - written_back)
    if size != member.size:
        raise ArchiveError(f"file {file_id}: archive member is truncated")
    return size, digest.hexdigest()


def _hash_only(data: TarSource, member: tarfile.TarInfo, file_id: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    for piece in data.pieces(member.size):
        digest.update(piece)
        size += len(piece)
    if size != member.size:
        raise ArchiveError(f"file {file_id}: archive member is truncated")
    return size, digest.hexdigest()


def check_listed_size(file_id: str, entry: dict, size: int, listing: str) -> None:
    """A file's size in the archive must be the one its listing gives (legacy: if it gives one)."""
    if entry["size"] is not None and entry["size"] != size:
        raise ArchiveError(
            f"file {file_id}: size mismatch ({listing} says {entry['size']} bytes, "
            f"the archive holds {size})"
        )
