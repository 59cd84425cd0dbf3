"""Writing a backup archive, format 2 (SPEC §7) with payload 3.0: ``write_backup_archive``.

The records are validated exactly as a reader would validate them, then written as a tar of
metadata.json and newline-delimited listing pieces, each files piece followed by the contents
of its files, optionally zstd-compressed, through a ``SegmentWriter``. The listings are
consumed as streams: the writer holds one piece at a time. Blocking; the server runs it in a
worker thread.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import zstandard

from cfms_trio.errors import ArchiveError

from .listings import (
    FILES_PREFIX,
    METADATA_MEMBER,
    RECORD_PARSERS,
    VERSION_V3,
    parse_metadata,
    parts_of,
)
from .records import (
    COUNT_FIELD_OF_KIND,
    LISTING_KINDS,
    PART_OF_KIND,
    PIECE_RECORDS,
    encode_record,
    piece_name,
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


def _json_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    tar.addfile(member_info(name, len(data), mtime), io.BytesIO(data))


class _ListingWriter:
    """Validates records as a reader would, counts them and writes them in pieces."""

    def __init__(self, tar: tarfile.TarFile, mtime: int):
        self.tar = tar
        self.mtime = mtime
        self.counts = dict.fromkeys(LISTING_KINDS, 0)
        self.file_bytes = 0

    def piece(self, kind: str, number: int, records: list) -> list[dict]:
        """Write one piece of ``kind``; return its records as validated."""
        parse = RECORD_PARSERS[kind]
        name = piece_name(kind, number)
        parsed = []
        for record in records:
            try:
                parsed.append(parse(record, self.counts[kind], name))
            except ArchiveError as exc:
                raise ValueError(f"backup data is invalid: {exc.message}") from None
            self.counts[kind] += 1
        _json_member(self.tar, name, b"".join(map(encode_record, parsed)), self.mtime)
        return parsed


def _pieces(records: Iterable[dict]) -> Iterator[list[dict]]:
    iterator = iter(records)
    while batch := list(itertools.islice(iterator, PIECE_RECORDS)):
        yield batch


def _write_payload(tar: tarfile.TarFile, metadata: dict, listings: dict,
                   open_file: Callable[[str], BinaryIO], mtime: int) -> None:
    _json_member(tar, METADATA_MEMBER, _json_bytes(metadata), mtime)
    writer = _ListingWriter(tar, mtime)
    parts = parts_of(metadata)
    for kind in LISTING_KINDS:
        if PART_OF_KIND[kind] not in parts:
            continue
        for number, batch in enumerate(_pieces(listings.get(kind, ()))):
            entries = writer.piece(kind, number, batch)
            if kind != "files":
                continue
            for entry in entries:
                with open_file(entry["id"]) as raw:
                    source = VerifyingSource(raw, entry)
                    info = member_info(FILES_PREFIX + entry["id"], entry["size"], mtime)
                    tar.addfile(info, source)
                    source.finish()
                writer.file_bytes += entry["size"]
            tar.members.clear()  # the writer never looks back; 100,000 TarInfos add up
    for kind, count in writer.counts.items():
        if metadata[COUNT_FIELD_OF_KIND[kind]] != count:
            raise ValueError(f"backup data is invalid: metadata counts "
                             f"{metadata[COUNT_FIELD_OF_KIND[kind]]} {kind}, the listing "
                             f"held {count}")
    if metadata["total_file_bytes"] != writer.file_bytes:
        raise ValueError("backup data is invalid: total_file_bytes is not the sum of the "
                         "files' sizes")


def write_backup_archive(
    out: BinaryIO,
    key: bytes,
    *,
    compression: str,
    metadata: dict,
    listings: dict[str, Iterable[dict]],
    open_file: Callable[[str], BinaryIO],
    chunk_log2: int = DEFAULT_CHUNK_LOG2,
    wrap_for: Sequence[Recipient | Passphrase] = (),
) -> None:
    """Write a complete format 2 archive of payload 3.0 to ``out``, or, when ``wrap_for``
    names recipients or passphrases, a format 3 archive whose file key ``key`` is wrapped for
    each of them (and not stored anywhere else).

    ``metadata`` is the payload's metadata.json (version 3.0, its parts and counts);
    ``listings`` maps each listing kind of those parts to its records, consumed as a stream in
    pieces of ``PIECE_RECORDS``: every record is validated as a reader would validate it, and
    the counts must be the metadata's. ``open_file(file_id)`` must return a readable binary
    file with exactly the size and sha256 of its ``files`` record; any difference raises
    ``ValueError``, as does invalid data. References between records are not checked here:
    they come from one consistent snapshot of a store that enforces them, and every reader
    checks them. On error no final segment is written, so a partial archive can never be
    read as a complete one. The caller owns ``out`` (wrap it in ``HashingWriter`` to learn
    its size and sha256, and in ``WriteBehind`` to write it from a second thread).
    """
    if compression not in COMPRESSION_NAMES:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSION_NAMES)}")
    try:
        metadata = parse_metadata(metadata, None)
    except ArchiveError as exc:
        raise ValueError(f"backup metadata is invalid: {exc.message}") from None
    if metadata["version"] != VERSION_V3:
        raise ValueError(f"this writer makes payload version {VERSION_V3} only")
    mtime = int(metadata["created_at"])
    header = build_header(key, compression=COMPRESSION_NAMES[compression], chunk_log2=chunk_log2)
    if wrap_for:
        out.write(envelope_bytes(key, wrap_for, header))
    sealer = SegmentWriter(out, key, header=header, seal_behind=True)
    try:
        sink: Any = sealer
        if compression == "zstd":
            sink = zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(sealer, closefd=False)
        with tarfile.open(
            fileobj=_TarSink(sink), mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
            copybufsize=COPY_BYTES,
        ) as tar:
            _write_payload(tar, metadata, listings, open_file, mtime)
        if sink is not sealer:
            sink.close()  # ends the zstd frame; closefd=False leaves the sealer open
        sealer.close()
    except BaseException:
        sealer.abort()
        raise
