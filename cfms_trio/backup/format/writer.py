"""Writing a backup archive, format 2 (SPEC §7): ``write_backup_archive``.

The listings are validated exactly as a reader would validate them, then written as a tar of
the four JSON listings followed by the file contents, optionally zstd-compressed, through a
``SegmentWriter``. Blocking; the server runs it in a worker thread.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, BinaryIO, Callable, Sequence

import zstandard

from cfms_trio.errors import ArchiveError

from .listings import (
    FILES_PREFIX,
    JSON_MEMBERS,
    VERSION_V2,
    BackupContents,
    check_metadata_counts,
    parse_documents,
    parse_files,
    parse_folders,
    parse_metadata,
    validate_references,
)
from .envelope import envelope_bytes
from .recipients import Passphrase, Recipient
from .segments import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    DEFAULT_CHUNK_LOG2,
    SegmentWriter,
    build_header,
)
from .streams import COPY_BYTES, VerifyingSource
from .tarmembers import member_info

COMPRESSION_NAMES = {"none": COMPRESSION_NONE, "zstd": COMPRESSION_ZSTD}
ZSTD_LEVEL = 3


def _json_bytes(value) -> bytes:
    """Compact, key-sorted UTF-8 JSON, so equal listings give byte-identical members."""
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


class _TarSink:
    """The file object tarfile's plain write mode ("w") needs: ``write``, and ``tell`` once at
    the start. Writing through it rather than in stream mode ("w|") gives the same bytes
    without the stream's re-blocking into 10 KiB writes (about a hundred calls per MiB);
    file contents then pass in ``COPY_BYTES`` pieces."""

    def __init__(self, out):
        self._out = out

    def write(self, data) -> int:
        return self._out.write(data)

    def tell(self) -> int:
        return 0


def _normalise_export(
    metadata: dict, folders: list, documents: list, files: list
) -> BackupContents:
    """Validate the exporter's data exactly as a reader would and return the normalised form."""
    try:
        contents = BackupContents(
            format_version=VERSION_V2,
            metadata=parse_metadata(metadata, VERSION_V2),
            folders=parse_folders(folders, legacy=False),
            documents=parse_documents(documents, legacy=False),
            files=parse_files(files, legacy=False),
        )
        check_metadata_counts(contents)
        validate_references(contents)
    except ArchiveError as exc:
        raise ValueError(f"backup data is invalid: {exc.message}") from None
    return contents


def write_backup_archive(
    out: BinaryIO,
    key: bytes,
    *,
    compression: str,
    metadata: dict,
    folders: list,
    documents: list,
    files: list,
    open_file: Callable[[str], BinaryIO],
    chunk_log2: int = DEFAULT_CHUNK_LOG2,
    wrap_for: Sequence[Recipient | Passphrase] = (),
) -> None:
    """Write a complete format 2 archive of the given listings and file contents to ``out``,
    or, when ``wrap_for`` names recipients or passphrases, a format 3 archive whose file key
    ``key`` is wrapped for each of them (and not stored anywhere else).

    ``open_file(file_id)`` must return a readable binary file with exactly the size and sha256
    recorded in ``files``; any difference raises ``ValueError``, as does invalid data. On error
    no final segment is written, so a partial archive can never be read as a complete one. The
    caller owns ``out`` (wrap it in ``HashingWriter`` to learn its size and sha256, and in
    ``WriteBehind`` to write it from a second thread).
    """
    if compression not in COMPRESSION_NAMES:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSION_NAMES)}")
    contents = _normalise_export(metadata, folders, documents, files)
    mtime = int(contents.metadata["created_at"])
    header = build_header(key, compression=COMPRESSION_NAMES[compression], chunk_log2=chunk_log2)
    if wrap_for:
        out.write(envelope_bytes(key, wrap_for, header))
    sealer = SegmentWriter(out, key, header=header)
    try:
        sink: Any = sealer
        if compression == "zstd":
            sink = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(sealer, closefd=False)
        with tarfile.open(
            fileobj=_TarSink(sink), mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
            copybufsize=COPY_BYTES,
        ) as tar:
            listings = (contents.metadata, contents.folders, contents.documents, contents.files)
            for name, listing in zip(JSON_MEMBERS, listings):
                data = _json_bytes(listing)
                tar.addfile(member_info(name, len(data), mtime), io.BytesIO(data))
            for entry in contents.files:
                with open_file(entry["id"]) as raw:
                    source = VerifyingSource(raw, entry)
                    info = member_info(FILES_PREFIX + entry["id"], entry["size"], mtime)
                    tar.addfile(info, source)
                    source.finish()
                tar.members.clear()  # the writer never looks back; 100,000 TarInfos add up
        if sink is not sealer:
            sink.close()  # ends the zstd frame; closefd=False leaves the sealer open
        sealer.close()
    except BaseException:
        sealer.abort()
        raise
