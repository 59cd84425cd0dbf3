"""Writing and reading whole backup archives (SPEC §7, §9).

``write_backup_archive`` streams a tar of the JSON listings and file contents, optionally
zstd-compressed, through ``SegmentWriter``. ``read_backup_archive`` reverses that for format 2
archives and also reads legacy 1.0 archives (AES-256-CBC over a plain tar), extracting file
contents into a staging folder and returning the validated listings.

Archives come from clients, so the reader treats every byte as hostile: nothing seeks, nothing is
held in memory beyond a segment and one JSON listing, every limit of ``ArchiveLimits`` is
enforced, and every failure surfaces as ``ArchiveError`` (``ArchiveLimitExceeded`` for limits)
with a message that names the offending member or id. Errors from tarfile, zstandard and json are
converted at the boundary of ``read_backup_archive``; an ``OSError`` there is the server's own I/O
failing (disk full, unreadable upload) and is passed on unchanged.

All functions are synchronous and blocking; the server runs them in worker threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import queue
import re
import tarfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import zstandard
from Crypto.Cipher import AES

from cfms_trio.backup.crypto_stream import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    DEFAULT_CHUNK_LOG2,
    MAGIC,
    SegmentReader,
    SegmentWriter,
    read_up_to,
)
from cfms_trio.backup.keyfile import FORMAT_LEGACY, FORMAT_V2, KeyInfo
from cfms_trio.config import ArchiveLimits
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

FORMAT_NAME = "cfms-backup"
VERSION_V2 = "2.0"
VERSION_LEGACY = "1.0"
COMPRESSION_NAMES = {"none": COMPRESSION_NONE, "zstd": COMPRESSION_ZSTD}
ZSTD_LEVEL = 3

METADATA_MEMBER = "metadata.json"
FOLDERS_MEMBER = "folders.json"
DOCUMENTS_MEMBER = "documents.json"
FILES_MEMBER = "files.json"
JSON_MEMBERS = (METADATA_MEMBER, FOLDERS_MEMBER, DOCUMENTS_MEMBER, FILES_MEMBER)
FILES_PREFIX = "files/"

ID_MAX_CHARS = 64
_ID_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,64}")
_SHA256_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
ACCESS_TYPES = ("read", "write", "move", "manage")
RULE_MATCH_VALUES = ("all", "any")
METADATA_COUNT_FIELDS = {
    "folders_count": FOLDERS_MEMBER,
    "documents_count": DOCUMENTS_MEMBER,
    "files_count": FILES_MEMBER,
}

COPY_BYTES = 1024 * 1024  # file contents are streamed in pieces of this size
WRITE_BEHIND_PIECES = 4  # sealed segments waiting between the exporting and the writing thread
READ_AHEAD_PIECES = 4  # decrypted pieces of COPY_BYTES waiting for the extracting thread
LEGACY_READ_BYTES = 64 * 1024  # ciphertext read per step from a legacy archive (whole AES blocks)
AES_BLOCK_BYTES = 16
LEGACY_IV_BYTES = 16
# pax and GNU long-name headers are read whole by tarfile; ours never need more than a few
# records, and a cap keeps a hostile header from costing memory or quadratic parsing time.
TAR_EXTENDED_HEADER_MAX_BYTES = 8 * 1024
PROGRESS_STEP_BYTES = 1024 * 1024  # report progress at most once per this many archive bytes
STAGING_FILE_MODE = 0o600
ERROR_DETAIL_CHARS = 200

_EXTENDED_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


@dataclasses.dataclass
class BackupContents:
    """The validated listings of a backup; file contents live in the staging folder.

    ``files`` entries are ``{id, sha256, size, created_time}``; legacy ``path`` fields are
    dropped and missing legacy sizes are filled in from the extracted files.
    """

    format_version: str
    metadata: dict
    folders: list[dict]
    documents: list[dict]
    files: list[dict]


def _show(name: str) -> str:
    """Quote an untrusted name for an error message, shortened and with control chars escaped."""
    if len(name) > 100:
        name = name[:100] + "..."
    return repr(name)


# --------------------------------------------------------------------------------------------
# Schema validation (shared by the writer, which refuses to write what it could not read back)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(obj: dict, field: str, where: str):
    if field not in obj:
        raise ArchiveError(f"{where}: missing field '{field}'")
    return obj[field]


def _as_object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ArchiveError(f"{where} must be a JSON object")
    return value


def _as_list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ArchiveError(f"{where} must be a JSON array")
    return value


def _as_id(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise ArchiveError(
            f"{where}: {field} must be an id of 1-{ID_MAX_CHARS} characters from [0-9A-Za-z_-]"
        )
    return value


def _as_optional_id(value, where: str, field: str) -> str | None:
    return None if value is None else _as_id(value, where, field)


def _as_text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ArchiveError(f"{where}: {field} must be a string")
    return value


def _as_time(value, where: str, field: str) -> float:
    if not _is_number(value):
        raise ArchiveError(f"{where}: {field} must be a number of seconds since the epoch")
    return float(value)


def _as_size(value, where: str, field: str) -> int:
    if type(value) is not int or value < 0:
        raise ArchiveError(f"{where}: {field} must be a non-negative integer")
    return value


def _as_sha256(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not _SHA256_PATTERN.fullmatch(value):
        raise ArchiveError(f"{where}: {field} must be 64 hex digits")
    return value.lower()


def _entry_where(member: str, kind: str, index: int, entry) -> tuple[dict, str, str]:
    """Check that a list entry is an object with a valid id; return it, its id and a label."""
    where = f"{member}: entry {index}"
    entry = _as_object(entry, where)
    entry_id = _as_id(_require(entry, "id", where), where, "id")
    return entry, entry_id, f"{member}: {kind} {entry_id!r}"


def _check_match(value, where: str) -> None:
    if value not in RULE_MATCH_VALUES:
        raise ArchiveError(f"{where}: match must be \"all\" or \"any\"")


def _check_requirement(value, where: str) -> None:
    """A ``rights``/``groups`` clause of a rule group: ``{match, require: [str, ...]}``."""
    clause = _as_object(value, where)
    if "match" in clause:
        _check_match(clause["match"], where)
    require = _as_list(clause.get("require", []), f"{where}: require")
    if not all(isinstance(item, str) for item in require):
        raise ArchiveError(f"{where}: require must list strings")


def _check_rule_data(value, where: str) -> dict:
    """Check the shape of a rule (SPEC §4) without interpreting it."""
    rule = _as_object(value, f"{where}: rule_data")
    if "match" in rule:
        _check_match(rule["match"], f"{where}: rule_data")
    groups = _as_list(rule.get("match_groups", []), f"{where}: rule_data.match_groups")
    for position, group in enumerate(groups):
        group_where = f"{where}: rule_data.match_groups[{position}]"
        group = _as_object(group, group_where)
        if "match" in group:
            _check_match(group["match"], group_where)
        for clause in ("rights", "groups"):
            if clause in group:
                _check_requirement(group[clause], f"{group_where}.{clause}")
    return rule


def _parse_access_rules(owner: dict, where: str, legacy: bool) -> list[dict]:
    if legacy and "access_rules" not in owner:
        return []  # legacy exports may omit an empty rule list
    rules = _as_list(_require(owner, "access_rules", where), f"{where}: access_rules")
    parsed = []
    for index, rule in enumerate(rules):
        rule_where = f"{where}: access rule {index}"
        rule = _as_object(rule, rule_where)
        rule_id = _as_id(_require(rule, "id", rule_where), rule_where, "id")
        rule_where = f"{where}: access rule {rule_id!r}"
        access_type = _require(rule, "access_type", rule_where)
        if access_type not in ACCESS_TYPES:
            raise ArchiveError(
                f"{rule_where}: access_type must be one of {', '.join(ACCESS_TYPES)}"
            )
        rule_data = _check_rule_data(_require(rule, "rule_data", rule_where), rule_where)
        parsed.append({"id": rule_id, "access_type": access_type, "rule_data": rule_data})
    return parsed


def _parse_metadata(value, container_version: str) -> dict:
    """Validate metadata.json; its version must match the container that carried it."""
    metadata = _as_object(value, METADATA_MEMBER)
    version = _require(metadata, "version", METADATA_MEMBER)
    if version not in (VERSION_V2, VERSION_LEGACY):
        shown = _show(version) if isinstance(version, str) else f"of type {type(version).__name__}"
        raise ArchiveError(f"unsupported backup version {shown} in {METADATA_MEMBER}")
    if version != container_version:
        raise ArchiveError(
            f"{METADATA_MEMBER} says version {version}, "
            f"but the archive is format {container_version}"
        )
    strict = version == VERSION_V2
    checks = {
        "created_at": _as_time,
        "backup_name": _as_text,
        "server_version": _as_text,
        "folders_count": _as_size,
        "documents_count": _as_size,
        "files_count": _as_size,
        "total_file_bytes": _as_size,
    }
    parsed: dict[str, Any] = {"version": version}
    if strict:
        if _require(metadata, "format", METADATA_MEMBER) != FORMAT_NAME:
            raise ArchiveError(f"{METADATA_MEMBER}: format must be {FORMAT_NAME!r}")
        parsed["format"] = FORMAT_NAME
    for field, check in checks.items():
        if strict:
            value = _require(metadata, field, METADATA_MEMBER)
            parsed[field] = check(value, METADATA_MEMBER, field)
        elif metadata.get(field) is not None:
            parsed[field] = check(metadata[field], METADATA_MEMBER, field)
    return parsed


def _parse_folders(value, legacy: bool) -> list[dict]:
    folders = []
    for index, entry in enumerate(_as_list(value, FOLDERS_MEMBER)):
        entry, folder_id, where = _entry_where(FOLDERS_MEMBER, "folder", index, entry)
        folders.append({
            "id": folder_id,
            "name": _as_text(_require(entry, "name", where), where, "name"),
            "parent_id": _as_optional_id(_require(entry, "parent_id", where), where, "parent_id"),
            "created_time": _as_time(_require(entry, "created_time", where), where, "created_time"),
            "access_rules": _parse_access_rules(entry, where, legacy),
        })
    return folders


def _parse_revisions(document: dict, where: str) -> list[dict]:
    revisions = []
    entries = _as_list(_require(document, "revisions", where), f"{where}: revisions")
    for index, revision in enumerate(entries):
        rev_where = f"{where}: revision {index}"
        revision = _as_object(revision, rev_where)
        revision_id = _as_id(_require(revision, "id", rev_where), rev_where, "id")
        rev_where = f"{where}: revision {revision_id!r}"
        revisions.append({
            "id": revision_id,
            "file_id": _as_id(_require(revision, "file_id", rev_where), rev_where, "file_id"),
            "created_time": _as_time(
                _require(revision, "created_time", rev_where), rev_where, "created_time"
            ),
        })
    return revisions


def _parse_documents(value, legacy: bool) -> list[dict]:
    documents = []
    for index, entry in enumerate(_as_list(value, DOCUMENTS_MEMBER)):
        entry, document_id, where = _entry_where(DOCUMENTS_MEMBER, "document", index, entry)
        documents.append({
            "id": document_id,
            "title": _as_text(_require(entry, "title", where), where, "title"),
            "folder_id": _as_optional_id(_require(entry, "folder_id", where), where, "folder_id"),
            "created_time": _as_time(_require(entry, "created_time", where), where, "created_time"),
            "access_rules": _parse_access_rules(entry, where, legacy),
            "revisions": _parse_revisions(entry, where),
        })
    return documents


def _parse_files(value, legacy: bool) -> list[dict]:
    """Validate files.json; legacy entries may lack ``size`` (None until extraction)."""
    files = []
    for index, entry in enumerate(_as_list(value, FILES_MEMBER)):
        entry, file_id, where = _entry_where(FILES_MEMBER, "file", index, entry)
        if legacy and entry.get("size") is None:
            size = None
        else:
            size = _as_size(_require(entry, "size", where), where, "size")
        files.append({
            "id": file_id,
            "sha256": _as_sha256(_require(entry, "sha256", where), where, "sha256"),
            "size": size,
            "created_time": _as_time(_require(entry, "created_time", where), where, "created_time"),
        })
    return files


def _unique_index(items: Iterable[dict], kind: str) -> dict[str, dict]:
    index: dict[str, dict] = {}
    for item in items:
        if item["id"] in index:
            raise ArchiveError(f"duplicate {kind} id {item['id']!r}")
        index[item["id"]] = item
    return index


def _check_folder_cycles(parent_of: dict[str, str | None]) -> None:
    """Fail if following parent links from any folder loops instead of reaching a root."""
    reaches_root: set[str] = set()
    for start in parent_of:
        path: list[str] = []
        on_path: set[str] = set()
        node = start
        while node is not None and node not in reaches_root:
            if node in on_path:
                raise ArchiveError(f"folder {node!r} is part of a cycle in the folder hierarchy")
            on_path.add(node)
            path.append(node)
            node = parent_of[node]
        reaches_root.update(path)


def validate_references(contents: BackupContents) -> None:
    """Check ids are unique and every cross-reference between the listings resolves.

    Root folders have ``parent_id`` null and documents in the root have ``folder_id`` null;
    every other reference must name an object in the same backup, and folders must form a tree.
    """
    folders = _unique_index(contents.folders, "folder")
    _unique_index(contents.documents, "document")
    files = _unique_index(contents.files, "file")
    _unique_index((rev for doc in contents.documents for rev in doc["revisions"]), "revision")
    owners = list(contents.folders) + list(contents.documents)
    _unique_index((rule for owner in owners for rule in owner["access_rules"]), "access rule")
    for folder in contents.folders:
        parent_id = folder["parent_id"]
        if parent_id is not None and parent_id not in folders:
            raise ArchiveError(
                f"folder {folder['id']!r}: parent folder {parent_id!r} is not in the backup"
            )
    _check_folder_cycles({folder["id"]: folder["parent_id"] for folder in contents.folders})
    for document in contents.documents:
        folder_id = document["folder_id"]
        if folder_id is not None and folder_id not in folders:
            raise ArchiveError(
                f"document {document['id']!r}: folder {folder_id!r} is not in the backup"
            )
        for revision in document["revisions"]:
            if revision["file_id"] not in files:
                raise ArchiveError(
                    f"document {document['id']!r}: revision {revision['id']!r} refers to "
                    f"file {revision['file_id']!r}, which is not in the backup"
                )


def _check_metadata_counts(contents: BackupContents) -> None:
    """Fail when metadata.json's counts disagree with the listings (a sign of tampering)."""
    lists = {
        FOLDERS_MEMBER: contents.folders,
        DOCUMENTS_MEMBER: contents.documents,
        FILES_MEMBER: contents.files,
    }
    for field, member in METADATA_COUNT_FIELDS.items():
        if field in contents.metadata and contents.metadata[field] != len(lists[member]):
            raise ArchiveError(
                f"{METADATA_MEMBER} says {field} is {contents.metadata[field]}, "
                f"but {member} lists {len(lists[member])}"
            )
    if "total_file_bytes" in contents.metadata:
        total = sum(entry["size"] for entry in contents.files)
        if contents.metadata["total_file_bytes"] != total:
            raise ArchiveError(
                f"{METADATA_MEMBER} says total_file_bytes is "
                f"{contents.metadata['total_file_bytes']}, but {FILES_MEMBER} adds up to {total}"
            )


