"""Reading a backup archive, format 2 or legacy 1.0 (SPEC §7, §9): ``read_backup_archive``.

Archives come from clients, so every byte is hostile: nothing seeks, nothing is held in memory
beyond a segment and one listing entry (2.0) or piece (3.0), every limit of ``ArchiveLimits`` is enforced, and every
failure surfaces as ``ArchiveError`` (``ArchiveLimitExceeded`` for limits) naming the offending
member or id. Errors from tarfile, zstandard and json are converted at the boundary of
``read_backup_archive``; an ``OSError`` there is the server's own I/O failing (disk full,
unreadable upload) and is passed on unchanged. Blocking; the server runs it in a worker thread.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Callable

import zstandard

from cfms_trio.config import ArchiveLimits
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

from .envelope import MAGIC_V3, open_envelope, read_envelope
from .keyfile import FORMAT_LEGACY, FORMAT_V2, KeyInfo
from .legacy import LegacyCbcReader
from .listings import BackupContents
from .records import RecordSink
from .recipients import Unlock
from .segments import COMPRESSION_ZSTD, SegmentReader
from .staged import STAGE_BRIEFLY
from .streams import CallbackFailed, CountingSource, ReadAhead, TarSource, drain, read_up_to
from .tarmembers import Extractor, GuardedTarInfo

ERROR_DETAIL_CHARS = 200


def _open_staging_dir(staging_dir: Path) -> int:
    """Create (if needed) and open the staging folder, refusing a symlink in its place."""
    Path(staging_dir).mkdir(mode=0o700, exist_ok=True)
    return os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _is_legacy(key_info: KeyInfo | Unlock) -> bool:
    return isinstance(key_info, KeyInfo) and key_info.format == FORMAT_LEGACY


def _open_segments(source: BinaryIO, key_info: KeyInfo | Unlock,
                   limits: ArchiveLimits) -> SegmentReader:
    """The segment reader of a format 2 archive, or of the payload of a format 3 one."""
    magic = read_up_to(source, len(MAGIC_V3))
    if magic == MAGIC_V3:
        envelope = read_envelope(source)
        if not isinstance(key_info, Unlock):
            raise ArchiveError("this is a format 3 archive: it opens with an identity file or "
                               "its passphrase, not a key file (it opens with: "
                               f"{'; '.join(envelope.describe())})")
        file_key = open_envelope(envelope, key_info, limits)
        return SegmentReader(source, file_key, envelope.payload_header)
    if isinstance(key_info, Unlock):
        raise ArchiveError("an identity or a passphrase opens only format 3 archives "
                           "(CFMSBAK3); this one needs its key file")
    if key_info.format != FORMAT_V2:
        raise ArchiveError(f"unsupported key file format {key_info.format}")
    return SegmentReader(source, key_info.key, magic)


def _plaintext_stream(source: BinaryIO, key_info: KeyInfo | Unlock, limits: ArchiveLimits):
    """Return ``(tar_stream, segment_reader_or_None)`` for the archive's format."""
    if _is_legacy(key_info):
        return LegacyCbcReader(source, key_info.key), None
    segments = _open_segments(source, key_info, limits)
    if segments.header.compression == COMPRESSION_ZSTD:
        decompressor = zstandard.ZstdDecompressor(max_window_size=limits.zstd_window_bytes)
        reader = decompressor.stream_reader(segments, read_across_frames=True, closefd=False)
        return reader, segments
    return segments, segments


