"""Users, groups, tokens and the audit log (blocking; run through Store)."""

from __future__ import annotations

import json

from ..errors import Conflict, Forbidden, NotFound
from ..conventions import (
    ADMIN_USERNAME,
    ALL_PERMISSIONS,
    DEFAULT_USER_PERMISSIONS,
    SYSOP_GROUP,
    USER_GROUP,
)
from ..permissions import Principal
from . import backup_tasks, transfers

DELETED_ACCOUNT_MESSAGE = "the account that owned this import was deleted"


def is_initialized(m) -> bool:
    return m.User.select().exists()


def bootstrap(m, admin_password_hash: str, now: float) -> None:
    """First start: the groups `sysop` (every permission) and `user`, and `admin` in both."""
    m.Group.create(name=SYSOP_GROUP, permissions=json.dumps(list(ALL_PERMISSIONS)),
                   created_time=now)
    m.Group.create(name=USER_GROUP, permissions=json.dumps(list(DEFAULT_USER_PERMISSIONS)),
                   created_time=now)
    m.User.create(username=ADMIN_USERNAME, password_hash=admin_password_hash,
                  nickname="Administrator", created_time=now, passwd_last_modified=now)
    for group in (SYSOP_GROUP, USER_GROUP):
        m.UserGroup.create(user=ADMIN_USERNAME, group=group)


def password_hash_of(m, username: str) -> str | None:
    row = m.User.get_or_none(m.User.username == username)
    return row.password_hash if row else None


def _principal(m, user) -> Principal:
    groups = [ug.group for ug in m.UserGroup.select(m.UserGroup, m.Group)
              .join(m.Group).where(m.UserGroup.user == user.username)]
    permissions = set(json.loads(user.permissions))
    for group in groups:
        permissions.update(json.loads(group.permissions))
    return Principal(user.username, frozenset(permissions),
                     frozenset(g.name for g in groups), user.nickname)


def principal_of(m, username: str) -> Principal:
    user = m.User.get_or_none(m.User.username == username)
    if user is None:
        raise NotFound(f"user '{username}' does not exist")
    return _principal(m, user)


def store_token(m, username: str, token_hash: str, now: float, expires: float) -> None:
    m.Token.delete().where(m.Token.expires_time < now).execute()
    m.Token.create(token_hash=token_hash, user=username, created_time=now, expires_time=expires)


def authenticate(m, username: str, token_hash: str, now: float) -> Principal | None:
    """The principal for a live token of `username`, or None."""
    token = m.Token.get_or_none((m.Token.token_hash == token_hash) & (m.Token.user == username))
    if token is None or token.expires_time <= now:
        return None
    return principal_of(m, username)


# Token hashes looked up per query by `live_principals`, well under SQLite's variable limit.
SESSION_LOOKUP_BATCH = 500


def live_principals(m, sessions: list[tuple[str, str]], now: float) -> dict[str, Principal]:
    """For each `(token_hash, username)` whose token is live at `now`, the principal of that
    user as it is now, keyed by token hash. Ended sessions are absent (logged out, expired,
    password changed, account deleted): the event hub's audience at publish time."""
    live: dict[str, str] = {}
    for start in range(0, len(sessions), SESSION_LOOKUP_BATCH):
        hashes = [token_hash for token_hash, _ in sessions[start:start + SESSION_LOOKUP_BATCH]]
        live.update((t.token_hash, t.__data__["user"]) for t in m.Token.select().where(
            m.Token.token_hash.in_(hashes) & (m.Token.expires_time > now)))
    principals: dict[str, Principal] = {}
    out = {}
    for token_hash, username in sessions:
        if live.get(token_hash) == username:
            if username not in principals:
                principals[username] = principal_of(m, username)
            out[token_hash] = principals[username]
    return out


def delete_token(m, token_hash: str) -> None:
    m.Token.delete().where(m.Token.token_hash == token_hash).execute()