# --------------------------------------------------------------------------------------------
# Writing


class HashingWriter(io.RawIOBase):
    """Writable wrapper that passes bytes on to ``out`` while counting and hashing them.

    Lets the exporter learn the archive's size and sha256 in the same pass that writes it.
    ``out`` is never closed.
    """

    def __init__(self, out: BinaryIO):
        super().__init__()
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._out.write(view)
        self._hash.update(view)
        self.size += len(view)
        return len(view)

    def hexdigest(self) -> str:
        """sha256 of everything written so far, as lowercase hex."""
        return self._hash.hexdigest()


class WriteBehind(io.RawIOBase):
    """Writable that passes each write on to ``out`` from a helper thread.

    An export in one thread would hash and write every sealed segment between reading,
    verifying and sealing the next; with this the two halves overlap on two cores (hashlib,
    AES-GCM and file writes all release the GIL). At most ``WRITE_BEHIND_PIECES`` writes wait
    in between, so memory stays bounded by a few segments. A failure of ``out`` is raised by
    the next ``write`` or by ``close``, which waits until everything queued was written.
    ``out`` itself is never closed.
    """

    def __init__(self, out: BinaryIO):
        super().__init__()
        self._out = out
        self._queue: queue.Queue = queue.Queue(WRITE_BEHIND_PIECES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="write-behind", daemon=True)
        self._thread.start()

    def writable(self) -> bool:
        return True

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:  # after a failure keep draining, so no writer blocks
                try:
                    self._out.write(data)
                except BaseException as exc:  # handed to the writing thread
                    self._error = exc

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to a closed WriteBehind")
        if self._error is not None:
            raise self._error
        # The queue keeps a reference until the helper thread is done with it: only
        # immutable bytes may wait there.
        data = data if type(data) is bytes else bytes(data)
        self._queue.put(data)
        return len(data)

    def close(self) -> None:
        """Wait for every queued write, then raise the first failure if there was one."""
        if not self.closed:
            self._queue.put(None)
            self._thread.join()
            super().close()
            if self._error is not None:
                raise self._error


