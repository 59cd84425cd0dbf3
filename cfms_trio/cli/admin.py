"""`cfms-trio client users|groups|members|audit|info`: administration of a running server."""

from __future__ import annotations

import getpass
import os
import sys

import trio

from ..client.session import save_session
from .common import (
    Output, UsageError, add_connection_args, human_time, read_password_file, run, table,
)

NEW_PASSWORD_ENV = "CFMS_NEW_PASSWORD"


def new_password(args, username: str) -> str:
    """--new-password-file, $CFMS_NEW_PASSWORD, else asked twice on a terminal."""
    if args.new_password_file:
        return read_password_file(args.new_password_file)
    if os.environ.get(NEW_PASSWORD_ENV):
        return os.environ[NEW_PASSWORD_ENV]
    if not sys.stdin.isatty():
        raise UsageError(f"no new password for {username}: use --new-password-file F or "
                         f"${NEW_PASSWORD_ENV}")
    first = getpass.getpass(f"new password for {username}: ")
    if getpass.getpass("again: ") != first:
        raise UsageError("the two passwords differ")
    return first


def _user_row(user: dict) -> list[str]:
    return [user["username"], user["nickname"], ",".join(user["groups"]) or "-",
            ",".join(user["permissions"]) or "-"]


def cmd_users_list(args) -> int:
    async def flow(client) -> Output:
        users = (await client.call("list_users"))["users"]
        rows = [["USER", "NICKNAME", "GROUPS", "OWN PERMISSIONS"]] + [_user_row(u) for u in users]
        return Output({"users": users}, table(rows))

    return run(args, flow)


def cmd_users_add(args) -> int:
    async def flow(client) -> Output:
        password = await trio.to_thread.run_sync(new_password, args, args.username_new)
        data = {"username": args.username_new, "password": password,
                "groups": args.group, "permissions": args.permission}
        if args.nickname:
            data["nickname"] = args.nickname
        await client.call("create_user", data)
        user = await client.call("get_user_info", {"username": args.username_new})
        return Output(user, f"added user {user['username']} (groups: "
                            f"{', '.join(user['groups']) or 'none'})")

    return run(args, flow)


def _remove_each(args, action: str, field: str, kind: str) -> int:
    """`users rm` and `groups rm`: one request per name, in order, stopping at a refusal."""
    async def flow(client) -> Output:
        for name in args.names:
            await client.call(action, {field: name})
        return Output({"removed": args.names}, "\n".join(f"removed {kind} {n}" for n in args.names))

    return run(args, flow)


def cmd_users_rm(args) -> int:
    return _remove_each(args, "delete_user", "username", "user")


def cmd_users_passwd(args) -> int:
    async def flow(client, target) -> Output:
        username = args.name or client.username
        secret = await trio.to_thread.run_sync(new_password, args, username)
        data = {"username": username, "new_password": secret}
        if args.old_password_file:
            data["old_password"] = read_password_file(args.old_password_file)
        await client.call("set_passwd", data)
        text = f"password of {username} changed; every session of {username} ended"
        relogged = False
        if username == client.username and target.profile is not None:
            # Our own sessions ended too: keep the profile logged in with the new password.
            await save_session(target, await client.login(username, secret))
            relogged = True
            text += f"; profile {target.profile_name!r} logged in again"
        return Output({"username": username, "changed": True, "profile_relogged": relogged},
                      text)

    return run(args, flow, with_target=True)


def cmd_groups_list(args) -> int:
    async def flow(client) -> Output:
        groups = (await client.call("list_groups"))["groups"]
        rows = [["GROUP", "MEMBERS", "PERMISSIONS"]] + [
            [g["name"], ",".join(g["members"]) or "-", ",".join(g["permissions"]) or "-"]
            for g in groups]
        return Output({"groups": groups}, table(rows))

    return run(args, flow)


def cmd_groups_add(args) -> int:
    async def flow(client) -> Output:
        await client.call("create_group", {"name": args.name, "permissions": args.permission})
        return Output({"name": args.name, "permissions": sorted(set(args.permission))},
                      f"added group {args.name}")

    return run(args, flow)


def cmd_groups_rm(args) -> int:
    return _remove_each(args, "delete_group", "name", "group")


def cmd_groups_set_permissions(args) -> int:
    async def flow(client) -> Output:
        result = await client.call("set_group_permissions", {"name": args.name,
                                                             "permissions": args.permissions})
        return Output(result, f"group {result['name']}: "
                              f"{', '.join(result['permissions']) or 'no permissions'}")

    return run(args, flow)


def cmd_members_set(args) -> int:
    async def flow(client) -> Output:
        result = await client.call("change_user_groups", {"username": args.name,
                                                          "groups": args.groups})
        return Output(result, f"{result['username']} is in: "
                              f"{', '.join(result['groups']) or 'no group'}")

    return run(args, flow)


