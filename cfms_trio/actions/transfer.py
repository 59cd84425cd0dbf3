"""upload_file and download_file: the transfer sequences of SPEC §6."""

from __future__ import annotations

from ..dispatch import Context
from ..storage import transfers
from ..transfer.flows import receive_upload, send_download


async def upload_file(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["task_id"]
    task = await ctx.app.store.read(transfers.task_for_transfer, data["task_id"],
                                    ctx.user.username, "upload", ctx.app.now())
    return await receive_upload(ctx, task)


async def download_file(ctx: Context, data: dict) -> dict:
    task = await ctx.app.store.read(transfers.task_for_transfer, data["task_id"],
                                    ctx.user.username, "download", ctx.app.now())
    return await send_download(ctx, task, data["offset"])
