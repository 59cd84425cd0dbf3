"""Applying a restored backup's accounts and audit log (blocking; inside the restore's
transaction). The policies are those of `start_backup_import {accounts}`
(docs/BACKUP_RESTORE.md, "Accounts"):

- `skip_existing`: groups and users absent here are created; those present keep their data.
- `replace`: present ones take the archive's data too, except that the importing
  administrator's own account (password, groups, permissions) is never touched and the
  `sysop` group keeps its permissions here, so the importer never loses access; sessions of
  replaced users end. Accounts absent from the archive are never removed.
- `none`: no account is imported.

Afterwards some member of `sysop` must still hold every permission (the lock-out rule), or the
whole import fails and rolls back.
"""

from __future__ import annotations

from typing import Iterable

from ..conventions import SYSOP_GROUP
from .accounts import require_an_administrator
from .restore_rows import AUDIT_FIELDS, LOOKUP_BATCH_IDS, existing_keys, insert_rows


def _names_present(model, field: str, names: list[str]) -> set[str]:
    present: set[str] = set()
    for start in range(0, len(names), LOOKUP_BATCH_IDS):
        present.update(existing_keys(model, field, names[start:start + LOOKUP_BATCH_IDS]))
    return present


def apply_groups(m, batches: Iterable[list[tuple]], policy: str) -> dict:
    """Groups from batches of (name, permissions JSON, created_time)."""
    created, replaced, kept = [], [], []
    for batch in batches:
        present = _names_present(m.Group, "name", [row[0] for row in batch])
        new = [row for row in batch if row[0] not in present]
        insert_rows(m.Group, ("name", "permissions", "created_time"), [new])
        created += [row[0] for row in new]
        for name, permissions, created_time in batch:
            if name not in present:
                continue
            if policy == "replace" and name != SYSOP_GROUP:
                (m.Group.update(permissions=permissions, created_time=created_time)
                 .where(m.Group.name == name).execute())
                replaced.append(name)
            else:
                kept.append(name)
    return {"created": created, "replaced": replaced, "kept": kept}


def apply_users(m, batches: Iterable[list[tuple]], groups_of, policy: str,
                importer: str) -> dict:
    """Users from batches of (username, password_hash, nickname, permissions JSON,
    created_time, passwd_last_modified); `groups_of(usernames)` gives their memberships."""
    created, replaced, kept = [], [], []
    fields = ("username", "password_hash", "nickname", "permissions", "created_time",
              "passwd_last_modified")
    for batch in batches:
        present = _names_present(m.User, "username", [row[0] for row in batch])
        replace = [row for row in batch if row[0] in present and policy == "replace"
                   and row[0] != importer]
        new = [row for row in batch if row[0] not in present]
        replacing = {row[0] for row in replace}
        kept += [row[0] for row in batch if row[0] in present and row[0] not in replacing]
        for row in replace:
            m.User.update(**dict(zip(fields[1:], row[1:]))).where(
                m.User.username == row[0]).execute()
            m.UserGroup.delete().where(m.UserGroup.user == row[0]).execute()
            m.Token.delete().where(m.Token.user == row[0]).execute()
        insert_rows(m.User, fields, [new])
        touched = [row[0] for row in new + replace]
        insert_rows(m.UserGroup, ("user", "group"), [groups_of(touched)])
        created += [row[0] for row in new]
        replaced += [row[0] for row in replace]
    require_an_administrator(m)
    return {"created": created, "replaced": replaced, "kept": kept}


def append_audit(m, batches: Iterable[list[tuple]]) -> int:
    """Audit entries appended after this server's own, in archive order: new ids (this
    server's numbering continues), the original times, actors, actions and results."""
    return insert_rows(m.AuditLog, AUDIT_FIELDS, batches)


def absent_groups(m, batches: Iterable[list[tuple]]) -> list[str]:
    """Which group names of `batches` (of 1-tuples) no group here holds."""
    missing = []
    for batch in batches:
        names = [row[0] for row in batch]
        present = _names_present(m.Group, "name", names)
        missing += [name for name in names if name not in present]
    return missing
