"""Issue 12, item 12, the rest of its class: every disk write that fails for want of space
answers 507 with a message about disk space, leaves nothing half written, and the server keeps
working. (The upload case is in test_fault_consistency.py.)"""

from __future__ import annotations

import errno

import pytest
import trio

from cfms_trio.backup import export as backup_export
from cfms_trio.errors import InsufficientStorage
from cfms_trio.storage import Store

import databases

from .support import entries
from .test_faults import FaultyOs

pytestmark = pytest.mark.timeout(60)

STEP_TIMEOUT_S = 20


async def test_disk_full_export_answers_507_and_leaves_no_partial_backup(server, admin,
                                                                        monkeypatch):
    await admin.call("create_directory", {"name": "something to export"})
    backups = server.root / "content" / "backups"
    before = entries(backups)
    faulty = FaultyOs(errno.ENOSPC, write_from_call=1)
    monkeypatch.setattr(backup_export, "os", faulty)
    with trio.fail_after(STEP_TIMEOUT_S):
        reply = await admin.request("generate_backup", {"backup_name": "full"})
    assert faulty.raised >= 1
    assert reply["code"] == 507, reply
    assert "disk space" in reply["message"], reply
    assert entries(backups) == before, "a partial backup was kept"
    monkeypatch.undo()
    # With space again the same name works: nothing of the failed export is in the way.
    with trio.fail_after(STEP_TIMEOUT_S):
        done = await admin.call("generate_backup", {"backup_name": "full"})
    assert done["backup_name"] == "full"


@databases.skip_on_postgresql
def test_full_database_is_a_507_not_a_500(tmp_path):
    """SQLite reports a full disk as SQLITE_FULL (here its page limit, which is the same
    error): every write through the Store, a login's token included, answers 507 and
    changes nothing."""
    store = Store(tmp_path / "cfms.db")
    store.upgrade_schema()
    store.database.connect(reuse_if_open=True)
    pages = store.database.execute_sql("PRAGMA page_count").fetchone()[0]
    store.database.execute_sql(f"PRAGMA max_page_count = {pages}")

    def fill(m) -> None:
        for _ in range(100):
            m.AuditLog.create(time=0.0, username="u" * 4000, action="login", result=200)

    with pytest.raises(InsufficientStorage) as caught:
        store.run_write(fill)
    assert caught.value.code == 507
    assert "disk space" in caught.value.message
    assert store.run_read(lambda m: m.AuditLog.select().count()) == 0
    store.close()
