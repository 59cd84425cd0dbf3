"""A logged-in connection made from a saved profile or from explicit settings.

A profile's token is used as long as it lives: with less than half of its lifetime left it is
exchanged for a new one with `refresh_token` (and saved), so a profile that is used now and then
stays logged in. A token that has expired or that the server no longer accepts is replaced by a
fresh login when a password is at hand; otherwise the session ends with a "log in again" error.
A session without a matching profile logs in with the password and logs out at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import trio

from .connection import Client, ClientError, open_client
from .profiles import Profile, update_profile

LOGOUT_TIMEOUT_S = 5
UNAUTHORIZED = 401

PasswordSource = Callable[[], "str | None"]  # the password, or None when none is at hand


@dataclasses.dataclass
class Target:
    """Where and as whom to connect; `profile` is the saved login for exactly this server and
    user (None when there is none, or when flags named another server or user)."""

    server: str
    username: str
    cafile: str | None = None
    insecure: bool = False
    profile_name: str | None = None
    profile: Profile | None = None
    config_folder: Path | None = None

    def describe(self) -> str:
        return f"{self.username} on {self.server}"


async def save_session(target: Target, login_data: dict | None) -> None:
    """Keep the session of a login or refresh in the target's profile (None: forget it)."""
    if target.profile_name is None or target.config_folder is None:
        return
    base = target.profile or Profile(server=target.server, username=target.username,
                                     cafile=target.cafile, insecure=target.insecure)
    target.profile = base.with_token(login_data, time.time())
    await trio.to_thread.run_sync(update_profile, target.config_folder, target.profile_name,
                                  target.profile)


def log_in_again(target: Target, why: str) -> ClientError:
    return ClientError(0, f"{why}; log in again: cfms-trio client login"
                       + (f" --profile {target.profile_name}"
                          if target.profile_name not in (None, "default") else ""))


async def _use_profile_token(client: Client, target: Target) -> bool:
    """Put the profile's token to use, refreshing it when it is getting old; False when it is
    dead (expired, or refused by the server)."""
    profile = target.profile
    state = profile.token_state(time.time()) if profile else "none"
    if state in ("none", "expired"):
        return False
    client.username, client.token = target.username, profile.token
    if state == "fresh":
        return True
    try:
        data = await client.call("refresh_token")
    except ClientError as err:
        if err.code != UNAUTHORIZED:
            raise
        client.token = None
        return False
    client.token = data["token"]
    await save_session(target, data)
    return True


@contextlib.asynccontextmanager
async def open_session(target: Target, password: PasswordSource) -> AsyncIterator[Client]:
    """A connection to the target's server, authenticated as its user (see the module text)."""
    async with open_client(target.server, cafile=target.cafile, insecure=target.insecure,
                           check_certificate_first=True) as client:
        ephemeral = False
        if not await _use_profile_token(client, target):
            secret = await trio.to_thread.run_sync(password)
            if secret is None:
                if target.profile is not None:
                    raise log_in_again(target, f"the session of {target.describe()} "
                                               + ("has expired" if target.profile.token
                                                  else "was ended (logout)"))
                raise log_in_again(target, f"no password for {target.describe()} (set "
                                           "CFMS_PASSWORD or use --password-file)")
            data = await client.login(target.username, secret)
            if target.profile is not None:
                await save_session(target, data)
            else:
                ephemeral = True
        try:
            yield client
        finally:
            if ephemeral:
                with trio.move_on_after(LOGOUT_TIMEOUT_S) as scope:
                    scope.shield = True
                    with contextlib.suppress(Exception):  # the session ends anyway when the token expires
                        await client.call("logout")
