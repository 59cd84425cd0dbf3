"""`cfms-trio client login|logout|profiles`: saved logins, so later commands need no flags."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import trio

from ..client import ClientError, open_client
from ..client.profiles import Profile, config_dir, load_profiles, profiles_path, update_profile
from ..conventions import ADMIN_USERNAME
from .common import (
    EXIT_USAGE, Output, UsageError, add_connection_args, fail, human_time, password_source,
    profile_name, run_async,
)


def _login_password(args, username: str) -> str:
    if args.password_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
        if not secret:
            raise UsageError("--password-stdin: no password on standard input")
        return secret
    secret = password_source(args, lambda: username)()
    if secret is None:
        raise UsageError("no password: use --password-file F, --password-stdin or "
                         "$CFMS_PASSWORD (or run on a terminal to be asked)")
    return secret


def cmd_login(args) -> int:
    folder = config_dir(args.config_dir)
    name = profile_name(args)
    try:
        saved = load_profiles(folder).get(name)
    except Exception as err:  # a broken profile file is replaced by this login
        saved = None
        print(f"warning: {err}", file=sys.stderr)
    server = args.server or (saved.server if saved else None)
    if not server:
        return fail(args, EXIT_USAGE, "login needs --server URL (e.g. wss://127.0.0.1:5104)")
    same = saved is not None and saved.server == server
    username = args.username or (saved.username if same else None) or ADMIN_USERNAME
    cafile = (str(Path(args.cafile).resolve()) if args.cafile
              else (saved.cafile if same else None))
    insecure = args.insecure or bool(same and saved.insecure and not args.cafile)
    if args.password_file and args.password_stdin:
        return fail(args, EXIT_USAGE, "use either --password-file or --password-stdin")
    if cafile and not os.path.isfile(cafile):
        return fail(args, EXIT_USAGE, f"--cafile: {cafile} is not a file")

    async def main(state: dict) -> Output:
        password = _login_password(args, username)
        async with open_client(server, cafile=cafile, insecure=insecure,
                               check_certificate_first=True) as client:
            state["connected"] = True
            data = await client.login(username, password)
        profile = Profile(server=server, username=username, cafile=cafile,
                          insecure=insecure).with_token(data, time.time())
        path = await trio.to_thread.run_sync(update_profile, folder, name, profile)
        return Output(
            {"profile": name, "server": server, "username": username, "config_file": str(path),
             "token_expires_time": data["exp"], "groups": data["groups"],
             "permissions": data["permissions"]},
            f"logged in as {username} on {server} (profile {name!r} in {path}; the session "
            f"is renewed as you use it, first expiry {human_time(data['exp'])})")

    return run_async(args, main)


def cmd_logout(args) -> int:
    folder = config_dir(args.config_dir)
    name = profile_name(args)

    async def main(state: dict) -> Output:
        profile = (await trio.to_thread.run_sync(load_profiles, folder)).get(name)
        if profile is None or not profile.token:
            return Output({"profile": name, "logged_out": False},
                          f"profile {name!r} holds no session")
        try:
            if profile.token_state(time.time()) != "expired":
                async with open_client(profile.server, cafile=profile.cafile,
                                       insecure=profile.insecure,
                                       check_certificate_first=True) as client:
                    state["connected"] = True
                    client.username, client.token = profile.username, profile.token
                    try:
                        await client.call("logout")
                    except ClientError as err:
                        if err.code != 401:  # already over: nothing left to end
                            raise
        finally:  # the token is forgotten here even when the server could not be told
            await trio.to_thread.run_sync(update_profile, folder, name,
                                          profile.with_token(None, time.time()))
        return Output({"profile": name, "logged_out": True},
                      f"logged out {profile.username} from {profile.server} (profile {name!r})")

    return run_async(args, main)


def cmd_profiles(args) -> int:
    folder = config_dir(args.config_dir)

    async def main(state: dict) -> Output:
        profiles = await trio.to_thread.run_sync(load_profiles, folder)
        now = time.time()
        data = {"config_file": str(profiles_path(folder)), "profiles": {
            name: {"server": p.server, "username": p.username, "cafile": p.cafile,
                   "insecure": p.insecure, "session": p.token_state(now),
                   "token_expires_time": p.token_expires_time}
            for name, p in sorted(profiles.items())}}
        lines = [f"{name}: {p['username']} on {p['server']} (session: "
                 f"{'none' if p['session'] == 'none' else p['session'] + ', expires ' + human_time(p['token_expires_time'])})"
                 for name, p in data["profiles"].items()]
        return Output(data, "\n".join(lines) if lines else f"no profiles in {data['config_file']}")

    return run_async(args, main)


def register(commands) -> None:
    login = commands.add_parser("login", help="log in and save the session in a profile")
    add_connection_args(login)
    login.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input")
    login.set_defaults(func=cmd_login)
    logout = commands.add_parser("logout", help="end the profile's session")
    add_connection_args(logout)
    logout.set_defaults(func=cmd_logout)
    profiles = commands.add_parser("profiles", help="list the saved profiles")
    add_connection_args(profiles)
    profiles.set_defaults(func=cmd_profiles)
