"""The JSON listings of a backup (SPEC §7): names, schema validation and ``BackupContents``.

The reader validates what it extracts and the writer validates what it is about to write with the
same functions, so nothing is written that could not be read back. Listings come from clients:
JSON is decoded strictly and every failure is an ``ArchiveError`` naming the member and the id.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from cfms_trio.conventions import (
    ACCESS_TYPES,
    ACCOUNT_NAME_MAX_CHARS,
    ACCOUNT_NAMES_MAX,
    BACKUP_PARTS,
    NICKNAME_MAX_CHARS,
    PASSWORD_HASH_MAX_CHARS,
    ID_MAX_CHARS,
    ID_PATTERN,
    RULE_DATA_MAX_BYTES,
    RULE_MATCH_GROUPS_MAX,
    RULE_MATCH_VALUES,
    RULE_REQUIRE_NAMES_MAX,
    RULES_PER_ACCESS_TYPE_MAX,
    SHA256_HEX_PATTERN,
    with_prerequisites,
)
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

from .jsonstream import JsonArray

FORMAT_NAME = "cfms-backup"
VERSION_V3 = "3.0"  # newline-delimited listings in pieces, accounts, audit
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
    """What reading a backup found, apart from its records (which went to the reader's
    ``RecordSink`` one by one, validated): the metadata, the parts, how many records of each
    listing kind were read, and what reading had to change.

    Only a legacy archive has files that are not served: ``inactive_file_ids`` are restored
    inactive (uploads that never happened upstream, or content missing from the archive), and
    ``absent_file_ids`` (all of them inactive) have no content in the staging folder.
    ``warnings`` say, in plain words, what reading had to change.
    """

    format_version: str
    metadata: dict
    counts: dict[str, int]  # listing kind (folders, documents, files, groups, users, audit)
    total_file_bytes: int = 0
    inactive_file_ids: set[str] = dataclasses.field(default_factory=set)
    absent_file_ids: set[str] = dataclasses.field(default_factory=set)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def parts(self) -> tuple[str, ...]:
        return parts_of(self.metadata)


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


METADATA_FIELDS = {
    "created_at": _as_time,
    "backup_name": _as_text,
    "server_version": _as_text,
    "folders_count": _as_size,
    "documents_count": _as_size,
    "files_count": _as_size,
    "total_file_bytes": _as_size,
}
# Payload 3.0 adds the accounts and the audit log.
METADATA_V3_COUNTS = ("groups_count", "users_count", "audit_count")


def _parse_parts(metadata: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """3.0: the parts the archive holds and the ones its maker asked for."""
    out = []
    for field in ("parts", "requested_parts"):
        value = _as_list(_require(metadata, field, METADATA_MEMBER), f"{METADATA_MEMBER}: {field}")
        if (not all(isinstance(part, str) and part in BACKUP_PARTS for part in value)
                or len(set(value)) != len(value)):
            raise ArchiveError(f"{METADATA_MEMBER}: {field} must list distinct parts among "
                               f"{', '.join(BACKUP_PARTS)}")
        out.append(tuple(part for part in BACKUP_PARTS if part in value))
    parts, requested = out
    if with_prerequisites(parts) != parts or not set(requested) <= set(parts):
        raise ArchiveError(f"{METADATA_MEMBER}: parts {list(parts)} lack a prerequisite of "
                           f"{list(requested)}")
    return parts, requested


def parse_metadata(value, container_version: str | None) -> dict:
    """Validate metadata.json. A legacy container must hold version 1.0; a format 2 stream
    holds 2.0 or 3.0 (``container_version`` None)."""
    metadata = _as_object(value, METADATA_MEMBER)
    version = _require(metadata, "version", METADATA_MEMBER)
    if version not in (VERSION_V3, VERSION_V2, VERSION_LEGACY):
        if isinstance(version, str):
            shown = show_name(version)
        else:
            shown = f"of type {type(version).__name__}"
        raise ArchiveError(f"unsupported backup version {shown} in {METADATA_MEMBER}")
    if (container_version == VERSION_LEGACY) != (version == VERSION_LEGACY):
        raise ArchiveError(
            f"{METADATA_MEMBER} says version {version}, "
            f"but the archive is format {container_version or '2 (CFMSBAK2)'}"
        )
    strict = version != VERSION_LEGACY
    parsed: dict[str, Any] = {"version": version}
    if strict:
        if _require(metadata, "format", METADATA_MEMBER) != FORMAT_NAME:
            raise ArchiveError(f"{METADATA_MEMBER}: format must be {FORMAT_NAME!r}")
        parsed["format"] = FORMAT_NAME
    checks = dict(METADATA_FIELDS)
    if version == VERSION_V3:
        checks.update(dict.fromkeys(METADATA_V3_COUNTS, _as_size))
        parsed["parts"], parsed["requested_parts"] = map(list, _parse_parts(metadata))
    for field, check in checks.items():
        if strict:
            value = _require(metadata, field, METADATA_MEMBER)
            parsed[field] = check(value, METADATA_MEMBER, field)
        elif metadata.get(field) is not None:
            parsed[field] = check(metadata[field], METADATA_MEMBER, field)
    return parsed


def parts_of(metadata: dict) -> tuple[str, ...]:
    """The parts an archive holds: 3.0 says so; 2.0 and 1.0 hold documents only."""
    return tuple(metadata.get("parts", ("documents",)))


def parse_folder(entry, index: int, legacy: bool, member: str = FOLDERS_MEMBER) -> dict:
    entry, folder_id, where = _entry_where(member, "folder", index, entry)
    owner = f"folder {folder_id!r}"
    return {
        "id": folder_id,
        "name": _as_text(_require(entry, "name", where), where, "name"),
        "parent_id": _as_optional_id(_require(entry, "parent_id", where), where, "parent_id"),
        "created_time": _as_time(_require(entry, "created_time", where), where, "created_time"),
        "access_rules": _parse_access_rules(entry, where, legacy, member, owner),
    }


def _parse_revisions(document: dict, where: str, owner: str, member: str) -> list[dict]:
    revisions = []
    entries = _as_list(_require(document, "revisions", where), f"{where}: revisions")
    for index, revision in enumerate(entries):
        rev_where = f"{where}: revision {index}"
        revision = _as_object(revision, rev_where)
        revision_id = _as_child_id(_require(revision, "id", rev_where), rev_where,
                                   member, "revision", owner)
        rev_where = f"{where}: revision {revision_id!r}"
        revisions.append({
            "id": revision_id,
            "file_id": _as_id(_require(revision, "file_id", rev_where), rev_where, "file_id"),
            "created_time": _as_time(
                _require(revision, "created_time", rev_where), rev_where, "created_time"
            ),
        })
    return revisions


def parse_document(entry, index: int, legacy: bool, member: str = DOCUMENTS_MEMBER) -> dict:
    entry, document_id, where = _entry_where(member, "document", index, entry)
    owner = f"document {document_id!r}"
    return {
        "id": document_id,
        "title": _as_text(_require(entry, "title", where), where, "title"),
        "folder_id": _as_optional_id(_require(entry, "folder_id", where), where, "folder_id"),
        "created_time": _as_time(_require(entry, "created_time", where), where, "created_time"),
        "access_rules": _parse_access_rules(entry, where, legacy, member, owner),
        "revisions": _parse_revisions(entry, where, owner, member),
    }


def parse_file(entry, index: int, legacy: bool, member: str = FILES_MEMBER) -> dict:
    """A files listing entry; legacy entries may lack ``size`` and have a null ``sha256``
    (None until extraction computes them)."""
    entry, file_id, where = _entry_where(member, "file", index, entry)
    if legacy and entry.get("size") is None:
        size = None
    else:
        size = _as_size(_require(entry, "size", where), where, "size")
    if legacy and entry.get("sha256") is None:
        sha256 = None
    else:
        sha256 = _as_sha256(_require(entry, "sha256", where), where, "sha256")
    return {
        "id": file_id,
        "sha256": sha256,
        "size": size,
        "created_time": _as_time(_require(entry, "created_time", where), where, "created_time"),
    }


def _as_name(value, where: str, field: str, max_chars: int = ACCOUNT_NAME_MAX_CHARS) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= max_chars:
        raise ArchiveError(f"{where}: {field} must be a string of 1 to {max_chars} characters")
    return value


def _as_names(value, where: str, field: str) -> list[str]:
    names = _as_list(value, f"{where}: {field}")
    if len(names) > ACCOUNT_NAMES_MAX:
        raise ArchiveLimitExceeded(f"{where}: {field} lists {len(names)} names, more than "
                                   f"{ACCOUNT_NAMES_MAX}")
    parsed = [_as_name(name, where, field) for name in names]
    if len(set(parsed)) != len(parsed):
        raise ArchiveError(f"{where}: {field} lists a name twice")
    return sorted(parsed)


def _as_optional_text(value, where: str, field: str) -> str | None:
    return None if value is None else _as_text(value, where, field)


def parse_group(entry, index: int, member: str) -> dict:
    where = f"{member}: entry {index}"
    entry = _as_object(entry, where)
    name = _as_name(_require(entry, "name", where), where, "name")
    where = f"{member}: group {name!r}"
    return {"name": name,
            "permissions": _as_names(_require(entry, "permissions", where), where, "permissions"),
            "created_time": _as_time(_require(entry, "created_time", where), where,
                                     "created_time")}


def parse_user(entry, index: int, member: str) -> dict:
    """A user with its password hash (opaque here; the restoring server checks it names a
    scheme it verifies), its direct permissions and its groups."""
    where = f"{member}: entry {index}"
    entry = _as_object(entry, where)
    username = _as_name(_require(entry, "username", where), where, "username")
    where = f"{member}: user {username!r}"
    return {
        "username": username,
        "password_hash": _as_name(_require(entry, "password_hash", where), where,
                                  "password_hash", PASSWORD_HASH_MAX_CHARS),
        "nickname": _as_text(_require(entry, "nickname", where), where, "nickname")[
            :NICKNAME_MAX_CHARS],
        "permissions": _as_names(_require(entry, "permissions", where), where, "permissions"),
        "groups": _as_names(_require(entry, "groups", where), where, "groups"),
        "created_time": _as_time(_require(entry, "created_time", where), where,
                                 "created_time"),
        "passwd_last_modified": _as_time(_require(entry, "passwd_last_modified", where), where,
                                         "passwd_last_modified"),
    }


AUDIT_TEXT_MAX_CHARS = 4096


def parse_audit_entry(entry, index: int, member: str) -> dict:
    where = f"{member}: entry {index}"
    entry = _as_object(entry, where)
    out: dict[str, Any] = {"time": _as_time(_require(entry, "time", where), where, "time")}
    for field in ("username", "action", "target", "address"):
        value = _require(entry, field, where)
        text = (_as_text(value, where, field) if field == "action"
                else _as_optional_text(value, where, field))
        if text is not None and len(text) > AUDIT_TEXT_MAX_CHARS:
            raise ArchiveError(f"{where}: {field} is longer than {AUDIT_TEXT_MAX_CHARS} "
                               "characters")
        out[field] = text
    result = _require(entry, "result", where)
    if type(result) is not int:
        raise ArchiveError(f"{where}: result must be an integer")
    out["result"] = result
    return out


# The record parser of each listing kind (payload 3.0 names its listings by kind).
RECORD_PARSERS = {
    "folders": lambda entry, index, member: parse_folder(entry, index, False, member),
    "documents": lambda entry, index, member: parse_document(entry, index, False, member),
    "files": lambda entry, index, member: parse_file(entry, index, False, member),
    "groups": parse_group,
    "users": parse_user,
    "audit": parse_audit_entry,
}
