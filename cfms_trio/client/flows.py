"""Whole client-side flows built on `Client`: carry a backup off one server, restore it on
another. Shared by `cfms-trio client ...` and scripts/demo_client.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import trio

from ..conventions import ARCHIVE_SUFFIX, FINAL_STATUSES, KEY_SUFFIX
from .connection import Client, Progress

StatusCallback = Callable[[dict], None]


async def export_backup(client: Client, out_dir: Path, name: str | None = None,
                        compression: str = "zstd",
                        progress: Progress | None = None) -> tuple[Path, Path, dict]:
    """Ask the server for a backup and download its archive and key into `out_dir`."""
    data: dict = {"compression": compression}
    if name:
        data["backup_name"] = name
    result = await client.call("generate_backup", data)
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{result['backup_name']}{ARCHIVE_SUFFIX}"
    key = out_dir / f"{result['backup_name']}{KEY_SUFFIX}"
    await client.download_file(result["archive_task_id"], archive, progress=progress)
    await client.download_file(result["key_task_id"], key)
    key.chmod(0o600)
    return archive, key, result


async def import_backup(client: Client, archive: Path, key: Path, *, timeout_seconds: int = 3600,
                        poll_interval_s: float = 2.0,
                        upload_progress: Progress | None = None,
                        on_status: StatusCallback | None = None) -> dict:
    """The flow of BACKUP_IMPORT_FEATURE.md: initiate, upload archive and key, start, then poll
    get_backup_import_status until the task is completed, failed or timed out."""
    init = await client.call("initiate_backup_import", {"timeout_seconds": timeout_seconds})
    task_id = init["backup_task_id"]
    await client.upload_file(init["archive_task_id"], archive, progress=upload_progress)
    await client.upload_file(init["key_task_id"], key)
    await client.call("start_backup_import", {"backup_task_id": task_id})
    while True:
        status = await client.call("get_backup_import_status", {"backup_task_id": task_id})
        if on_status:
            on_status(status)
        if status["status"] in FINAL_STATUSES:
            return status
        await trio.sleep(poll_interval_s)
