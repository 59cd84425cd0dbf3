"""Users, groups and the audit log."""

from __future__ import annotations

import trio

from .. import auth
from ..dispatch import Context
from ..errors import BadRequest, Forbidden, Unauthorized
from ..conventions import ALL_PERMISSIONS
from ..storage import accounts

USERNAME_MAX = 64
PASSWORD_MIN = 8
PASSWORD_MAX = 1024


def check_password_strength(password: str, field: str) -> None:
    if len(password) < PASSWORD_MIN:
        raise BadRequest(f"field 'data.{field}' must be at least {PASSWORD_MIN} characters")


def check_permission_names(permissions: list) -> list[str]:
    for permission in permissions:
        if not isinstance(permission, str) or permission not in ALL_PERMISSIONS:
            raise BadRequest(f"field 'data.permissions' holds unknown permission {permission!r}")
    return permissions


def check_names(names: list, field: str) -> list[str]:
    for name in names:
        if not isinstance(name, str) or not name:
            raise BadRequest(f"field 'data.{field}' must hold only non-empty strings")
    return names


async def close_file_tasks(ctx: Context, task_ids: list[str], reason: str) -> None:
    """After the rows of file tasks are gone: abort their uploads running now (each removes
    its own partial file as it unwinds, answering `reason`) and remove the partial uploads of
    the others, which nobody can resume any more."""
    app = ctx.app
    for task_id in task_ids:
        app.transfers.abort(task_id, reason)
    parts = [task_id for task_id in task_ids if not app.transfers.is_active(task_id)]
    if parts:
        await trio.to_thread.run_sync(app.content.discard_partial_uploads, parts,
                                      limiter=app.io_limiter)


async def list_users(ctx: Context, data: dict) -> dict:
    return {"users": await ctx.app.store.read(accounts.list_users)}


async def get_user_info(ctx: Context, data: dict) -> dict:
    username = data["username"] or ctx.user.username
    if username != ctx.user.username and not ctx.user.has("list_users"):
        raise Forbidden("permission 'list_users' required to see another user")
    return await ctx.app.store.read(accounts.user_info, username)


async def create_user(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["username"]
    password = data["password"]
    check_password_strength(password, "password")
    groups = check_names(data["groups"], "groups")
    permissions = check_permission_names(data["permissions"])
    password_hash = await trio.to_thread.run_sync(auth.hash_password, password)
    await ctx.app.store.write(accounts.create_user, ctx.user.username, data["username"],
                              password_hash,
                              data["nickname"] or data["username"], groups, permissions,
                              ctx.app.now())
    return {"username": data["username"]}


async def delete_user(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["username"]
    if data["username"] == ctx.user.username:
        raise BadRequest("you cannot delete your own account")
    closed = await ctx.app.store.write(accounts.delete_user, ctx.user.username,
                                       data["username"], ctx.app.now())
    # Its sessions ended with the rows; what it had running is closed now, even if this
    # request's connection goes away meanwhile (each step is bounded).
    with trio.CancelScope(shield=True):
        await close_file_tasks(ctx, closed["file_task_ids"], "the account was deleted")
        await ctx.app.imports.close_abandoned(closed["imports"])
    return {}


async def set_passwd(ctx: Context, data: dict) -> dict:
    """Change a password: your own with the old password, anyone's with super_set_passwd."""
    username = data["username"] or ctx.user.username
    ctx.audit_target = username
    check_password_strength(data["new_password"], "new_password")
    if username == ctx.user.username and data["old_password"] is not None:
        ctx.require("set_passwd")
        stored = await ctx.app.store.read(accounts.password_hash_of, username)
        ok = await trio.to_thread.run_sync(auth.verify_password, data["old_password"], stored)
        if not ok:
            await trio.sleep(ctx.app.settings.login_failure_delay_s)
            raise Unauthorized("old password is wrong")
    elif not ctx.user.has("super_set_passwd"):
        if username == ctx.user.username:
            raise BadRequest("missing field 'data.old_password'")
        raise Forbidden("permission 'super_set_passwd' required")
    password_hash = await trio.to_thread.run_sync(auth.hash_password, data["new_password"])
    await ctx.app.store.write(accounts.set_password_hash, ctx.user.username, username,
                              password_hash, ctx.app.now())
    return {}


async def list_groups(ctx: Context, data: dict) -> dict:
    return {"groups": await ctx.app.store.read(accounts.list_groups)}


async def create_group(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["name"]
    permissions = check_permission_names(data["permissions"])
    await ctx.app.store.write(accounts.create_group, ctx.user.username, data["name"],
                              permissions, ctx.app.now())
    return {"name": data["name"]}


async def delete_group(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["name"]
    await ctx.app.store.write(accounts.delete_group, ctx.user.username, data["name"])
    return {}


async def change_user_groups(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["username"]
    groups = check_names(data["groups"], "groups")
    await ctx.app.store.write(accounts.set_user_groups, ctx.user.username, data["username"],
                              groups)
    return {"username": data["username"], "groups": sorted(set(groups))}


async def set_group_permissions(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["name"]
    permissions = check_permission_names(data["permissions"])
    await ctx.app.store.write(accounts.set_group_permissions, ctx.user.username, data["name"],
                              permissions)
    return {"name": data["name"], "permissions": sorted(set(permissions))}


async def view_audit_logs(ctx: Context, data: dict) -> dict:
    return await ctx.app.store.read(accounts.list_audit, data["offset"], data["limit"],
                                    data["username"], data["action"])