def cmd_audit(args) -> int:
    async def flow(client) -> Output:
        data = {"limit": args.limit, "offset": args.offset}
        if args.user:
            data["username"] = args.user
        if args.action:
            data["action"] = args.action
        result = await client.call("view_audit_logs", data)
        rows = [["TIME", "USER", "ACTION", "RESULT", "TARGET", "ADDRESS"]] + [
            [human_time(e["time"]), e["username"] or "-", e["action"], str(e["result"]),
             e["target"] or "-", e["address"] or "-"] for e in result["entries"]]
        shown = len(result["entries"])
        return Output(result, table(rows) + f"\n({shown} of {result['total']} entries)")

    return run(args, flow)


def cmd_info(args) -> int:
    async def flow(client, target) -> Output:
        server = await client.call("server_info")
        user = await client.call("get_user_info")
        profile = target.profile
        data = {"server": server, "url": target.server, "user": user,
                "profile": target.profile_name,
                "token_expires_time": profile.token_expires_time if profile else None}
        text = "\n".join([
            f"server:      {server['name']} {server['version']} (protocol "
            f"{server['protocol_version']}) at {target.server}",
            f"user:        {user['username']} ({user['nickname']})",
            f"groups:      {', '.join(user['groups']) or '-'}",
            f"permissions: {', '.join(user['effective_permissions']) or '-'}",
            f"profile:     {target.profile_name or '(none: logged in for this command)'}"
            + (f", session until {human_time(profile.token_expires_time)}" if profile else ""),
        ])
        return Output(data, text)

    return run(args, flow, with_target=True)


def register(commands) -> None:
    def group(name: str, help_text: str):
        parser = commands.add_parser(name, help=help_text)
        return parser.add_subparsers(dest=f"{name}_command", required=True)

    def command(sub, name: str, func, help_text: str):
        parser = sub.add_parser(name, help=help_text)
        add_connection_args(parser)
        parser.set_defaults(func=func)
        return parser

    users = group("users", "list, add and remove users; change passwords")
    command(users, "list", cmd_users_list, "every user")
    add = command(users, "add", cmd_users_add, "add a user (password from "
                  f"--new-password-file, ${NEW_PASSWORD_ENV} or a prompt)")
    add.add_argument("username_new", metavar="USER")
    add.add_argument("--nickname")
    add.add_argument("--group", action="append", default=[], metavar="GROUP",
                     help="a group to join (repeat for more)")
    add.add_argument("--permission", action="append", default=[], metavar="PERMISSION",
                     help="a permission granted directly (repeat for more)")
    add.add_argument("--new-password-file", help="file holding the new user's password")
    rm = command(users, "rm", cmd_users_rm, "remove users")
    rm.add_argument("names", nargs="+", metavar="USER")
    passwd = command(users, "passwd", cmd_users_passwd, "set a password (yours by default)")
    passwd.add_argument("name", nargs="?", metavar="USER")
    passwd.add_argument("--new-password-file", help="file holding the new password")
    passwd.add_argument("--old-password-file", help="your current password (needed to change "
                        "your own without the super_set_passwd permission)")

    groups = group("groups", "list, add and remove groups; set their permissions")
    command(groups, "list", cmd_groups_list, "every group with its members")
    gadd = command(groups, "add", cmd_groups_add, "add a group")
    gadd.add_argument("name", metavar="GROUP")
    gadd.add_argument("--permission", action="append", default=[], metavar="PERMISSION",
                      help="a permission of the group (repeat for more)")
    grm = command(groups, "rm", cmd_groups_rm, "remove groups")
    grm.add_argument("names", nargs="+", metavar="GROUP")
    gset = command(groups, "set-permissions", cmd_groups_set_permissions,
                   "replace a group's permissions")
    gset.add_argument("name", metavar="GROUP")
    gset.add_argument("permissions", nargs="*", metavar="PERMISSION")

    members = group("members", "group membership")
    mset = command(members, "set", cmd_members_set, "replace a user's groups")
    mset.add_argument("name", metavar="USER")
    mset.add_argument("groups", nargs="*", metavar="GROUP")

    audit = commands.add_parser("audit", help="the audit log, newest first")
    add_connection_args(audit)
    audit.add_argument("--user", help="only this user's entries")
    audit.add_argument("--action", help="only this action's entries")
    audit.add_argument("--limit", type=int, default=50, help="entries to show (1..1000)")
    audit.add_argument("--offset", type=int, default=0, help="skip this many newest entries")
    audit.set_defaults(func=cmd_audit)

    info = commands.add_parser("info", help="the server and who you are on it")
    add_connection_args(info)
    info.set_defaults(func=cmd_info)
