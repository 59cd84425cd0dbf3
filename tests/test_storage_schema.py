"""Schema versions: a database made by an earlier release upgrades in place on start, once; one
of a newer release is refused; the database URL is checked.

The fixture tests/fixtures/schema_v0 is a server root made by the release before schema
versions (commit cf9c1fc, see its make_fixture.py); that release knew only SQLite. PostgreSQL
databases exist from schema version 2 on, so there the upgrade is tested from the version
before the latest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import peewee as pw
import pytest

from cfms_trio.errors import SchemaTooNew
from cfms_trio.storage import Store, accounts, backup_tasks
from cfms_trio.storage.backends import parse_database_url
from cfms_trio.storage.migrations import LATEST_VERSION, VERSION_TABLE
from cfms_trio.storage.models import REVISION_HISTORY_INDEX, build_models

import databases

FIXTURE = Path(__file__).parent / "fixtures" / "schema_v0"
FIXTURE_ADMIN_PASSWORD = "fixture-admin-password"
FIXTURE_ALICE_PASSWORD = "fixture-alice-password"


def _store_for(root: Path) -> Store:
    """A store on the test's database for `root` (a fresh one on PostgreSQL)."""
    url = databases.database_url_for(root)
    return Store(parse_database_url(url) if url else root / "cfms.db")


def _set_version(store: Store, version: int) -> None:
    store.run_write(lambda m: m.db.execute_sql(f'UPDATE "{VERSION_TABLE}" SET version = '
                                               f'{m.db.param}', (version,)))



def _without_leases(m) -> None:
    """Undo migration 4 (what a database of the release before it lacks)."""
    for model in (m.BackupTask, m.FileTask):
        for column in ("lease_owner", "lease_expires_time"):
            m.db.execute_sql(f'ALTER TABLE "{model._meta.table_name}" DROP COLUMN "{column}"')
    m.db.execute_sql(f'DROP TABLE "{m.ClusterEvent._meta.table_name}"')


def _index_names(store: Store) -> set[str]:
    return set(store.run_read(lambda m: [index.name for index in m.db.get_indexes("revision")]))


async def _download_sha256(client, document_id: str, folder: Path) -> str:
    ticket = await client.call("get_document", {"document_id": document_id})
    target = folder / f"download-{document_id}"
    await client.download_file(ticket["task_id"], target)
    return hashlib.sha256(target.read_bytes()).hexdigest()


async def test_a_root_made_by_the_release_before_schema_versions_upgrades_in_place(
        start_server, tmp_path):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    shutil.copytree(FIXTURE / "content", tmp_path / "old" / "content")
    # That release had SQLite and local files only: this root keeps its own database file and
    # its content folder on every backend.
    server = await start_server("old", database_url=None, storage_url=None)
    assert server.app.store.schema_version() == LATEST_VERSION
    async with server.connect("admin", FIXTURE_ADMIN_PASSWORD) as admin:
        root = await admin.call("list_directory", {"folder_id": None})
        assert sorted(f["name"] for f in root["folders"]) == ["Projects"]
        assert sorted(d["title"] for d in root["documents"]) == ["Readme"]
        for document_id, document in expected["documents"].items():
            info = await admin.call("get_document_info", {"document_id": document_id})
            assert info["title"] == document["title"]
            revisions = await admin.call("list_revisions", {"document_id": document_id})
            assert len(revisions["revisions"]) == document["revisions"]
            assert await _download_sha256(admin, document_id, tmp_path) == document["sha256"]
        users = {u["username"]: u for u in (await admin.call("list_users"))["users"]}
        assert sorted(users["alice"]["groups"]) == ["editors", "user"]
        groups = {g["name"] for g in (await admin.call("list_groups"))["groups"]}
        assert "editors" in groups
        backups = {b["name"] for b in (await admin.call("list_backups"))["backups"]}
        assert "before-upgrade" in backups
        schedules = (await admin.call("list_backup_schedules"))["schedules"]
        assert [s["name"] for s in schedules] == ["nightly"]
        task = await admin.call("get_backup_import_status",
                                {"backup_task_id": expected["import_task_id"]})
        assert task["warnings"] == []
        # Writing works too: a new document in an old folder, read back.
        created = await admin.call("create_document", {"title": "after upgrade",
                                                       "folder_id": expected["folders"]["Inner"]})
        source = tmp_path / "new"
        source.write_bytes(b"written after the upgrade\n")
        await admin.upload_file(created["task_id"], source)
        assert await _download_sha256(admin, created["document_id"], tmp_path) == \
            hashlib.sha256(b"written after the upgrade\n").hexdigest()
    async with server.connect("alice", FIXTURE_ALICE_PASSWORD) as alice:
        assert (await alice.call("list_directory", {"folder_id": None}))["documents"]
    await server.stop()
    # The next start finds nothing to do: the same version, the same data.
    again = await start_server("old", database_url=None, storage_url=None)
    assert again.app.store.schema_version() == LATEST_VERSION
    async with again.connect("admin", FIXTURE_ADMIN_PASSWORD) as admin:
        listed = await admin.call("list_directory", {"folder_id": expected["folders"]["Inner"]})
        assert sorted(d["title"] for d in listed["documents"]) == ["after upgrade", "notes"]


def _columns_of(store, table: str) -> set[str]:
    return store.run_read(lambda m: {c.name for c in m.db.get_columns(table)})


