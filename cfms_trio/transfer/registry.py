"""Transfers in progress, so that one task has at most one upload at a time and a supervisor
can abort an upload whose deadline passed.

The registry knows this instance's transfers; with several instances on one database each
transfer also holds a lease on its task's row (storage/leases.py), taken when it starts,
renewed by `run` every third of `lease_s` and released when it ends, so a second transfer of
the same task on another instance is refused too. An instance that dies leaves its leases to
expire: after `lease_s` the task may be resumed anywhere. An abort asked by another instance
arrives through the cluster relay (`abort_from_elsewhere`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import AsyncIterator

import trio

from ..errors import Conflict
from ..storage import Store, leases

log = logging.getLogger(__name__)

# How often `wait_ended` looks whether another instance's transfer has released its lease.
RELEASE_POLL_S = 0.2


class ActiveTransfer:
    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.abort_reason: str | None = None
        self.ended = trio.Event()  # set once the transfer has unwound (its files closed)


class TransferRegistry:
    def __init__(self, store: Store, instance_id: str, lease_s: float) -> None:
        self._store = store
        self._instance_id = instance_id
        self._lease_s = lease_s
        self._active: dict[str, ActiveTransfer] = {}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Renew the leases of this instance's transfers until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self._lease_s / 3)
            try:
                await self._store.write(leases.renew_transfers, sorted(self._active),
                                        self._instance_id, time.time() + self._lease_s)
            except Exception:
                log.exception("could not renew the leases of running transfers")

    @contextlib.asynccontextmanager
    async def claim(self, task_id: str) -> AsyncIterator[ActiveTransfer]:
        """Run the one transfer of `task_id`, here and on every instance; 409 otherwise."""
        if task_id in self._active:
            raise Conflict(f"a transfer for task '{task_id}' is already in progress")
        active = self._active[task_id] = ActiveTransfer()
        try:
            now = time.time()
            await self._store.write(leases.claim_transfer, task_id, self._instance_id, now,
                                    now + self._lease_s)
        except BaseException:
            del self._active[task_id]
            active.ended.set()
            raise
        try:
            yield active
        finally:
            del self._active[task_id]
            with trio.CancelScope(shield=True):
                try:
                    await self._store.write(leases.release_transfer, task_id,
                                            self._instance_id)
                except Exception:
                    log.warning("could not release the lease of transfer %s (it expires by "
                                "itself)", task_id, exc_info=True)
            active.ended.set()

    def abort(self, task_id: str, reason: str) -> bool:
        """Cancel the transfer of `task_id`, if one runs here; it answers the client with
        `reason`. (The supervisor sends the same request to the other instances.)"""
        active = self._active.get(task_id)
        if active is None:
            return False
        active.abort_reason = reason
        active.scope.cancel()
        return True

    async def abort_from_elsewhere(self, body: dict) -> None:
        """The cluster relay's `abort_transfer` message."""
        self.abort(str(body["task_id"]), str(body["reason"]))

    async def wait_ended(self, task_ids: list[str]) -> None:
        """Return once none of `task_ids` has a transfer running, here or elsewhere."""
        for task_id in task_ids:
            active = self._active.get(task_id)
            if active is not None:
                await active.ended.wait()
        while await self._store.read(leases.leased_transfer_ids, time.time(), task_ids):
            await trio.sleep(RELEASE_POLL_S)

    def is_active(self, task_id: str) -> bool:
        return task_id in self._active

    def active_task_ids(self) -> set[str]:
        return set(self._active)
