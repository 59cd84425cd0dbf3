"""Transfers in progress, so that one task has at most one upload at a time and a supervisor
can abort an upload whose deadline passed."""

from __future__ import annotations

import contextlib
from typing import Iterator

import trio

from ..errors import Conflict


class ActiveTransfer:
    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.abort_reason: str | None = None
        self.ended = trio.Event()  # set once the transfer has unwound (its files closed)


class TransferRegistry:
    def __init__(self) -> None:
        self._active: dict[str, ActiveTransfer] = {}

    @contextlib.contextmanager
    def claim(self, task_id: str) -> Iterator[ActiveTransfer]:
        if task_id in self._active:
            raise Conflict(f"a transfer for task '{task_id}' is already in progress")
        active = self._active[task_id] = ActiveTransfer()
        try:
            yield active
        finally:
            del self._active[task_id]
            active.ended.set()

    def abort(self, task_id: str, reason: str) -> bool:
        """Cancel the transfer of `task_id`, if one runs; it answers the client with `reason`."""
        active = self._active.get(task_id)
        if active is None:
            return False
        active.abort_reason = reason
        active.scope.cancel()
        return True

    async def wait_ended(self, task_ids: list[str]) -> None:
        """Return once none of `task_ids` has a transfer running."""
        for task_id in task_ids:
            active = self._active.get(task_id)
            if active is not None:
                await active.ended.wait()

    def is_active(self, task_id: str) -> bool:
        return task_id in self._active

    def active_task_ids(self) -> set[str]:
        return set(self._active)