def test_a_database_one_version_behind_upgrades_once(tmp_path):
    """On the tests' database (PostgreSQL in its run): a database at LATEST_VERSION - 1, the
    shape the previous release's migrations left (here: without the task leases and the
    cluster event table, what migration 4 adds), gets the latest migration and keeps its rows."""
    assert LATEST_VERSION == 4, "undo what the newest migration adds in this test"
    store = _store_for(tmp_path)
    try:
        assert store.upgrade_schema() is None  # empty: created at the latest version
        assert "lease_owner" in _columns_of(store, "backup_task")
        store.run_write(accounts.bootstrap, "hash-of-a-password", 1.0)
        # Back to the previous version: without what the latest migration adds (the leases
        # of several instances, issue 16).
        store.run_write(_without_leases)
        assert "lease_owner" not in _columns_of(store, "backup_task")
        _set_version(store, LATEST_VERSION - 1)
    finally:
        store.close()
    store = _store_for(tmp_path)
    try:
        assert store.schema_version() == LATEST_VERSION - 1
        assert "lease_owner" not in _columns_of(store, "backup_task")
        assert store.upgrade_schema() == LATEST_VERSION - 1
        assert store.schema_version() == LATEST_VERSION
        for table in ("backup_task", "file_task"):
            assert {"lease_owner", "lease_expires_time"} <= _columns_of(store, table)
        assert "cluster_event" in store.run_read(lambda m: m.db.get_tables())
        assert "plan" in _columns_of(store, "backup_task")
        assert REVISION_HISTORY_INDEX in _index_names(store)
        assert store.run_read(accounts.is_initialized)
        assert store.upgrade_schema() == LATEST_VERSION  # idempotent: nothing left to do
    finally:
        store.close()


def test_a_sqlite_database_without_versions_gains_what_it_lacks(tmp_path):
    """The shape before issue 11 (no BackupTask.warnings) and before schema versions: version 0,
    brought to the latest with its rows kept. Only SQLite databases had that shape."""
    path = tmp_path / "cfms.db"
    database = pw.SqliteDatabase(str(path))
    m = build_models(database)
    m.BackupTask._meta.remove_field("warnings")
    with database.connection_context():
        database.create_tables(m.all)
        m.BackupTask.create(id="old-task", username="admin", operation="import",
                            status="completed", created_time=1.0)
    database.close()
    store = Store(path)
    try:
        assert store.schema_version() == 0
        assert store.upgrade_schema() == 0
        assert store.upgrade_schema() == LATEST_VERSION
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


def test_a_database_of_a_newer_release_is_refused_with_a_clear_message(tmp_path):
    root = tmp_path / "root"
    (root / "content").mkdir(parents=True)
    url = databases.database_url_for(root)
    store = Store(parse_database_url(url) if url else root / "content" / "cfms.db")
    try:
        store.upgrade_schema()
        _set_version(store, LATEST_VERSION + 1)
    finally:
        store.close()
    store = Store(parse_database_url(url) if url else root / "content" / "cfms.db")
    try:
        with pytest.raises(SchemaTooNew, match=f"schema version {LATEST_VERSION + 1}, newer "
                                               f"than this cfms-trio knows"):
            store.upgrade_schema()
        assert store.schema_version() == LATEST_VERSION + 1  # untouched
    finally:
        store.close()
    result = subprocess.run([sys.executable, "-m", "cfms_trio", "serve", "--root", str(root),
                             "--port", "0", *databases.serve_arguments(root)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the ") and "newer than this cfms-trio" in last_line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "unsupported database URL"),
    ("postgresql://u@h", "names no database"),
    ("postgresql://u@h:port/db", "bad port"),
    ("sqlite://relative/path", "not a SQLite database URL"),
])
def test_serve_refuses_a_malformed_database_url(tmp_path, url, message):
    result = subprocess.run([sys.executable, "-m", "cfms_trio", "serve", "--root",
                             str(tmp_path), "--database", url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --database: ") and message in result.stderr


def test_a_password_in_the_url_is_never_echoed():
    with pytest.raises(ValueError) as info:
        parse_database_url("mysql://user:s3cret@host/db")
    assert "s3cret" not in str(info.value)
    location = parse_database_url("postgresql://user:s3cret@db.example:6543/cfms")
    assert (location.host, location.port, location.user, location.password,
            location.dbname) == ("db.example", 6543, "user", "s3cret", "cfms")
    assert "s3cret" not in location.describe()


def test_an_unreachable_database_is_one_line_at_start(tmp_path):
    port = databases.free_loopback_port()
    result = subprocess.run([sys.executable, "-m", "cfms_trio", "serve", "--root",
                             str(tmp_path), "--database",
                             f"postgresql://nobody@127.0.0.1:{port}/nothing"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: cannot open the PostgreSQL database "
                                f"postgresql://nobody@127.0.0.1:{port}/nothing")
    assert "Traceback" not in result.stderr


def test_a_side_connection_is_its_own(tmp_path):
    """The seam for work that keeps a connection (LISTEN): same database, not the pool's."""
    store = _store_for(tmp_path)
    try:
        store.upgrade_schema()
        side = store.open_side_connection()
        side.connect()
        try:
            assert side.execute_sql(f'SELECT COUNT(*) FROM "{VERSION_TABLE}"').fetchone() == (1,)
            assert side.connection() is not store.database.connection()
        finally:
            side.close()
    finally:
        store.close()
