"""The JSON listings of a backup (SPEC §7): names, schema validation and ``BackupContents``.

The reader validates what it extracts and the writer validates what it is about to write with the
same functions, so nothing is written that could not be read back. Listings come from clients:
JSON is decoded strictly and every failure is an ``ArchiveError`` naming the member and the id.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable

from cfms_trio.conventions import (
    ACCESS_TYPES,
    ID_MAX_CHARS,
    ID_PATTERN,
    RULE_DATA_MAX_BYTES,
    RULE_MATCH_GROUPS_MAX,
    RULE_MATCH_VALUES,
    RULE_REQUIRE_NAMES_MAX,
    RULES_PER_ACCESS_TYPE_MAX,
    SHA256_HEX_PATTERN,
)
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

from .jsonstream import JsonArray

FORMAT_NAME = "cfms-backup"
VERSION_V2 = "2.0"
VERSION_LEGACY = "1.0"

METADATA_MEMBER = "metadata.json"
FOLDERS_MEMBER = "folders.json"
DOCUMENTS_MEMBER = "documents.json"
FILES_MEMBER = "files.json"
JSON_MEMBERS = (METADATA_MEMBER, FOLDERS_MEMBER, DOCUMENTS_MEMBER, FILES_MEMBER)
FILES_PREFIX = "files/"

METADATA_COUNT_FIELDS = {
    "folders_count": FOLDERS_MEMBER,
    "documents_count": DOCUMENTS_MEMBER,
    "files_count": FILES_MEMBER,
}
SHOWN_NAME_CHARS = 100


@dataclasses.dataclass
class BackupContents:
    """The validated listings of a backup; file contents live in the staging folder.

    ``files`` entries are ``{id, sha256, size, created_time}``; legacy ``path`` fields are
    dropped and missing legacy sizes and null sha256 values are filled in from the extracted
    files. Only a legacy archive has files that are not served: ``inactive_file_ids`` are restored
    inactive (uploads that never happened upstream, or content missing from the archive), and
    ``absent_file_ids`` (all of them inactive) have no content in the staging folder, so their
    size and sha256 are None. ``warnings`` say, in plain words, what reading had to change.
    """

    format_version: str
    metadata: dict
    folders: list[dict]
    documents: list[dict]
    files: list[dict]
    inactive_file_ids: set[str] = dataclasses.field(default_factory=set)
    absent_file_ids: set[str] = dataclasses.field(default_factory=set)
    warnings: list[str] = dataclasses.field(default_factory=list)


WARNING_ITEMS_MAX = 20  # items of one kind reported one by one; the rest are counted


def itemised(lines: list[str], rest: str) -> list[str]:
    """``lines`` as warnings, at most WARNING_ITEMS_MAX of them, then ``rest`` (formatted with
    ``count``) for those left out: a backup of 100,000 objects must not make a million-line
    status."""
    shown = lines[:WARNING_ITEMS_MAX]
    if len(lines) > len(shown):
        shown.append(rest.format(count=len(lines) - len(shown)))
    return shown


def show_name(name: str) -> str:
    """Quote an untrusted name for an error message, shortened and with control chars escaped."""
    if len(name) > SHOWN_NAME_CHARS:
        name = name[:SHOWN_NAME_CHARS] + "..."
    return repr(name)


# --------------------------------------------------------------------------------------------
# Schema validation (shared by the writer, which refuses to write what it could not read back)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(obj: dict, field: str, where: str):
    if field not in obj:
        raise ArchiveError(f"{where}: missing field '{field}'")
    return obj[field]


def _as_object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ArchiveError(f"{where} must be a JSON object")
    return value


def _as_list(value, where: str) -> list | JsonArray:
    """A JSON array: a list, or a listing streamed from its member (it checks its own type)."""
    if not isinstance(value, (list, JsonArray)):
        raise ArchiveError(f"{where} must be a JSON array")
    return value


def _as_id(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ArchiveError(
            f"{where}: {field} must be an id of 1-{ID_MAX_CHARS} characters from [0-9A-Za-z_-]"
        )
    return value


def _as_child_id(value, where: str, member: str, kind: str, owner: str) -> str:
    """The id of a revision or access rule (``kind``) of ``owner`` ("document 'x'")."""
    if type(value) is int:
        raise ArchiveError(
            f"{member}: {kind} id {value} of {owner} is an integer; ids in a format 2.0 archive "
            f"are strings of 1-{ID_MAX_CHARS} characters from [0-9A-Za-z_-] (integer ids occur "
            "only in format 1.0 archives of the upstream CFMS server)"
        )
    return _as_id(value, where, "id")


def _as_optional_id(value, where: str, field: str) -> str | None:
    return None if value is None else _as_id(value, where, field)


def _as_text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ArchiveError(f"{where}: {field} must be a string")
    return value


def _as_time(value, where: str, field: str) -> float:
    if not is_number(value):
        raise ArchiveError(f"{where}: {field} must be a number of seconds since the epoch")
    return float(value)


def _as_size(value, where: str, field: str) -> int:
    if type(value) is not int or value < 0:
        raise ArchiveError(f"{where}: {field} must be a non-negative integer")
    return value


def _as_sha256(value, where: str, field: str) -> str:
    if not isinstance(value, str) or not SHA256_HEX_PATTERN.fullmatch(value):
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
    if len(require) > RULE_REQUIRE_NAMES_MAX:
        raise ArchiveLimitExceeded(
            f"{where}: require lists {len(require)} names, more than {RULE_REQUIRE_NAMES_MAX}")
    if not all(isinstance(item, str) for item in require):
        raise ArchiveError(f"{where}: require must list strings")


def _check_rule_data(value, where: str) -> dict:
    """Check the shape of a rule (SPEC §4) without interpreting it."""
    rule = _as_object(value, f"{where}: rule_data")
    if "match" in rule:
        _check_match(rule["match"], f"{where}: rule_data")
    groups = _as_list(rule.get("match_groups", []), f"{where}: rule_data.match_groups")
    if len(groups) > RULE_MATCH_GROUPS_MAX:
        raise ArchiveLimitExceeded(f"{where}: rule_data.match_groups has {len(groups)} "
                                   f"entries, more than {RULE_MATCH_GROUPS_MAX}")
    for position, group in enumerate(groups):
        group_where = f"{where}: rule_data.match_groups[{position}]"
        group = _as_object(group, group_where)
        if "match" in group:
            _check_match(group["match"], group_where)
        for clause in ("rights", "groups"):
            if clause in group:
                _check_requirement(group[clause], f"{group_where}.{clause}")
    size = len(json.dumps(rule, separators=(",", ":")).encode())
    if size > RULE_DATA_MAX_BYTES:
        raise ArchiveLimitExceeded(
            f"{where}: rule_data takes {size} bytes, more than the limit of {RULE_DATA_MAX_BYTES}")
    return rule


def _parse_access_rules(owner: dict, where: str, legacy: bool, member: str,
                        owner_label: str) -> list[dict]:
    if legacy and "access_rules" not in owner:
        return []  # legacy exports may omit an empty rule list
    rules = _as_list(_require(owner, "access_rules", where), f"{where}: access_rules")
    parsed = []
    per_type: dict[str, int] = {}
    for index, rule in enumerate(rules):
        rule_where = f"{where}: access rule {index}"
        rule = _as_object(rule, rule_where)
        rule_id = _as_child_id(_require(rule, "id", rule_where), rule_where, member,
                               "access rule", owner_label)
        rule_where = f"{where}: access rule {rule_id!r}"
        access_type = _require(rule, "access_type", rule_where)
        if access_type not in ACCESS_TYPES:
            raise ArchiveError(
                f"{rule_where}: access_type must be one of {', '.join(ACCESS_TYPES)}"
            )
        per_type[access_type] = per_type.get(access_type, 0) + 1
        if per_type[access_type] > RULES_PER_ACCESS_TYPE_MAX:
            raise ArchiveLimitExceeded(
                f"{where}: access_rules has more than {RULES_PER_ACCESS_TYPE_MAX} "
                f"'{access_type}' rules (the limit per access type)")
        rule_data = _check_rule_data(_require(rule, "rule_data", rule_where), rule_where)
        parsed.append({"id": rule_id, "access_type": access_type, "rule_data": rule_data})
    return parsed


def parse_metadata(value, container_version: str) -> dict:
    """Validate metadata.json; its version must match the container that carried it."""
    metadata = _as_object(value, METADATA_MEMBER)
    version = _require(metadata, "version", METADATA_MEMBER)
    if version not in (VERSION_V2, VERSION_LEGACY):
        if isinstance(version, str):
            shown = show_name(version)
        else:
            shown = f"of type {type(version).__name__}"
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


def parse_folders(value, legacy: bool) -> list[dict]:
    folders = []
    for index, entry in enumerate(_as_list(value, FOLDERS_MEMBER)):
        entry, folder_id, where = _entry_where(FOLDERS_MEMBER, "folder", index, entry)
        owner = f"folder {folder_id!r}"
        folders.append({
            "id": folder_id,
            "name": _as_text(_require(entry, "name", where), where, "name"),
            "parent_id": _as_optional_id(_require(entry, "parent_id", where), where, "parent_id"),
            "created_time": _as_time(_require(entry, "created_time", where), where, "created_time"),
            "access_rules": _parse_access_rules(entry, where, legacy, FOLDERS_MEMBER, owner),
        })
    return folders


def _parse_revisions(document: dict, where: str, owner: str) -> list[dict]:
    revisions = []
    entries = _as_list(_require(document, "revisions", where), f"{where}: revisions")
    for index, revision in enumerate(entries):
        rev_where = f"{where}: revision {index}"
        revision = _as_object(revision, rev_where)
        revision_id = _as_child_id(_require(revision, "id", rev_where), rev_where,
                                   DOCUMENTS_MEMBER, "revision", owner)
        rev_where = f"{where}: revision {revision_id!r}"
        revisions.append({
            "id": revision_id,
            "file_id": _as_id(_require(revision, "file_id", rev_where), rev_where, "file_id"),
            "created_time": _as_time(
                _require(revision, "created_time", rev_where), rev_where, "created_time"
            ),
        })
    return revisions


def parse_documents(value, legacy: bool) -> list[dict]:
    documents = []
    for index, entry in enumerate(_as_list(value, DOCUMENTS_MEMBER)):
        entry, document_id, where = _entry_where(DOCUMENTS_MEMBER, "document", index, entry)
        owner = f"document {document_id!r}"
        documents.append({
            "id": document_id,
            "title": _as_text(_require(entry, "title", where), where, "title"),
            "folder_id": _as_optional_id(_require(entry, "folder_id", where), where, "folder_id"),
            "created_time": _as_time(_require(entry, "created_time", where), where, "created_time"),
            "access_rules": _parse_access_rules(entry, where, legacy, DOCUMENTS_MEMBER, owner),
            "revisions": _parse_revisions(entry, where, owner),
        })
    return documents


def parse_files(value, legacy: bool) -> list[dict]:
    """Validate files.json; legacy entries may lack ``size`` and have a null ``sha256`` (None
    until extraction computes them)."""
    files = []
    for index, entry in enumerate(_as_list(value, FILES_MEMBER)):
        entry, file_id, where = _entry_where(FILES_MEMBER, "file", index, entry)
        if legacy and entry.get("size") is None:
            size = None
        else:
            size = _as_size(_require(entry, "size", where), where, "size")
        if legacy and entry.get("sha256") is None:
            sha256 = None
        else:
            sha256 = _as_sha256(_require(entry, "sha256", where), where, "sha256")
        files.append({
            "id": file_id,
            "sha256": sha256,
            "size": size,
            "created_time": _as_time(_require(entry, "created_time", where), where, "created_time"),
        })
    return files


def unique_index(items: Iterable[dict], kind: str) -> dict[str, dict]:
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
    folders = unique_index(contents.folders, "folder")
    unique_index(contents.documents, "document")
    files = unique_index(contents.files, "file")
    unique_index((rev for doc in contents.documents for rev in doc["revisions"]), "revision")
    owners = list(contents.folders) + list(contents.documents)
    unique_index((rule for owner in owners for rule in owner["access_rules"]), "access rule")
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


def check_metadata_counts(contents: BackupContents) -> None:
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
        total = sum(entry["size"] or 0 for entry in contents.files)  # None: no content
        if contents.metadata["total_file_bytes"] != total:
            raise ArchiveError(
                f"{METADATA_MEMBER} says total_file_bytes is "
                f"{contents.metadata['total_file_bytes']}, but {FILES_MEMBER} adds up to {total}"
            )
