"""The tar layer of a backup: guarded tar headers, member checks and extraction into staging.

``Extractor`` takes the members of a tar read in stream mode one at a time: it checks names,
types, order and limits, validates the JSON listings and streams file contents into the staging
folder, hashing them. ``member_info`` builds the headers the writer uses.
"""

from __future__ import annotations

import functools
import tarfile
from typing import Callable

from cfms_trio.config import ArchiveLimits
from cfms_trio.conventions import ID_PATTERN
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

from .jsonstream import JsonArray, decode_json
from .legacy import LegacyListings
from .listings import (
    DOCUMENTS_MEMBER,
    FILES_MEMBER,
    FILES_PREFIX,
    FOLDERS_MEMBER,
    JSON_MEMBERS,
    METADATA_COUNT_FIELDS,
    METADATA_MEMBER,
    VERSION_LEGACY,
    VERSION_V3,
    BackupContents,
    itemised,
    parse_document,
    parse_file,
    parse_folder,
    parse_metadata,
    show_name,
)
from .payload3 import PayloadV3
from .records import RecordSink, parse_piece_name
from .staged import STAGE_BRIEFLY, STAGING_FILE_MODE, check_listed_size, write_staging_file

# A format 2 stream's listings of payload 2.0 (and legacy 1.0): member -> (kind, entry parser).
_LISTING_PARSERS = {
    FOLDERS_MEMBER: ("folders", parse_folder),
    DOCUMENTS_MEMBER: ("documents", parse_document),
    FILES_MEMBER: ("files", parse_file),
}

# pax and GNU long-name headers are read whole by tarfile; ours never need more than a few
# records, and a cap keeps a hostile header from costing memory or quadratic parsing time.
TAR_EXTENDED_HEADER_MAX_BYTES = 8 * 1024
# Extended headers in a row before one member (pax, GNU long name and long link, a global
# header): tarfile reads each recursively, so a chain of them must stop short of the stack.
TAR_EXTENDED_HEADERS_PER_MEMBER_MAX = 4
# Keys and values of the global pax headers, which tarfile keeps and copies for every member.
TAR_GLOBAL_HEADERS_MAX_BYTES = TAR_EXTENDED_HEADER_MAX_BYTES
_SPARSE_PAX_PREFIX = "GNU.sparse."
_CHAIN_ATTRIBUTE = "_cfms_extended_header_chain"  # set on the TarFile being read

_EXTENDED_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def member_info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = STAGING_FILE_MODE
    info.type = tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _sparse_error(name: str) -> ArchiveError:
    return ArchiveError(
        f"sparse member {show_name(name)} is not allowed; only regular files are allowed"
    )


def _pax_member_name(next_info: tarfile.TarInfo, pax_headers: dict) -> str:
    """The name a pax header gives the member after it (its own header's name otherwise)."""
    return pax_headers.get("GNU.sparse.name") or pax_headers.get("path") or next_info.name


class GuardedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses what tarfile would otherwise accept silently or expensively.

    tarfile parses every header inside ``TarFile.next()``, before the ``Extractor`` sees the
    member, so everything whose cost the headers decide is refused here, before tarfile acts:
    - Extended headers (pax, GNU long names) are read into memory whole: cap their size, the
      number of them in a row (each recurses) and the global pax headers kept across members.
    - GNU sparse members in every encoding (old GNU type 'S', pax 0.0, 0.1 and 1.0): the 1.0
      map is read from the data with no bound, the old format's extension blocks too. They are
      refused before any map is read, naming the member.
    - Negative sizes (base-256 header numbers or a pax ``size``).
    - A corrupt or truncated header after the first one makes tarfile end the archive quietly,
      hiding the members behind it; make it an error instead.
    Header errors are raised as ``tarfile.ReadError`` (not a ``HeaderError``, which tarfile
    would swallow) and the rest as ``ArchiveError``; tarfile passes both on.
    The hooks are tarfile's documented ``_proc_member`` and the ``_proc_gnusparse_*`` and
    ``_apply_pax_info`` steps it calls from ``_proc_pax``/``_proc_builtin``.
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
        if self.size < 0:
            raise ArchiveError(f"tar header of {show_name(self.name)} has a negative size")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _sparse_error(self.name)  # before tarfile reads its extension blocks
        if self.type not in _EXTENDED_HEADER_TYPES:
            return super()._proc_member(tar)
        if self.size > TAR_EXTENDED_HEADER_MAX_BYTES:
            raise ArchiveLimitExceeded(
                f"tar extended header of {self.size} bytes exceeds the limit of "
                f"{TAR_EXTENDED_HEADER_MAX_BYTES} bytes"
            )
        chain = getattr(tar, _CHAIN_ATTRIBUTE, 0) + 1
        if chain > TAR_EXTENDED_HEADERS_PER_MEMBER_MAX:
            raise ArchiveLimitExceeded(
                f"tar member is preceded by more than {TAR_EXTENDED_HEADERS_PER_MEMBER_MAX} "
                "extended headers"
            )
        setattr(tar, _CHAIN_ATTRIBUTE, chain)
        try:
            member = super()._proc_member(tar)
        finally:
            setattr(tar, _CHAIN_ATTRIBUTE, chain - 1)
        if self.type == tarfile.XGLTYPE:
            kept = sum(len(key) + len(value) for key, value in tar.pax_headers.items())
            if kept > TAR_GLOBAL_HEADERS_MAX_BYTES:
                raise ArchiveLimitExceeded(
                    f"tar global headers hold {kept} bytes; the limit is "
                    f"{TAR_GLOBAL_HEADERS_MAX_BYTES} bytes"
                )
        return member

    # _proc_pax calls these once the header after a sparse pax header is read; 1.0 would then
    # read the sparse map from the member's data.
    def _proc_gnusparse_00(self, next, pax_headers, buf):
        raise _sparse_error(_pax_member_name(next, pax_headers))

    def _proc_gnusparse_01(self, next, pax_headers):
        raise _sparse_error(_pax_member_name(next, pax_headers))

    def _proc_gnusparse_10(self, next, pax_headers, tarfile):
        raise _sparse_error(_pax_member_name(next, pax_headers))

    def _apply_pax_info(self, pax_headers, encoding, errors):
        # Every member returned passes here (local and global pax headers alike): any other
        # GNU.sparse.* keyword (realsize, name, numblocks ...) marks a sparse member too, and
        # tarfile would convert some of them with int() unguarded.
        if any(keyword.startswith(_SPARSE_PAX_PREFIX) for keyword in pax_headers):
            raise _sparse_error(_pax_member_name(self, pax_headers))
        super()._apply_pax_info(pax_headers, encoding, errors)
        if self.size < 0:
            raise ArchiveError(f"tar member {show_name(self.name)} has a negative size")


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
        return f"sparse member {show_name(name)} is not allowed; only regular files are allowed"
    elif member.type not in _REGULAR_TYPES:
        what = f"of unsupported type {member.type!r}"
    else:
        return None
    return f"archive member {show_name(name)} is {what}; only regular files are allowed"


def _not_listed(name: str) -> ArchiveError:
    return ArchiveError(f"archive member {show_name(name)} is not listed in {FILES_MEMBER}")


