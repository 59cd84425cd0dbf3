"""A corpus of hostile backup archives and key files, built by code for both formats.

Every case is a function registered in ``CASES`` under its own name. It returns a ``Case``: the
archive bytes, the key file bytes, and a substring the import's ``error_message`` must contain.
Cases that the server must refuse while they are still being uploaded (over a size limit) say
which upload (``refused_upload``) and then ``expected`` is part of the 413 message instead.

Format 2 archives are hand-built tar streams sealed with the real ``SegmentWriter`` (so each case
gets past the encryption layer and reaches the check it is about), or sealed archives cut and
spliced afterwards. Legacy 1.0 archives are AES-256-CBC over a tar, encrypted here. Each case
changes one thing in an otherwise valid backup of ``base_dataset()``; ``valid_v2_archive`` and
``valid_legacy_archive`` are that backup unchanged, and a test checks they import cleanly.

The server these cases run against is seeded with ``seed_dataset()`` (ids ``seed-*``), so cases
can also collide with ids that already exist, and runs with ``HOSTILE_LIMITS``, so every limit
can be crossed with a small archive.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import random
import tarfile
from typing import Callable, NamedTuple

import zstandard
from Crypto.Cipher import AES
from Crypto.Util.Padding import pad

from cfms_trio.backup.format import make_key_file
from cfms_trio.backup.format import segments as cs
from cfms_trio.config import ArchiveLimits
from cfms_trio.conventions import MAX_TREE_DEPTH, NAME_MAX_CHARS

KiB = 1024
MiB = 1024 * KiB

# Small limits, so that every one of them can be crossed by an archive of a few MiB.
HOSTILE_LIMITS = ArchiveLimits(
    archive_bytes=4 * MiB,
    extracted_bytes=16 * MiB,
    member_count=64,
    json_member_bytes=256 * KiB,
    json_depth=32,
    key_file_bytes=4 * KiB,
    zstd_window_bytes=8 * MiB,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
CHUNK_LOG2 = cs.MIN_CHUNK_LOG2  # 64 KiB segments: multi-segment archives stay small
SEGMENT_BYTES = 1 << CHUNK_LOG2
SEALED_SEGMENT_BYTES = SEGMENT_BYTES + cs.SEGMENT_TAG_BYTES
CREATED_AT = 1_700_000_000.5

# Names a traversal would write if any guard failed; tests look for them after every case.
ESCAPE_NAME = "cfms-hostile-escape"
ABSOLUTE_TARGET = f"/tmp/{ESCAPE_NAME}-absolute"
TRAVERSAL = "../" * 12 + ESCAPE_NAME


class Case(NamedTuple):
    archive: bytes
    key: bytes
    expected: str
    refused_upload: str | None = None  # "archive" or "key": refused with 413 while uploading


CASES: dict[str, Callable[[], Case]] = {}


def case(fn: Callable[[], Case]) -> Callable[[], Case]:
    """Register a case under its function's name."""
    CASES[fn.__name__] = fn
    return fn


def _register(name: str, fn: Callable[[], Case]) -> None:
    fn.__name__ = name
    case(fn)


# ------------------------------------------------------------------------------------------
# Data sets


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


RULE = {"match": "all", "match_groups": [{"match": "any",
                                          "rights": {"match": "all", "require": ["read"]},
                                          "groups": {"match": "any", "require": ["user"]}}]}


def _dataset(prefix: str, blobs: dict[str, bytes]) -> dict:
    """Two nested folders, a document in each place, three revisions, rules on both kinds."""
    p = prefix
    ids = list(blobs)
    folders = [
        {"id": f"{p}f1", "name": f"{p}Top", "parent_id": None, "created_time": 1.5,
         "access_rules": [{"id": f"{p}r1", "access_type": "read", "rule_data": RULE}]},
        {"id": f"{p}f2", "name": f"{p}Inner", "parent_id": f"{p}f1", "created_time": 2.5,
         "access_rules": []},
    ]
    documents = [
        {"id": f"{p}d1", "title": f"{p}Report", "folder_id": f"{p}f2", "created_time": 3.5,
         "access_rules": [{"id": f"{p}r2", "access_type": "write", "rule_data": RULE}],
         "revisions": [{"id": f"{p}v1", "file_id": ids[0], "created_time": 3.5},
                       {"id": f"{p}v2", "file_id": ids[1], "created_time": 4.5}]},
        {"id": f"{p}d2", "title": f"{p}Note", "folder_id": None, "created_time": 5.5,
         "access_rules": [], "revisions": [{"id": f"{p}v3", "file_id": ids[2],
                                            "created_time": 5.5}]},
    ]
    files = [{"id": fid, "sha256": sha(data), "size": len(data), "created_time": 6.5}
             for fid, data in blobs.items()]
    dataset = {"folders": folders, "documents": documents, "files": files, "blobs": blobs}
    dataset["metadata"] = metadata_for(dataset)
    return dataset


def base_dataset() -> dict:
    """The valid backup every case starts from (ids ``h*``, none of them on the server)."""
    return _dataset("h", {"hx1": b"first draft", "hx2": b"second draft, a bit longer",
                          "hx3": b""})


