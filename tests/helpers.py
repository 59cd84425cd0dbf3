"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ADMIN_PASSWORD = "admin-password-for-tests"
USER_PASSWORD = "user-password-1"


async def make_user(admin, username: str, password: str = USER_PASSWORD, groups=("user",),
                    permissions=()) -> None:
    await admin.call("create_user", {"username": username, "password": password,
                                     "groups": list(groups), "permissions": list(permissions)})


def snapshot_tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under `root` (for before/after checks)."""
    out = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
