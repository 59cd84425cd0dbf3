"""What every `cfms-trio client` command shares: the connection flags, the profile they fall back
on, the password sources, `--json` output, and the one place where errors become a line on
stderr and an exit code (docs/CLI.md):

0 done · 1 refused (by the server, whose message is shown, or by the client's own checks: a
missing path, a file that exists) · 2 usage (bad flags, no server or password configured, a
local source that does not exist) · 3 no connection (unreachable, TLS, connection lost).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from ..client import ClientError, ProgressBar, TlsError
from ..client.profiles import (
    DEFAULT_PROFILE, PROFILE_ENV, ProfileError, config_dir, load_profiles, profiles_path,
)
from ..client.session import UNAUTHORIZED, Target, open_session
from ..conventions import ADMIN_USERNAME

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_CONNECTION = 0, 1, 2, 3
PASSWORD_ENV = "CFMS_PASSWORD"


class UsageError(Exception):
    """The command cannot run as given (exit 2)."""


@dataclasses.dataclass
class Output:
    """What a command shows: `data` for --json, `text` otherwise, and its exit code."""

    data: Any
    text: str | None = None
    exit_code: int = EXIT_OK


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """The flags every client command takes; all optional once a profile exists."""
    group = parser.add_argument_group("connection (default: the saved profile)")
    group.add_argument("--server", help="e.g. wss://host:5104")
    group.add_argument("--username", help=f"default: the profile's, else {ADMIN_USERNAME}")
    group.add_argument("--password-file", help="file holding the password, when a login is "
                       f"needed (default: ${PASSWORD_ENV}, else a prompt on a terminal)")
    group.add_argument("--cafile", help="CA or self-signed certificate to trust "
                       "(the server's content/tls/cert.pem)")
    group.add_argument("--insecure", action="store_true",
                       help="do not verify the server's certificate")
    group.add_argument("--profile", help=f"saved login to use (default: ${PROFILE_ENV}, "
                       f"else {DEFAULT_PROFILE!r})")
    group.add_argument("--config-dir", help="folder of profiles.json (default: "
                       "$CFMS_CONFIG_DIR, else $XDG_CONFIG_HOME/cfms-trio, else "
                       "~/.config/cfms-trio)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def profile_name(args) -> str:
    return args.profile or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE


def build_target(args) -> Target:
    """Server, user and saved session from the flags, falling back on the profile."""
    folder = config_dir(args.config_dir)
    name = profile_name(args)
    profile = load_profiles(folder).get(name)
    if args.profile and profile is None and not args.server:
        raise UsageError(f"no profile {name!r} in {profiles_path(folder)}; log in first: "
                         f"cfms-trio client login --server URL --profile {name}")
    server = args.server or (profile.server if profile else None)
    if not server:
        raise UsageError("no server: log in first (cfms-trio client login --server URL) or "
                         "pass --server URL")
    same_server = profile is not None and profile.server == server
    username = args.username or (profile.username if same_server else None) or ADMIN_USERNAME
    matching = profile if same_server and profile.username == username else None
    cafile = args.cafile or (profile.cafile if same_server else None)
    insecure = args.insecure or bool(same_server and profile.insecure)
    return Target(server, username, cafile, insecure, name if matching else None, matching,
                  folder)


def read_password_file(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise UsageError(f"cannot read the password file: {err.strerror}: {path}") from None


def password_source(args, username_of: Callable[[], str]) -> Callable[[], str | None]:
    """--password-file, $CFMS_PASSWORD, then a prompt when stdin is a terminal."""

    def source() -> str | None:
        if getattr(args, "password_file", None):
            return read_password_file(args.password_file)
        if os.environ.get(PASSWORD_ENV):
            return os.environ[PASSWORD_ENV]
        if sys.stdin.isatty():
            return getpass.getpass(f"password for {username_of()}: ")
        return None

    return source


def progress_bar(args, label: str) -> ProgressBar:
    """A progress bar on stderr, drawn only on a terminal and never with --json."""
    return ProgressBar(sys.stderr, label, enabled=sys.stderr.isatty() and not args.json)


def _print_output(args, output: Output) -> int:
    if args.json:
        json.dump(output.data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    elif output.text:
        print(output.text)
    return output.exit_code


def fail(args, code: int, message: str, server_code: int | None = None) -> int:
    """One line on stderr (and an error object on stdout with --json); returns the exit code."""
    suffix = f" (code {server_code})" if server_code else ""
    print(f"error: {message}{suffix}", file=sys.stderr)
    if getattr(args, "json", False):
        json.dump({"error": {"message": message, "code": server_code or 0, "exit": code}},
                  sys.stdout)
        sys.stdout.write("\n")
    return code


Flow = Callable[[Any], Awaitable["Output | int"]]


def run_async(args, main: Callable[[dict], Awaitable["Output | int"]],
              target: Target | None = None) -> int:
    """Run `main(state)` under trio and turn every failure into its exit code; `state`
    ["connected"] tells a lost connection from a refused connection attempt."""
    state = {"connected": False}
    where = target.server if target else getattr(args, "server", None) or "the server"
    try:
        result = trio.run(main, state)
    except UsageError as err:
        return fail(args, EXIT_USAGE, str(err))
    except ProfileError as err:
        return fail(args, EXIT_USAGE, str(err))
    except TlsError as err:
        return fail(args, EXIT_CONNECTION, err.message)
    except ClientError as err:
        message = err.message
        if (err.code == UNAUTHORIZED and target is not None and target.profile is not None
                and "log in again" not in message):
            message += "; log in again: cfms-trio client login"
        return fail(args, EXIT_REFUSED, message, err.code)
    except (HandshakeError, ConnectionClosed, trio.BrokenResourceError, ssl.SSLError) as err:
        return fail(args, EXIT_CONNECTION, f"cannot talk to {where}: {err!r}")
    except OSError as err:
        if state["connected"] and err.filename:
            return fail(args, EXIT_REFUSED, f"{err.strerror}: {err.filename}")
        return fail(args, EXIT_CONNECTION, f"cannot talk to {where}: {err}")
    except KeyboardInterrupt:
        return fail(args, 130, "interrupted")
    if isinstance(result, Output):
        return _print_output(args, result)
    return result


def run(args, flow: Flow, *, with_target: bool = False) -> int:
    """Open a session (from the profile or the flags) and run `flow(client)` in it
    (`flow(client, target)` with `with_target`)."""
    try:
        target = build_target(args)
    except (UsageError, ProfileError) as err:
        return fail(args, EXIT_USAGE, str(err))
    password = password_source(args, lambda: target.username)

    async def main(state: dict):
        async with open_session(target, password) as client:
            state["connected"] = True
            return await (flow(client, target) if with_target else flow(client))

    return run_async(args, main, target)


def human_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return str(size)


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces (the last column is not padded)."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([cell.ljust(w) for cell, w in zip(row, widths)] + [row[-1]])
                     for row in rows)
