"""The routing table: every action, its handler, schema and permission, top to bottom."""

from __future__ import annotations

from ..dispatch import Route
from ..schema import Field, name_field, optional
from . import accounts, session

USERNAME = Field(str, min_len=1, max_len=accounts.USERNAME_MAX)
PASSWORD = Field(str, min_len=1, max_len=accounts.PASSWORD_MAX)
NAME_LIST = optional(list, default=[], max_len=1000)

ROUTES: list[Route] = [
    # sessions and events
    Route("server_info", session.server_info, anonymous=True),
    Route("login", session.login, {"username": USERNAME, "password": PASSWORD},
          anonymous=True, audited=True),
    Route("refresh_token", session.refresh_token),
    Route("logout", session.logout, audited=True),
    Route("register_listener", session.register_listener),
    # users
    Route("list_users", accounts.list_users, permission="list_users"),
    Route("get_user_info", accounts.get_user_info, {"username": optional(str, max_len=64)}),
    Route("create_user", accounts.create_user,
          {"username": USERNAME, "password": PASSWORD,
           "nickname": optional(str, max_len=255), "groups": NAME_LIST,
           "permissions": NAME_LIST},
          permission="create_user", audited=True),
    Route("delete_user", accounts.delete_user, {"username": USERNAME},
          permission="delete_user", audited=True),
    Route("set_passwd", accounts.set_passwd,
          {"username": optional(str, max_len=64), "old_password": optional(str, max_len=1024),
           "new_password": PASSWORD},
          audited=True),
    # groups
    Route("list_groups", accounts.list_groups, permission="list_groups"),
    Route("create_group", accounts.create_group,
          {"name": name_field(64), "permissions": NAME_LIST},
          permission="create_group", audited=True),
    Route("delete_group", accounts.delete_group, {"name": name_field(64)},
          permission="delete_group", audited=True),
    Route("change_user_groups", accounts.change_user_groups,
          {"username": USERNAME, "groups": Field(list, max_len=1000)},
          permission="change_user_groups", audited=True),
    Route("set_group_permissions", accounts.set_group_permissions,
          {"name": name_field(64), "permissions": Field(list, max_len=1000)},
          permission="set_group_permissions", audited=True),
    # audit
    Route("view_audit_logs", accounts.view_audit_logs,
          {"offset": optional(int, default=0, min=0), "limit": optional(int, default=100, min=1, max=1000),
           "username": optional(str, max_len=64), "action": optional(str, max_len=64)},
          permission="view_audit_logs"),
]
