"""Backups as a product: schedules, the catalogue of backups, verification, pruning.

The scheduler (`app.backups`) makes, verifies and prunes; these handlers create and remove its
schedules, read the catalogue, and ask it to verify or prune now.
"""

from __future__ import annotations

from ..backup.format import Passphrase, Unlock, parse_key_upload, parse_recipient
from ..backup.retention import parse_keep
from ..backup.targets import parse_target
from ..conventions import is_backup_name
from ..dispatch import Context
from .backup_export import checked_parts
from ..errors import ArchiveError, BadRequest
from ..storage import backups

SCHEDULE_NAME_MAX_CHARS = 64
MAX_RECIPIENTS = 16
INTERVAL_MAX_SECONDS = 366 * 24 * 3600


def _schedule_name(name: str) -> str:
    if not is_backup_name(name) or len(name) > SCHEDULE_NAME_MAX_CHARS:
        raise BadRequest("field 'data.name' may hold only letters, digits, '.', '_' and '-', "
                         "must start with a letter or digit and be at most "
                         f"{SCHEDULE_NAME_MAX_CHARS} characters")
    return name


def _recipients(values: list) -> list[str]:
    if not values:
        raise BadRequest("field 'data.recipients' must name at least one recipient (cfms1...): "
                         "scheduled backups are made for public keys, so the server cannot "
                         "read its own old backups")
    out = []
    for index, text in enumerate(values):
        if not isinstance(text, str):
            raise BadRequest(f"field 'data.recipients[{index}]' must be a string")
        try:
            out.append(str(parse_recipient(text)))
        except ArchiveError as exc:
            raise BadRequest(f"field 'data.recipients[{index}]': {exc.message}") from None
    if len(set(out)) != len(out):
        raise BadRequest("field 'data.recipients' names a recipient twice")
    return out


async def create_backup_schedule(ctx: Context, data: dict) -> dict:
    name = _schedule_name(data["name"])
    ctx.audit_target = name
    parts = checked_parts(data["parts"])
    schedule = await ctx.app.store.write(
        backups.create_schedule, name=name, created_by=ctx.user.username, now=ctx.app.now(),
        interval_seconds=data["interval_seconds"], recipients=_recipients(data["recipients"]),
        parts=None if parts is None else list(parts), compression=data["compression"],
        target=parse_target(data["target"]), keep=parse_keep(data["keep"]))
    ctx.app.backups.changed()
    return schedule


async def list_backup_schedules(ctx: Context, data: dict) -> dict:
    schedules = await ctx.app.store.read(backups.list_schedules)
    running = ctx.app.backups.running
    return {"schedules": [dict(s, running=s["name"] in running) for s in schedules]}


async def delete_backup_schedule(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["name"]
    await ctx.app.store.write(backups.delete_schedule, data["name"])
    ctx.app.backups.changed()
    return {}


async def list_backups(ctx: Context, data: dict) -> dict:
    listed = await ctx.app.store.read(backups.list_backups, data["schedule"])
    return {"backups": [{k: v for k, v in b.items() if k != "key_location"} for b in listed]}


def _key_material(data: dict, limits):
    """An identity (identity file text, an identity line, a paper phrase, or a key file) and/or
    a passphrase from the request, parsed in memory; never written anywhere."""
    key_info = None
    if data["identity"] is not None:
        try:
            key_info = parse_key_upload(data["identity"].encode("utf-8"), limits)
        except ArchiveError as exc:
            raise BadRequest(f"field 'data.identity': {exc.message}") from None
    if data["passphrase"] is None:
        return key_info
    identities = key_info.identities if isinstance(key_info, Unlock) else ()
    if key_info is not None and not isinstance(key_info, Unlock):
        raise BadRequest("field 'data.passphrase': give a passphrase with an identity, not "
                         "with a key file")
    return Unlock(identities=identities, passphrase=Passphrase(data["passphrase"]))


async def verify_backup(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["name"]
    key_info = _key_material(data, ctx.app.settings.limits.archive)
    report = await ctx.app.backups.verify(data["name"], deep=data["deep"], key_info=key_info)
    del key_info
    answer = report.as_answer()
    answer["backup"] = {k: v for k, v in
                        (await ctx.app.store.read(backups.get_backup, data["name"])).items()
                        if k != "key_location"}
    return answer


async def prune_backups(ctx: Context, data: dict) -> dict:
    if data["schedule"] is not None:
        ctx.audit_target = data["schedule"]
    return await ctx.app.backups.prune(dry_run=data["dry_run"], schedule=data["schedule"])