class Extractor:
    """Validates tar members one by one and extracts file contents into the staging folder.

    Payload 2.0 members must come in the exact order of SPEC §7, so files.json is known before
    any file arrives and sizes, hashes and membership are checked while streaming; a 3.0 payload
    (known from its metadata.json, the first member) is handed to ``PayloadV3``. Legacy members
    may come in any order; what cannot be checked on arrival is checked in ``finish``. A legacy
    file listed but absent from the archive fails ``finish`` unless ``allow_missing_content``.
    Every listing entry goes to ``sink`` as it is validated; the files listing is asked back
    from it. ``before_listing()`` is called before each listing member is parsed (progress).
    """

    def __init__(self, *, legacy: bool, staging_fd: int, limits: ArchiveLimits,
                 sink: RecordSink, allow_missing_content: bool = False,
                 before_listing: Callable[[], None] | None = None,
                 staging: str = STAGE_BRIEFLY):
        self.legacy = legacy
        self.upstream = LegacyListings() if legacy else None
        self.allow_missing_content = allow_missing_content
        self.before_listing = before_listing
        self.null_sha256_ids: list[str] = []  # legacy files whose sha256 was computed here
        self.version = VERSION_LEGACY if legacy else None  # 2.0 or 3.0 once metadata is read
        self.limits = limits
        self.sink = sink
        self.staging_fd = staging_fd
        self.staging = staging  # see write_staging_file
        self.member_count = 0
        self.seen: set[str] = set()  # member names (2.0 and 1.0; 3.0 checks order instead)
        self.metadata: dict | None = None
        self.counts = {FOLDERS_MEMBER: 0, DOCUMENTS_MEMBER: 0, FILES_MEMBER: 0}
        self.listed_bytes = 0
        self.files_listed = False  # files.json read
        self.early: dict[str, tuple[int, str]] = {}  # legacy: id -> (size, sha256) before files.json
        self.position = 0  # format 2: index of the next expected member
        self.v3: PayloadV3 | None = None

    # -- names and types

    def _safe_name(self, raw: str) -> str:
        """Reject names that could point outside the archive; normalise legacy './' prefixes."""
        if not raw:
            raise ArchiveError("archive member has an empty name")
        if raw.startswith("/"):
            raise ArchiveError(f"archive member {show_name(raw)} has an absolute name")
        parts = raw.split("/")
        if ".." in parts:
            raise ArchiveError(f"archive member {show_name(raw)} escapes the archive")
        if self.legacy:
            while parts and parts[0] == ".":
                parts.pop(0)
        return "/".join(parts)

    def _classify(self, name: str, raw: str) -> str | None:
        """Return the file id for ``files/<id>``, None for a listing; reject anything else."""
        if name in JSON_MEMBERS or (self.v3 is not None and parse_piece_name(name)):
            return None
        if name.startswith(FILES_PREFIX) and ID_PATTERN.fullmatch(name[len(FILES_PREFIX):]):
            return name[len(FILES_PREFIX):]
        raise ArchiveError(f"unexpected archive member {show_name(raw)}")

    def _expected_name(self) -> str | None:
        if self.position < len(JSON_MEMBERS):
            return JSON_MEMBERS[self.position]
        file_id = self.sink.listed_file_at(self.position - len(JSON_MEMBERS))
        return None if file_id is None else FILES_PREFIX + file_id

    def _check_position(self, name: str, file_id: str | None) -> None:
        """Format 2: the member must be exactly the next one SPEC §7 calls for."""
        expected = self._expected_name()
        if name == expected:
            self.position += 1
            return
        if file_id is not None and self.files_listed and self.sink.listed_file(file_id) is None:
            raise _not_listed(name)
        if expected is None:
            raise ArchiveError(f"archive member {show_name(name)} follows the last listed file")
        raise ArchiveError(
            f"archive member {show_name(name)} is out of order; expected {expected!r}"
        )

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
        if self.v3 is not None:
            if file_id is not None or parse_piece_name(name):
                self.v3.handle(tar, member, name)
                return
            raise ArchiveError(f"archive member {show_name(raw)} is out of order; expected "
                               f"{self.v3.expected()!r}")
        if name in self.seen:
            raise ArchiveError(f"duplicate archive member {show_name(raw)}")
        if not self.legacy:
            self._check_position(name, file_id)
        self.seen.add(name)
        if file_id is None:
            self._read_listing(tar, member, name)
        else:
            self._extract_file(tar, member, file_id)

    # -- JSON listings

    def _read_listing(self, tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> None:
        """Validate a JSON listing; the entry lists are parsed one entry at a time (1.0
        entries normalised on the way, see ``LegacyListings``) and go to the sink."""
        if self.before_listing is not None:
            self.before_listing()
        limit = self.limits.json_member_bytes
        if name == METADATA_MEMBER:
            limit = min(limit, self.limits.metadata_member_bytes)
        if member.size > limit:
            raise ArchiveLimitExceeded(
                f"archive member {name} is {member.size} bytes; the limit is {limit} bytes"
            )
        what = f"archive member {name}"
        source = tar.extractfile(member)
        if name == METADATA_MEMBER:
            data = source.read(member.size)
            if len(data) != member.size:
                raise ArchiveError(f"{what} is truncated")
            value = decode_json(data, what, self.limits.json_depth)
            self.metadata = parse_metadata(value, self.version)
            self.version = self.metadata["version"]
            if self.version == VERSION_V3:
                self.v3 = PayloadV3(self.metadata, self.sink, self.staging_fd, self.limits,
                                    staging=self.staging)
            return
        each = None if self.upstream is None else functools.partial(self.upstream.normalise,
                                                                      name)
        entries = JsonArray(source, member.size, name, what, self.limits.json_depth, each=each)
        kind, parse = _LISTING_PARSERS[name]
        for index, entry in enumerate(entries):
            record = parse(entry, index, self.legacy)
            self.sink.add(kind, record)
            self.counts[name] += 1
            if name == FILES_MEMBER:
                self.listed_bytes += record["size"] or 0
        if self.upstream is not None:
            self.upstream.finish(name)
        if name == FILES_MEMBER:
            self.files_listed = True
            for file_id in self.early:  # legacy: files that came before their listing
                self._verify_extracted(file_id, *self.early[file_id])
            self.early.clear()
            if not self.legacy:
                self._check_listings_early()

    def _check_counts(self) -> None:
        """Fail when metadata.json's counts disagree with the listings (a sign of tampering)."""
        for field, member in METADATA_COUNT_FIELDS.items():
            if field in self.metadata and self.metadata[field] != self.counts[member]:
                raise ArchiveError(
                    f"{METADATA_MEMBER} says {field} is {self.metadata[field]}, "
                    f"but {member} lists {self.counts[member]}"
                )
        total = self.metadata.get("total_file_bytes")
        if total is not None and total != self.listed_bytes:
            raise ArchiveError(
                f"{METADATA_MEMBER} says total_file_bytes is {total}, but {FILES_MEMBER} adds "
                f"up to {self.listed_bytes}"
            )

    def _check_listings_early(self) -> None:
        """Format 2: all listings are known before the first file; check the counts now."""
        self._check_counts()
        members = len(JSON_MEMBERS) + self.counts[FILES_MEMBER]
        if members > self.limits.member_count:
            raise ArchiveLimitExceeded(
                f"archive lists {members} members; the limit is {self.limits.member_count}"
            )
        if self.listed_bytes > self.limits.extracted_bytes:
            raise ArchiveLimitExceeded(
                f"archive lists {self.listed_bytes} bytes of files; the limit is "
                f"{self.limits.extracted_bytes} bytes"
            )

    # -- file contents

    def _extract_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, file_id: str) -> None:
        if self.files_listed:
            entry = self.sink.listed_file(file_id)
            if entry is None:
                raise _not_listed(member.name)
            check_listed_size(file_id, entry, member.size, FILES_MEMBER)
        size, sha256 = write_staging_file(tar, member, file_id, self.staging_fd,
                                          staging=self.staging)
        if self.files_listed:
            self._verify_extracted(file_id, size, sha256, entry)
        else:
            self.early[file_id] = (size, sha256)

    def _verify_extracted(self, file_id: str, size: int, sha256: str,
                          entry: dict | None = None) -> None:
        """Compare an extracted file with its files.json entry (known by now)."""
        entry = entry or self.sink.listed_file(file_id)
        if entry is None:
            raise _not_listed(FILES_PREFIX + file_id)
        check_listed_size(file_id, entry, size, FILES_MEMBER)
        if entry["sha256"] is None:  # legacy: nothing to check against, so it is computed
            self.null_sha256_ids.append(file_id)
        elif entry["sha256"] != sha256:
            raise ArchiveError(f"file {file_id}: sha256 mismatch")
        if self.legacy:
            if entry["size"] is None:
                self.listed_bytes += size
            self.sink.file_extracted(file_id, size, sha256)

    # -- end of archive

    def finish(self) -> BackupContents:
        """Run the checks that need the whole archive and return what was read."""
        if self.v3 is not None:
            counts = self.v3.finish()
            return BackupContents(format_version=self.version, metadata=self.metadata,
                                  counts=counts, total_file_bytes=self.v3.total_file_bytes)
        for name in JSON_MEMBERS:
            if name not in self.seen:
                raise ArchiveError(f"archive is missing member {name}")
        if not self.legacy:
            missing = self._expected_name()
            if missing is not None:
                raise ArchiveError(f"file {missing[len(FILES_PREFIX):]}: listed in "
                                   f"{FILES_MEMBER} but missing from the archive")
        counts = {kind: self.counts[name] for name, (kind, _) in _LISTING_PARSERS.items()}
        contents = BackupContents(format_version=self.version, metadata=self.metadata,
                                  counts=counts, total_file_bytes=self.listed_bytes)
        if self.legacy:
            self._legacy_files(contents, self.sink.files_without_content())
            contents.total_file_bytes = self.listed_bytes
            self._check_counts()
        return contents

    def _legacy_files(self, contents: BackupContents, absent: list[str]) -> None:
        """Record which legacy files are not served, refuse content missing without the
        option, and say in warnings what was changed."""
        inactive = self.upstream.inactive_file_ids
        missing = [file_id for file_id in absent if file_id not in inactive]
        if missing and not self.allow_missing_content:
            more = f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
            raise ArchiveError(
                f"file {missing[0]}: listed in {FILES_MEMBER} but missing from the archive"
                f"{more}; to restore everything else, with the revisions of missing files kept "
                "inactive, start the import with allow_missing_content")
        contents.inactive_file_ids = inactive | set(absent)
        contents.absent_file_ids = set(absent)
        warnings = list(self.upstream.warnings)
        warnings += itemised(
            [f"file {file_id}: sha256 was null in {FILES_MEMBER}; computed from the content, "
             "which therefore could not be verified" for file_id in self.null_sha256_ids],
            "... and {count} more files whose sha256 was null and was computed")
        never_uploaded = [file_id for file_id in absent if file_id in inactive]
        warnings += itemised(
            [f"file {file_id}: inactive upstream (its upload never happened) and not in the "
             "archive; its revisions are kept in the history but are never current"
             for file_id in never_uploaded],
            "... and {count} more inactive files without content")
        inactive_with_content = sorted(inactive - set(absent))
        warnings += itemised(
            [f"file {file_id}: inactive upstream; its content is restored but its revisions "
             "stay inactive and are never served, as upstream" for file_id in inactive_with_content],
            "... and {count} more inactive files")
        warnings += itemised(
            [f"file {file_id}: listed in {FILES_MEMBER} but missing from the archive; imported "
             "without content (allow_missing_content), its revisions are kept inactive"
             for file_id in missing],
            "... and {count} more files missing from the archive")
        contents.warnings = warnings
