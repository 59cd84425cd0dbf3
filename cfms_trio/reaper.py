"""Removing deleted content (deferred while an export reads the store), through the content
storage (`content`: local files or an S3 bucket).

An export snapshots the rows in one transaction and then streams file contents; a document
deleted meanwhile must not pull its file out from under the export. Deletions of stored
content therefore go through the `FileReaper`, which removes at once when no export runs and
otherwise after the last one ends.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import trio

log = logging.getLogger(__name__)


class FileReaper:
    def __init__(self, io_limiter: trio.CapacityLimiter, content) -> None:
        self._io_limiter = io_limiter
        self._content = content
        self._holds = 0
        self._deferred: list[str] = []

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While held (an export is reading stored files), removals are only queued."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    async def remove(self, keys: Iterable[str] = ()) -> None:
        """Remove the content at `keys` (File rows' paths) now, or once no hold remains; with
        no keys, remove what was queued if nothing holds any more (called when an export
        ends)."""
        self._deferred.extend(keys)
        if self._holds or not self._deferred:
            return
        ready, self._deferred = self._deferred, []
        await trio.to_thread.run_sync(self._content.delete, ready, limiter=self._io_limiter)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