def _extract_all(
    source: CountingSource, key_info: KeyInfo | Unlock, staging_fd: int,
    limits: ArchiveLimits, allow_missing_content: bool, sink: RecordSink, staging: str,
) -> BackupContents:
    legacy = _is_legacy(key_info)
    plaintext, segments = _plaintext_stream(source, key_info, limits)
    extractor = Extractor(legacy=legacy, staging_fd=staging_fd, limits=limits, sink=sink,
                          allow_missing_content=allow_missing_content,
                          before_listing=source.report, staging=staging)
    with ReadAhead(plaintext) as ahead:
        limited = TarSource(ahead, limits.extracted_bytes)
        # The plain read mode ("r:") on a forward-only source: tarfile then reads headers and
        # listings from it directly, and file contents come out of it without copies
        # (`write_staging_file` reads them from `tar.fileobj`).
        with tarfile.open(
            fileobj=limited, mode="r:", tarinfo=GuardedTarInfo, encoding="utf-8",
            errors="strict",
        ) as tar:
            while (member := tar.next()) is not None:
                extractor.handle(tar, member)
                tar.members.clear()  # stream mode would otherwise keep every TarInfo in memory
        # Reading to the very end verifies the final segment (format 2) or the padding
        # (legacy); whatever follows the tar's end marker still counts against the extracted
        # bytes limit.
        drain(limited)
    if segments is not None:
        drain(segments)  # already at its end, read by the helper; kept as the final check
    return extractor.finish()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:ERROR_DETAIL_CHARS]


def read_backup_archive(
    archive: BinaryIO,
    key_info: KeyInfo | Unlock,
    staging_dir: Path,
    limits: ArchiveLimits,
    sink: RecordSink,
    progress: Callable[[int, int], None] | None = None,
    archive_size: int | None = None,
    allow_missing_content: bool = False,
    staging: str = STAGE_BRIEFLY,
) -> BackupContents:
    """Decrypt, verify and extract a backup archive; every validated listing record goes to
    ``sink`` as it is read (the sink checks what needs the whole set: unique ids, references);
    returns what else was read (metadata, counts, warnings).

    File contents are written to ``staging_dir/<file_id>`` and checked against their size and
    sha256. ``key_info`` is a parsed key file (formats 2 and 1.0) or an ``Unlock`` of
    identities and/or a passphrase (format 3). ``progress(consumed, total)`` is called with
    the encrypted bytes read so far and ``archive_size`` (0 when unknown), at least every MiB
    and before each JSON listing. Any problem with the archive raises ``ArchiveError``; the
    caller removes ``staging_dir`` on failure. A legacy 1.0 archive may list files it does not
    hold: that fails unless ``allow_missing_content``, which restores them as inactive files
    without content (see ``BackupContents``; its ``warnings`` say what was changed).
    ``staging``: what the staged files are for (``STAGE_DURABLE``: an import, which keeps and
    syncs them; ``STAGE_BRIEFLY``: a check that uses and deletes them; ``STAGE_HASH_ONLY``: a
    check that needs only their hashes, so nothing is written; see ``write_staging_file``).
    """
    if archive_size is not None and archive_size > limits.archive_bytes:
        raise ArchiveLimitExceeded(
            f"archive is {archive_size} bytes; the limit is {limits.archive_bytes} bytes"
        )
    source = CountingSource(archive, limits.archive_bytes, progress, archive_size or 0)
    legacy = _is_legacy(key_info)
    staging_fd = _open_staging_dir(staging_dir)
    try:
        return _extract_all(source, key_info, staging_fd, limits, allow_missing_content,
                            sink, staging)
    except (ArchiveError, OSError):
        raise  # archive problems are already precise; OSError is the server's own I/O failing
    except CallbackFailed as exc:
        raise exc.__cause__ from None
    except zstandard.ZstdError as exc:
        if "memory" in str(exc).lower():
            raise ArchiveLimitExceeded(
                "zstd data needs a decoding window larger than the limit of "
                f"{limits.zstd_window_bytes} bytes"
            ) from exc
        raise ArchiveError(f"corrupt archive: invalid zstd data ({_describe(exc)})") from exc
    except Exception as exc:  # tarfile, json, unicode and anything else the parsers raise
        prefix = "wrong key or corrupt archive" if legacy else "corrupt archive"
        raise ArchiveError(f"{prefix}: {_describe(exc)}") from exc
    finally:
        os.close(staging_fd)