class _VerifyingSource:
    """Reads one file's content for the tar writer and checks it against its files.json entry.

    tarfile copies exactly the declared size and would silently drop extra bytes or fail with a
    vague message on missing ones; this says which file changed under the exporter.
    """

    def __init__(self, source: BinaryIO, entry: dict):
        self._source = source
        self._entry = entry
        self._remaining = entry["size"]
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._remaining
        size = min(size, self._remaining)
        data = self._source.read(size)
        if len(data) < size:  # a short read: gather the rest, or find the file shorter
            buf = bytearray(data)
            while len(buf) < size:
                piece = self._source.read(size - len(buf))
                if not piece:
                    raise ValueError(
                        f"file {self._entry['id']!r} is shorter than its recorded size")
                buf += piece
            data = bytes(buf)
        self._remaining -= len(data)
        self._hash.update(data)
        return data

    def finish(self) -> None:
        """Confirm the file ended exactly at its size and matched its sha256."""
        if self._remaining or self._source.read(1):
            raise ValueError(f"file {self._entry['id']!r} is longer than its recorded size")
        if self._hash.hexdigest() != self._entry["sha256"]:
            raise ValueError(f"file {self._entry['id']!r} does not match its recorded sha256")


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


def _member_info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = STAGING_FILE_MODE
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _normalise_export(
    metadata: dict, folders: list, documents: list, files: list
) -> BackupContents:
    """Validate the exporter's data exactly as a reader would and return the normalised form."""
    try:
        contents = BackupContents(
            format_version=VERSION_V2,
            metadata=_parse_metadata(metadata, VERSION_V2),
            folders=_parse_folders(folders, legacy=False),
            documents=_parse_documents(documents, legacy=False),
            files=_parse_files(files, legacy=False),
        )
        _check_metadata_counts(contents)
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
) -> None:
    """Write a complete format 2 archive of the given listings and file contents to ``out``.

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
    sealer = SegmentWriter(
        out, key, compression=COMPRESSION_NAMES[compression], chunk_log2=chunk_log2
    )
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
                tar.addfile(_member_info(name, len(data), mtime), io.BytesIO(data))
            for entry in contents.files:
                with open_file(entry["id"]) as raw:
                    source = _VerifyingSource(raw, entry)
                    info = _member_info(FILES_PREFIX + entry["id"], entry["size"], mtime)
                    tar.addfile(info, source)
                    source.finish()
                tar.members.clear()  # the writer never looks back; 100,000 TarInfos add up
        if sink is not sealer:
            sink.close()  # ends the zstd frame; closefd=False leaves the sealer open
        sealer.close()
    except BaseException:
        sealer.abort()
        raise


# --------------------------------------------------------------------------------------------
# Reading: byte streams


class _CallbackFailed(Exception):
    """Carries an exception raised by the caller's progress callback through the parsers, so
    the boundary re-raises it unchanged instead of blaming the archive."""


class _CountingSource(io.RawIOBase):
    """The encrypted archive as read: enforces the archive size limit and reports progress."""

    def __init__(
        self,
        source: BinaryIO,
        limit_bytes: int,
        progress: Callable[[int, int], None] | None,
        total_bytes: int,
    ):
        super().__init__()
        self._source = source
        self._limit_bytes = limit_bytes
        self._progress = progress
        self._total_bytes = total_bytes
        self._reported = 0
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(len(view)) or b""
        count = len(data)
        view[:count] = data
        self.consumed += count
        if self.consumed > self._limit_bytes:
            raise ArchiveLimitExceeded(
                f"archive is larger than the limit of {self._limit_bytes} bytes"
            )
        at_end = count == 0
        if self._progress is not None and (
            self.consumed - self._reported >= PROGRESS_STEP_BYTES
            or (at_end and self.consumed != self._reported)
        ):
            self._reported = self.consumed
            try:
                self._progress(self.consumed, self._total_bytes)
            except Exception as exc:
                raise _CallbackFailed() from exc
        return count


class _LimitedReader(io.RawIOBase):
    """The decrypted (and decompressed) tar stream: enforces the extracted bytes limit.

    Counting here, after decompression, is what defeats a compression bomb.
    """

    def __init__(self, source, limit_bytes: int):
        super().__init__()
        self._source = source
        self._limit_bytes = limit_bytes
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self._source.read(len(view))
        count = len(data)
        self.produced += count
        if self.produced > self._limit_bytes:
            raise ArchiveLimitExceeded(
                f"archive expands to more than the limit of {self._limit_bytes} bytes"
            )
        view[:count] = data
        return count


def _strip_pkcs7(block: bytes) -> bytes:
    """Remove PKCS#7 padding from the last plaintext block of a legacy archive."""
    pad = block[-1]
    if not 1 <= pad <= AES_BLOCK_BYTES or block[-pad:] != bytes([pad]) * pad:
        raise ArchiveError("wrong key or corrupt archive (bad padding)")
    return block[:-pad]


