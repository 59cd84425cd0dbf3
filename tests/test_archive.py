"""Backup archive format 2 and legacy 1.0: round trips and every way a hostile archive can fail.

Plain synchronous tests: the archive code is blocking and runs in worker threads in the server.
Hostile archives are built here with tarfile directly and sealed with the real SegmentWriter, so
each test reaches the check it is about past the encryption layer.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import itertools
import json
import random
import tarfile
import tempfile
from pathlib import Path

import pytest
import zstandard
from Crypto.Cipher import AES
from Crypto.Util.Padding import pad
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfms_trio.backup.format import (
    STAGE_BRIEFLY,
    STAGE_DURABLE,
    STAGE_HASH_ONLY,
    HashingWriter,
    KeyInfo,
    make_key_file,
    parse_key_file,
    write_backup_archive,
)
from cfms_trio.backup.format import segments as cs
from cfms_trio.backup.staging_index import StagingIndex
from cfms_trio.config import ArchiveLimits
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded
from backup_support import ReadBack, read_back, v3_metadata

KEY = bytes(range(32))
OTHER_KEY = bytes(reversed(range(32)))
V2_KEY = KeyInfo(format=2, key=KEY, algorithm="AES-256-GCM-STREAM")
LEGACY_KEY = KeyInfo(format=1, key=KEY, algorithm="AES-256-CBC")
CHUNK_LOG2 = 16  # smallest segments, so multi-segment archives stay small and fast
SEGMENT = 1 << CHUNK_LOG2
SEALED_SEGMENT = SEGMENT + cs.SEGMENT_TAG_BYTES
LIMITS = ArchiveLimits()
CREATED_AT = 1_700_000_000.25

_staging_numbers = itertools.count()


# ------------------------------------------------------------------------------------------
# Building data sets and archives


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_dataset() -> dict:
    """Nested folders, documents in a folder and in the root, revisions, access rules, and files
    that are empty, small, and several segments long."""
    blobs = {
        "empty": b"",
        "small": b"hello, backup",
        "big": random.Random(7).randbytes(3 * SEGMENT + 123),
    }
    rule = {
        "match": "all",
        "match_groups": [
            {
                "match": "any",
                "rights": {"match": "all", "require": ["read_docs"]},
                "groups": {"match": "any", "require": ["staff", "sysop"]},
            }
        ],
    }
    folders = [
        {"id": "fa", "name": "Top", "parent_id": None, "created_time": 1.0,
         "access_rules": [{"id": "r1", "access_type": "read", "rule_data": rule}]},
        {"id": "fb", "name": "Middle", "parent_id": "fa", "created_time": 2.0, "access_rules": []},
        {"id": "fc", "name": "Deep", "parent_id": "fb", "created_time": 3.0,
         "access_rules": [{"id": "r2", "access_type": "manage", "rule_data": {"match": "any"}}]},
    ]
    documents = [
        {"id": "d1", "title": "Report", "folder_id": "fc", "created_time": 4.0,
         "access_rules": [{"id": "r3", "access_type": "write", "rule_data": rule}],
         "revisions": [{"id": "v1", "file_id": "small", "created_time": 4.0},
                       {"id": "v2", "file_id": "big", "created_time": 5.0}]},
        {"id": "d2", "title": "Loose note", "folder_id": None, "created_time": 6.0,
         "access_rules": [], "revisions": [{"id": "v3", "file_id": "empty", "created_time": 6.0}]},
    ]
    files = [{"id": fid, "sha256": sha(data), "size": len(data), "created_time": 7.0}
             for fid, data in blobs.items()]
    dataset = {"folders": folders, "documents": documents, "files": files, "blobs": blobs}
    dataset["metadata"] = metadata_for(dataset)
    return dataset


def metadata_for(dataset: dict) -> dict:
    return {
        "format": "cfms-backup",
        "version": "2.0",
        "created_at": CREATED_AT,
        "backup_name": "nightly",
        "server_version": "0.1.0",
        "folders_count": len(dataset["folders"]),
        "documents_count": len(dataset["documents"]),
        "files_count": len(dataset["files"]),
        "total_file_bytes": sum(entry["size"] for entry in dataset["files"]),
    }


def listings_of_dataset(dataset: dict) -> dict:
    return {kind: dataset[kind] for kind in ("folders", "documents", "files")}


def write_archive(dataset: dict, compression: str = "none", key: bytes = KEY) -> bytes:
    """The dataset as this project's writer writes it today (payload 3.0)."""
    out = io.BytesIO()
    write_backup_archive(
        out, key, compression=compression,
        metadata=v3_metadata(listings_of_dataset(dataset)),
        listings=listings_of_dataset(dataset),
        open_file=lambda file_id: io.BytesIO(dataset["blobs"][file_id]), chunk_log2=CHUNK_LOG2,
    )
    return out.getvalue()


def read_archive(data: bytes, tmp_path: Path, key_info: KeyInfo = V2_KEY,
                 limits: ArchiveLimits = LIMITS, **kwargs) -> tuple[ReadBack, Path]:
    staging = tmp_path / f"staging{next(_staging_numbers)}"
    return read_back(io.BytesIO(data), key_info, staging, limits, **kwargs), staging


def json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def standard_members(dataset: dict) -> list[tuple[str, bytes]]:
    """The members of a well-formed archive of ``dataset``, in format 2 order, as (name, data)."""
    members = [
        ("metadata.json", json_bytes(dataset["metadata"])),
        ("folders.json", json_bytes(dataset["folders"])),
        ("documents.json", json_bytes(dataset["documents"])),
        ("files.json", json_bytes(dataset["files"])),
    ]
    members += [(f"files/{entry['id']}", dataset["blobs"].get(entry["id"], b""))
                for entry in dataset["files"]]
    return members


