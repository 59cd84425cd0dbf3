"""Payload 3.0 (docs/BACKUP_FORMAT.md §1.6): the members after ``metadata.json``.

``PayloadV3`` takes them one at a time from the ``Extractor``: listing pieces of each kind in
``LISTING_KINDS`` order (only the kinds of the parts the metadata names), numbered from 0 without
gaps, and after each ``files`` piece exactly the content members of its entries, in its order.
Records go to the sink as they are validated; one piece's file entries are all it holds.
"""

from __future__ import annotations

import collections
import tarfile

from cfms_trio.config import ArchiveLimits
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

from .listings import FILES_PREFIX, METADATA_MEMBER, RECORD_PARSERS, parts_of, show_name
from .records import (
    COUNT_FIELD_OF_KIND,
    LISTING_KINDS,
    PART_OF_KIND,
    RecordSink,
    parse_piece_name,
    piece_name,
    piece_records,
)
from .staged import STAGE_BRIEFLY, check_listed_size, write_staging_file


class PayloadV3:
    def __init__(self, metadata: dict, sink: RecordSink, staging_fd: int,
                 limits: ArchiveLimits, *, staging: str = STAGE_BRIEFLY):
        self.metadata = metadata
        self.sink = sink
        self.staging_fd = staging_fd
        self.staging = staging  # see write_staging_file
        self.limits = limits
        parts = parts_of(metadata)
        self.kinds = [kind for kind in LISTING_KINDS if PART_OF_KIND[kind] in parts]
        for kind in LISTING_KINDS:
            if kind not in self.kinds and metadata[COUNT_FIELD_OF_KIND[kind]]:
                raise ArchiveError(f"{METADATA_MEMBER} counts {kind} records, but the archive "
                                   f"does not hold the part {PART_OF_KIND[kind]!r}")
        if metadata["total_file_bytes"] > limits.extracted_bytes:
            raise ArchiveLimitExceeded(
                f"archive lists {metadata['total_file_bytes']} bytes of files; the limit is "
                f"{limits.extracted_bytes} bytes")
        if metadata["files_count"] >= limits.member_count:
            raise ArchiveLimitExceeded(f"archive lists {metadata['files_count']} files; the "
                                       f"limit is {limits.member_count} members")
        self.counts = dict.fromkeys(LISTING_KINDS, 0)
        self.total_file_bytes = 0
        self.kind_index = -1  # index in self.kinds of the listing being read
        self.next_piece = 0
        self.pending: collections.deque[dict] = collections.deque()  # file entries of the last files piece, yet to arrive

    def expected(self) -> str:
        if self.pending:
            return FILES_PREFIX + self.pending[0]["id"]
        if self.kind_index < 0:
            return piece_name(self.kinds[0], 0) if self.kinds else "the end of the archive"
        return piece_name(self.kinds[self.kind_index], self.next_piece)

    def _out_of_order(self, name: str) -> ArchiveError:
        return ArchiveError(f"archive member {show_name(name)} is out of order; expected "
                            f"{self.expected()!r}")

    def handle(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        if self.pending:
            if name != FILES_PREFIX + self.pending[0]["id"]:
                raise self._out_of_order(name)
            self._extract(tar, member, self.pending.popleft())
            return
        piece = parse_piece_name(name)
        if piece is None:
            raise self._out_of_order(name)
        kind, number = piece
        current = self.kinds[self.kind_index] if self.kind_index >= 0 else None
        if kind == current and number == self.next_piece:
            self.next_piece += 1
        elif (number == 0 and kind in self.kinds
              and self.kinds.index(kind) > self.kind_index):
            self.kind_index, self.next_piece = self.kinds.index(kind), 1
        else:
            raise self._out_of_order(name)
        self._read_piece(tar, member, kind, name)

    def _read_piece(self, tar: tarfile.TarFile, member: tarfile.TarInfo, kind: str,
                    name: str) -> None:
        if member.size > self.limits.piece_bytes:
            raise ArchiveLimitExceeded(f"archive member {name} is {member.size} bytes; the "
                                       f"limit is {self.limits.piece_bytes} bytes a piece")
        data = tar.extractfile(member).read(member.size)
        if len(data) != member.size:
            raise ArchiveError(f"archive member {name} is truncated")
        parse = RECORD_PARSERS[kind]
        for value in piece_records(data, name, self.limits.piece_records):
            record = parse(value, self.counts[kind], name)
            self.counts[kind] += 1
            self.sink.add(kind, record)
            if kind == "files":
                self.total_file_bytes += record["size"]
                self.pending.append(record)
        if kind == "files" and self.total_file_bytes > self.metadata["total_file_bytes"]:
            raise ArchiveError(f"the files listed add up to more than the "
                               f"{self.metadata['total_file_bytes']} bytes {METADATA_MEMBER} says")

    def _extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo, entry: dict) -> None:
        file_id = entry["id"]
        check_listed_size(file_id, entry, member.size, "its files piece")
        size, sha256 = write_staging_file(tar, member, file_id, self.staging_fd,
                                          staging=self.staging)
        if sha256 != entry["sha256"]:
            raise ArchiveError(f"file {file_id}: sha256 mismatch")

    def finish(self) -> dict[str, int]:
        """At the end of the tar: every listed file arrived, the counts are the metadata's."""
        if self.pending:
            raise ArchiveError(f"file {self.pending[0]['id']}: listed in a files piece but "
                               "missing from the archive")
        for kind, count in self.counts.items():
            field = COUNT_FIELD_OF_KIND[kind]
            if self.metadata[field] != count:
                raise ArchiveError(f"{METADATA_MEMBER} says {field} is {self.metadata[field]}, "
                                   f"but the archive lists {count}")
        if self.total_file_bytes != self.metadata["total_file_bytes"]:
            raise ArchiveError(f"{METADATA_MEMBER} says total_file_bytes is "
                               f"{self.metadata['total_file_bytes']}, but the files listed add "
                               f"up to {self.total_file_bytes}")
        return self.counts