class LegacyCbcReader(io.RawIOBase):
    """Readable plaintext of a legacy 1.0 archive: 16-byte IV ‖ AES-256-CBC, PKCS#7 padded.

    Decrypts block-wise as data is consumed, withholding the last block until end of file so the
    padding can be checked and stripped. Nothing authenticates this format; the tar layer and
    the sha256 checks do the validation.
    """

    def __init__(self, source: BinaryIO, key: bytes):
        super().__init__()
        self._source = source
        iv = read_up_to(source, LEGACY_IV_BYTES)
        if iv.startswith(MAGIC):
            raise ArchiveError(
                "archive is format 2 (CFMSBAK2) but the key file is a legacy AES-256-CBC key"
            )
        if len(iv) < LEGACY_IV_BYTES:
            raise ArchiveError("wrong key or corrupt archive (too short for a legacy archive)")
        self._cipher = AES.new(key, AES.MODE_CBC, iv=iv)
        self._pending = b""  # ciphertext not yet making up a whole block
        self._held = b""  # last decrypted block; it may carry the padding
        self._out = b""
        self._out_pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while self._out_pos >= len(self._out):
            if self._eof:
                return 0
            self._out = self._decrypt_more()
            self._out_pos = 0
        count = min(len(view), len(self._out) - self._out_pos)
        view[:count] = self._out[self._out_pos:self._out_pos + count]
        self._out_pos += count
        return count

    def _decrypt_more(self) -> bytes:
        data = self._source.read(LEGACY_READ_BYTES)
        if not data:
            self._eof = True
            if self._pending or not self._held:
                raise ArchiveError(
                    "wrong key or corrupt archive (ciphertext is not a whole number of blocks)"
                )
            return _strip_pkcs7(self._held)
        ciphertext = self._pending + data
        usable = len(ciphertext) - len(ciphertext) % AES_BLOCK_BYTES
        self._pending = ciphertext[usable:]
        if not usable:
            return b""
        plaintext = self._held + self._cipher.decrypt(ciphertext[:usable])
        self._held = plaintext[-AES_BLOCK_BYTES:]
        return plaintext[:-AES_BLOCK_BYTES]