def seed_dataset() -> dict:
    """What the server holds before any case runs (ids ``seed-*``)."""
    return _dataset("seed-", {"seed-x1": b"seeded content " * 100,
                              "seed-x2": random.Random(1).randbytes(3000), "seed-x3": b"s"})


def big_dataset() -> dict:
    """The base backup with a file spanning several segments (for truncation cases)."""
    dataset = base_dataset()
    blob = random.Random(2).randbytes(3 * SEGMENT_BYTES + 5000)
    dataset["blobs"]["hx2"] = blob
    dataset["files"][1].update(sha256=sha(blob), size=len(blob))
    dataset["metadata"] = metadata_for(dataset)
    return dataset


def metadata_for(dataset: dict, version: str = "2.0") -> dict:
    return {
        "format": "cfms-backup", "version": version, "created_at": CREATED_AT,
        "backup_name": "hostile", "server_version": "0.1.0",
        "folders_count": len(dataset["folders"]),
        "documents_count": len(dataset["documents"]),
        "files_count": len(dataset["files"]),
        "total_file_bytes": sum(entry["size"] for entry in dataset["files"]),
    }


def renamed(dataset: dict, old: str, new: str) -> dict:
    """The data set with one id replaced everywhere it occurs."""
    text = json.dumps({k: v for k, v in dataset.items() if k != "blobs"})
    out = json.loads(text.replace(json.dumps(old), json.dumps(new)))
    out["blobs"] = {(new if fid == old else fid): data for fid, data in dataset["blobs"].items()}
    return out


# ------------------------------------------------------------------------------------------
# Building archives


def json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def listing_members(dataset: dict, version: str = "2.0") -> list[tuple[str, bytes]]:
    metadata = dataset.get("metadata") or metadata_for(dataset, version)
    return [
        ("metadata.json", json_bytes(metadata)),
        ("folders.json", json_bytes(dataset["folders"])),
        ("documents.json", json_bytes(dataset["documents"])),
        ("files.json", json_bytes(dataset["files"])),
    ]


def file_members(dataset: dict, prefix: str = "") -> list[tuple[str, bytes]]:
    return [(f"{prefix}files/{entry['id']}", dataset["blobs"].get(entry["id"], b""))
            for entry in dataset["files"]]


