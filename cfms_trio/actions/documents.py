"""Folders, documents, revisions and access rules (SPEC §5)."""

from __future__ import annotations

import trio

from ..dispatch import Context
from ..permissions import validate_rules
from ..storage import documents, transfers


def checked_rules(rules) -> dict:
    """The request's access rules once they are well formed and within bounds (400/413)."""
    validate_rules(rules or {})
    return rules or {}


async def _upload_task(ctx: Context, file_id: str) -> str:
    now = ctx.app.now()
    return await ctx.app.store.write(transfers.create_task, file_id, "upload", ctx.user.username,
                                     now, now + ctx.app.settings.transfer_task_ttl_s)


async def _remove_deleted(ctx: Context, removed: dict) -> None:
    """Remove the content and partial uploads of deleted documents once their rows are gone.

    A partial upload still being written belongs to its running transfer, which fails when it
    finds its task gone and cleans up after itself.
    """
    app = ctx.app
    await app.reaper.remove(removed["paths"])
    parts = [task_id for task_id in removed["task_ids"] if not app.transfers.is_active(task_id)]
    if parts:
        await trio.to_thread.run_sync(app.content.discard_partial_uploads, parts,
                                      limiter=app.io_limiter)


# -- folders -----------------------------------------------------------------------------------

async def create_directory(ctx: Context, data: dict) -> dict:
    rules = checked_rules(data["access_rules"])
    folder = await ctx.app.store.write(documents.create_folder, ctx.user, data["name"],
                                       data["parent_id"], rules, ctx.app.now())
    ctx.audit_target = folder["id"]
    return folder


async def list_directory(ctx: Context, data: dict) -> dict:
    return await ctx.app.store.read(documents.list_folder, ctx.user, data["folder_id"])


async def get_directory_info(ctx: Context, data: dict) -> dict:
    return await ctx.app.store.read(documents.folder_info, ctx.user, data["folder_id"])


async def rename_directory(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["folder_id"]
    return await ctx.app.store.write(documents.rename_folder, ctx.user, data["folder_id"],
                                     data["name"])


async def move_directory(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["folder_id"]
    return await ctx.app.store.write(documents.move_folder, ctx.user, data["folder_id"],
                                     data["parent_id"])


async def delete_directory(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["folder_id"]
    removed = await ctx.app.store.write(documents.delete_folder, ctx.user, data["folder_id"])
    await _remove_deleted(ctx, removed)
    return {}


async def get_directory_access_rules(ctx: Context, data: dict) -> dict:
    return await ctx.app.store.read(documents.get_rules, ctx.user, "folder", data["folder_id"])


async def set_directory_rules(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["folder_id"]
    rules = checked_rules(data["access_rules"])
    return await ctx.app.store.write(documents.set_rules, ctx.user, "folder", data["folder_id"],
                                     rules)


# -- documents ---------------------------------------------------------------------------------

async def create_document(ctx: Context, data: dict) -> dict:
    rules = checked_rules(data["access_rules"])
    created = await ctx.app.store.write(documents.create_document, ctx.user, data["title"],
                                        data["folder_id"], rules, ctx.app.now())
    ctx.audit_target = created["document_id"]
    created["task_id"] = await _upload_task(ctx, created["file_id"])
    return created


async def upload_document(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["document_id"]
    created = await ctx.app.store.write(documents.add_revision, ctx.user, data["document_id"],
                                        ctx.app.now())
    created["task_id"] = await _upload_task(ctx, created["file_id"])
    return created


async def get_document(ctx: Context, data: dict) -> dict:
    revision = await ctx.app.store.read(documents.revision_for_download, ctx.user,
                                        data["document_id"], data["revision_id"])
    now = ctx.app.now()
    task_id = await ctx.app.store.write(transfers.create_task, revision["file_id"], "download",
                                        ctx.user.username, now,
                                        now + ctx.app.settings.transfer_task_ttl_s)
    return {"document_id": data["document_id"], "revision_id": revision["id"],
            "task_id": task_id, "file_size": revision["size"], "sha256": revision["sha256"]}


async def get_document_info(ctx: Context, data: dict) -> dict:
    return await ctx.app.store.read(documents.document_info, ctx.user, data["document_id"])


async def list_revisions(ctx: Context, data: dict) -> dict:
    return await ctx.app.store.read(documents.list_revisions, ctx.user, data["document_id"])


async def rename_document(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["document_id"]
    return await ctx.app.store.write(documents.rename_document, ctx.user, data["document_id"],
                                     data["title"])


async def move_document(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["document_id"]
    return await ctx.app.store.write(documents.move_document, ctx.user, data["document_id"],
                                     data["folder_id"])


async def delete_document(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["document_id"]
    removed = await ctx.app.store.write(documents.delete_document, ctx.user,
                                        data["document_id"])
    await _remove_deleted(ctx, removed)
    return {}


async def get_document_access_rules(ctx: Context, data: dict) -> dict:
    return await ctx.app.store.read(documents.get_rules, ctx.user, "document",
                                    data["document_id"])


async def set_document_rules(ctx: Context, data: dict) -> dict:
    ctx.audit_target = data["document_id"]
    rules = checked_rules(data["access_rules"])
    return await ctx.app.store.write(documents.set_rules, ctx.user, "document",
                                     data["document_id"], rules)
