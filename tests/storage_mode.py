"""Which content storage the suite's servers use: `CFMS_TEST_STORAGE=s3` runs them on a bucket
of the session's moto server (local files otherwise). Read here, by conftest.py and by the
helpers that start server processes; production code never reads it."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import pytest

STORAGE = os.environ.get("CFMS_TEST_STORAGE", "local")
S3_MODE = STORAGE == "s3"
BUCKET = "cfms-test-storage"
active_endpoint: str | None = None  # the moto server's, set by conftest in S3 mode


def local_disk_only(reason: str):
    """Skip a test in S3 mode: it is about, or inspects, files under <root>/content/."""
    return pytest.mark.skipif(S3_MODE, reason=f"local storage only: {reason}")


def new_storage_url() -> str:
    """A fresh prefix of the test bucket, one per server."""
    return f"s3://{BUCKET}/{secrets.token_hex(6)}/"


def server_args(root: Path) -> list[str]:
    """`serve` flags for a server process on `root` in the current mode (the same prefix for
    the same root, so a restarted server finds its content)."""
    if not S3_MODE:
        return []
    prefix = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return ["--storage", f"s3://{BUCKET}/{prefix}/", "--s3-endpoint", active_endpoint]
