"""Housekeeping for abandoned uploads.

An interrupted upload keeps its verified chunks in `tmp/uploads/<task>.part` so the client can
resume. Once its task has expired (or is gone) nobody can resume it, so a periodic sweep closes
expired tasks and removes their partial files.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..reaper import remove_unclaimed
from ..storage import transfers

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 600.0
PART_SUFFIX = ".part"


async def sweep_once(app: "App") -> int:
    now = app.now()
    await app.store.write(transfers.close_expired_tasks, now)
    keep = await app.store.read(transfers.open_upload_task_ids, now)
    keep |= app.transfers.active_task_ids()
    removed = await trio.to_thread.run_sync(remove_unclaimed, app.paths.uploads, keep,
                                            PART_SUFFIX)
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
