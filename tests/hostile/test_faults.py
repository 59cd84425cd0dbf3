"""Faults in the server's own machinery during a restore: the disk filling up, the database
failing. Whatever fails and wherever, the import ends `failed` and the store is as before."""

from __future__ import annotations

import errno
import os
import sqlite3

import pytest
import trio

from cfms_trio.backup import importer as importer_module
from cfms_trio.content import local as local_content
from cfms_trio.backup.format import staged as staged_module
from cfms_trio.storage import restore_rows

from . import corpus
from .support import (
    assert_no_leftovers,
    assert_store_unchanged,
    capture,
    run_import,
    seed_store,
)

TEST_TIMEOUT_S = 60


class FaultyOs:
    """Stands in for the `os` module inside one server module. `fails(name, ...)` decides, call
    by call, whether that function raises instead; everything else is the real `os`."""

    def __init__(self, error_number: int, *, rename_from_call: int | None = None,
                 write_from_call: int | None = None, renames_into: str | None = None):
        self.error_number = error_number
        self.rename_from_call = rename_from_call
        self.renames_into = renames_into  # count only renames into this folder
        self.write_from_call = write_from_call
        self.renames = 0
        self.writes = 0
        self.raised = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def error(self) -> OSError:
        self.raised += 1
        return OSError(self.error_number, os.strerror(self.error_number))

    def rename(self, source, target):
        if self.renames_into is not None and os.path.dirname(target) != self.renames_into:
            return os.rename(source, target)
        self.renames += 1
        if self.rename_from_call is not None and self.renames >= self.rename_from_call:
            raise self.error()
        return os.rename(source, target)

    def fdopen(self, fd, *args, **kwargs):
        return _FaultyFile(os.fdopen(fd, *args, **kwargs), self)


class _FaultyFile:
    """A file whose writes fail once the owning FaultyOs says the disk is full."""

    def __init__(self, real, faults: FaultyOs):
        self._real = real
        self._faults = faults

    def write(self, data):
        faults = self._faults
        faults.writes += 1
        if faults.write_from_call is not None and faults.writes >= faults.write_from_call:
            # A full disk takes part of the data first, as a real one would.
            self._real.write(bytes(memoryview(data)[:len(data) // 2]))
            raise faults.error()
        return self._real.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._real.close()

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
async def seeded(start_server, tmp_path):
    """A fresh seeded server and a listening admin connection to it."""
    server = await start_server("faults")
    async with server.connect("admin") as admin:
        await admin.listen()
        await seed_store(admin, tmp_path)
        yield server, admin


async def import_under_fault(seeded, tmp_path) -> dict:
    """Import the big valid backup; check the store is unchanged; return the final status."""
    server, admin = seeded
    archive, key = corpus.big_archive(), corpus.v2_key()
    with trio.fail_after(TEST_TIMEOUT_S):
        before = await capture(server.root)
        status = await run_import(admin, archive, key, tmp_path)
        after = await capture(server.root)
    assert status["status"] == "failed", status
    assert_store_unchanged(before, after)
    assert_no_leftovers(server.root)
    return status


async def import_succeeds(seeded, tmp_path) -> None:
    """With the fault gone the same backup restores: nothing half-imported is in the way."""
    server, admin = seeded
    with trio.fail_after(TEST_TIMEOUT_S):
        status = await run_import(admin, corpus.big_archive(), corpus.v2_key(), tmp_path)
    assert status["status"] == "completed", status
    restored = sorted(os.listdir(server.root / "content" / "restore" / "files"))
    assert [name for name in restored if name.startswith("hx")] == ["hx1", "hx2", "hx3"]


DISK_FAULTS = {
    # (errno, where, expected message)
    "disk_full_while_staging": (errno.ENOSPC, "staging",
                                "the server ran out of disk space while restoring"),
    "quota_exceeded_while_staging": (errno.EDQUOT, "staging",
                                     "the server's disk quota was exceeded while restoring"),
    "disk_full_while_placing_files": (errno.ENOSPC, "placing",
                                      "the server ran out of disk space while restoring"),
    "io_error_while_placing_files": (errno.EIO, "placing",
                                     "disk error while restoring (Input/output error)"),
}


@pytest.mark.parametrize("fault", sorted(DISK_FAULTS))
async def test_disk_failure_mid_restore(seeded, tmp_path, monkeypatch, fault):
    error_number, where, expected = DISK_FAULTS[fault]
    if where == "staging":
        # The second file (hx2, several segments long) fails half-written into staging.
        faulty = FaultyOs(error_number, write_from_call=2)
        monkeypatch.setattr(staged_module, "os", faulty)
    else:
        # The first file is in restore/files when the second one cannot be placed.
        faulty = FaultyOs(error_number, rename_from_call=2,
                          renames_into=str(seeded[0].root / "content" / "restore" / "files"))
        monkeypatch.setattr(local_content, "os", faulty)
    status = await import_under_fault(seeded, tmp_path)
    assert faulty.raised == 1
    assert status["error_message"] == expected
    if where == "placing":
        assert status["current_step"] == "Importing files"
    monkeypatch.undo()
    await import_succeeds(seeded, tmp_path)


async def test_database_failing_while_inserting(seeded, tmp_path, monkeypatch):
    """Documents are inserted (after every file was placed), then the database fails."""
    real_insert = restore_rows.insert_rows

    def insert_then_fail(model, *args, **kwargs):
        inserted = real_insert(model, *args, **kwargs)
        if model._meta.table_name == "document":
            raise sqlite3.OperationalError("database or disk is full")
        return inserted

    monkeypatch.setattr(restore_rows, "insert_rows", insert_then_fail)
    status = await import_under_fault(seeded, tmp_path)
    assert status["error_message"].startswith("internal error while restoring (log reference ")
    assert status["current_step"] == "Importing documents"
    monkeypatch.undo()
    await import_succeeds(seeded, tmp_path)


async def test_database_failing_at_commit(seeded, tmp_path, monkeypatch):
    """Every row is written and every file placed; then the transaction fails to commit."""
    real_commit_restore = importer_module.commit_restore

    def commit_then_fail(m, *args):
        real_commit_restore(m, *args)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(importer_module, "commit_restore", commit_then_fail)
    status = await import_under_fault(seeded, tmp_path)
    assert status["error_message"].startswith("internal error while restoring (log reference ")
    assert status["current_step"] == "Finalizing import"
    monkeypatch.undo()
    await import_succeeds(seeded, tmp_path)
