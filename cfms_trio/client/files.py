"""Local files on the client side.

Blocking, pure helpers; async callers run them through `trio.to_thread`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HASH_READ_BYTES = 1024 * 1024


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a whole local file, read in bounded blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()