def _drain(stream) -> None:
    """Read a stream to its end, so trailing authentication and padding checks run."""
    while stream.read(COPY_BYTES):
        pass


class _GuardedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses what tarfile would otherwise accept silently or expensively.

    - Extended headers (pax, GNU long names) are read into memory whole by tarfile: cap them.
    - GNU sparse members are not regular files.
    - A corrupt or truncated header after the first one makes tarfile end the archive quietly,
      hiding the members behind it; make it an error instead.
    Errors are raised as ``tarfile.ReadError`` (not a ``HeaderError``), which tarfile passes on.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive marker
        except tarfile.EmptyHeaderError:
            raise tarfile.ReadError("tar stream ends without an end-of-archive marker") from None
        except tarfile.TruncatedHeaderError:
            raise tarfile.ReadError("tar stream is truncated inside a header") from None
        except tarfile.InvalidHeaderError as exc:
            raise tarfile.ReadError(f"invalid tar header ({exc})") from None

    def _proc_member(self, tar):
        # tarfile documents _proc_member as the hook for subclasses.
        if self.type in _EXTENDED_HEADER_TYPES and self.size > TAR_EXTENDED_HEADER_MAX_BYTES:
            raise ArchiveLimitExceeded(
                f"tar extended header of {self.size} bytes exceeds the limit of "
                f"{TAR_EXTENDED_HEADER_MAX_BYTES} bytes"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError(
                f"archive member {_show(self.name)} is a sparse file; "
                "only regular files are allowed"
            )
        return super()._proc_member(tar)


# --------------------------------------------------------------------------------------------
# Reading: members


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)  # called for every object of a listing: the common case stays in C
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {_show(key)}")
            seen.add(key)
    return result


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _json_depth_exceeds(value, limit: int) -> bool:
    """True when arrays/objects nest deeper than ``limit`` (the top-level value is depth 1)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _decode_json(data: bytes, name: str, limits: ArchiveLimits):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError(f"archive member {name} is not valid UTF-8") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except RecursionError:
        raise ArchiveLimitExceeded(
            f"archive member {name} nests deeper than the limit of {limits.json_depth}"
        ) from None
    except ValueError as exc:
        raise ArchiveError(f"archive member {name} is not valid JSON: {exc}") from None
    if isinstance(value, (dict, list)) and _json_depth_exceeds(value, limits.json_depth):
        raise ArchiveLimitExceeded(
            f"archive member {name} nests deeper than the limit of {limits.json_depth}"
        )
    return value


def _member_kind_error(member: tarfile.TarInfo, name: str) -> str | None:
    """Describe why a member is not a plain regular file, or None when it is one."""
    if member.issym():
        what = "a symbolic link"
    elif member.islnk():
        what = "a hard link"
    elif member.ischr() or member.isblk():
        what = "a device"
    elif member.isfifo():
        what = "a FIFO"
    elif member.isdir():
        what = "a directory"
    elif member.issparse():
        what = "a sparse file"
    elif member.type not in _REGULAR_TYPES:
        what = f"of unsupported type {member.type!r}"
    else:
        return None
    return f"archive member {_show(name)} is {what}; only regular files are allowed"


class _Extractor:
    """Validates tar members one by one and extracts file contents into the staging folder.

    Format 2 members must come in the exact order of SPEC §7, so files.json is known before any
    file arrives and sizes, hashes and membership are checked while streaming. Legacy members may
    come in any order; what cannot be checked on arrival is checked in ``finish``.
    """

    def __init__(self, *, legacy: bool, staging_fd: int, limits: ArchiveLimits):
        self.legacy = legacy
        self.version = VERSION_LEGACY if legacy else VERSION_V2
        self.limits = limits
        self.staging_fd = staging_fd
        self.member_count = 0
        self.seen: set[str] = set()
        self.listings: dict[str, Any] = {}
        self.listed: dict[str, dict] | None = None  # files.json by id, once read
        self.extracted: dict[str, tuple[int, str]] = {}  # id -> (size, sha256)
        self.position = 0  # format 2: index of the next expected member

    # -- names and types

    def _safe_name(self, raw: str) -> str:
        """Reject names that could point outside the archive; normalise legacy './' prefixes."""
        if not raw:
            raise ArchiveError("archive member has an empty name")
        if raw.startswith("/"):
            raise ArchiveError(f"archive member {_show(raw)} has an absolute name")
        parts = raw.split("/")
        if ".." in parts:
            raise ArchiveError(f"archive member {_show(raw)} escapes the archive")
        if self.legacy:
            while parts and parts[0] == ".":
                parts.pop(0)
        return "/".join(parts)

    @staticmethod
    def _classify(name: str, raw: str) -> str | None:
        """Return the file id for ``files/<id>``, None for a JSON listing; reject anything else."""
        if name in JSON_MEMBERS:
            return None
        if name.startswith(FILES_PREFIX) and _ID_PATTERN.fullmatch(name[len(FILES_PREFIX):]):
            return name[len(FILES_PREFIX):]
        raise ArchiveError(f"unexpected archive member {_show(raw)}")

    def _expected_name(self) -> str | None:
        if self.position < len(JSON_MEMBERS):
            return JSON_MEMBERS[self.position]
        files = self.listings[FILES_MEMBER]
        index = self.position - len(JSON_MEMBERS)
        return FILES_PREFIX + files[index]["id"] if index < len(files) else None

    def _check_position(self, name: str, file_id: str | None) -> None:
        """Format 2: the member must be exactly the next one SPEC §7 calls for."""
        expected = self._expected_name()
        if name == expected:
            self.position += 1
            return
        if file_id is not None and self.listed is not None and file_id not in self.listed:
            raise ArchiveError(f"archive member {_show(name)} is not listed in {FILES_MEMBER}")
        if expected is None:
            raise ArchiveError(f"archive member {_show(name)} follows the last listed file")
        raise ArchiveError(f"archive member {_show(name)} is out of order; expected {expected!r}")

    def handle(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Validate one member and consume its data."""
        self.member_count += 1
        if self.member_count > self.limits.member_count:
            raise ArchiveLimitExceeded(
                f"archive has more than the limit of {self.limits.member_count} members"
            )
        raw = member.name
        name = self._safe_name(raw)
        if self.legacy and member.isdir():
            return  # legacy tars may list their folders; they carry nothing
        problem = _member_kind_error(member, raw)
        if problem:
            raise ArchiveError(problem)
        file_id = self._classify(name, raw)
        if name in self.seen:
            raise ArchiveError(f"duplicate archive member {_show(raw)}")
        if not self.legacy:
            self._check_position(name, file_id)
        self.seen.add(name)
        if file_id is None:
            self._read_listing(tar, member, name)
        else:
            self._extract_file(tar, member, file_id)

    # -- JSON listings

    def _read_listing(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        if member.size > self.limits.json_member_bytes:
            raise ArchiveLimitExceeded(
                f"archive member {name} is {member.size} bytes; "
                f"the limit is {self.limits.json_member_bytes} bytes"
            )
        data = tar.extractfile(member).read(member.size)
        if len(data) != member.size:
            raise ArchiveError(f"archive member {name} is truncated")
        value = _decode_json(data, name, self.limits)
        if name == METADATA_MEMBER:
            self.listings[name] = _parse_metadata(value, self.version)
        elif name == FOLDERS_MEMBER:
            self.listings[name] = _parse_folders(value, self.legacy)
        elif name == DOCUMENTS_MEMBER:
            self.listings[name] = _parse_documents(value, self.legacy)
        else:
            self.listings[name] = _parse_files(value, self.legacy)
            self.listed = _unique_index(self.listings[name], "file")
            for file_id in self.extracted:  # legacy: files that came before their listing
                self._verify_extracted(file_id)
            if not self.legacy:
                self._check_listings_early()

    def _contents(self) -> BackupContents:
        return BackupContents(
            format_version=self.version,
            metadata=self.listings[METADATA_MEMBER],
            folders=self.listings[FOLDERS_MEMBER],
            documents=self.listings[DOCUMENTS_MEMBER],
            files=self.listings[FILES_MEMBER],
        )

    def _check_listings_early(self) -> None:
        """Format 2: all listings are known before the first file; check them all now."""
        contents = self._contents()
        _check_metadata_counts(contents)
        validate_references(contents)
        members = len(JSON_MEMBERS) + len(contents.files)
        if members > self.limits.member_count:
            raise ArchiveLimitExceeded(
                f"archive lists {members} members; the limit is {self.limits.member_count}"
            )
        total = sum(entry["size"] for entry in contents.files)
        if total > self.limits.extracted_bytes:
            raise ArchiveLimitExceeded(
                f"archive lists {total} bytes of files; the limit is "
                f"{self.limits.extracted_bytes} bytes"
            )

    # -- file contents

    def _extract_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, file_id: str) -> None:
        if self.listed is not None:
            entry = self.listed.get(file_id)
            if entry is None:
                raise ArchiveError(
                    f"archive member {_show(member.name)} is not listed in {FILES_MEMBER}"
                )
            if entry["size"] is not None and entry["size"] != member.size:
                raise ArchiveError(
                    f"file {file_id}: size mismatch ({FILES_MEMBER} says {entry['size']} bytes, "
                    f"the archive holds {member.size})"
                )
        self.extracted[file_id] = self._write_staging_file(tar, member, file_id)
        if self.listed is not None:
            self._verify_extracted(file_id)

    def _write_staging_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, file_id: str
    ) -> tuple[int, str]:
        """Stream a member into ``staging/<file_id>``, hashing it; return (size, sha256).

        The id is validated to be a plain name, the file is created relative to the staging
        folder's descriptor, and O_EXCL|O_NOFOLLOW refuse anything already there, links included.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(file_id, flags, STAGING_FILE_MODE, dir_fd=self.staging_fd)
        except FileExistsError:
            raise ArchiveError(f"file {file_id}: already present in the staging folder") from None
        source = tar.extractfile(member)
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as target:
            while chunk := source.read(COPY_BYTES):
                digest.update(chunk)
                target.write(chunk)
                size += len(chunk)
        if size != member.size:
            raise ArchiveError(f"file {file_id}: archive member is truncated")
        return size, digest.hexdigest()

    def _verify_extracted(self, file_id: str) -> None:
        """Compare an extracted file with its files.json entry (known by now)."""
        entry = self.listed.get(file_id)
        if entry is None:
            raise ArchiveError(
                f"archive member {_show(FILES_PREFIX + file_id)} is not listed in {FILES_MEMBER}"
            )
        size, sha256 = self.extracted[file_id]
        if entry["size"] is not None and entry["size"] != size:
            raise ArchiveError(
                f"file {file_id}: size mismatch ({FILES_MEMBER} says {entry['size']} bytes, "
                f"the archive holds {size})"
            )
        if entry["sha256"] != sha256:
            raise ArchiveError(f"file {file_id}: sha256 mismatch")

    # -- end of archive

    def finish(self) -> BackupContents:
        """Run the checks that need the whole archive and return the validated contents."""
        for name in JSON_MEMBERS:
            if name not in self.listings:
                raise ArchiveError(f"archive is missing member {name}")
        for entry in self.listings[FILES_MEMBER]:
            if entry["id"] not in self.extracted:
                raise ArchiveError(
                    f"file {entry['id']}: listed in {FILES_MEMBER} but missing from the archive"
                )
            if entry["size"] is None:
                entry["size"] = self.extracted[entry["id"]][0]
        contents = self._contents()
        if self.legacy:
            _check_metadata_counts(contents)
            validate_references(contents)
        return contents


# --------------------------------------------------------------------------------------------
# Reading: entry point


def _open_staging_dir(staging_dir: Path) -> int:
    """Create (if needed) and open the staging folder, refusing a symlink in its place."""
    Path(staging_dir).mkdir(mode=0o700, exist_ok=True)
    return os.open(staging_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _plaintext_stream(source: BinaryIO, key_info: KeyInfo, limits: ArchiveLimits):
    """Return ``(tar_stream, segment_reader_or_None)`` for the archive's format."""
    if key_info.format == FORMAT_LEGACY:
        return LegacyCbcReader(source, key_info.key), None
    if key_info.format != FORMAT_V2:
        raise ArchiveError(f"unsupported key file format {key_info.format}")
    segments = SegmentReader(source, key_info.key)
    if segments.header.compression == COMPRESSION_ZSTD:
        decompressor = zstandard.ZstdDecompressor(max_window_size=limits.zstd_window_bytes)
        reader = decompressor.stream_reader(segments, read_across_frames=True, closefd=False)
        return reader, segments
    return segments, segments


