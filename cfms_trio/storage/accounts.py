"""Users, groups, tokens and the audit log (blocking; run through Store)."""

from __future__ import annotations

import json

from ..errors import Conflict, NotFound
from ..conventions import (
    ADMIN_USERNAME,
    ALL_PERMISSIONS,
    DEFAULT_USER_PERMISSIONS,
    SYSOP_GROUP,
    USER_GROUP,
)
from ..permissions import Principal


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


def create_user(m, username: str, password_hash: str, nickname: str, groups: list[str],
                permissions: list[str], now: float) -> None:
    if m.User.get_or_none(m.User.username == username) is not None:
        raise Conflict(f"user '{username}' already exists")
    _require_groups(m, groups)
    m.User.create(username=username, password_hash=password_hash, nickname=nickname,
                  permissions=json.dumps(sorted(set(permissions))), created_time=now,
                  passwd_last_modified=now)
    for group in sorted(set(groups)):
        m.UserGroup.create(user=username, group=group)


def delete_user(m, username: str) -> None:
    if m.User.delete().where(m.User.username == username).execute() == 0:
        raise NotFound(f"user '{username}' does not exist")


def set_password_hash(m, username: str, password_hash: str, now: float) -> None:
    updated = (m.User.update(password_hash=password_hash, passwd_last_modified=now)
               .where(m.User.username == username).execute())
    if not updated:
        raise NotFound(f"user '{username}' does not exist")
    # A password change ends every session of that user.
    m.Token.delete().where(m.Token.user == username).execute()


def list_groups(m) -> list[dict]:
    out = []
    for group in m.Group.select().order_by(m.Group.name):
        members = [ug.username for ug in m.UserGroup.select().where(m.UserGroup.group == group.name)]
        out.append({"name": group.name, "permissions": sorted(json.loads(group.permissions)),
                    "members": sorted(members), "created_time": group.created_time})
    return out


def create_group(m, name: str, permissions: list[str], now: float) -> None:
    if m.Group.get_or_none(m.Group.name == name) is not None:
        raise Conflict(f"group '{name}' already exists")
    m.Group.create(name=name, permissions=json.dumps(sorted(set(permissions))), created_time=now)


def delete_group(m, name: str) -> None:
    if name == SYSOP_GROUP:
        raise Conflict("the 'sysop' group cannot be deleted")
    if m.Group.delete().where(m.Group.name == name).execute() == 0:
        raise NotFound(f"group '{name}' does not exist")


def set_user_groups(m, username: str, groups: list[str]) -> None:
    if m.User.get_or_none(m.User.username == username) is None:
        raise NotFound(f"user '{username}' does not exist")
    _require_groups(m, groups)
    m.UserGroup.delete().where(m.UserGroup.user == username).execute()
    for group in sorted(set(groups)):
        m.UserGroup.create(user=username, group=group)


def set_group_permissions(m, name: str, permissions: list[str]) -> None:
    updated = (m.Group.update(permissions=json.dumps(sorted(set(permissions))))
               .where(m.Group.name == name).execute())
    if not updated:
        raise NotFound(f"group '{name}' does not exist")


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
