"""A database made by an earlier version keeps working: columns added since are added at start."""

from __future__ import annotations

import peewee as pw

from cfms_trio.storage import Store, backup_tasks
from cfms_trio.storage.models import build_models


def _database_without_warnings(path) -> None:
    """The store as the version before issue 11 created it: BackupTask had no `warnings`."""
    database = pw.SqliteDatabase(str(path))
    m = build_models(database)
    m.BackupTask._meta.remove_field("warnings")
    with database.connection_context():
        database.create_tables(m.all)
        m.BackupTask.create(id="old-task", username="admin", operation="import",
                            status="completed", created_time=1.0)
    database.close()


def test_an_existing_database_gains_the_warnings_column(tmp_path):
    path = tmp_path / "cfms.db"
    _database_without_warnings(path)
    store = Store(path)
    try:
        store.create_tables()
        store.create_tables()  # idempotent: a second start changes nothing
        columns = [c.name for c in store.database.get_columns("backup_task")]
        assert columns.count("warnings") == 1
        old = store.run_read(backup_tasks.get_backup_task, "old-task")
        assert old["warnings"] == [] and old["status"] == "completed"
        store.run_write(backup_tasks.update_backup_task, "old-task",
                        warnings=["folder 'x': renamed"])
        assert store.run_read(backup_tasks.get_backup_task, "old-task")["warnings"] == [
            "folder 'x': renamed"]
    finally:
        store.close()
