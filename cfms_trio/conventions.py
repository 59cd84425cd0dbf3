"""The shared vocabulary of the server, its archives and its client: the one home of each name.

Group and permission names, access types, the shape of object ids, backup task states and the
file suffixes of a backup pair. Nothing here imports anything: every layer may use it.
"""

from __future__ import annotations

import re
import secrets

# -- accounts (SPEC §2, §4) ---------------------------------------------------------------------
ADMIN_USERNAME = "admin"
SYSOP_GROUP = "sysop"  # every permission; its members bypass access rules
USER_GROUP = "user"
# The owner recorded on the backup tasks of a deleted account. No account can have an empty
# name, so a later account of the same name never inherits them (issue 12 item 4).
DELETED_OWNER = ""

ALL_PERMISSIONS = (
    "import_backup", "export_backup", "create_document", "create_directory",
    "delete_document", "delete_directory", "rename_document", "rename_directory", "move",
    "set_access_rules", "view_access_rules", "list_users", "create_user", "delete_user",
    "set_passwd", "super_set_passwd", "list_groups", "create_group", "delete_group",
    "change_user_groups", "set_group_permissions", "view_audit_logs",
)
# Granted to the `user` group on first start: what an ordinary member needs to work with documents.
DEFAULT_USER_PERMISSIONS = (
    "create_document", "create_directory", "delete_document", "delete_directory",
    "rename_document", "rename_directory", "move", "set_passwd",
)

# -- objects (SPEC §4, §5) ----------------------------------------------------------------------
ACCESS_TYPES = ("read", "write", "move", "manage")
MAX_TREE_DEPTH = 1000  # levels of folders; deeper trees are refused, by the API and by imports
NAME_MAX_CHARS = 1024  # folder names and document titles (the upstream has no limit)
RULE_MATCH_VALUES = ("all", "any")
# Bounds on access rules wherever they enter (the API and backup archives): every access check
# of an object and of everything below it evaluates its rules, and storing them holds the one
# database writer, so neither may grow with what a client chooses to send.
RULES_PER_ACCESS_TYPE_MAX = 1000  # rules of one object for one access type
RULE_MATCH_GROUPS_MAX = 32  # entries of one rule's `match_groups`
RULE_REQUIRE_NAMES_MAX = 128  # names in one `rights.require` or `groups.require`
RULE_DATA_MAX_BYTES = 16 * 1024  # one rule as compact JSON (UTF-8)
ID_MAX_CHARS = 64
# Ids we accept from clients and archives; ids we make are `new_id()` hex strings.
ID_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,64}")
SHA256_HEX_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
ID_BYTES = 16


def new_id() -> str:
    """A random hex object id (SPEC §5)."""
    return secrets.token_hex(ID_BYTES)


def is_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


# -- backup tasks (SPEC §8) ---------------------------------------------------------------------
OPERATION_IMPORT = "import"
OPERATION_EXPORT = "export"
STATUS_PENDING = "pending"
STATUS_PROCESSING = "processing"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_TIMEOUT = "timeout"
STATUS_CANCELLED = "cancelled"
# A dry run ended: the plan is ready and the uploads are kept until the task's deadline, so the
# task can be started again. Not final.
STATUS_PLANNED = "planned"
FINAL_STATUSES = (STATUS_COMPLETED, STATUS_FAILED, STATUS_TIMEOUT, STATUS_CANCELLED)
# Imports whose uploads are kept and which may still be started or cancelled.
STARTABLE_STATUSES = (STATUS_PENDING, STATUS_PLANNED)
# How an import treats archive objects that meet existing ones (docs/BACKUP_RESTORE.md).
CONFLICT_POLICIES = ("fail", "skip", "overwrite", "new_ids")
CONFLICT_DEFAULT_POLICY = "fail"

# -- backup files (SPEC §7) ---------------------------------------------------------------------
ARCHIVE_SUFFIX = ".cfms.enc"
KEY_SUFFIX = ".key"
# A backup's name is the stem of both files of its pair, so it must stay one plain file name:
# letters, digits, '.', '_' and '-', starting with a letter or digit, never '..'.
BACKUP_NAME_MAX_CHARS = 100
BACKUP_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def is_backup_name(value: object) -> bool:
    return (isinstance(value, str) and BACKUP_NAME_PATTERN.fullmatch(value) is not None
            and ".." not in value)


# What a backup holds (issue 13): `generate_backup {parts}` picks among these; a part's
# prerequisites are added to it. `audit` needs `accounts`: an audit entry names its actor by
# username, and without the accounts of the same backup that name would point at whoever holds
# it on the restoring server.
BACKUP_PARTS = ("accounts", "documents", "audit")
BACKUP_PART_NEEDS = {"audit": ("accounts",)}
# How `start_backup_import {accounts}` applies an archive's accounts (docs/BACKUP_RESTORE.md).
ACCOUNTS_POLICIES = ("skip_existing", "replace", "none")
ACCOUNTS_DEFAULT_POLICY = "skip_existing"
ACCOUNT_NAME_MAX_CHARS = 64  # usernames and group names (SPEC §2)
PASSWORD_HASH_MAX_CHARS = 1024
NICKNAME_MAX_CHARS = 255
ACCOUNT_NAMES_MAX = 1000  # groups of one user, permissions of one user or group


def with_prerequisites(parts) -> tuple[str, ...]:
    """`parts` plus every part they need, in BACKUP_PARTS order."""
    wanted = set(parts)
    for part in list(wanted):
        wanted.update(BACKUP_PART_NEEDS.get(part, ()))
    return tuple(part for part in BACKUP_PARTS if part in wanted)