def standard_members(dataset: dict) -> list:
    """The members of a well-formed archive, in format 2 order, as (name, data) pairs."""
    return listing_members(dataset) + file_members(dataset)


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    """A member of a type other than a regular file (link, device, FIFO, directory)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null
    return info


def tar_bytes(members, tar_format=tarfile.PAX_FORMAT) -> bytes:
    """A tar of (name, data) pairs and of ready TarInfo objects (without data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(CREATED_AT)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def seal(plaintext: bytes, *, key: bytes = KEY, compression: int = cs.COMPRESSION_NONE) -> bytes:
    """Encrypt a plaintext into a format 2 archive with the real segment writer."""
    out = io.BytesIO()
    writer = cs.SegmentWriter(out, key, compression=compression, chunk_log2=CHUNK_LOG2)
    writer.write(plaintext)
    writer.close()
    return out.getvalue()


def v2_archive(members, *, zstd: bool = False) -> bytes:
    plaintext = tar_bytes(members)
    if zstd:
        return seal(zstandard.ZstdCompressor().compress(plaintext),
                    compression=cs.COMPRESSION_ZSTD)
    return seal(plaintext)


def legacy_encrypt(plaintext: bytes, key: bytes = KEY) -> bytes:
    iv = bytes(range(16, 32))
    return iv + AES.new(key, AES.MODE_CBC, iv=iv).encrypt(pad(plaintext, AES.block_size))


def legacy_archive(members) -> bytes:
    return legacy_encrypt(tar_bytes(members, tarfile.GNU_FORMAT))


def v2_key(key: bytes = KEY) -> bytes:
    return make_key_file(key, "hostile", CREATED_AT, None)


def legacy_key(key: bytes = KEY) -> bytes:
    return json_bytes({"key": key.hex(), "algorithm": "AES-256-CBC", "created_at": CREATED_AT,
                       "backup_name": "old"})


def legacy_members(dataset: dict) -> list:
    """A legacy archive's members: files first, './' prefixes, a directory, a stray `path`."""
    dataset = copy.deepcopy(dataset)
    for entry in dataset["files"]:
        entry["path"] = f"/var/cfms/files/{entry['id']}"  # must be ignored
    dataset["metadata"] = {"version": "1.0", "created_at": CREATED_AT}
    listings = [(f"./{name}", data) for name, data in listing_members(dataset)]
    return ([special("./files", tarfile.DIRTYPE)] + file_members(dataset, "./")
            + listings)


def v2_case(dataset: dict, expected: str) -> Case:
    return Case(v2_archive(standard_members(dataset)), v2_key(), expected)


def v2_members_case(members, expected: str) -> Case:
    return Case(v2_archive(members), v2_key(), expected)


def legacy_members_case(members, expected: str) -> Case:
    return Case(legacy_archive(members), legacy_key(), expected)


def valid_v2_archive(dataset: dict | None = None) -> tuple[bytes, bytes]:
    return v2_archive(standard_members(dataset or base_dataset())), v2_key()


def valid_legacy_archive(dataset: dict | None = None) -> tuple[bytes, bytes]:
    return legacy_archive(legacy_members(dataset or base_dataset())), legacy_key()


def _with_member(members: list, name: str, replacement) -> list:
    """``members`` with the member called ``name`` replaced (by a list of members)."""
    out = []
    for member in members:
        current = member.name if isinstance(member, tarfile.TarInfo) else member[0]
        out.extend(replacement if current == name else [member])
    return out


# ------------------------------------------------------------------------------------------
# Member names and types


@case
def member_name_with_dotdot() -> Case:
    return v2_members_case([(TRAVERSAL, b"escaped")] + standard_members(base_dataset()),
                           "escapes the archive")


@case
def file_member_name_with_dotdot() -> Case:
    members = _with_member(standard_members(base_dataset()), "files/hx1",
                           [(f"files/{TRAVERSAL}", b"first draft")])
    return v2_members_case(members, "escapes the archive")


@case
def member_name_absolute() -> Case:
    return v2_members_case([(ABSOLUTE_TARGET, b"escaped")] + standard_members(base_dataset()),
                           "has an absolute name")


@case
def member_symlink() -> Case:
    members = _with_member(standard_members(base_dataset()), "files/hx1",
                           [special("files/hx1", tarfile.SYMTYPE, TRAVERSAL),
                            ("files/hx1", b"written through the link")])
    return v2_members_case(members, "is a symbolic link")


@case
def member_hard_link() -> Case:
    members = _with_member(standard_members(base_dataset()), "files/hx1",
                           [special("files/hx1", tarfile.LNKTYPE, "/etc/passwd")])
    return v2_members_case(members, "is a hard link")


@case
def member_character_device() -> Case:
    members = _with_member(standard_members(base_dataset()), "files/hx1",
                           [special("files/hx1", tarfile.CHRTYPE)])
    return v2_members_case(members, "is a device")


@case
def member_block_device() -> Case:
    members = _with_member(standard_members(base_dataset()), "files/hx1",
                           [special("files/hx1", tarfile.BLKTYPE)])
    return v2_members_case(members, "is a device")


@case
def member_fifo() -> Case:
    members = _with_member(standard_members(base_dataset()), "files/hx1",
                           [special("files/hx1", tarfile.FIFOTYPE)])
    return v2_members_case(members, "is a FIFO")


@case
def member_directory() -> Case:
    members = _with_member(standard_members(base_dataset()), "files/hx1",
                           [special("files", tarfile.DIRTYPE), ("files/hx1", b"first draft")])
    return v2_members_case(members, "is a directory")


@case
def member_unexpected_name() -> Case:
    return v2_members_case(standard_members(base_dataset()) + [("notes.txt", b"hi")],
                           "unexpected archive member 'notes.txt'")


@case
def member_out_of_order() -> Case:
    members = standard_members(base_dataset())
    members[0], members[1] = members[1], members[0]
    return v2_members_case(members, "out of order; expected 'metadata.json'")


@case
def duplicate_listing_member() -> Case:
    members = standard_members(base_dataset())
    return v2_members_case(members[:1] + members, "duplicate archive member 'metadata.json'")


@case
def duplicate_file_member() -> Case:
    members = _with_member(standard_members(base_dataset()), "files/hx1",
                           [("files/hx1", b"first draft"), ("files/hx1", b"first draft")])
    return v2_members_case(members, "duplicate archive member 'files/hx1'")


@case
def file_present_but_not_listed() -> Case:
    members = standard_members(base_dataset()) + [("files/hx9", b"stowaway")]
    return v2_members_case(members, "'files/hx9' is not listed in files.json")


@case
def file_listed_but_missing() -> Case:
    members = [m for m in standard_members(base_dataset()) if m[0] != "files/hx3"]
    return v2_members_case(members, "file hx3: listed in files.json but missing from the archive")


@case
def file_sha256_mismatch() -> Case:
    members = _with_member(standard_members(base_dataset()), "files/hx1",
                           [("files/hx1", b"FIRST draft")])
    return v2_members_case(members, "file hx1: sha256 mismatch")


@case
def file_size_mismatch() -> Case:
    dataset = base_dataset()
    dataset["files"][0]["size"] = 5
    dataset["metadata"] = metadata_for(dataset)
    return v2_case(dataset, "file hx1: size mismatch")


# ------------------------------------------------------------------------------------------
# Ids, references, counts


def _duplicate(kind: str, expected: str) -> Callable[[], Case]:
    def build() -> Case:
        dataset = base_dataset()
        if kind == "folder":
            dataset["folders"][1]["id"] = "hf1"
            dataset["documents"][0]["folder_id"] = "hf1"
        elif kind == "document":
            dataset["documents"][1]["id"] = "hd1"
        elif kind == "file":
            dataset["files"][2]["id"] = "hx1"
            dataset["documents"][1]["revisions"][0]["file_id"] = "hx1"
        elif kind == "revision":
            dataset["documents"][1]["revisions"][0]["id"] = "hv1"
        else:  # an access rule id used by a folder and by a document
            dataset["documents"][0]["access_rules"][0]["id"] = "hr1"
        dataset["metadata"] = metadata_for(dataset)
        return v2_case(dataset, expected)
    return build


for _kind, _id in (("folder", "hf1"), ("document", "hd1"), ("file", "hx1"),
                   ("revision", "hv1"), ("access_rule", "hr1")):
    _register(f"duplicate_{_kind}_id_inside_archive",
              _duplicate(_kind, f"duplicate {_kind.replace('_', ' ')} id '{_id}'"))


def _collision(old: str, new: str, kind: str) -> Callable[[], Case]:
    def build() -> Case:
        return v2_case(renamed(base_dataset(), old, new),
                       f"{kind} id '{new}' already exists on this server")
    return build


for _old, _new, _kind in (("hf2", "seed-f2", "folder"), ("hd2", "seed-d2", "document"),
                          ("hv2", "seed-v2", "revision"), ("hx2", "seed-x2", "file"),
                          ("hr2", "seed-r2", "access rule")):
    _register(f"{_kind.replace(' ', '_')}_id_already_on_server", _collision(_old, _new, _kind))


@case
def invalid_id_with_path() -> Case:
    return v2_case(renamed(base_dataset(), "hx1", "../../etc"),
                   "id must be an id of 1-64 characters")


@case
def folder_cycle() -> Case:
    dataset = base_dataset()
    dataset["folders"][0]["parent_id"] = "hf2"
    return v2_case(dataset, "is part of a cycle in the folder hierarchy")


@case
def folder_is_its_own_parent() -> Case:
    dataset = base_dataset()
    dataset["folders"][1]["parent_id"] = "hf2"
    return v2_case(dataset, "folder 'hf2' is part of a cycle")


@case
def folder_orphan() -> Case:
    dataset = base_dataset()
    dataset["folders"][1]["parent_id"] = "nowhere"
    return v2_case(dataset, "folder 'hf2': parent folder 'nowhere' is not in the backup")


@case
def folder_parent_on_server_only() -> Case:
    """A parent that exists on the server but not in the backup is still an orphan."""
    dataset = base_dataset()
    dataset["folders"][1]["parent_id"] = "seed-f1"
    return v2_case(dataset, "parent folder 'seed-f1' is not in the backup")


def folder_chain_dataset(depth: int) -> dict:
    """The base backup with its folders replaced by a chain ``depth`` levels deep; the report
    lives in the deepest folder."""
    dataset = base_dataset()
    dataset["folders"] = [{"id": f"hc{level}", "name": f"level {level}",
                           "parent_id": f"hc{level - 1}" if level > 1 else None,
                           "created_time": 1.0, "access_rules": []}
                          for level in range(1, depth + 1)]
    dataset["documents"][0]["folder_id"] = f"hc{depth}"
    dataset["metadata"] = metadata_for(dataset)
    return dataset


@case
def folder_tree_too_deep() -> Case:
    """Deeper than the server's MAX_TREE_DEPTH: it would refuse to serve the deepest folders."""
    return v2_case(folder_chain_dataset(MAX_TREE_DEPTH + 1),
                   f"folder 'hc{MAX_TREE_DEPTH + 1}' is nested {MAX_TREE_DEPTH + 1} levels deep")


@case
def duplicate_sibling_folder_names() -> Case:
    """Two folders of one name under one parent: the API never makes this, clients could not
    tell them apart."""
    dataset = base_dataset()
    dataset["folders"].append({"id": "hf3", "name": "hInner", "parent_id": "hf1",
                               "created_time": 2.5, "access_rules": []})
    dataset["metadata"] = metadata_for(dataset)
    return v2_case(dataset, "two folders named 'hInner' in folder 'hf1'")


@case
def duplicate_document_titles_at_root() -> Case:
    dataset = base_dataset()
    dataset["documents"][0]["folder_id"] = None
    dataset["documents"][0]["title"] = "hNote"
    return v2_case(dataset, "two documents named 'hNote' in the root")


@case
def document_title_too_long() -> Case:
    dataset = base_dataset()
    dataset["documents"][1]["title"] = "x" * (NAME_MAX_CHARS + 1)
    return v2_case(dataset, f"document 'hd2': title must be 1 to {NAME_MAX_CHARS} characters "
                            "long")


@case
def root_folder_name_taken_on_server() -> Case:
    """Ids are new but a top-level folder's name is taken at the server's root."""
    dataset = base_dataset()
    dataset["folders"][0]["name"] = "seed-Top"
    return v2_case(dataset, "a folder with the name 'seed-Top' already exists at the root")


@case
def root_document_title_taken_on_server() -> Case:
    dataset = base_dataset()
    dataset["documents"][1]["title"] = "seed-Note"
    return v2_case(dataset, "a document with the title 'seed-Note' already exists at the root")


@case
def document_in_unknown_folder() -> Case:
    dataset = base_dataset()
    dataset["documents"][0]["folder_id"] = "seed-f1"
    return v2_case(dataset, "document 'hd1': folder 'seed-f1' is not in the backup")


@case
def revision_of_unknown_file() -> Case:
    dataset = base_dataset()
    dataset["documents"][0]["revisions"][1]["file_id"] = "seed-x1"
    return v2_case(dataset, "refers to file 'seed-x1', which is not in the backup")


@case
def revisions_not_an_array() -> Case:
    dataset = base_dataset()
    dataset["documents"][1]["revisions"] = {"document_id": "seed-d1", "file_id": "hx3"}
    return v2_case(dataset, "documents.json: document 'hd2': revisions must be a JSON array")


def _count_lie(field: str, value: int, expected: str) -> Callable[[], Case]:
    def build() -> Case:
        dataset = base_dataset()
        dataset["metadata"][field] = value
        return v2_case(dataset, expected)
    return build


for _field, _listing, _actual in (("documents_count", "documents.json", 2),
                                  ("folders_count", "folders.json", 2),
                                  ("files_count", "files.json", 3)):
    _register(f"metadata_{_field}_lies",
              _count_lie(_field, 1000, f"metadata.json says {_field} is 1000, "
                                       f"but {_listing} lists {_actual}"))
_register("metadata_total_file_bytes_lies",
          _count_lie("total_file_bytes", 1, "metadata.json says total_file_bytes is 1"))


# ------------------------------------------------------------------------------------------
# JSON members


def _with_listing(name: str, data: bytes, dataset: dict | None = None) -> list:
    return _with_member(standard_members(dataset or base_dataset()), name, [(name, data)])


@case
def json_member_too_large() -> Case:
    dataset = base_dataset()
    dataset["folders"][0]["name"] = "x" * HOSTILE_LIMITS.json_member_bytes
    return v2_case(dataset, f"the limit is {HOSTILE_LIMITS.json_member_bytes} bytes")


@case
def json_nested_too_deep() -> Case:
    dataset = base_dataset()
    deep: dict = {}
    for _ in range(HOSTILE_LIMITS.json_depth + 5):
        deep = {"match_groups": [deep]}
    dataset["folders"][1]["access_rules"] = [{"id": "hr9", "access_type": "read",
                                              "rule_data": deep}]
    return v2_case(dataset, f"nests deeper than the limit of {HOSTILE_LIMITS.json_depth}")


@case
def json_recursion_bomb() -> Case:
    depth = 100_000  # deeper than Python's recursion limit, far below the size limit
    bomb = b"[" * depth + b"]" * depth
    return v2_members_case(_with_listing("folders.json", bomb),
                           "folders.json nests deeper than the limit")


@case
def json_not_json() -> Case:
    return v2_members_case(_with_listing("documents.json", b"{not json"),
                           "archive member documents.json is not valid JSON")


@case
def json_not_utf8() -> Case:
    return v2_members_case(_with_listing("folders.json", b'[{"name": "\xff\xfe"}]'),
                           "archive member folders.json is not valid UTF-8")


@case
def json_duplicate_keys() -> Case:
    data = b'{"version": "2.0", "version": "2.0"}'
    return v2_members_case(_with_listing("metadata.json", data), "duplicate key 'version'")


@case
def json_nan_time() -> Case:
    data = json_bytes(base_dataset()["files"]).replace(b"6.5", b"NaN", 1)
    return v2_members_case(_with_listing("files.json", data), "NaN is not allowed")


def _wrong_type(mutate: Callable[[dict], None], expected: str) -> Callable[[], Case]:
    def build() -> Case:
        dataset = base_dataset()
        mutate(dataset)
        return v2_case(dataset, expected)
    return build


_WRONG_TYPES = {
    "metadata_not_an_object": (lambda d: d.update(metadata=[1, 2]),
                               "metadata.json must be a JSON object"),
    "folders_not_an_array": (lambda d: d.update(folders={"hf1": {}}),
                             "folders.json must be a JSON array"),
    "file_size_is_a_string": (lambda d: d["files"][0].update(size="11"),
                              "files.json: file 'hx1': size must be a non-negative integer"),
    "file_size_is_negative": (lambda d: d["files"][0].update(size=-1),
                              "size must be a non-negative integer"),
    "file_size_is_a_boolean": (lambda d: d["files"][2].update(size=False),
                               "size must be a non-negative integer"),
    "file_sha256_not_hex": (lambda d: d["files"][0].update(sha256="z" * 64),
                            "sha256 must be 64 hex digits"),
    "created_time_is_a_string": (lambda d: d["documents"][0].update(created_time="yesterday"),
                                 "created_time must be a number of seconds"),
    "folder_name_is_a_number": (lambda d: d["folders"][0].update(name=7),
                                "folders.json: folder 'hf1': name must be a string"),
    "document_title_missing": (lambda d: d["documents"][0].pop("title"),
                               "missing field 'title'"),
    "folder_id_is_an_object": (lambda d: d["folders"][0].update(id={"$ne": None}),
                               "folders.json: entry 0: id must be an id"),
    "access_type_unknown": (lambda d: d["folders"][0]["access_rules"][0].update(
                                access_type="delete"), "access_type must be one of"),
    "rule_data_not_an_object": (lambda d: d["folders"][0]["access_rules"][0].update(
                                    rule_data="allow all"), "rule_data must be a JSON object"),
    "rule_match_unknown": (lambda d: d["folders"][0]["access_rules"][0].update(
                               rule_data={"match": "none"}), 'match must be "all" or "any"'),
    "metadata_count_is_a_float": (lambda d: d["metadata"].update(files_count=3.0),
                                  "files_count must be a non-negative integer"),
    "version_unknown": (lambda d: d["metadata"].update(version="4.0"),
                        "unsupported backup version '4.0'"),
    "version_missing": (lambda d: d["metadata"].pop("version"),
                        "metadata.json: missing field 'version'"),
    "version_not_a_string": (lambda d: d["metadata"].update(version=2.0),
                             "unsupported backup version of type float in metadata.json"),
    "version_legacy_inside_format_2": (lambda d: d["metadata"].update(version="1.0"),
                                       "metadata.json says version 1.0, but the archive is "
                                       "format 2 (CFMSBAK2)"),
    "format_name_wrong": (lambda d: d["metadata"].update(format="tarball"),
                          "format must be 'cfms-backup'"),
}
for _name, (_mutate, _expected) in _WRONG_TYPES.items():
    _register(_name, _wrong_type(_mutate, _expected))


# ------------------------------------------------------------------------------------------
# Limits and compression


@case
def compression_bomb_after_end_marker() -> Case:
    """A small archive whose zstd stream expands far beyond the extracted bytes limit: a valid
    tar followed by zeros, which compress to almost nothing."""
    plaintext = tar_bytes(standard_members(base_dataset()))
    compressor = zstandard.ZstdCompressor(level=3)
    zeros = b"\0" * MiB
    out = io.BytesIO()
    writer = compressor.stream_writer(out, closefd=False)
    writer.write(plaintext)
    for _ in range(4 * HOSTILE_LIMITS.extracted_bytes // MiB):
        writer.write(zeros)
    writer.close()
    return Case(seal(out.getvalue(), compression=cs.COMPRESSION_ZSTD), v2_key(),
                f"archive expands to more than the limit of {HOSTILE_LIMITS.extracted_bytes}")


@case
def compression_bomb_in_a_file() -> Case:
    """A listed file of zeros larger than the extracted bytes limit, honestly declared."""
    dataset = base_dataset()
    blob = b"\0" * (HOSTILE_LIMITS.extracted_bytes + 1)
    dataset["blobs"]["hx1"] = blob
    dataset["files"][0].update(size=len(blob), sha256=sha(blob))
    dataset["metadata"] = metadata_for(dataset)
    return Case(v2_archive(standard_members(dataset), zstd=True), v2_key(),
                f"bytes of files; the limit is {HOSTILE_LIMITS.extracted_bytes} bytes")


@case
def zstd_window_too_large() -> Case:
    params = zstandard.ZstdCompressionParameters(window_log=27, compression_level=3)
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(compression_params=params).stream_writer(out,
                                                                               closefd=False)
    writer.write(tar_bytes(standard_members(base_dataset())))
    writer.close()
    return Case(seal(out.getvalue(), compression=cs.COMPRESSION_ZSTD), v2_key(),
                "decoding window larger than the limit")


@case
def zstd_data_corrupt() -> Case:
    plaintext = tar_bytes(standard_members(base_dataset()))
    return Case(seal(plaintext, compression=cs.COMPRESSION_ZSTD), v2_key(),
                "invalid zstd data")


@case
def too_many_members() -> Case:
    dataset = base_dataset()
    for index in range(HOSTILE_LIMITS.member_count):
        file_id = f"hm{index}"
        dataset["blobs"][file_id] = b""
        dataset["files"].append({"id": file_id, "sha256": sha(b""), "size": 0,
                                 "created_time": 1.0})
    dataset["metadata"] = metadata_for(dataset)
    return v2_case(dataset, f"the limit is {HOSTILE_LIMITS.member_count}")


@case
def archive_over_size_limit() -> Case:
    archive = b"\0" * (HOSTILE_LIMITS.archive_bytes + 1)
    return Case(archive, v2_key(), f"larger than the limit of {HOSTILE_LIMITS.archive_bytes}",
                refused_upload="archive")


@case
def tar_extended_header_too_large() -> Case:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in standard_members(base_dataset()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == "files/hx1":
                info.pax_headers = {"comment": "x" * (16 * KiB)}
            tar.addfile(info, io.BytesIO(data))
    return Case(seal(buf.getvalue()), v2_key(), "tar extended header of")


# ------------------------------------------------------------------------------------------
# Key files


def _key_case(key: bytes, expected: str, archive: bytes | None = None,
              refused_upload: str | None = None) -> Case:
    archive = valid_v2_archive()[0] if archive is None else archive
    return Case(archive, key, expected, refused_upload)


_KEY_CASES = {
    "key_file_not_json": (lambda: b"key=000102", "key file is not valid JSON"),
    "key_file_empty": (lambda: b"", "key file is not valid JSON"),
    "key_file_not_utf8": (lambda: b'{"key": "\xff"}', "key file is not valid UTF-8"),
    "key_file_not_an_object": (lambda: b'["AES-256-GCM-STREAM"]',
                               "key file must be a JSON object"),
    "key_file_deeply_nested": (lambda: b"[" * 1500 + b"]" * 1500, "key file is not valid JSON"),
    "key_wrong_length": (lambda: v2_key().replace(KEY.hex().encode(), KEY.hex()[:62].encode()),
                         "key must be 32 bytes (64 hex digits)"),
    "key_not_hex": (lambda: v2_key().replace(KEY.hex().encode(), b"g" * 64),
                    "key must be 32 bytes (64 hex digits)"),
    "key_missing": (lambda: json_bytes({"format": 2, "algorithm": "AES-256-GCM-STREAM"}),
                    "key file has no 'key' field"),
    "key_algorithm_unknown": (lambda: json_bytes({"algorithm": "ROT13", "key": KEY.hex()}),
                              "unsupported key algorithm 'ROT13'"),
    "key_format_2_without_format_field": (
        lambda: json_bytes({"algorithm": "AES-256-GCM-STREAM", "key": KEY.hex()}),
        'must have "format": 2'),
    "key_is_the_wrong_key": (lambda: v2_key(OTHER_KEY), "wrong key for this archive"),
    "key_legacy_for_a_format_2_archive": (
        lambda: legacy_key(), "archive is format 2 (CFMSBAK2) but the key file is a legacy"),
}
for _name, (_key, _expected) in _KEY_CASES.items():
    _register(_name, (lambda k, e: lambda: _key_case(k(), e))(_key, _expected))


@case
def key_file_too_large() -> Case:
    document = json.loads(v2_key())
    document["backup_name"] = "k" * HOSTILE_LIMITS.key_file_bytes
    return _key_case(json_bytes(document), f"larger than the limit of "
                     f"{HOSTILE_LIMITS.key_file_bytes} bytes", refused_upload="key")


@case
def key_format_2_for_a_legacy_archive() -> Case:
    return Case(valid_legacy_archive()[0], v2_key(),
                "not a CFMS backup archive (bad magic; expected CFMSBAK2)")


# ------------------------------------------------------------------------------------------
# Segments: truncation, splicing, trailing bytes


def big_archive() -> bytes:
    return v2_archive(standard_members(big_dataset()))


def segment_count(archive: bytes) -> int:
    return -(-(len(archive) - cs.HEADER_BYTES) // SEALED_SEGMENT_BYTES)


def _segment_start(index: int) -> int:
    return cs.HEADER_BYTES + index * SEALED_SEGMENT_BYTES


BIG_SEGMENTS = 4  # segment_count(big_archive()); checked by a test


def _truncated_at_boundary(index: int) -> Callable[[], Case]:
    def build() -> Case:
        archive = big_archive()
        return Case(archive[:_segment_start(index)], v2_key(),
                    "archive is truncated: the final segment is missing")
    return build


def _truncated_mid_segment(index: int) -> Callable[[], Case]:
    def build() -> Case:
        archive = big_archive()
        end = min(len(archive), _segment_start(index + 1))
        middle = (_segment_start(index) + end) // 2
        return Case(archive[:middle], v2_key(), f"segment {index} failed authentication")
    return build


for _index in range(BIG_SEGMENTS):
    _register(f"truncated_at_segment_boundary_{_index}", _truncated_at_boundary(_index))
    _register(f"truncated_mid_segment_{_index}", _truncated_mid_segment(_index))


@case
def truncated_inside_a_tag() -> Case:
    archive = big_archive()
    return Case(archive[:_segment_start(1) + 7], v2_key(), "archive is truncated inside segment 1")


@case
def truncated_inside_the_header() -> Case:
    return Case(big_archive()[:cs.HEADER_BYTES - 1], v2_key(),
                "archive is too short to hold a format 2 header")


@case
def trailing_garbage() -> Case:
    archive = big_archive()
    return Case(archive + b"garbage!", v2_key(),
                f"segment {BIG_SEGMENTS - 1} failed authentication")


@case
def trailing_garbage_after_a_full_final_segment() -> Case:
    plaintext = tar_bytes(standard_members(base_dataset()))
    plaintext += b"\0" * (-len(plaintext) % SEGMENT_BYTES)  # zeros after the tar end marker
    return Case(seal(plaintext) + b"x" * 100, v2_key(),
                "archive has unexpected data after the final segment")


@case
def segments_swapped() -> Case:
    archive = big_archive()
    first, second = (archive[_segment_start(i):_segment_start(i + 1)] for i in (0, 1))
    spliced = archive[:_segment_start(0)] + second + first + archive[_segment_start(2):]
    return Case(spliced, v2_key(), "segment 0 failed authentication")


@case
def segment_dropped() -> Case:
    archive = big_archive()
    spliced = archive[:_segment_start(1)] + archive[_segment_start(2):]
    return Case(spliced, v2_key(), "segment 1 failed authentication")


@case
def segment_from_another_archive() -> Case:
    archive, other = big_archive(), big_archive()  # same key, fresh salt and nonce prefix
    spliced = archive[:_segment_start(1)] + other[_segment_start(1):]
    return Case(spliced, v2_key(), "segment 1 failed authentication")


@case
def header_bad_magic() -> Case:
    # CFMSBAK3 is format 3 since issue 17; an unknown version is still a bad magic.
    return Case(b"CFMSBAK9" + big_archive()[8:], v2_key(), "bad magic")


@case
def header_unknown_compression() -> Case:
    archive = bytearray(big_archive())
    archive[8] = 7
    return Case(bytes(archive), v2_key(), "archive header names unknown compression 7")


@case
def header_chunk_size_out_of_range() -> Case:
    archive = bytearray(big_archive())
    archive[9] = 40
    return Case(bytes(archive), v2_key(), "archive header has chunk_log2 40")


@case
def empty_archive() -> Case:
    return Case(b"", v2_key(), "archive is too short to hold a format 2 header")


@case
def empty_archive_with_legacy_key() -> Case:
    return Case(b"", legacy_key(), "too short for a legacy archive")


# ------------------------------------------------------------------------------------------
# Legacy 1.0 archives: nothing authenticates them, every member is checked


def _legacy(mutate: Callable[[list], list], expected: str) -> Callable[[], Case]:
    def build() -> Case:
        return legacy_members_case(mutate(legacy_members(base_dataset())), expected)
    return build


def _legacy_replace(name: str, replacement: list) -> Callable[[list], list]:
    return lambda members: _with_member(members, name, replacement)


_LEGACY_CASES = {
    "legacy_member_name_with_dotdot": (
        lambda ms: [(f"./{TRAVERSAL}", b"escaped")] + ms, "escapes the archive"),
    "legacy_directory_with_dotdot": (
        lambda ms: [special(f"./{'../' * 3}evil", tarfile.DIRTYPE)] + ms,
        "escapes the archive"),
    "legacy_member_name_absolute": (
        lambda ms: [(ABSOLUTE_TARGET, b"escaped")] + ms, "has an absolute name"),
    "legacy_member_symlink": (
        _legacy_replace("./files/hx1", [special("./files/hx1", tarfile.SYMTYPE, TRAVERSAL)]),
        "is a symbolic link"),
    "legacy_member_hard_link": (
        _legacy_replace("./files/hx1", [special("./files/hx1", tarfile.LNKTYPE, "/etc/passwd")]),
        "is a hard link"),
    "legacy_member_device": (
        _legacy_replace("./files/hx1", [special("./files/hx1", tarfile.CHRTYPE)]),
        "is a device"),
    "legacy_member_fifo": (
        _legacy_replace("./files/hx1", [special("./files/hx1", tarfile.FIFOTYPE)]),
        "is a FIFO"),
    "legacy_duplicate_member": (
        lambda ms: ms + [("files/hx1", b"first draft")], "duplicate archive member"),
    "legacy_file_present_but_not_listed": (
        lambda ms: [("./files/hx9", b"stowaway")] + ms, "is not listed in files.json"),
    "legacy_file_listed_but_missing": (
        lambda ms: [m for m in ms if not (isinstance(m, tuple) and m[0] == "./files/hx2")],
        "file hx2: listed in files.json but missing from the archive"),
    "legacy_file_sha256_mismatch": (
        _legacy_replace("./files/hx2", [("./files/hx2", b"second draft, a bit LONGER")]),
        "file hx2: sha256 mismatch"),
    "legacy_too_many_members": (
        lambda ms: [special(f"dir{i}", tarfile.DIRTYPE)
                    for i in range(HOSTILE_LIMITS.member_count)] + ms,
        f"more than the limit of {HOSTILE_LIMITS.member_count} members"),
    "legacy_metadata_count_lies": (
        _legacy_replace("./metadata.json", [("./metadata.json", json_bytes(
            {"version": "1.0", "documents_count": 9}))]),
        "metadata.json says documents_count is 9, but documents.json lists 2"),
    "legacy_version_2_inside_format_1": (
        _legacy_replace("./metadata.json", [("./metadata.json", json_bytes(
            {"version": "2.0"}))]),
        "metadata.json says version 2.0, but the archive is format 1.0"),
    "legacy_listing_missing": (
        lambda ms: [m for m in ms if not (isinstance(m, tuple) and m[0] == "./folders.json")],
        "archive is missing member folders.json"),
}
for _name, (_mutate, _expected) in _LEGACY_CASES.items():
    _register(_name, _legacy(_mutate, _expected))


@case
def legacy_folder_cycle() -> Case:
    dataset = base_dataset()
    dataset["folders"][0]["parent_id"] = "hf2"
    return legacy_members_case(legacy_members(dataset), "is part of a cycle")


@case
def legacy_wrong_key() -> Case:
    return Case(valid_legacy_archive()[0], legacy_key(OTHER_KEY), "wrong key or corrupt archive")


@case
def legacy_not_whole_blocks() -> Case:
    return Case(valid_legacy_archive()[0][:-5], legacy_key(),
                "ciphertext is not a whole number of blocks")


@case
def legacy_truncated_at_a_block() -> Case:
    return Case(valid_legacy_archive()[0][:-AES.block_size], legacy_key(),
                "wrong key or corrupt archive")


@case
def legacy_truncated_to_half() -> Case:
    archive = valid_legacy_archive()[0]
    cut = 16 + (len(archive) - 16) // 2 // AES.block_size * AES.block_size
    return Case(archive[:cut], legacy_key(), "wrong key or corrupt archive")


@case
def legacy_bad_padding() -> Case:
    iv = bytes(16)
    body = tar_bytes(legacy_members(base_dataset()), tarfile.GNU_FORMAT)
    body += bytes([0] * 15 + [17])  # not valid PKCS#7: the pad byte is larger than a block
    return Case(iv + AES.new(KEY, AES.MODE_CBC, iv=iv).encrypt(body), legacy_key(),
                "bad padding")


@case
def legacy_trailing_garbage() -> Case:
    garbage = bytes(range(200, 216))  # one whole block, so only the padding check can tell
    return Case(valid_legacy_archive()[0] + garbage, legacy_key(), "wrong key or corrupt archive")


@case
def legacy_not_a_tar() -> Case:
    return Case(legacy_encrypt(b"this is not a tar stream" * 100), legacy_key(),
                "wrong key or corrupt archive")
