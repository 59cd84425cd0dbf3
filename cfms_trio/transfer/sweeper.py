"""Housekeeping for abandoned uploads.

An interrupted upload keeps its verified chunks in `tmp/uploads/<task>.part` so the client can
resume. Once its task has expired (or is gone) nobody can resume it, so a periodic sweep closes
expired tasks and removes their partial files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..storage import transfers

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 600.0
PART_SUFFIX = ".part"


def remove_stale_parts(uploads_dir: Path, keep_task_ids: set[str]) -> int:
    removed = 0
    for entry in os.scandir(uploads_dir):
        task_id = entry.name.removesuffix(PART_SUFFIX)
        if entry.name.endswith(PART_SUFFIX) and task_id not in keep_task_ids:
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


async def sweep_once(app: "App") -> int:
    now = app.now()
    await app.store.write(transfers.close_expired_tasks, now)
    keep = await app.store.read(transfers.open_upload_task_ids, now)
    keep |= app.transfers.active_task_ids()
    removed = await trio.to_thread.run_sync(remove_stale_parts, app.paths.uploads, keep)
    if removed:
        log.info("removed %d abandoned partial uploads", removed)
    return removed


async def sweep_forever(app: "App", interval_s: float = SWEEP_INTERVAL_S) -> None:
    while True:
        try:
            await sweep_once(app)
        except Exception:
            log.exception("upload sweep failed")
        await trio.sleep(interval_s)


async def startup(app: "App") -> None:
    """Server start-up hook: sweep now and then periodically."""
    app.nursery.start_soon(sweep_forever, app)
