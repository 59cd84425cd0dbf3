"""Housekeeping for abandoned uploads.

An interrupted upload keeps its verified chunks in its partial-upload file so the client can
resume. Once its task has expired (or is gone) nobody can resume it, so a periodic sweep closes
expired tasks and removes their partial files. Several instances may sweep at once: closing
is a compare-and-set and a partial file is kept while any instance's transfer holds its task's
lease, so they never undo each other's work.
"""

from __future__ import annotations

import logging
import time

import trio

from ..storage import Store, leases, transfers
from .registry import TransferRegistry

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 600.0


class UploadSweeper:
    def __init__(self, store: Store, content, transfers_running: TransferRegistry,
                 interval_s: float = SWEEP_INTERVAL_S):
        self._store = store
        self._content = content  # the content storage holding the partial uploads
        self._running = transfers_running
        self._interval_s = interval_s

    async def sweep_once(self) -> int:
        """Close expired tasks and remove partial uploads no open task can resume."""
        now = time.time()
        await self._store.write(transfers.close_expired_tasks, now)
        keep = await self._store.read(transfers.open_upload_task_ids, now)
        keep |= self._running.active_task_ids()
        # Uploads running on other instances (several instances share the content storage).
        keep |= await self._store.read(leases.leased_transfer_ids, now)
        removed = await trio.to_thread.run_sync(self._content.remove_unclaimed_uploads, keep)
        if removed:
            log.info("removed %d abandoned partial uploads", removed)
        return removed

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Sweep now and then every interval, until cancelled."""
        task_status.started()
        while True:
            try:
                await self.sweep_once()
            except Exception:
                log.exception("upload sweep failed")
            await trio.sleep(self._interval_s)
