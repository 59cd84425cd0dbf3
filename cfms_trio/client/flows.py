"""Whole client-side flows built on `Client`: carry a backup off one server, restore it on
another. Shared by `cfms-trio client ...` and scripts/demo_client.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import trio

from ..conventions import ARCHIVE_SUFFIX, FINAL_STATUSES, KEY_SUFFIX, STATUS_PLANNED, is_backup_name
from .connection import Client, ClientError, Progress
from .files import unlink_if_present

StatusCallback = Callable[[dict], None]


async def export_backup(client: Client, out_dir: Path, name: str | None = None,
                        compression: str = "zstd",
                        progress: Progress | None = None, *,
                        recipients: tuple[str, ...] = (),
                        passphrase: str | None = None,
                        parts: tuple[str, ...] | None = None) -> tuple[Path, Path | None, dict]:
    """Ask the server for a backup and download its archive and key into `out_dir`.

    The server's answer is not trusted to name local files: a backup name that is not one
    plain file name (the server's own rule) is refused before anything is written. Existing
    files in `out_dir` are never replaced, and the key file is 0600 from its creation on.
    If a download fails, neither file of the pair is left behind. A backup made for
    `recipients` (or only a `passphrase`) has no key file: the key returned is None.
    `parts`: what the backup holds (default: everything; see generate_backup).
    """
    data: dict = {"compression": compression}
    if name:
        data["backup_name"] = name
    if recipients:
        data["recipients"] = list(recipients)
    if passphrase is not None:
        data["passphrase"] = passphrase
    if parts is not None:
        data["parts"] = list(parts)
    result = await client.call("generate_backup", data)
    backup_name = result.get("backup_name")
    if not is_backup_name(backup_name):
        raise ClientError(0, f"the server answered an unusable backup name {backup_name!r}: "
                             "a backup name may hold only letters, digits, '.', '_' and '-', "
                             "must start with a letter or digit and be at most 100 characters; "
                             "nothing was written")
    if name and backup_name != name:
        raise ClientError(0, f"the server named the backup {backup_name!r} instead of the "
                             f"requested {name!r}; nothing was written")
    await trio.to_thread.run_sync(lambda: out_dir.mkdir(parents=True, exist_ok=True))
    archive = out_dir / f"{backup_name}{ARCHIVE_SUFFIX}"
    key = out_dir / f"{backup_name}{KEY_SUFFIX}"
    for path in (archive, key):
        if await trio.to_thread.run_sync(path.exists):
            raise ClientError(0, f"{path} already exists; not overwriting it")
    await client.download_file(result["archive_task_id"], archive, progress=progress,
                               exclusive=True)
    if result.get("key_task_id") is None:
        return archive, None, result
    try:
        await client.download_file(result["key_task_id"], key, exclusive=True, secret=True)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(unlink_if_present, archive)
        raise
    return archive, key, result


async def import_backup(client: Client, archive: Path, key: Path | None, *,
                        timeout_seconds: int = 3600,
                        poll_interval_s: float = 2.0,
                        upload_progress: Progress | None = None,
                        on_status: StatusCallback | None = None,
                        passphrase: str | None = None,
                        allow_missing_content: bool = False,
                        accounts: str | None = None,
                        options: dict | None = None) -> dict:
    """The flow of BACKUP_IMPORT_FEATURE.md: initiate, upload archive and key, start, then poll
    get_backup_import_status until the task is completed, failed or timed out. `key` is a key
    file or an identity file; with a `passphrase` it may be None (nothing uploaded for it).
    `allow_missing_content`: restore a legacy archive that lists files it does not hold.
    `accounts`: how the archive's accounts apply (skip_existing, replace, none). `options`:
    more fields of start_backup_import (dry_run, conflict_policy, include, target_folder_id);
    a dry run's flow ends when the task is `planned`."""
    init = await client.call("initiate_backup_import", {"timeout_seconds": timeout_seconds})
    await client.upload_file(init["archive_task_id"], archive, progress=upload_progress)
    if key is not None:
        await client.upload_file(init["key_task_id"], key)
    return await start_import(client, init["backup_task_id"], poll_interval_s=poll_interval_s,
                              on_status=on_status, passphrase=passphrase,
                              allow_missing_content=allow_missing_content, accounts=accounts,
                              options=options)


async def start_import(client: Client, task_id: str, *, poll_interval_s: float = 2.0,
                       on_status: StatusCallback | None = None,
                       passphrase: str | None = None,
                       allow_missing_content: bool = False,
                       accounts: str | None = None,
                       options: dict | None = None) -> dict:
    """Start an import task whose uploads are in (just uploaded, or kept by a dry run or a
    start refused because of its options) and poll get_backup_import_status until it ends:
    `planned` for a dry run, else completed, failed, cancelled or timed out. The options are
    those of `import_backup`."""
    start: dict = {"backup_task_id": task_id}
    if passphrase is not None:
        start["passphrase"] = passphrase
    if allow_missing_content:
        start["allow_missing_content"] = True
    if accounts is not None:
        start["accounts"] = accounts
    start.update(options or {})
    ends = FINAL_STATUSES + ((STATUS_PLANNED,) if start.get("dry_run") else ())
    await client.call("start_backup_import", start)
    while True:
        status = await client.call("get_backup_import_status", {"backup_task_id": task_id})
        if on_status:
            on_status(status)
        if status["status"] in ends:
            return status
        await trio.sleep(poll_interval_s)
