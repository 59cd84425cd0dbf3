"""Helpers for the hostile-input tests: imports through the API, and before/after pictures of
everything an import could change (data tables, content folder, the world outside the root)."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import trio

from cfms_trio.client import Client, ClientError

import databases
from helpers import snapshot_tree

from . import corpus

IMPORT_TIMEOUT_S = 30
POLL_INTERVAL_S = 0.02
FINAL_STATUSES = ("completed", "failed", "timeout")
COMPLETED_EVENT = "backup_import_completed"
# Every table an import writes to, save its own BackupTask row and the audit log.
DATA_TABLES = ("folder", "document", "revision", "file", "access_rule", "file_task")
# What legitimately changes while the server runs; everything else in content/ must not.
VOLATILE_PREFIXES = ("cfms.db", "logs/")

_file_numbers = itertools.count()


# ------------------------------------------------------------------------------------------
# Pictures of the store


def dump_tables(root: Path) -> dict[str, list[tuple]]:
    """Every row of the data tables, read through a connection of our own (blocking)."""
    return databases.dump_tables(root, DATA_TABLES)


def content_tree(content: Path) -> dict[str, str]:
    return {path: digest for path, digest in snapshot_tree(content).items()
            if not path.startswith(VOLATILE_PREFIXES)}


def entries(folder: Path) -> list[str]:
    """Names in a folder (files and folders), [] when it does not exist."""
    return sorted(os.listdir(folder)) if folder.is_dir() else []


@dataclasses.dataclass
class StoreState:
    tables: dict[str, list[tuple]]
    content: dict[str, str]


def capture_blocking(root: Path) -> StoreState:
    content = root / "content"
    return StoreState(dump_tables(root), content_tree(content))


async def capture(root: Path) -> StoreState:
    return await trio.to_thread.run_sync(capture_blocking, root)


def assert_store_unchanged(before: StoreState, after: StoreState) -> None:
    for table in DATA_TABLES:
        assert after.tables[table] == before.tables[table], f"table {table} changed"
    added = sorted(set(after.content) - set(before.content))
    removed = sorted(set(before.content) - set(after.content))
    changed = sorted(p for p in set(before.content) & set(after.content)
                     if before.content[p] != after.content[p])
    assert (added, removed, changed) == ([], [], []), "content folder changed"


def assert_no_leftovers(root: Path) -> None:
    """Nothing of a finished import remains: uploads, staging, partial uploads."""
    content = root / "content"
    assert entries(content / "backups" / "import") == []
    assert entries(content / "tmp" / "staging") == []
    assert entries(content / "tmp" / "uploads") == []


def escaped_files(*folders: Path) -> list[str]:
    """Files a path traversal in the corpus would have created."""
    found = [str(p) for p in (Path(corpus.ABSOLUTE_TARGET), Path("/") / corpus.ESCAPE_NAME,
                              Path("/tmp") / corpus.ESCAPE_NAME) if os.path.lexists(p)]
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            found += [os.path.join(dirpath, name) for name in dirnames + filenames
                      if corpus.ESCAPE_NAME in name]
    return found


# ------------------------------------------------------------------------------------------
# Imports through the API


async def upload_bytes(client: Client, task_id: str, data: bytes, workdir: Path) -> dict:
    path = workdir / f"upload-{next(_file_numbers)}"
    await trio.to_thread.run_sync(path.write_bytes, data)
    try:
        return await client.upload_file(task_id, path)
    finally:
        path.unlink()


async def wait_for_outcome(client: Client, task_id: str, bystander: Client | None = None) -> dict:
    """Poll until the task is final, then wait for its completion event (sent once the
    uploads are removed); return the final status. `bystander` is pinged on every poll."""
    with trio.fail_after(IMPORT_TIMEOUT_S):
        while True:
            status = await client.call("get_backup_import_status", {"backup_task_id": task_id})
            if bystander is not None:
                assert (await bystander.call("server_info"))["name"] == "cfms-trio"
            if status["status"] in FINAL_STATUSES:
                break
            await trio.sleep(POLL_INTERVAL_S)
        while True:
            event = await client.next_event(COMPLETED_EVENT)
            if event["data"]["backup_task_id"] == task_id:
                assert event["data"]["status"] == status["status"]
                return status


async def start_import(client: Client, archive: bytes, key: bytes, workdir: Path,
                       timeout_seconds: int = 60) -> str:
    """Initiate, upload both files and start; return the backup task id."""
    init = await client.call("initiate_backup_import", {"timeout_seconds": timeout_seconds})
    await upload_bytes(client, init["archive_task_id"], archive, workdir)
    await upload_bytes(client, init["key_task_id"], key, workdir)
    await client.call("start_backup_import", {"backup_task_id": init["backup_task_id"]})
    return init["backup_task_id"]


async def run_import(client: Client, archive: bytes, key: bytes, workdir: Path,
                     bystander: Client | None = None) -> dict:
    """The whole import flow; `client` must have registered as a listener. Returns the final
    status."""
    task_id = await start_import(client, archive, key, workdir)
    return await wait_for_outcome(client, task_id, bystander)


async def refused_upload(client: Client, case: corpus.Case, workdir: Path) -> tuple[int, str]:
    """Initiate an import whose `case.refused_upload` is refused; check it can never start and
    let it time out, so its placeholders are gone. Returns the refusal's code and message."""
    init = await client.call("initiate_backup_import", {"timeout_seconds": 1})
    uploads = {"archive": (init["archive_task_id"], case.archive),
               "key": (init["key_task_id"], case.key)}
    refusal = None
    for which, (task_id, data) in uploads.items():
        try:
            await upload_bytes(client, task_id, data, workdir)
        except ClientError as err:
            assert which == case.refused_upload, f"{which} upload refused: {err}"
            refusal = (err.code, err.message)
        else:
            assert which != case.refused_upload, f"{which} upload was accepted"
    try:
        await client.call("start_backup_import", {"backup_task_id": init["backup_task_id"]})
    except ClientError as err:
        assert err.code == 400 and f"{case.refused_upload} upload is not complete" in err.message
    else:
        raise AssertionError("an import with a refused upload started")
    status = await wait_for_outcome(client, init["backup_task_id"])
    assert status["status"] == "timeout"
    return refusal


# ------------------------------------------------------------------------------------------
# Seeding a store


async def seed_store(client: Client, workdir: Path) -> None:
    """Give a fresh server something to lose: content made through the API, and a restored
    backup (ids ``seed-*``) whose files live in restore/files. `client` must be a listener."""
    folder = await client.call("create_directory", {"name": "Through the API"})
    document = await client.call("create_document", {"title": "Plan", "folder_id": folder["id"]})
    await upload_bytes(client, document["task_id"], b"api content " * 500, workdir)
    archive, key = corpus.valid_v2_archive(corpus.seed_dataset())
    status = await run_import(client, archive, key, workdir)
    assert status["status"] == "completed", status
