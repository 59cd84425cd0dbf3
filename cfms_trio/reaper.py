"""Removing files from disk: deleted content (deferred while an export reads the store) and
the helpers every other clean-up uses.

An export snapshots the rows in one transaction and then streams file contents; a document
deleted meanwhile must not pull its file out from under the export. Deletions of stored
content therefore go through the `FileReaper`, which unlinks at once when no export runs and
otherwise after the last one ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import trio

log = logging.getLogger(__name__)


class FileReaper:
    def __init__(self, io_limiter: trio.CapacityLimiter) -> None:
        self._io_limiter = io_limiter
        self._holds = 0
        self._deferred: list[Path] = []

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While held (an export is reading stored files), removals are only queued."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    async def remove(self, paths: Iterable[Path] = ()) -> None:
        """Remove `paths` now, or once no hold remains; with no paths, remove what was queued
        if nothing holds any more (called when an export ends)."""
        self._deferred.extend(paths)
        if self._holds or not self._deferred:
            return
        ready, self._deferred = self._deferred, []
        await trio.to_thread.run_sync(unlink_all, ready, limiter=self._io_limiter)


def unlink_all(paths: Iterable[Path]) -> None:
    """Remove each file; a missing one is fine, any other failure is logged, not raised."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("could not remove %s", path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_unclaimed(directory: Path, claimed: set[str], suffix: str = "") -> int:
    """Remove the files in `directory` named `<key><suffix>` whose key is not in `claimed`
    (left-overs nothing refers to any more); return how many. A missing folder holds none."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.endswith(suffix) and entry.name.removesuffix(suffix) not in claimed:
            try:
                os.unlink(entry.path)
                removed += 1
            except (FileNotFoundError, IsADirectoryError):
                pass
    return removed