class _ReadAhead(io.RawIOBase):
    """Readable that reads ``source`` on a helper thread, ahead of its reader.

    Extracting in one thread takes turns between decrypting (and decompressing) the archive and
    hashing and writing the files; with this the two halves overlap on two cores (AES-GCM,
    zstd, hashlib and file I/O all release the GIL). The helper queues up to
    ``READ_AHEAD_PIECES`` pieces of ``COPY_BYTES``. Whatever ``source`` raises is raised by the
    read that reaches that point of the stream, so every error surfaces where it always did.
    ``close`` stops the helper and waits for it; ``source`` itself is never closed.
    """

    def __init__(self, source):
        super().__init__()
        self._source = source
        self._queue: queue.Queue = queue.Queue(READ_AHEAD_PIECES)
        self._stop = threading.Event()
        self._piece = b""
        self._pos = 0
        self._eof = False
        self._error: BaseException | None = None  # what ended the stream, once reached
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                piece = self._source.read(COPY_BYTES)
            except BaseException as exc:  # handed to the reading thread, in stream order
                self._queue.put(exc)
                return
            self._queue.put(piece)
            if not piece:
                return

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        while self._pos >= len(self._piece):
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            item = self._queue.get()  # the helper ends every stream with b"" or an error
            if isinstance(item, BaseException):
                self._error = item
            elif not item:
                self._eof = True
            else:
                self._piece, self._pos = item, 0
        if self._pos == 0 and size >= len(self._piece):
            self._pos = len(self._piece)
            return self._piece  # the whole piece, without a copy
        data = self._piece[self._pos:self._pos + size]
        self._pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            while self._thread.is_alive():  # unblock a helper waiting for room
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
            super().close()


