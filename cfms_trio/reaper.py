"""Removal of deleted files' content, deferred while an export reads the store.

An export snapshots the rows in one transaction and then streams file contents; a document
deleted meanwhile must not pull its file out from under the export. Deletions therefore go
through the reaper, which unlinks at once when no export runs and otherwise after the last one
ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


class Reaper:
    def __init__(self) -> None:
        self._holds = 0
        self._deferred: list[Path] = []

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """While held, `take` only queues paths."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    def take(self, paths: list[Path]) -> list[Path]:
        """Queue `paths` for removal; return what may be unlinked now (blocking work the
        caller runs off the event loop with `unlink_all`)."""
        self._deferred.extend(paths)
        if self._holds:
            return []
        ready, self._deferred = self._deferred, []
        return ready


def unlink_all(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("could not remove %s", path)


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