def build_tar(members, tar_format=tarfile.PAX_FORMAT) -> bytes:
    """A tar of (name, data) pairs or ready TarInfo objects (with data) for odd member types."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def seal(plaintext: bytes, compression: int = cs.COMPRESSION_NONE, key: bytes = KEY,
         chunk_log2: int = CHUNK_LOG2) -> bytes:
    out = io.BytesIO()
    writer = cs.SegmentWriter(out, key, compression=compression, chunk_log2=chunk_log2)
    writer.write(plaintext)
    writer.close()
    return out.getvalue()


def sealed_members(members, compression: str = "none") -> bytes:
    plaintext = build_tar(members)
    if compression == "zstd":
        return seal(zstandard.ZstdCompressor().compress(plaintext), cs.COMPRESSION_ZSTD)
    return seal(plaintext)


def sealed_dataset(dataset: dict) -> bytes:
    return sealed_members(standard_members(dataset))


def legacy_encrypt(plaintext: bytes, key: bytes = KEY, padded: bool = True) -> bytes:
    iv = bytes(range(100, 116))
    body = pad(plaintext, 16) if padded else plaintext
    return iv + AES.new(key, AES.MODE_CBC, iv=iv).encrypt(body)


def special_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def expect_error(data: bytes, tmp_path: Path, match: str, *, error=ArchiveError,
                 key_info: KeyInfo = V2_KEY, limits: ArchiveLimits = LIMITS):
    with pytest.raises(error, match=match) as caught:
        read_archive(data, tmp_path, key_info, limits)
    return caught.value


class RecordingReader(io.RawIOBase):
    """A source that remembers how many bytes were asked of it."""

    def __init__(self, data: bytes):
        self._inner = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self._inner.read(len(buffer))
        buffer[:len(data)] = data
        self.bytes_read += len(data)
        return len(data)


@functools.cache
def standard_archive() -> bytes:
    """A payload 2.0 archive of the standard dataset (as the writer made them before 3.0)."""
    return sealed_dataset(make_dataset())


def segments_of(archive: bytes) -> tuple[bytes, list[bytes]]:
    header, body = archive[:cs.HEADER_BYTES], archive[cs.HEADER_BYTES:]
    return header, [body[i:i + SEALED_SEGMENT] for i in range(0, len(body), SEALED_SEGMENT)]


# ------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip_preserves_listings_and_contents(tmp_path, compression):
    dataset = make_dataset()
    out = io.BytesIO()
    hashing = HashingWriter(out)
    write_backup_archive(
        hashing, KEY, compression=compression,
        metadata=v3_metadata(listings_of_dataset(dataset)),
        listings=listings_of_dataset(dataset),
        open_file=lambda file_id: io.BytesIO(dataset["blobs"][file_id]), chunk_log2=CHUNK_LOG2,
    )
    archive = out.getvalue()
    assert hashing.size == len(archive) and hashing.hexdigest() == sha(archive)
    assert cs.parse_header(archive).compression == (compression == "zstd")
    reports = []
    contents, staging = read_archive(
        archive, tmp_path, progress=lambda done, total: reports.append((done, total)),
        archive_size=len(archive),
    )
    assert contents.format_version == "3.0"
    assert contents.folders == dataset["folders"]
    assert contents.documents == dataset["documents"]
    assert contents.files == dataset["files"]
    assert contents.metadata == v3_metadata(listings_of_dataset(dataset))
    for file_id, data in dataset["blobs"].items():
        assert (staging / file_id).read_bytes() == data
    assert sorted(p.name for p in staging.iterdir()) == sorted(dataset["blobs"])
    assert reports[-1] == (len(archive), len(archive))
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)


def test_round_trip_of_an_empty_store(tmp_path):
    dataset = {"folders": [], "documents": [], "files": [], "blobs": {}}
    dataset["metadata"] = metadata_for(dataset)
    contents, staging = read_archive(write_archive(dataset, "zstd"), tmp_path)
    assert (contents.folders, contents.documents, contents.files) == ([], [], [])
    assert list(staging.iterdir()) == []


def test_big_file_spans_several_segments():
    archive = standard_archive()
    assert len(archive) > cs.HEADER_BYTES + 3 * SEALED_SEGMENT


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT])
def test_segment_layer_round_trip_and_layout(size):
    payload = random.Random(size).randbytes(size)
    out = io.BytesIO()
    writer = cs.SegmentWriter(out, KEY, chunk_log2=CHUNK_LOG2)
    for start in range(0, size, 5000):  # uneven writes
        writer.write(payload[start:start + 5000])
    writer.close()
    segment_count = max(1, -(-size // SEGMENT))
    assert len(out.getvalue()) == cs.HEADER_BYTES + size + segment_count * cs.SEGMENT_TAG_BYTES
    reader = cs.SegmentReader(io.BytesIO(out.getvalue()), KEY)
    assert reader.read() == payload
    assert reader.finished


def test_segment_reader_accepts_an_empty_final_segment_after_a_full_one():
    """Another writer may end a segment-aligned stream with an empty final segment."""
    header = cs.build_header(KEY, chunk_log2=CHUNK_LOG2)
    header_bytes = header.to_bytes()
    payload_key, _ = cs.derive_subkeys(KEY, header.salt)
    out = header_bytes
    for index, (plain, last) in enumerate([(b"a" * SEGMENT, False), (b"", True)]):
        cipher = AES.new(payload_key, AES.MODE_GCM,
                         nonce=cs.segment_nonce(header.nonce_prefix, index, last))
        cipher.update(header_bytes)
        ciphertext, tag = cipher.encrypt_and_digest(plain)
        out += ciphertext + tag
    assert cs.SegmentReader(io.BytesIO(out), KEY).read() == b"a" * SEGMENT


# ------------------------------------------------------------------------------------------
# Header and segment failures


def test_wrong_key_fails_before_any_payload(tmp_path):
    archive = standard_archive()
    source = RecordingReader(archive)
    with pytest.raises(ArchiveError, match="wrong key"):
        cs.SegmentReader(source, OTHER_KEY)
    assert source.bytes_read == cs.HEADER_BYTES
    wrong = KeyInfo(format=2, key=OTHER_KEY, algorithm="AES-256-GCM-STREAM")
    expect_error(archive, tmp_path, "wrong key", key_info=wrong)


def test_tampered_segment_is_rejected(tmp_path):
    archive = bytearray(standard_archive())
    archive[cs.HEADER_BYTES + SEALED_SEGMENT + 100] ^= 0x01
    expect_error(bytes(archive), tmp_path, "segment 1 failed authentication")


def test_swapped_segments_are_rejected(tmp_path):
    header, segments = segments_of(standard_archive())
    segments[0], segments[1] = segments[1], segments[0]
    expect_error(header + b"".join(segments), tmp_path, "segment 0 failed authentication")


def test_segment_replayed_from_another_archive_is_rejected(tmp_path):
    """Same key, different header: the header is associated data of every segment."""
    header_a, segments_a = segments_of(standard_archive())
    header_b, segments_b = segments_of(write_archive(make_dataset()))
    spliced = header_a + segments_a[0] + b"".join(segments_b[1:])
    expect_error(spliced, tmp_path, "segment 1 failed authentication")


def test_truncation_at_segment_boundary_is_rejected(tmp_path):
    archive = standard_archive()
    cut = archive[:cs.HEADER_BYTES + 2 * SEALED_SEGMENT]
    expect_error(cut, tmp_path, "final segment is missing")
    expect_error(archive[:cs.HEADER_BYTES], tmp_path, "final segment is missing")


def test_truncation_mid_segment_is_rejected(tmp_path):
    archive = standard_archive()
    expect_error(archive[:cs.HEADER_BYTES + SEALED_SEGMENT + 1000], tmp_path, "truncated")
    expect_error(archive[:cs.HEADER_BYTES + 5], tmp_path, "truncated")
    expect_error(archive[:40], tmp_path, "too short")


def test_trailing_bytes_are_rejected(tmp_path):
    expect_error(standard_archive() + b"\0", tmp_path, "failed authentication")
    out = io.BytesIO()
    writer = cs.SegmentWriter(out, KEY, chunk_log2=CHUNK_LOG2)
    writer.write(b"x" * (2 * SEGMENT))  # the final segment is a full one
    writer.close()
    with pytest.raises(ArchiveError, match="after the final segment"):
        cs.SegmentReader(io.BytesIO(out.getvalue() + b"extra"), KEY).read()


@pytest.mark.parametrize(
    "offset, value, match",
    [
        (0, ord("X"), "bad magic"),
        (8, 7, "unknown compression"),
        (9, 15, "chunk_log2 15"),
        (9, 25, "chunk_log2 25"),
        (10, 1, "reserved"),
        (11, 1, "reserved"),
        (8, 1, "wrong key"),  # a valid but different compression byte breaks key_check
        (40, 0xFF, "wrong key"),  # salt
        (60, 0xFF, "wrong key"),  # key_check
    ],
)
def test_bad_header_fields_are_rejected(tmp_path, offset, value, match):
    archive = bytearray(standard_archive())
    archive[offset] = value if archive[offset] != value else value ^ 0x02
    expect_error(bytes(archive), tmp_path, match)


def test_legacy_key_on_format_2_archive_is_explained(tmp_path):
    expect_error(standard_archive(), tmp_path, "format 2", key_info=LEGACY_KEY)


# ------------------------------------------------------------------------------------------
# Limits


def test_archive_size_limit(tmp_path):
    archive = standard_archive()
    small = ArchiveLimits(archive_bytes=1000)
    expect_error(archive, tmp_path, "archive is larger", error=ArchiveLimitExceeded, limits=small)
    with pytest.raises(ArchiveLimitExceeded, match="limit is 1000"):
        read_archive(archive, tmp_path, limits=small, archive_size=len(archive))


class ZeroReader(io.RawIOBase):
    def __init__(self, size: int):
        self._left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        count = min(len(buffer), self._left)
        buffer[:count] = bytes(count)
        self._left -= count
        return count


def test_zstd_bomb_stops_at_extracted_bytes_limit(tmp_path):
    bomb_bytes = 32 * 1024 * 1024
    out = io.BytesIO()
    sealer = cs.SegmentWriter(out, KEY, compression=cs.COMPRESSION_ZSTD, chunk_log2=CHUNK_LOG2)
    compressor = zstandard.ZstdCompressor().stream_writer(sealer, closefd=False)
    with tarfile.open(fileobj=compressor, mode="w|") as tar:
        info = tarfile.TarInfo("metadata.json")
        info.size = bomb_bytes
        tar.addfile(info, ZeroReader(bomb_bytes))
    compressor.close()
    sealer.close()
    assert len(out.getvalue()) < bomb_bytes // 100
    # metadata.json's own bound would stop it first; this test is about the extracted bytes.
    limits = ArchiveLimits(extracted_bytes=1024 * 1024, metadata_member_bytes=bomb_bytes)
    expect_error(out.getvalue(), tmp_path, "expands to more than", error=ArchiveLimitExceeded,
                 limits=limits)


def test_zstd_window_over_limit(tmp_path):
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=24)
    buf = io.BytesIO()
    writer = zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False)
    writer.write(build_tar(standard_members(make_dataset())))
    writer.close()
    archive = seal(buf.getvalue(), cs.COMPRESSION_ZSTD)
    limits = ArchiveLimits(zstd_window_bytes=1024 * 1024)
    expect_error(archive, tmp_path, "decoding window", error=ArchiveLimitExceeded, limits=limits)


def test_concatenated_zstd_frames_are_accepted(tmp_path):
    plaintext = build_tar(standard_members(make_dataset()))
    half = len(plaintext) // 2
    compressor = zstandard.ZstdCompressor()
    payload = compressor.compress(plaintext[:half]) + compressor.compress(plaintext[half:])
    contents, _ = read_archive(seal(payload, cs.COMPRESSION_ZSTD), tmp_path)
    assert len(contents.files) == 3


def test_member_count_limit(tmp_path):
    limits = ArchiveLimits(member_count=5)
    expect_error(standard_archive(), tmp_path, "members", error=ArchiveLimitExceeded, limits=limits)
    legacy = legacy_encrypt(build_tar(standard_members(legacy_dataset())))
    expect_error(legacy, tmp_path, "more than the limit of 5 members", error=ArchiveLimitExceeded,
                 key_info=LEGACY_KEY, limits=limits)


def test_extracted_bytes_limit(tmp_path):
    limits = ArchiveLimits(extracted_bytes=100_000)
    expect_error(standard_archive(), tmp_path, "limit is 100000", error=ArchiveLimitExceeded,
                 limits=limits)
    legacy = legacy_encrypt(build_tar(standard_members(legacy_dataset())))
    expect_error(legacy, tmp_path, "expands to more than", error=ArchiveLimitExceeded,
                 key_info=LEGACY_KEY, limits=limits)


def test_json_member_too_big(tmp_path):
    limits = ArchiveLimits(json_member_bytes=320)
    expect_error(standard_archive(), tmp_path, "folders.json is .* bytes",
                 error=ArchiveLimitExceeded, limits=limits)


@pytest.mark.parametrize("depth", [70, 100_000])
def test_json_too_deep(tmp_path, depth):
    dataset = make_dataset()
    members = standard_members(dataset)
    deep = "[" * depth + "]" * depth
    folders = members[1][1].decode()
    assert '"match": "any"}' in folders
    folders = folders.replace('"match": "any"}', '"match": "any", "x": ' + deep + "}")
    members[1] = ("folders.json", folders.encode())
    expect_error(sealed_members(members), tmp_path, "nests deeper", error=ArchiveLimitExceeded)


def test_oversized_pax_header_is_refused(tmp_path):
    info = tarfile.TarInfo("metadata.json")
    info.pax_headers = {"comment": "x" * 20_000}
    members = standard_members(make_dataset())
    info.size = len(members[0][1])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(members[0][1]))
    expect_error(seal(buf.getvalue()), tmp_path, "extended header", error=ArchiveLimitExceeded)


# ------------------------------------------------------------------------------------------
# Hostile members


@pytest.mark.parametrize(
    "member, match",
    [
        (special_member("files/small", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (special_member("files/small", tarfile.LNKTYPE, "metadata.json"), "hard link"),
        (special_member("files/small", tarfile.FIFOTYPE), "FIFO"),
        (special_member("files/small", tarfile.CHRTYPE), "device"),
        (special_member("files/small", tarfile.BLKTYPE), "device"),
        (special_member("files", tarfile.DIRTYPE), "directory"),
    ],
    ids=["symlink", "hardlink", "fifo", "chardev", "blockdev", "directory"],
)
def test_non_regular_members_are_rejected(tmp_path, member, match):
    members = [member] + standard_members(make_dataset())
    expect_error(sealed_members(members), tmp_path, match)


@pytest.mark.parametrize(
    "name, match",
    [
        ("/etc/passwd", "absolute name"),
        ("../x", "'../x' escapes the archive"),
        ("files/../../x", "escapes the archive"),
        ("./metadata.json", "unexpected archive member"),
        ("notes.txt", "unexpected archive member"),
        ("files/bad.id", "unexpected archive member"),
        ("files/" + "a" * 65, "unexpected archive member"),
    ],
)
def test_bad_member_names_are_rejected(tmp_path, name, match):
    members = [(name, b"{}")] + standard_members(make_dataset())
    expect_error(sealed_members(members), tmp_path, match)


def test_duplicate_members_are_rejected(tmp_path):
    members = standard_members(make_dataset())
    expect_error(sealed_members(members[:1] + members), tmp_path, "duplicate archive member")
    expect_error(sealed_members(members + members[-1:]), tmp_path, "duplicate archive member")


def test_unlisted_file_is_rejected(tmp_path):
    members = standard_members(make_dataset()) + [("files/stranger", b"boo")]
    expect_error(sealed_members(members), tmp_path, "'files/stranger' is not listed in files.json")


def test_missing_file_is_rejected(tmp_path):
    members = standard_members(make_dataset())[:-1]
    expect_error(sealed_members(members), tmp_path, "file big: listed in files.json but missing")


def test_missing_listing_is_rejected(tmp_path):
    members = standard_members(make_dataset())[:2]
    expect_error(sealed_members(members), tmp_path, "missing member documents.json")


def test_sha256_mismatch_is_rejected(tmp_path):
    members = standard_members(make_dataset())
    members[5] = ("files/small", b"HELLO, backup")
    expect_error(sealed_members(members), tmp_path, "file small: sha256 mismatch")


def test_size_mismatch_is_rejected_before_extraction(tmp_path):
    members = standard_members(make_dataset())
    members[5] = ("files/small", b"hello, backup!")
    expect_error(sealed_members(members), tmp_path, "file small: size mismatch")


@pytest.mark.parametrize(
    "order, match",
    [
        ([1, 0, 2, 3, 4, 5, 6], "'folders.json' is out of order; expected 'metadata.json'"),
        ([0, 1, 2, 4, 3, 5, 6], "'files/empty' is out of order; expected 'files.json'"),
        ([0, 1, 2, 3, 4, 6, 5], "'files/big' is out of order; expected 'files/small'"),
    ],
)
def test_wrong_member_order_is_rejected(tmp_path, order, match):
    members = standard_members(make_dataset())
    expect_error(sealed_members([members[i] for i in order]), tmp_path, match)


def test_payload_that_is_not_a_tar_is_rejected(tmp_path):
    expect_error(seal(b"not a tar at all" * 100), tmp_path, "corrupt archive")


def test_tar_without_end_marker_is_rejected(tmp_path):
    plaintext = build_tar(standard_members(make_dataset()))
    # Cut the end-of-archive blocks and the record padding, keeping the last member whole.
    end = plaintext.rstrip(b"\0")
    end += b"\0" * (-len(end) % 512)
    expect_error(seal(end), tmp_path, "end-of-archive marker")


def test_corrupt_header_after_first_member_is_not_a_silent_end(tmp_path):
    plaintext = bytearray(build_tar(standard_members(make_dataset())))
    second_header = 512 + 512  # metadata.json header + one data block (it is under 512 bytes)
    plaintext[second_header + 148:second_header + 156] = b"0000000\0"  # wrong checksum
    expect_error(seal(bytes(plaintext)), tmp_path, "invalid tar header")


def test_progress_callback_errors_pass_through_unchanged(tmp_path):
    class Cancelled(Exception):
        pass

    def progress(done, total):
        raise Cancelled()

    with pytest.raises(Cancelled):
        read_archive(standard_archive(), tmp_path, progress=progress)


def test_pre_planted_link_in_staging_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "small").symlink_to(outside)
    with pytest.raises(ArchiveError, match="already present"):
        read_back(io.BytesIO(standard_archive()), V2_KEY, staging, LIMITS)
    assert outside.read_bytes() == b"precious"


# ------------------------------------------------------------------------------------------
# Listing validation


def mutated(mutate) -> bytes:
    """Seal a well-formed archive of a data set changed by ``mutate(dataset)``."""
    dataset = make_dataset()
    mutate(dataset)
    return sealed_dataset(dataset)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["folders"].append(dict(d["folders"][0])), "duplicate folder id 'fa'"),
        (lambda d: d["documents"].append(copy.deepcopy(d["documents"][1])),
         "duplicate document id 'd2'"),
        (lambda d: d["files"].append(dict(d["files"][0])), "duplicate file id 'empty'"),
        (lambda d: d["documents"][1]["revisions"].append(dict(d["documents"][0]["revisions"][0])),
         "duplicate revision id 'v1'"),
        (lambda d: d["folders"][1]["access_rules"].append(
            dict(d["documents"][0]["access_rules"][0])), "duplicate access rule id 'r3'"),
    ],
    ids=["folders", "documents", "files", "revisions", "access-rules"],
)
def test_duplicate_ids_are_rejected(tmp_path, mutate, match):
    def mutate_and_recount(dataset):
        mutate(dataset)
        dataset["metadata"] = metadata_for(dataset)
    expect_error(mutated(mutate_and_recount), tmp_path, match)


def test_folder_cycle_is_rejected(tmp_path):
    def make_cycle(dataset):
        dataset["folders"][0]["parent_id"] = "fc"
    expect_error(mutated(make_cycle), tmp_path, "cycle in the folder hierarchy")


def test_folder_that_is_its_own_parent_is_rejected(tmp_path):
    def self_parent(dataset):
        dataset["folders"][0]["parent_id"] = "fa"
    expect_error(mutated(self_parent), tmp_path, "cycle")


def test_orphan_folder_is_rejected(tmp_path):
    def orphan(dataset):
        dataset["folders"][2]["parent_id"] = "nowhere"
    expect_error(mutated(orphan), tmp_path, "folder 'fc': parent folder 'nowhere' is not in")


def test_document_in_unknown_folder_is_rejected(tmp_path):
    def lost(dataset):
        dataset["documents"][0]["folder_id"] = "nowhere"
    expect_error(mutated(lost), tmp_path, "document 'd1': folder 'nowhere' is not in")


def test_revision_pointing_at_unknown_file_is_rejected(tmp_path):
    def dangling(dataset):
        dataset["documents"][0]["revisions"][1]["file_id"] = "ghost"
    expect_error(mutated(dangling), tmp_path, "revision 'v2' refers to file 'ghost'")


@pytest.mark.parametrize("field", ["documents_count", "folders_count", "files_count",
                                   "total_file_bytes"])
def test_lying_counts_are_rejected(tmp_path, field):
    def lie(dataset):
        dataset["metadata"][field] += 1
    expect_error(mutated(lie), tmp_path, f"says {field} is")


@pytest.mark.parametrize("version", ["4.0", "1.0", 2, None])
def test_unknown_metadata_version_is_rejected(tmp_path, version):
    def set_version(dataset):
        dataset["metadata"]["version"] = version
    expect_error(mutated(set_version), tmp_path, "version")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["folders"][0].update(id="a/b"), "id must be an id"),
        (lambda d: d["folders"][0].update(id=""), "id must be an id"),
        (lambda d: d["files"][0].update(id="x" * 65), "id must be an id"),
        (lambda d: d["folders"][0]["access_rules"][0].update(access_type="delete"),
         "access_type must be one of"),
        (lambda d: d["folders"][0]["access_rules"][0].update(rule_data=["x"]),
         "rule_data must be a JSON object"),
        (lambda d: d["folders"][0]["access_rules"][0]["rule_data"].update(match="most"),
         "match must be"),
        (lambda d: d["documents"][0].update(created_time="yesterday"), "created_time must be"),
        (lambda d: d["documents"][0].pop("title"), "missing field 'title'"),
        (lambda d: d["documents"][0].update(revisions={}), "revisions must be a JSON array"),
        (lambda d: d["files"][0].update(size=-1), "size must be a non-negative integer"),
        (lambda d: d["files"][0].update(size=True), "size must be a non-negative integer"),
        (lambda d: d["files"][0].pop("size"), "missing field 'size'"),
        (lambda d: d["files"][0].update(sha256="xyz"), "sha256 must be 64 hex digits"),
        (lambda d: d["files"][0].update(sha256=None), "sha256 must be 64 hex digits"),
        # Integer ids are what the upstream's 1.0 archives hold; in 2.0 they are refused,
        # saying which value and where.
        (lambda d: d["documents"][0]["revisions"][0].update(id=1),
         "documents.json: revision id 1 of document 'd1' is an integer; ids in a format 2.0 "
         "archive are strings"),
        (lambda d: d["folders"][2]["access_rules"][0].update(id=7),
         "folders.json: access rule id 7 of folder 'fc' is an integer"),
        (lambda d: d["metadata"].update(format="tarball"), "format must be"),
        (lambda d: d["metadata"].pop("backup_name"), "missing field 'backup_name'"),
        (lambda d: d.update(folders={"fa": {}}), "folders.json must be a JSON array"),
    ],
)
def test_schema_violations_are_rejected(tmp_path, mutate, match):
    expect_error(mutated(mutate), tmp_path, match)


def test_duplicate_json_keys_are_rejected(tmp_path):
    members = standard_members(make_dataset())
    members[0] = ("metadata.json", members[0][1].replace(b"{", b'{"version": "2.0", ', 1))
    expect_error(sealed_members(members), tmp_path, "duplicate key")


# ------------------------------------------------------------------------------------------
# Writer


def test_writer_refuses_a_file_that_changed_size_or_content(tmp_path):
    dataset = make_dataset()
    for blob, match in [(b"hello", "shorter"), (b"hello, backup and more", "longer"),
                        (b"HELLO, BACKUP", "sha256")]:
        out = io.BytesIO()
        blobs = dict(dataset["blobs"], small=blob)
        with pytest.raises(ValueError, match=match):
            write_backup_archive(
                out, KEY, compression="zstd",
                metadata=v3_metadata(listings_of_dataset(dataset)),
                listings=listings_of_dataset(dataset),
                open_file=lambda fid: io.BytesIO(blobs[fid]), chunk_log2=CHUNK_LOG2,
            )
        # The aborted output has no final segment, so it can never pass for a whole backup.
        expect_error(out.getvalue(), tmp_path, "ArchiveError|truncated|final segment|corrupt")


def test_writer_refuses_invalid_data():
    dataset = make_dataset()
    dataset["documents"][0]["folder_id"] = "no/such id"
    with pytest.raises(ValueError, match="folder_id must be an id"):
        write_archive(dataset)
    dataset = make_dataset()
    dataset["files"].pop()
    with pytest.raises(ValueError, match="sum of the files' sizes|counts"):
        out = io.BytesIO()
        write_backup_archive(out, KEY, compression="none",
                             metadata=v3_metadata(listings_of_dataset(make_dataset())),
                             listings=listings_of_dataset(dataset),
                             open_file=lambda fid: io.BytesIO(dataset["blobs"][fid]))
    with pytest.raises(ValueError, match="compression"):
        write_backup_archive(io.BytesIO(), KEY, compression="gzip", metadata={}, listings={},
                             open_file=io.BytesIO)


# ------------------------------------------------------------------------------------------
# Legacy 1.0


def legacy_dataset() -> dict:
    dataset = make_dataset()
    dataset["metadata"] = {"version": "1.0", "backup_name": "old", "created_at": 1000.0}
    for entry in dataset["files"]:
        entry["path"] = f"/srv/cfms/content/files/{entry['id']}"
    del dataset["files"][2]["size"]
    return dataset


def legacy_archive(dataset: dict) -> bytes:
    """Files first, listings after, './' prefixes and directory entries, like an old export."""
    members = [special_member("./", tarfile.DIRTYPE), special_member("./files", tarfile.DIRTYPE)]
    members += [(f"./files/{fid}", data) for fid, data in reversed(dataset["blobs"].items())]
    members += [
        ("./files.json", json_bytes(dataset["files"])),
        ("./documents.json", json_bytes(dataset["documents"])),
        ("metadata.json", json_bytes(dataset["metadata"])),
        ("./folders.json", json_bytes(dataset["folders"])),
    ]
    return legacy_encrypt(build_tar(members, tarfile.GNU_FORMAT))


def test_legacy_archive_is_read_and_normalised(tmp_path):
    dataset = legacy_dataset()
    contents, staging = read_archive(legacy_archive(dataset), tmp_path, LEGACY_KEY)
    assert contents.format_version == "1.0"
    assert contents.metadata["backup_name"] == "old"
    expected_files = make_dataset()["files"]
    assert contents.files == expected_files  # path dropped, missing size filled in
    assert contents.folders == dataset["folders"]
    assert contents.documents == dataset["documents"]
    for file_id, data in dataset["blobs"].items():
        assert (staging / file_id).read_bytes() == data


def test_legacy_upstream_habits_are_normalised_and_reported(tmp_path):
    """What the upstream CFMS server writes into 1.0 listings: integer revision and rule ids
    (the same integer in a folder rule and a document rule), a null sha256, an inactive file
    whose upload never happened (no content in the archive)."""
    dataset = legacy_dataset()
    dataset["folders"][0]["access_rules"][0]["id"] = 1
    dataset["documents"][0]["access_rules"][0]["id"] = 1
    for number, revision in enumerate(dataset["documents"][0]["revisions"], start=1):
        revision["id"] = number
    dataset["files"][1]["sha256"] = None  # "small"
    dataset["files"].append({"id": "never", "sha256": None, "path": "/srv/x", "active": False,
                             "created_time": 8.0})
    for entry in dataset["files"][:3]:
        entry["active"] = True
    dataset["documents"][1]["revisions"].append(
        {"id": 3, "file_id": "never", "created_time": 9.0})
    contents, staging = read_archive(legacy_archive(dataset), tmp_path, LEGACY_KEY)
    revision_ids = [r["id"] for d in contents.documents for r in d["revisions"]]
    assert len(set(revision_ids)) == 4 and all(isinstance(i, str) for i in revision_ids)
    assert "1" not in revision_ids
    rule_ids = [contents.folders[0]["access_rules"][0]["id"],
                contents.documents[0]["access_rules"][0]["id"]]
    assert rule_ids[0] != rule_ids[1] and "1" not in rule_ids
    files = {f["id"]: f for f in contents.files}
    assert files["small"]["sha256"] == sha(b"hello, backup")
    assert files["never"]["sha256"] is None and files["never"]["size"] is None
    assert contents.inactive_file_ids == contents.absent_file_ids == {"never"}
    assert not (staging / "never").exists()
    text = "\n".join(contents.warnings)
    assert "3 revision ids were integers" in text
    assert "folders.json: 1 access rule id was an integer" in text
    assert "file small: sha256 was null" in text
    assert "file never: inactive upstream" in text


def test_legacy_inactive_flag_must_be_a_boolean(tmp_path):
    dataset = legacy_dataset()
    dataset["files"][0]["active"] = "yes"
    expect_error(legacy_archive(dataset), tmp_path, "files.json: entry 0: active must be true "
                 "or false", key_info=LEGACY_KEY)


def test_legacy_missing_content_fails_unless_allowed(tmp_path):
    dataset = legacy_dataset()
    del dataset["blobs"]["small"]
    expect_error(legacy_archive(dataset), tmp_path,
                 "file small: listed in files.json but missing from the archive; .* "
                 "allow_missing_content", key_info=LEGACY_KEY)
    contents, _ = read_archive(legacy_archive(dataset), tmp_path, LEGACY_KEY,
                               allow_missing_content=True)
    assert contents.inactive_file_ids == contents.absent_file_ids == {"small"}
    assert any("file small: listed in files.json but missing" in w for w in contents.warnings)


def test_legacy_wrong_key_is_rejected(tmp_path):
    archive = legacy_archive(legacy_dataset())
    wrong = KeyInfo(format=1, key=OTHER_KEY, algorithm="AES-256-CBC")
    expect_error(archive, tmp_path, "wrong key or corrupt archive", key_info=wrong)


def test_legacy_bad_padding_is_rejected(tmp_path):
    plaintext = build_tar(standard_members(legacy_dataset()))
    assert len(plaintext) % 16 == 0
    archive = legacy_encrypt(plaintext + bytes(16), padded=False)  # pad byte 0 is invalid
    expect_error(archive, tmp_path, "wrong key or corrupt archive \\(bad padding\\)",
                 key_info=LEGACY_KEY)


def test_legacy_truncated_archive_is_rejected(tmp_path):
    archive = legacy_archive(legacy_dataset())
    expect_error(archive[:-5], tmp_path, "wrong key or corrupt archive", key_info=LEGACY_KEY)
    expect_error(archive[:10], tmp_path, "too short", key_info=LEGACY_KEY)


def test_legacy_file_is_checked_against_a_later_listing(tmp_path):
    dataset = legacy_dataset()
    dataset["blobs"]["small"] = b"tampered with"
    expect_error(legacy_archive(dataset), tmp_path, "file small: sha256 mismatch",
                 key_info=LEGACY_KEY)


def test_legacy_unlisted_and_escaping_members_are_rejected(tmp_path):
    dataset = legacy_dataset()
    dataset["blobs"]["stranger"] = b"boo"
    expect_error(legacy_archive(dataset), tmp_path, "not listed in files.json", key_info=LEGACY_KEY)
    evil = legacy_encrypt(build_tar([("./../../etc/cron.d/x", b"boo")]))
    expect_error(evil, tmp_path, "escapes the archive", key_info=LEGACY_KEY)
    link = legacy_encrypt(build_tar([special_member("./files/x", tarfile.SYMTYPE, "/etc")]))
    expect_error(link, tmp_path, "symbolic link", key_info=LEGACY_KEY)


def test_legacy_version_mismatch_is_rejected(tmp_path):
    dataset = legacy_dataset()
    dataset["metadata"]["version"] = "2.0"
    expect_error(legacy_archive(dataset), tmp_path, "archive is format 1.0", key_info=LEGACY_KEY)


# ------------------------------------------------------------------------------------------
# Key files


def test_key_file_round_trip():
    data = make_key_file(KEY, "nightly", CREATED_AT, "AB" * 32)
    info = parse_key_file(data, LIMITS)
    assert info == KeyInfo(format=2, key=KEY, algorithm="AES-256-GCM-STREAM",
                           backup_name="nightly", created_at=CREATED_AT,
                           archive_sha256="ab" * 32)
    assert KEY.hex() not in repr(info)
    legacy = json.dumps({"key": KEY.hex(), "algorithm": "AES-256-CBC", "created_at": 5,
                         "backup_name": "old"}).encode()
    assert parse_key_file(legacy, LIMITS) == KeyInfo(
        format=1, key=KEY, algorithm="AES-256-CBC", backup_name="old", created_at=5.0)


def key_doc(**changes) -> bytes:
    document = {"format": 2, "algorithm": "AES-256-GCM-STREAM", "key": KEY.hex(),
                "backup_name": "b", "created_at": 1.0, "archive_sha256": None}
    document.update(changes)
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{not json", "key file is not valid JSON"),
        (b"[" * 10_000, "key file is not valid JSON"),
        (b'{"key": NaN}', "key file is not valid JSON"),
        (b'{"algorithm": "AES-256-CBC", "algorithm": "AES-256-GCM-STREAM"}',
         "key file is not valid JSON: duplicate key 'algorithm'"),
        (b"[]", "must be a JSON object"),
        (key_doc(algorithm=...), "no 'algorithm'"),
        (key_doc(algorithm="ROT13"), "unsupported key algorithm 'ROT13'"),
        (key_doc(format=...), "must have \"format\": 2"),
        (key_doc(format=3), "must have \"format\": 2"),
        (key_doc(format=True), "must have \"format\": 2"),
        (key_doc(algorithm="AES-256-CBC"), "unexpected format field"),
        (key_doc(key=...), "no 'key' field"),
        (key_doc(key=KEY.hex()[:-2]), "key must be 32 bytes \\(64 hex digits\\)"),
        (key_doc(key="zz" * 32), "key must be 32 bytes"),
        (key_doc(key=list(KEY)), "key must be 32 bytes"),
        (key_doc(archive_sha256="abc"), "archive_sha256"),
        (key_doc(created_at="today"), "created_at"),
        (key_doc(backup_name=7), "backup_name"),
    ],
)
def test_key_file_errors(data, match):
    with pytest.raises(ArchiveError, match=match):
        parse_key_file(data, LIMITS)


def test_key_file_saved_with_a_byte_order_mark_is_accepted():
    key_info = parse_key_file(b"\xef\xbb\xbf" + key_doc(), LIMITS)
    assert (key_info.format, key_info.key) == (2, KEY)


def test_key_file_size_limit():
    with pytest.raises(ArchiveLimitExceeded, match="limit is 100 bytes"):
        parse_key_file(key_doc(backup_name="x" * 200), ArchiveLimits(key_file_bytes=100))


# ------------------------------------------------------------------------------------------
# Any single bit flip is caught


@functools.cache
def tiny_archive() -> bytes:
    dataset = {"folders": [], "documents": [], "files": [], "blobs": {"f": b"tiny"}}
    dataset["files"] = [{"id": "f", "sha256": sha(b"tiny"), "size": 4, "created_time": 1.0}]
    dataset["metadata"] = metadata_for(dataset)
    return write_archive(dataset, "zstd")


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_bit_flip_is_rejected(data):
    archive = bytearray(tiny_archive())
    position = data.draw(st.integers(0, len(archive) * 8 - 1), label="bit")
    archive[position // 8] ^= 1 << (position % 8)
    with tempfile.TemporaryDirectory() as tmp:
        with pytest.raises(ArchiveError):
            read_back(io.BytesIO(bytes(archive)), V2_KEY, Path(tmp) / "s", LIMITS)


def test_repeated_sibling_names_of_a_legacy_archive_become_unique():
    """In archive order the first keeps its name; a new name is one no sibling has."""
    def folder(folder_id, name, parent=None):
        return {"id": folder_id, "name": name, "parent_id": parent, "created_time": 1.0,
                "access_rules": []}

    folders = [folder("a", "x"), folder("b", "x"), folder("c", "x (2)"), folder("d", "x"),
               folder("e", "x", parent="a")]
    with tempfile.TemporaryDirectory() as tmp:
        index = StagingIndex.create(Path(tmp))
        for entry in folders:
            index.add("folders", entry)
        warnings = index.check(rename_twins=True)
        names = [row[1] for batch in index.rows("folders") for row in batch]
        index.close()
    assert sorted(names) == sorted(["x", "x (3)", "x (2)", "x (4)", "x"])
    assert len(warnings) == 2
    assert "folder 'b': another folder in the root is also named 'x'; imported as 'x (3)'" in (
        warnings)
    twins = [folder(f"t{i}", "twin") for i in range(3)]
    with tempfile.TemporaryDirectory() as tmp:
        index = StagingIndex.create(Path(tmp))
        for entry in twins:
            index.add("folders", entry)
        with pytest.raises(ArchiveError, match="two folders named 'twin' in the root"):
            index.check(rename_twins=False)  # format 2 archives are held to the API's rules
        index.close()


@pytest.mark.parametrize("staging", [STAGE_DURABLE, STAGE_BRIEFLY])
def test_only_a_durable_read_starts_the_writeback_of_staged_files(tmp_path, monkeypatch,
                                                                   staging):
    """An import (durable) asks the kernel to start writing a large staged file to disk as it
    is written, all of it in order; a check that deletes its copy at once leaves the pages
    unwritten in memory. Either way the staged bytes are the file's."""
    from cfms_trio.backup.format import staged

    started: list[tuple[int, int]] = []
    monkeypatch.setattr(staged, "WRITEBACK_START_BYTES", SEGMENT)
    monkeypatch.setattr(staged, "release_pages",
                        lambda fd, offset, length: started.append((offset, length)))
    dataset = make_dataset()
    big = dataset["blobs"]["big"]
    _, folder = read_archive(write_archive(dataset), tmp_path, staging=staging)
    assert (folder / "big").read_bytes() == big
    if staging == STAGE_DURABLE:
        ends = [offset + length for offset, length in started]
        assert [offset for offset, _ in started] == [0] + ends[:-1]
        assert ends[-1] == len(big)
    else:
        assert started == []


def test_a_hash_only_read_checks_every_file_and_writes_none(tmp_path):
    """The export's self-check and verify need only the hashes: each file is checked (a
    damaged one, a repeated one are still refused) and none is written, not even empty."""
    dataset = make_dataset()
    back, folder = read_archive(write_archive(dataset), tmp_path, staging=STAGE_HASH_ONLY)
    assert back.counts["files"] == len(dataset["blobs"])
    assert not {path.name for path in folder.iterdir()} & set(dataset["blobs"])
    members = standard_members(make_dataset())
    repeated = members[:6] + [members[5]] + members[6:]
    with pytest.raises(ArchiveError, match="files/small"):
        read_archive(sealed_members(repeated), tmp_path, staging=STAGE_HASH_ONLY)
    members[5] = ("files/small", b"HELLO, backup")
    with pytest.raises(ArchiveError, match="file small: sha256 mismatch"):
        read_archive(sealed_members(members), tmp_path, staging=STAGE_HASH_ONLY)