def _extract_all(
    source: BinaryIO, key_info: KeyInfo, staging_fd: int, limits: ArchiveLimits
) -> BackupContents:
    legacy = key_info.format == FORMAT_LEGACY
    plaintext, segments = _plaintext_stream(source, key_info, limits)
    extractor = _Extractor(legacy=legacy, staging_fd=staging_fd, limits=limits)
    with _ReadAhead(plaintext) as ahead:
        limited = _LimitedReader(ahead, limits.extracted_bytes)
        with tarfile.open(
            fileobj=limited, mode="r|", tarinfo=_GuardedTarInfo, encoding="utf-8",
            errors="strict",
        ) as tar:
            while (member := tar.next()) is not None:
                extractor.handle(tar, member)
                tar.members.clear()  # stream mode would otherwise keep every TarInfo in memory
        # Reading to the very end verifies the final segment (format 2) or the padding
        # (legacy); whatever follows the tar's end marker still counts against the extracted
        # bytes limit.
        _drain(limited)
    if segments is not None:
        _drain(segments)  # already at its end, read by the helper; kept as the final check
    return extractor.finish()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:ERROR_DETAIL_CHARS]


def read_backup_archive(
    archive: BinaryIO,
    key_info: KeyInfo,
    staging_dir: Path,
    limits: ArchiveLimits,
    progress: Callable[[int, int], None] | None = None,
    archive_size: int | None = None,
) -> BackupContents:
    """Decrypt, verify and extract a backup archive; return its validated listings.

    File contents are written to ``staging_dir/<file_id>`` and checked against their size and
    sha256. ``progress(consumed, total)`` is called with the encrypted bytes read so far and
    ``archive_size`` (0 when unknown). Any problem with the archive raises ``ArchiveError``;
    the caller removes ``staging_dir`` on failure.
    """
    if archive_size is not None and archive_size > limits.archive_bytes:
        raise ArchiveLimitExceeded(
            f"archive is {archive_size} bytes; the limit is {limits.archive_bytes} bytes"
        )
    source = _CountingSource(archive, limits.archive_bytes, progress, archive_size or 0)
    legacy = key_info.format == FORMAT_LEGACY
    staging_fd = _open_staging_dir(staging_dir)
    try:
        return _extract_all(source, key_info, staging_fd, limits)
    except (ArchiveError, OSError):
        raise  # archive problems are already precise; OSError is the server's own I/O failing
    except _CallbackFailed as exc:
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