def _user_dict(m, user) -> dict:
    principal = _principal(m, user)
    return {
        "username": user.username,
        "nickname": user.nickname,
        "groups": sorted(principal.groups),
        "permissions": sorted(json.loads(user.permissions)),
        "effective_permissions": sorted(principal.permissions),
        "created_time": user.created_time,
        "passwd_last_modified": user.passwd_last_modified,
    }


def list_users(m) -> list[dict]:
    return [_user_dict(m, u) for u in m.User.select().order_by(m.User.username)]


def user_info(m, username: str) -> dict:
    user = m.User.get_or_none(m.User.username == username)
    if user is None:
        raise NotFound(f"user '{username}' does not exist")
    return _user_dict(m, user)


def _require_groups(m, groups: list[str]) -> None:
    known = {g.name for g in m.Group.select(m.Group.name).where(m.Group.name.in_(groups))}
    for group in groups:
        if group not in known:
            raise NotFound(f"group '{group}' does not exist")


def _require_grantable(m, caller: str, *, permissions=(), groups=()) -> None:
    """403 unless `caller` holds, now, every permission and group it is handing on or taking
    away (`Principal.lacks`). Checked in the transaction that makes the change."""
    lacking = principal_of(m, caller).lacks(permissions=permissions, groups=groups)
    if lacking:
        raise Forbidden(f"you may grant or revoke only what you hold yourself: {lacking}")


def require_an_administrator(m) -> None:
    """409 unless some member of `sysop` holds every permission. Called after a change, in its
    transaction: refusing rolls the change back, and two concurrent changes are serialized by
    the single writer, so they cannot both take away the last administrator."""
    members = (m.User.select().join(m.UserGroup, on=(m.UserGroup.user == m.User.username))
               .where(m.UserGroup.group == SYSOP_GROUP))
    everything = set(ALL_PERMISSIONS)
    if any(everything <= _principal(m, user).permissions for user in members):
        return
    raise Conflict(f"refused: afterwards no member of '{SYSOP_GROUP}' would hold every "
                   "permission, and nobody could administer the server")


def _outranking(m, caller: str, username: str, doing: str) -> Forbidden | None:
    """The refusal when `username` holds a permission or group `caller` lacks: deleting an
    account or setting its password must not reach someone more privileged than the caller."""
    target = principal_of(m, username)
    lacking = principal_of(m, caller).lacks(permissions=target.permissions,
                                            groups=target.groups)
    if lacking:
        return Forbidden(f"you may not {doing} '{username}', who holds more than you: "
                         f"{lacking}")
    return None


def create_user(m, caller: str, username: str, password_hash: str, nickname: str,
                groups: list[str], permissions: list[str], now: float) -> None:
    if m.User.get_or_none(m.User.username == username) is not None:
        raise Conflict(f"user '{username}' already exists")
    _require_groups(m, groups)
    _require_grantable(m, caller, permissions=permissions, groups=groups)
    m.User.create(username=username, password_hash=password_hash, nickname=nickname,
                  permissions=json.dumps(sorted(set(permissions))), created_time=now,
                  passwd_last_modified=now)
    for group in sorted(set(groups)):
        m.UserGroup.create(user=username, group=group)


def delete_user(m, caller: str, username: str, now: float) -> dict:
    """Delete an account with its sessions, group memberships and file tasks; its pending
    imports end failed and its backup tasks pass to no account (`abandon_tasks_of`).

    Returns what the caller closes outside the database: `imports` (the failed imports) and
    `file_task_ids` (every file task the account held, to abort and remove partial uploads).
    """
    if m.User.get_or_none(m.User.username == username) is None:
        raise NotFound(f"user '{username}' does not exist")
    outranked = _outranking(m, caller, username, "delete")
    file_task_ids = transfers.task_ids_of(m, username)
    imports = backup_tasks.abandon_tasks_of(m, username, DELETED_ACCOUNT_MESSAGE, now)
    m.User.delete().where(m.User.username == username).execute()  # cascades to its rows
    # Raising rolls the change back. The lock-out is checked first: it holds whoever asks.
    require_an_administrator(m)
    if outranked:
        raise outranked
    return {"imports": imports, "file_task_ids": file_task_ids}


