"""Complete backups (issue 13): accounts, groups, permissions and the audit log travel with the
documents; parts; the accounts policies of an import; the importing administrator keeps
access; every payload version still imports (2.0 fixture made by the writer before 3.0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cfms_trio.client import ClientError

from backup_support import export_to, import_from, upload_bytes
from helpers import ADMIN_PASSWORD

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
async def source(start_server):
    return await start_server("source")


@pytest.fixture
async def target(start_server):
    return await start_server("target")


async def populate(server, folder: Path) -> dict:
    """Users in groups with direct permissions, documents only some of them may read."""
    folder.mkdir(parents=True, exist_ok=True)
    async with server.connect("admin") as admin:
        await admin.call("create_group", {"name": "staff", "permissions": ["create_document"]})
        await admin.call("create_user", {"username": "alice", "password": "alice-pass-1",
                                         "nickname": "Alice A.", "groups": ["user", "staff"],
                                         "permissions": ["list_users"]})
        await admin.call("create_user", {"username": "bob", "password": "bob-pass-1",
                                         "groups": ["user"]})
        staff_only = {"match": "all", "match_groups": [
            {"match": "all", "groups": {"match": "all", "require": ["staff"]}}]}
        plans = await admin.call("create_document", {"title": "plans",
                                                     "access_rules": {"read": [staff_only]}})
        await upload_bytes(admin, plans["task_id"], folder, b"staff plans")
        memo = await admin.call("create_document", {"title": "memo"})
        await upload_bytes(admin, memo["task_id"], folder, b"for everyone")
        audit = await admin.call("view_audit_logs", {"limit": 1000})
    return {"audit": audit["entries"]}


async def titles_seen(server, username: str, password: str) -> list[str]:
    async with server.connect(username, password) as client:
        listing = await client.call("list_directory", {"folder_id": None})
    return sorted(d["title"] for d in listing["documents"])


async def user_view(server, username: str) -> dict:
    async with server.connect("admin") as admin:
        info = await admin.call("get_user_info", {"username": username})
    return {key: info[key] for key in ("nickname", "groups", "permissions",
                                       "effective_permissions", "created_time",
                                       "passwd_last_modified")}


async def test_full_round_trip_through_two_servers(source, target, tmp_path):
    before = await populate(source, tmp_path / "up")
    seen_on_a = {name: await titles_seen(source, name, password)
                 for name, password in (("alice", "alice-pass-1"), ("bob", "bob-pass-1"))}
    assert seen_on_a == {"alice": ["memo", "plans"], "bob": ["memo"]}
    views_on_a = {name: await user_view(source, name) for name in ("alice", "bob")}
    async with source.connect("admin") as admin:
        archive, key, result = await export_to(admin, tmp_path / "backup")
    meta = result["metadata"]
    assert meta["version"] == "3.0" and meta["parts"] == ["accounts", "documents", "audit"]
    assert meta["users_count"] == 3 and meta["groups_count"] == 3
    async with target.connect("admin") as admin:
        final, _ = await import_from(admin, archive, key)
        assert final["status"] == "completed", final
        assert final["warnings"] == []
        audit = await admin.call("view_audit_logs", {"limit": 1000})
    for name, password in (("alice", "alice-pass-1"), ("bob", "bob-pass-1")):
        assert await titles_seen(target, name, password) == seen_on_a[name]
        assert await user_view(target, name) == views_on_a[name]
    # A's entries are appended on B, in A's order, with A's times, actors and actions.
    restored = [(e["time"], e["username"], e["action"], e["target"], e["result"])
                for e in reversed(audit["entries"]) if e["time"] <= before["audit"][0]["time"]]
    original = [(e["time"], e["username"], e["action"], e["target"], e["result"])
                for e in reversed(before["audit"])]
    assert original and [entry for entry in restored if entry in original] == original


async def test_parts_and_their_prerequisites(source, target, tmp_path):
    await populate(source, tmp_path / "up")
    async with source.connect("admin") as admin:
        archive, key, result = await export_to_parts(admin, tmp_path / "b1", ["audit"])
        assert result["metadata"]["parts"] == ["accounts", "audit"]
        assert result["metadata"]["requested_parts"] == ["audit"]
        assert result["metadata"]["documents_count"] == 0
        with pytest.raises(ClientError, match="data.parts"):
            await export_to_parts(admin, tmp_path / "b2", ["everything"])
    async with target.connect("admin") as admin:
        final, _ = await import_from(admin, archive, key)
        assert final["status"] == "completed", final
        assert final["documents_count"] == 0
        listing = await admin.call("list_directory", {"folder_id": None})
        assert listing["documents"] == []
    assert await titles_seen(target, "alice", "alice-pass-1") == []
    async with source.connect("admin") as admin:
        archive, key, result = await export_to_parts(admin, tmp_path / "b3", ["documents"])
    assert result["metadata"]["parts"] == ["documents"]
    async with target.connect("admin") as admin:
        final, _ = await import_from(admin, archive, key)
    assert final["status"] == "completed", final


async def export_to_parts(client, folder: Path, parts: list[str]):
    from cfms_trio.client import export_backup
    return await export_backup(client, folder, parts=tuple(parts))


async def import_with(client, archive, key, accounts: str) -> dict:
    from cfms_trio.client import import_backup
    return await import_backup(client, archive, key, poll_interval_s=0.02, accounts=accounts)


async def prepare_target(target) -> None:
    """B already has an 'alice' with another password and a group 'staff' of its own."""
    async with target.connect("admin") as admin:
        await admin.call("create_group", {"name": "staff", "permissions": []})
        await admin.call("create_user", {"username": "alice", "password": "alice-on-b",
                                         "groups": ["user"]})
        await admin.call("set_passwd", {"username": "admin", "new_password": "admin-on-b",
                                        "old_password": ADMIN_PASSWORD})


@pytest.mark.parametrize("policy", ["skip_existing", "replace", "none"])
async def test_accounts_policies(source, target, tmp_path, policy):
    await populate(source, tmp_path / "up")
    async with source.connect("admin") as admin:
        archive, key, _ = await export_to(admin, tmp_path / "backup")
    await prepare_target(target)
    async with target.connect("admin", "admin-on-b") as admin:
        final = await import_with(admin, archive, key, policy)
        assert final["status"] == "completed", final
        users = {u["username"]: u for u in (await admin.call("list_users"))["users"]}
        groups = {g["name"]: g for g in (await admin.call("list_groups"))["groups"]}
    # The importing administrator never loses access: own password and sysop kept.
    async with target.connect("admin", "admin-on-b") as admin:
        me = await admin.call("get_user_info", {})
        assert "sysop" in me["groups"]
    if policy == "none":
        assert "bob" not in users
        assert any("accounts=none" in w for w in final["warnings"])
        await titles_seen(target, "alice", "alice-on-b")
        return
    assert await titles_seen(target, "bob", "bob-pass-1") == ["memo"]  # created either way
    if policy == "skip_existing":
        await titles_seen(target, "alice", "alice-on-b")  # kept B's password and groups
        assert users["alice"]["groups"] == ["user"]
        assert groups["staff"]["permissions"] == []
    else:
        with pytest.raises(ClientError):
            await titles_seen(target, "alice", "alice-on-b")
        assert await titles_seen(target, "alice", "alice-pass-1") == ["memo", "plans"]
        assert users["alice"]["groups"] == ["staff", "user"]
        assert groups["staff"]["permissions"] == ["create_document"]
        assert any("your own account was kept" in w for w in final["warnings"]), final


async def test_rules_naming_absent_groups_are_reported(source, target, tmp_path):
    await populate(source, tmp_path / "up")
    async with source.connect("admin") as admin:
        archive, key, _ = await export_to_parts(admin, tmp_path / "backup", ["documents"])
    async with target.connect("admin") as admin:
        final, _ = await import_from(admin, archive, key)
    assert final["status"] == "completed", final
    assert final["warnings"] == [
        "access rules name the group 'staff', which does not exist on this server"]


async def test_a_bad_password_hash_fails_the_import_naming_the_user(target, tmp_path):
    """An archive is hostile input: an account hash this server cannot verify is refused."""
    from cfms_trio.backup.format import write_backup_archive
    from cfms_trio.backup.format.keyfile import make_key_file
    from backup_support import v3_metadata

    user = {"username": "mallory", "password_hash": "plain:secret", "nickname": "",
            "permissions": [], "groups": [], "created_time": 1.0, "passwd_last_modified": 1.0}
    listings = {"users": [user], "groups": []}
    key = bytes(range(32))
    archive = tmp_path / "bad.cfms.enc"
    with open(archive, "wb") as out:
        write_backup_archive(out, key, compression="none",
                             metadata=v3_metadata(listings, parts=("accounts",)),
                             listings=listings, open_file=open)
    key_path = tmp_path / "bad.key"
    key_path.write_bytes(make_key_file(key, "bad", 1.0, None))
    async with target.connect("admin") as admin:
        final, _ = await import_from(admin, archive, key_path)
    assert final["status"] == "failed"
    assert "user 'mallory': password_hash is not a hash this server can verify" in (
        final["error_message"])


async def test_the_payload_2_0_fixture_imports_with_its_contents(target):
    """tests/fixtures/format2 was written by the 2.0 writer; it must import forever."""
    folder = FIXTURES / "format2"
    expected = json.loads((folder / "expected.json").read_text())
    async with target.connect("admin") as admin:
        final, _ = await import_from(admin, folder / "v2-fixture.cfms.enc",
                                     folder / "v2-fixture.key")
        assert final["status"] == "completed", final
        assert final["documents_count"] == len(expected["documents"])
        assert final["folders_count"] == len(expected["folders"])
        for document in expected["documents"]:
            info = await admin.call("list_revisions", {"document_id": document["id"]})
            assert [r["revision_id"] if "revision_id" in r else r["id"]
                    for r in info["revisions"]] == [r["id"] for r in document["revisions"]]
            rules = await admin.call("get_document_access_rules",
                                     {"document_id": document["id"]})
            assert sum(len(v) for v in rules["access_rules"].values()) == len(
                document["access_rules"])
        for folder_entry in expected["folders"]:
            info = await admin.call("get_directory_info", {"folder_id": folder_entry["id"]})
            assert info["name"] == folder_entry["name"]


async def test_replace_that_would_lock_everyone_out_fails_and_changes_nothing(target, tmp_path):
    """`accounts: "replace"` run by an operator who is not in sysop: the archive's 'admin'
    (the only sysop member here) is in no sysop group, so afterwards nobody could administer
    the server. The import fails with the lock-out rule and the store is as it was."""
    from cfms_trio.auth import hash_password
    from cfms_trio.backup.format import write_backup_archive
    from cfms_trio.backup.format.keyfile import make_key_file
    from backup_support import content_files, dump_store, v3_metadata
    from helpers import USER_PASSWORD, make_user

    demoted = {"username": "admin", "password_hash": hash_password("archive-admin-pass"),
               "nickname": "not an admin", "permissions": [], "groups": ["user"],
               "created_time": 1.0, "passwd_last_modified": 1.0}
    listings = {"groups": [{"name": "user", "permissions": [], "created_time": 1.0}],
                "users": [demoted]}
    key = bytes(range(32))
    archive = tmp_path / "lockout.cfms.enc"
    with open(archive, "wb") as out:
        write_backup_archive(out, key, compression="none",
                             metadata=v3_metadata(listings, parts=("accounts",)),
                             listings=listings, open_file=open)
    key_path = tmp_path / "lockout.key"
    key_path.write_bytes(make_key_file(key, "lockout", 1.0, None))
    async with target.connect("admin") as admin:
        await make_user(admin, "ops", permissions=["import_backup"])
        users_before = (await admin.call("list_users"))["users"]
        groups_before = (await admin.call("list_groups"))["groups"]
        admin_before = await user_view(target, "admin")
    store_before, files_before = await dump_store(target), content_files(target)

    async with target.connect("ops", USER_PASSWORD) as ops:
        final = await import_with(ops, archive, key_path, "replace")
    assert final["status"] == "failed", final
    assert ("no member of 'sysop' would hold every permission, and nobody could administer "
            "the server") in final["error_message"], final

    # Unchanged: the admin still logs in with their own password and still administers.
    async with target.connect("admin") as admin:
        assert (await admin.call("list_users"))["users"] == users_before
        assert (await admin.call("list_groups"))["groups"] == groups_before
    assert await user_view(target, "admin") == admin_before
    assert "sysop" in admin_before["groups"]
    with pytest.raises(ClientError):
        await titles_seen(target, "admin", "archive-admin-pass")
    assert await dump_store(target) == store_before
    assert content_files(target) == files_before
