"""Sessions and events: server_info, login, refresh_token, logout, register_listener."""

from __future__ import annotations

import trio

from .. import __version__, auth
from ..dispatch import Context
from ..errors import Conflict, Unauthorized
from ..storage import accounts

PROTOCOL_VERSION = 1


async def server_info(ctx: Context, data: dict) -> dict:
    return {
        "name": "cfms-trio",
        "version": __version__,
        "protocol_version": PROTOCOL_VERSION,
        "time": ctx.app.now(),
        "max_message_bytes": ctx.app.settings.limits.message_bytes,
        "transfer_chunk_bytes": ctx.app.settings.limits.transfer_chunk_bytes,
        # Failed backup exports, uploads, verifications and prunings since the server started,
        # so a monitor can alert (docs/PROTOCOL.md, "Backup schedules").
        "backup_failures": dict(ctx.app.backups.failures),
    }


async def _issue_token(ctx: Context, username: str) -> dict:
    token = auth.new_token()
    now = ctx.app.now()
    exp = now + ctx.app.settings.token_ttl_s
    await ctx.app.store.write(accounts.store_token, username, auth.token_hash(token), now, exp)
    principal = await ctx.app.store.read(accounts.principal_of, username)
    return {
        "token": token,
        "exp": exp,
        "nickname": principal.nickname,
        "permissions": sorted(principal.permissions),
        "groups": sorted(principal.groups),
    }


async def login(ctx: Context, data: dict) -> dict:
    username, password = data["username"], data["password"]
    ctx.audit_target = ctx.audit_actor = username
    stored = await ctx.app.store.read(accounts.password_hash_of, username)
    if stored is None:
        await trio.to_thread.run_sync(auth.dummy_password_check, password)
        ok = False
    else:
        ok = await trio.to_thread.run_sync(auth.verify_password, password, stored)
    if not ok:
        # A short pause makes guessing slow; it is a trio sleep, so nobody else waits.
        await trio.sleep(ctx.app.settings.login_failure_delay_s)
        raise Unauthorized("wrong username or password")
    issued = await _issue_token(ctx, username)
    ctx.conn.authenticated()
    return issued


async def refresh_token(ctx: Context, data: dict) -> dict:
    """A fresh token for the caller; the old one stops working."""
    result = await _issue_token(ctx, ctx.user.username)
    old_hash = auth.token_hash(ctx.request.token)
    # Listeners of this session follow it to the new token before the old one stops working.
    ctx.app.hub.renew(old_hash, auth.token_hash(result["token"]))
    await ctx.app.store.write(accounts.delete_token, old_hash)
    return result


async def logout(ctx: Context, data: dict) -> dict:
    await ctx.app.store.write(accounts.delete_token, auth.token_hash(ctx.request.token))
    return {}


async def register_listener(ctx: Context, data: dict) -> dict:
    """From now on this connection receives the events its user may see, for as long as this
    session lasts (the audience of each event is decided when it is published)."""
    conn = ctx.conn
    if conn.listener is not None and conn.listener.active:
        raise Conflict("this connection is already a listener")
    listener, receive = ctx.app.hub.register(ctx.user.username,
                                             auth.token_hash(ctx.request.token),
                                             on_drop=conn.drop_listener)
    conn.listener = listener
    conn.nursery.start_soon(conn.pump_events, receive)
    return {"listening": True}