def set_password_hash(m, caller: str, username: str, password_hash: str, now: float) -> None:
    """Set a password; another account's only if `caller` holds everything it holds."""
    if m.User.get_or_none(m.User.username == username) is None:
        raise NotFound(f"user '{username}' does not exist")
    if caller != username and (outranked := _outranking(m, caller, username,
                                                        "set the password of")):
        raise outranked
    (m.User.update(password_hash=password_hash, passwd_last_modified=now)
     .where(m.User.username == username).execute())
    # A password change ends every session of that user.
    m.Token.delete().where(m.Token.user == username).execute()


def list_groups(m) -> list[dict]:
    out = []
    for group in m.Group.select().order_by(m.Group.name):
        members = [ug.username for ug in m.UserGroup.select().where(m.UserGroup.group == group.name)]
        out.append({"name": group.name, "permissions": sorted(json.loads(group.permissions)),
                    "members": sorted(members), "created_time": group.created_time})
    return out


def create_group(m, caller: str, name: str, permissions: list[str], now: float) -> None:
    if m.Group.get_or_none(m.Group.name == name) is not None:
        raise Conflict(f"group '{name}' already exists")
    _require_grantable(m, caller, permissions=permissions)
    m.Group.create(name=name, permissions=json.dumps(sorted(set(permissions))), created_time=now)


def _group_permissions(m, name: str) -> set[str]:
    group = m.Group.get_or_none(m.Group.name == name)
    if group is None:
        raise NotFound(f"group '{name}' does not exist")
    return set(json.loads(group.permissions))


def delete_group(m, caller: str, name: str) -> None:
    """Delete a group; its members lose its permissions, so the caller must hold them all."""
    if name == SYSOP_GROUP:
        raise Conflict("the 'sysop' group cannot be deleted")
    _require_grantable(m, caller, permissions=_group_permissions(m, name))
    m.Group.delete().where(m.Group.name == name).execute()
    require_an_administrator(m)


def set_user_groups(m, caller: str, username: str, groups: list[str]) -> None:
    """Replace a user's groups. Every group added or removed must be one the caller is in."""
    if m.User.get_or_none(m.User.username == username) is None:
        raise NotFound(f"user '{username}' does not exist")
    _require_groups(m, groups)
    before = {ug.__data__["group"] for ug in m.UserGroup.select()
              .where(m.UserGroup.user == username)}
    _require_grantable(m, caller, groups=before ^ set(groups))
    m.UserGroup.delete().where(m.UserGroup.user == username).execute()
    for group in sorted(set(groups)):
        m.UserGroup.create(user=username, group=group)
    require_an_administrator(m)


def set_group_permissions(m, caller: str, name: str, permissions: list[str]) -> None:
    """Replace a group's permissions. Every permission added or removed must be the caller's."""
    before = _group_permissions(m, name)
    _require_grantable(m, caller, permissions=before ^ set(permissions))
    (m.Group.update(permissions=json.dumps(sorted(set(permissions))))
     .where(m.Group.name == name).execute())
    require_an_administrator(m)


def add_audit(m, time: float, username: str | None, action: str, target: str | None,
              result: int, address: str | None) -> None:
    m.AuditLog.create(time=time, username=username, action=action, target=target,
                      result=result, address=address)


def list_audit(m, offset: int, limit: int, username: str | None, action: str | None) -> dict:
    query = m.AuditLog.select()
    if username:
        query = query.where(m.AuditLog.username == username)
    if action:
        query = query.where(m.AuditLog.action == action)
    total = query.count()
    rows = query.order_by(m.AuditLog.id.desc()).offset(offset).limit(limit)
    return {
        "total": total,
        "entries": [{"id": r.id, "time": r.time, "username": r.username, "action": r.action,
                     "target": r.target, "result": r.result, "address": r.address} for r in rows],
    }
