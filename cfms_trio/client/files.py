"""Local files on the client side: their sha256, and the target a download writes into.

Blocking, pure helpers; async callers run them through `trio.to_thread`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

HASH_READ_BYTES = 1024 * 1024
SECRET_FILE_MODE = 0o600  # readable and writable by the owner only
PLAIN_FILE_MODE = 0o666  # narrowed by the umask, as open() does


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a whole local file, read in bounded blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def open_download_target(path: Path, *, exclusive: bool, secret: bool) -> tuple[BinaryIO, bool]:
    """Open `path` for writing a download into; return the file and whether it was created now.

    Nothing is truncated here: the caller truncates to its offset once the server has agreed
    to send, so a refused request leaves an existing file as it was. A file created here has
    its final mode from the first byte on: `secret` makes it 0600 (an existing file is narrowed
    to 0600 before anything is written into it). `exclusive` refuses a file that already
    exists (FileExistsError), links included, instead of writing into it.
    """
    mode = SECRET_FILE_MODE if secret else PLAIN_FILE_MODE
    try:  # O_EXCL also refuses a symbolic link, even one pointing nowhere
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        created = True
    except FileExistsError:
        if exclusive:
            raise
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        created = False
    try:
        if secret and not created:
            os.fchmod(fd, SECRET_FILE_MODE)
        return os.fdopen(fd, "r+b"), created
    except BaseException:
        os.close(fd)
        raise


def unlink_if_present(path: Path) -> None:
    """Remove a file this client made, if it is still there."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
