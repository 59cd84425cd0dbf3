"""Backup import (SPEC §8, BACKUP_IMPORT_FEATURE.md): round trips between servers, legacy
archives, deadlines, refusals, failures that leave nothing behind, events, concurrency,
restarts, and the `cfms-trio client backup-import` command."""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from pathlib import Path

import pytest
import trio

from cfms_trio.client import ClientError
from cfms_trio.config import Limits
from cfms_trio.content import local as local_content
from cfms_trio.storage import backup_tasks, restore_rows
from cfms_trio.transfer.crypto import seal_chunk

from backup_support import (
    assert_progress_monotonic, build_legacy_archive, build_store, cli_command,
    content_files, dump_store, export_to, import_dir_files, import_from, legacy_key_file, rule,
    run_cli, serve_subprocess, sha256_hex, start_only, wait_final,
)
from helpers import USER_PASSWORD, make_user

CHUNK = 64 * 1024
TEST_DEADLINE_S = 30
SMALL = Limits(transfer_chunk_bytes=CHUNK)
PERSISTENT_TABLES = ("folders", "documents", "revisions", "access_rules")


@pytest.fixture
async def source(start_server):
    return await start_server("source", limits=SMALL)


@pytest.fixture
async def target(start_server):
    return await start_server("target", limits=SMALL)


@pytest.fixture
async def target_admin(target):
    async with target.connect("admin") as client:
        yield client


async def exported_backup(server, folder: Path, prefix: str = "", compression: str = "zstd"):
    """Fill `server` with build_store and export it: (built store, archive, key, dump)."""
    async with server.connect("admin") as client:
        built = await build_store(client, folder / "src", prefix=prefix)
        archive, key, _ = await export_to(client, folder / "backup", None, compression)
    return built, archive, key, await dump_store(server)


def restored_dir(server) -> Path:
    return server.root / "content" / "restore" / "files"


def leftovers(server) -> list[str]:
    """Whatever an import may leave lying around: uploads, partial uploads, staging, uploads
    set aside for removal."""
    content = server.root / "content"
    return sorted([*(f"import/{n}" for n in import_dir_files(server)),
                   *(f"uploads/{p.name}" for p in (content / "tmp" / "uploads").iterdir()),
                   *(f"staging/{p.name}" for p in (content / "tmp" / "staging").iterdir()),
                   *(f"removed/{p.name}" for p in (content / "tmp" / "removed").iterdir())])


CLEANUP_WAIT_S = 10.0


async def leftovers_after_cleanup(server) -> list[str]:
    """`leftovers` once the import's clean-up ran: staging and uploads are removed just after
    the `completed` status is committed (docs/ARCHITECTURE.md), so a client that saw the status
    may look a moment too early; this waits, at most CLEANUP_WAIT_S, then reports what stayed."""
    with trio.move_on_after(CLEANUP_WAIT_S):
        while leftovers(server):
            await trio.sleep(0.05)
    return leftovers(server)


async def state_of(server) -> tuple[dict, dict]:
    return await dump_store(server), content_files(server)


async def assert_unchanged(server, before: tuple[dict, dict]) -> None:
    """SPEC §8: after a failure the store is exactly as before and nothing partial remains."""
    dump, files = await state_of(server)
    assert dump == before[0]
    assert files == before[1]
    assert leftovers(server) == []


def assert_restored_rows(source_dump: dict, target_dump: dict, file_ids) -> None:
    """Every exported row arrived with its id, fields, links, order and timestamps."""
    for table in PERSISTENT_TABLES:
        assert target_dump[table] == source_dump[table], table
    source_files = {f["id"]: f for f in source_dump["files"]}
    restored = {f["id"]: f for f in target_dump["files"]}
    assert set(restored) == set(file_ids)
    for file_id in file_ids:
        expected = dict(source_files[file_id], path=f"restore/files/{file_id}")
        assert restored[file_id] == expected


async def walk(client, folder_id=None, path="") -> dict:
    """The tree as the API shows it: path -> (kind, id, access rules, revisions)."""
    listing = await client.call("list_directory", {"folder_id": folder_id})
    out = {}
    for folder in listing["folders"]:
        rules = await client.call("get_directory_access_rules", {"folder_id": folder["id"]})
        sub = f"{path}/{folder['name']}"
        out[sub] = ("folder", folder["id"], folder["created_time"], rules["access_rules"])
        out.update(await walk(client, folder["id"], sub))
    for document in listing["documents"]:
        rules = await client.call("get_document_access_rules", {"document_id": document["id"]})
        revisions = await client.call("list_revisions", {"document_id": document["id"]})
        out[f"{path}/{document['title']}"] = ("document", document["id"],
                                              document["created_time"], rules["access_rules"],
                                              revisions["revisions"])
    return out


async def download_revisions(client, built, folder: Path) -> dict[str, bytes]:
    """Every revision of every document, downloaded: file id -> bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for document_id, file_ids in built.revisions.items():
        revisions = (await client.call("list_revisions", {"document_id": document_id}))
        assert [r["file_id"] for r in revisions["revisions"]] == file_ids
        for revision in revisions["revisions"]:
            task = await client.call("get_document", {"document_id": document_id,
                                                      "revision_id": revision["id"]})
            path = folder / revision["file_id"]
            await client.download_file(task["task_id"], path)
            out[revision["file_id"]] = path.read_bytes()
    return out


# -- round trips -------------------------------------------------------------------------------

async def test_round_trip_between_two_servers_preserves_every_object(
        source, target, target_admin, tmp_path):
    built, archive, key, source_dump = await exported_backup(source, tmp_path)
    before_import = time.time()
    final, seen = await import_from(target_admin, archive, key)

    assert final["status"] == "completed", final
    assert (final["folders_count"], final["documents_count"], final["files_count"]) == (
        len(built.folders), len(built.documents), len(built.contents))
    assert final["progress_percent"] == 100 and final["current_step"] == "Restore completed"
    assert final["error_message"] is None
    assert final["warnings"] == []  # a clean format 2 import changes nothing
    assert before_import <= final["created_time"] <= final["started_time"] <= final["completed_time"]
    assert set(final) >= {"backup_task_id", "status", "current_step", "progress_percent",
                          "documents_count", "folders_count", "files_count", "created_time",
                          "started_time", "completed_time", "error_message"}
    assert_progress_monotonic(seen)

    target_dump = await dump_store(target)
    assert_restored_rows(source_dump, target_dump, built.contents)
    assert target_dump["file_tasks"] == []  # the import's upload tasks are gone with its files
    # ... and the uploaded archive and key were out of reach when `completed` was: set aside
    # in the commit, removed for good just after.
    assert import_dir_files(target) == []
    assert sorted(p.name for p in restored_dir(target).iterdir()) == sorted(built.contents)
    assert await leftovers_after_cleanup(target) == []

    # What a user sees through the API is the same on both servers...
    async with source.connect("admin") as source_admin:
        assert await walk(target_admin) == await walk(source_admin)
    # ...down to every byte of every revision.
    assert await download_revisions(target_admin, built, tmp_path / "dl") == built.contents


def legacy_backup(tmp_path: Path, *, reuse_revision_id: str | None = None):
    """A format 1.0 backup as an earlier CFMS server wrote it (SPEC §7, legacy)."""
    def new_id():
        return secrets.token_hex(16)

    parent, child, document, other = new_id(), new_id(), new_id(), new_id()
    files = {new_id(): os.urandom(40_000), new_id(): b"", new_id(): b"legacy v2"}
    file_ids = list(files)
    now = time.time() - 86400
    read_rule = rule(groups=["sysop"])
    listings = {
        "metadata.json": {"version": "1.0", "created_at": now, "backup_name": "old-server",
                          "documents_count": 2, "folders_count": 2, "files_count": 3},
        # a child listed before its parent
        "folders.json": [
            {"id": child, "name": "child", "parent_id": parent, "created_time": now + 1},
            {"id": parent, "name": "parent", "parent_id": None, "created_time": now,
             "access_rules": [{"id": new_id(), "access_type": "read", "rule_data": read_rule}]},
        ],
        "documents.json": [
            {"id": document, "title": "report", "folder_id": child, "created_time": now + 2,
             "access_rules": [{"id": new_id(), "access_type": "write",
                               "rule_data": read_rule}],
             "revisions": [
                 {"id": reuse_revision_id or new_id(), "file_id": file_ids[0],
                  "created_time": now + 2},
                 {"id": new_id(), "file_id": file_ids[2], "created_time": now + 3}]},
            {"id": other, "title": "blank", "folder_id": None, "created_time": now + 4,
             "revisions": [{"id": new_id(), "file_id": file_ids[1], "created_time": now + 4}]},
        ],
        # entries carry a server path to ignore and no size
        "files.json": [{"id": i, "sha256": sha256_hex(files[i]), "created_time": now + 2,
                        "path": f"./content/files/{i}"} for i in file_ids],
    }
    order = [f"files/{file_ids[2]}", "documents.json", f"files/{file_ids[0]}", "files.json",
             "metadata.json", f"files/{file_ids[1]}", "folders.json"]
    key = os.urandom(32)
    tmp_path.mkdir(parents=True, exist_ok=True)
    archive = tmp_path / "legacy.cfms.enc"
    archive.write_bytes(build_legacy_archive(listings, files, order, key))
    key_path = tmp_path / "legacy.key"
    key_path.write_bytes(legacy_key_file(key, "old-server"))
    return listings, files, archive, key_path


async def test_a_legacy_1_0_archive_is_imported(target, target_admin, tmp_path):
    listings, files, archive, key = legacy_backup(tmp_path)
    final, seen = await import_from(target_admin, archive, key)
    assert final["status"] == "completed", final
    assert (final["folders_count"], final["documents_count"], final["files_count"]) == (2, 2, 3)
    assert_progress_monotonic(seen)

    dump = await dump_store(target)
    assert {(f["id"], f["name"], f["parent"], f["created_time"]) for f in dump["folders"]} == {
        (f["id"], f["name"], f["parent_id"], f["created_time"])
        for f in listings["folders.json"]}
    assert {(d["id"], d["title"], d["folder"], d["created_time"]) for d in dump["documents"]} == {
        (d["id"], d["title"], d["folder_id"], d["created_time"])
        for d in listings["documents.json"]}
    assert sorted((r["id"], r["document"], r["file"], r["created_time"], r["seq"])
                  for r in dump["revisions"]) == sorted(
        (r["id"], d["id"], r["file_id"], r["created_time"], seq)
        for d in listings["documents.json"] for seq, r in enumerate(d["revisions"]))
    rules = [(r["id"], r["access_type"], r["rule_data"])
             for o in listings["folders.json"] + listings["documents.json"]
             for r in o.get("access_rules", [])]
    assert sorted((r["id"], r["access_type"], json.dumps(r["rule_data"]))
                  for r in dump["access_rules"]) == sorted(
        (i, t, json.dumps(d)) for i, t, d in rules)
    assert {f["id"]: (f["size"], f["sha256"], f["path"]) for f in dump["files"]} == {
        i: (len(b), sha256_hex(b), f"restore/files/{i}") for i, b in files.items()}
    assert await leftovers_after_cleanup(target) == []

    tree = await walk(target_admin)
    assert set(tree) == {"/parent", "/parent/child", "/parent/child/report", "/blank"}
    report = tree["/parent/child/report"]
    document_id = report[1]
    downloaded = {}
    for revision in report[4]:
        task = await target_admin.call("get_document", {"document_id": document_id,
                                                        "revision_id": revision["id"]})
        await target_admin.download_file(task["task_id"], tmp_path / "out")
        downloaded[revision["file_id"]] = (tmp_path / "out").read_bytes()
    assert downloaded == {i: files[i] for i in (r["file_id"] for r in
                                                listings["documents.json"][0]["revisions"])}


# -- deadlines ----------------------------------------------------------------------------------

async def wait_timeout(client, task_id: str) -> dict:
    final = await wait_final(client, task_id, timeout_s=8)
    assert final["status"] == "timeout", final
    return final


async def test_an_import_without_uploads_times_out_by_itself(target, target_admin):
    before = await state_of(target)
    await target_admin.listen()
    init = await target_admin.call("initiate_backup_import", {"timeout_seconds": 1})
    assert init["timeout"] == 1
    with trio.fail_after(5):
        event = await target_admin.next_event("backup_import_completed")
    assert event["data"]["backup_task_id"] == init["backup_task_id"]
    assert event["data"]["status"] == "timeout"
    final = await wait_timeout(target_admin, init["backup_task_id"])
    assert "archive and key" in final["error_message"], final
    assert final["completed_time"] >= final["created_time"] + 1
    reply = await target_admin.request("start_backup_import",
                                       {"backup_task_id": init["backup_task_id"]})
    assert reply["code"] == 408, reply
    await assert_unchanged(target, before)
    for task_id in (init["archive_task_id"], init["key_task_id"]):
        reply = await target_admin.request("upload_file", {"task_id": task_id})
        assert reply["code"] == 404, reply  # the upload tasks are gone with the import


async def test_an_import_with_one_upload_times_out_and_forgets_it(target, target_admin,
                                                                  tmp_path):
    before = await state_of(target)
    listings, files, archive, key = legacy_backup(tmp_path)
    init = await target_admin.call("initiate_backup_import", {"timeout_seconds": 1})
    await target_admin.upload_file(init["key_task_id"], key)
    assert len(import_dir_files(target)) == 1
    final = await wait_timeout(target_admin, init["backup_task_id"])
    assert "archive" in final["error_message"] and "key" not in final["error_message"], final
    await assert_unchanged(target, before)


async def test_the_deadline_aborts_an_upload_in_progress(target, target_admin, tmp_path):
    before = await state_of(target)
    listings, files, archive, key = legacy_backup(tmp_path)
    init = await target_admin.call("initiate_backup_import", {"timeout_seconds": 2})
    await target_admin.upload_file(init["key_task_id"], key)  # one upload done...
    content = os.urandom(3 * CHUNK)
    # ...and one in progress: speak the protocol by hand and stop after the first chunk.
    client = target_admin
    await client.send_raw(json.dumps(client.envelope("upload_file",
                                                     {"task_id": init["archive_task_id"]})))
    offer = await client.receive_reply()
    assert offer["action"] == "transfer_file", offer
    await client.send_raw(json.dumps({"action": "transfer_file", "data": {
        "file_size": len(content), "sha256": sha256_hex(content)}}))
    ready = (await client.receive_reply())["data"]
    await client.send_raw(seal_chunk(base64.b64decode(ready["key"]),
                                     base64.b64decode(ready["nonce_prefix"]), 0, content[:CHUNK]))
    with trio.fail_after(2):
        while not list((target.root / "content" / "tmp" / "uploads").iterdir()):
            await trio.sleep(0.01)  # the first chunk is on disk as a partial upload
    with trio.fail_after(6):
        reply = await client.receive_reply()
    assert reply["code"] == 408, reply
    assert "timed out" in reply["message"] or "expired" in reply["message"], reply
    final = await wait_timeout(client, init["backup_task_id"])
    assert "archive upload was" in final["error_message"], final
    await assert_unchanged(target, before)  # the partial archive and the key are gone
    assert (await client.call("server_info"))["name"] == "cfms-trio"  # the connection goes on


# -- refusals -----------------------------------------------------------------------------------

async def test_start_is_refused_until_both_uploads_are_done(target, target_admin, tmp_path):
    listings, files, archive, key = legacy_backup(tmp_path)
    init = await target_admin.call("initiate_backup_import", {"timeout_seconds": 60})
    task = {"backup_task_id": init["backup_task_id"]}
    reply = await target_admin.request("start_backup_import", task)
    assert reply["code"] == 400 and "archive and key uploads are" in reply["message"], reply
    await target_admin.upload_file(init["archive_task_id"], archive)
    reply = await target_admin.request("start_backup_import", task)
    assert reply["code"] == 400 and "key upload is" in reply["message"], reply
    status = await target_admin.call("get_backup_import_status", task)
    assert status["status"] == "pending" and status["started_time"] is None
    await target_admin.upload_file(init["key_task_id"], key)

    started = await target_admin.call("start_backup_import", task)
    assert started["backup_task_id"] == init["backup_task_id"]
    assert started["status"] == "processing" and "get_backup_import_status" in started["message"]
    reply = await target_admin.request("start_backup_import", task)
    assert reply["code"] == 409, reply
    final = await wait_final(target_admin, init["backup_task_id"])
    assert final["status"] == "completed", final
    reply = await target_admin.request("start_backup_import", task)
    assert reply["code"] == 409, reply


async def test_two_concurrent_starts_exactly_one_wins(target, target_admin, tmp_path):
    listings, files, archive, key = legacy_backup(tmp_path)
    init = await target_admin.call("initiate_backup_import", {"timeout_seconds": 60})
    await target_admin.upload_file(init["archive_task_id"], archive)
    await target_admin.upload_file(init["key_task_id"], key)
    codes = []

    async def start():
        async with target.connect("admin") as client:
            reply = await client.request("start_backup_import",
                                         {"backup_task_id": init["backup_task_id"]})
            codes.append(reply["code"])

    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(start)
    assert sorted(codes) == [200, 409, 409], codes
    final = await wait_final(target_admin, init["backup_task_id"])
    assert final["status"] == "completed" and final["files_count"] == 3, final


async def test_other_users_cannot_touch_an_import(target, target_admin, tmp_path):
    await make_user(target_admin, "bob", permissions=["import_backup"])
    await make_user(target_admin, "carol")
    listings, files, archive, key = legacy_backup(tmp_path)
    init = await target_admin.call("initiate_backup_import", {"timeout_seconds": 60})
    task = {"backup_task_id": init["backup_task_id"]}
    async with target.connect("bob", USER_PASSWORD) as bob:
        # The upload tasks are bound to the admin who initiated the import.
        reply = await bob.request("upload_file", {"task_id": init["archive_task_id"]})
        assert reply["code"] == 403, reply
        await target_admin.upload_file(init["archive_task_id"], archive)
        await target_admin.upload_file(init["key_task_id"], key)
        for action in ("start_backup_import", "get_backup_import_status"):
            reply = await bob.request(action, task)
            assert reply["code"] == 403 and "another user" in reply["message"], reply
        # bob may run his own import.
        own = await bob.call("initiate_backup_import", {})
        assert own["timeout"] == 3600
    async with target.connect("carol", USER_PASSWORD) as carol:
        for action, data in (("initiate_backup_import", {}), ("start_backup_import", task),
                             ("get_backup_import_status", task)):
            reply = await carol.request(action, data)
            assert reply["code"] == 403 and "import_backup" in reply["message"], reply
    assert (await target_admin.call("get_backup_import_status", task))["status"] == "pending"
    for data in ({"timeout_seconds": 0}, {"timeout_seconds": 86401},
                 {"timeout_seconds": "soon"}):
        reply = await target_admin.request("initiate_backup_import", data)
        assert reply["code"] == 400 and "timeout_seconds" in reply["message"], reply
    reply = await target_admin.request("get_backup_import_status", {"backup_task_id": "f00d"})
    assert reply["code"] == 404, reply


# -- failures leave the store as it was ------------------------------------------------------

def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


async def run_failing_import(server, client, archive: Path, key: Path) -> dict:
    """Run an import that must fail; check it changed nothing; return its final status. A
    failure because of the options (here: ids that exist, under policy fail) keeps the uploads
    for another start; they are cancelled before the store is compared."""
    before = await state_of(server)
    final, seen = await import_from(client, archive, key)
    assert final["status"] == "failed", final
    assert (final["documents_count"], final["folders_count"], final["files_count"]) == (0, 0, 0)
    assert final["completed_time"] is not None
    assert_progress_monotonic(seen)
    if final["startable"]:
        await client.call("cancel_backup_import", {"backup_task_id": final["backup_task_id"]})
    await assert_unchanged(server, before)
    return final


@pytest.mark.parametrize("damage, message", [
    ("wrong key", "wrong key"),
    ("key not json", "key file is not valid JSON"),
    ("legacy key for a format 2 archive", "legacy"),
    ("flipped byte", "segment"),
    ("truncated", "truncated"),
])
async def test_a_bad_archive_or_key_fails_and_changes_nothing(
        source, target, target_admin, tmp_path, damage, message):
    # Something already on the target, which must stay exactly as it is.
    async with target.connect("admin") as client:
        await build_store(client, tmp_path / "existing", big_bytes=5000, prefix="t-")
    built, archive, key, _ = await exported_backup(source, tmp_path)
    key_doc = json.loads(key.read_text())
    if damage == "wrong key":
        key.write_text(json.dumps(dict(key_doc, key=secrets.token_hex(32))))
    elif damage == "key not json":
        key.write_text("{not json")
    elif damage == "legacy key for a format 2 archive":
        key.write_bytes(legacy_key_file(bytes.fromhex(key_doc["key"]), "x"))
    elif damage == "flipped byte":
        flip_byte(archive, archive.stat().st_size // 2)
    else:
        archive.write_bytes(archive.read_bytes()[:-100])
    final = await run_failing_import(target, target_admin, archive, key)
    assert message in final["error_message"], final
    assert str(target.root) not in final["error_message"]
    assert final["startable"] is False  # the archive or key is at fault: the uploads are gone


async def test_an_id_that_exists_fails_the_import_naming_it(target, target_admin, tmp_path):
    listings, files, archive, key = legacy_backup(tmp_path / "first")
    final, _ = await import_from(target_admin, archive, key)
    assert final["status"] == "completed", final
    taken = listings["documents.json"][0]["revisions"][0]["id"]
    _, _, archive2, key2 = legacy_backup(tmp_path / "second", reuse_revision_id=taken)
    final = await run_failing_import(target, target_admin, archive2, key2)
    assert f"revision id '{taken}' already exists" in final["error_message"], final
    assert final["startable"] is True  # refused by policy fail: may start again with another
    # The same archive twice: every id collides, the first one in the check order is named.
    final = await run_failing_import(target, target_admin, archive, key)
    assert "already exists" in final["error_message"], final


async def test_a_failure_after_files_were_placed_takes_them_back(
        target, target_admin, tmp_path, monkeypatch):
    real_insert = restore_rows.insert_rows

    def broken_insert(model, *args, **kwargs):
        if model._meta.table_name == "document":
            raise RuntimeError("simulated failure while inserting documents")
        return real_insert(model, *args, **kwargs)

    monkeypatch.setattr(restore_rows, "insert_rows", broken_insert)
    listings, files, archive, key = legacy_backup(tmp_path)
    final = await run_failing_import(target, target_admin, archive, key)
    assert "log reference" in final["error_message"], final
    assert "simulated" not in final["error_message"]
    assert list(restored_dir(target).iterdir()) == []


async def test_restored_files_are_made_durable_before_the_commit(
        target, target_admin, tmp_path, monkeypatch):
    """The staged files are synced once all are written, the renames once all are done, and
    both before the task reads `completed` (its status is written in the commit's
    transaction)."""
    from cfms_trio.backup import restore
    from cfms_trio.backup.staging_index import INDEX_FILE_NAME

    seen: list[tuple[str, set[str], str]] = []

    def status() -> str:
        """The task's committed status: read on a thread of its own, so on a connection of
        its own, outside the restore's transaction."""
        found = []
        reader = threading.Thread(target=lambda: found.append(
            target.app.store.run_read(backup_tasks.get_backup_task, task_id)["status"]))
        reader.start()
        reader.join()
        return found[0]

    def recording(name, original, folder_of):
        def wrapper(folder):
            held = {p.name for p in folder_of(folder).iterdir()} - {INDEX_FILE_NAME}
            seen.append((name, held, status()))
            original(folder)
        return wrapper

    monkeypatch.setattr(restore, "sync_filesystem",
                        recording("staging", restore.sync_filesystem, lambda f: f))
    monkeypatch.setattr(local_content, "sync_directory",
                        recording("restored", local_content.sync_directory, lambda f: f))
    listings, files, archive, key = legacy_backup(tmp_path)
    init = await target_admin.call("initiate_backup_import", {"timeout_seconds": 120})
    task_id = init["backup_task_id"]
    await target_admin.upload_file(init["archive_task_id"], archive)
    await target_admin.upload_file(init["key_task_id"], key)
    await target_admin.call("start_backup_import", {"backup_task_id": task_id})
    final = await wait_final(target_admin, task_id)
    assert final["status"] == "completed", final
    assert [(name, names, state) for name, names, state in seen] == [
        ("staging", set(files), "processing"), ("restored", set(files), "processing")]


# -- events -------------------------------------------------------------------------------------

async def test_the_completion_event_reaches_backup_administrators_only(
        target, target_admin, tmp_path):
    await make_user(target_admin, "bob", permissions=["import_backup"])
    await make_user(target_admin, "carol")
    listings, files, archive, key = legacy_backup(tmp_path)
    async with target.connect("bob", USER_PASSWORD) as bob, \
            target.connect("carol", USER_PASSWORD) as carol:
        for client in (target_admin, bob, carol):
            await client.listen()
        task_id = await start_only(target_admin, archive, key)
        expected = {"backup_task_id": task_id, "status": "completed", "documents_imported": 2,
                    "folders_imported": 2, "files_imported": 3, "error": None}
        with trio.fail_after(TEST_DEADLINE_S):
            for client in (target_admin, bob):
                event = await client.next_event("backup_import_completed")
                assert event["data"] == expected
        # Events are queued to every listener at once: carol would have hers by now.
        await carol.call("server_info")
        await trio.sleep(0.2)
        assert carol.events_nowait() == []


# -- concurrency --------------------------------------------------------------------------------

async def test_two_imports_in_flight_at_once_both_complete(start_server, target, target_admin,
                                                           tmp_path):
    source_b = await start_server("source-b", limits=SMALL)
    source_a = await start_server("source-a", limits=SMALL)
    backups = [await exported_backup(source_a, tmp_path / "a", prefix="a-", compression="none"),
               await exported_backup(source_b, tmp_path / "b", prefix="b-")]
    finals = {}
    uploaded = [trio.Event(), trio.Event()]

    async def run(index):
        built, archive, key, _ = backups[index]
        async with target.connect("admin") as client:
            init = await client.call("initiate_backup_import", {"timeout_seconds": 60})
            await client.upload_file(init["archive_task_id"], archive)
            await client.upload_file(init["key_task_id"], key)
            uploaded[index].set()
            for event in uploaded:  # start both at the same moment
                await event.wait()
            await client.call("start_backup_import", {"backup_task_id": init["backup_task_id"]})
            finals[index] = await wait_final(client, init["backup_task_id"])

    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, 0)
            nursery.start_soon(run, 1)
    assert [finals[i]["status"] for i in (0, 1)] == ["completed", "completed"], finals
    # They really ran side by side.
    assert max(f["started_time"] for f in finals.values()) < min(
        f["completed_time"] for f in finals.values()), finals
    target_dump = await dump_store(target)
    a_dump, b_dump = backups[0][3], backups[1][3]
    for table in PERSISTENT_TABLES:
        key_of = (lambda r: r["id"])
        assert sorted(target_dump[table], key=key_of) == sorted(a_dump[table] + b_dump[table],
                                                                key=key_of), table
    contents = {**backups[0][0].contents, **backups[1][0].contents}
    for built in (backups[0][0], backups[1][0]):
        assert await download_revisions(target_admin, built, tmp_path / "dl") == built.contents
    assert sorted(p.name for p in restored_dir(target).iterdir()) == sorted(contents)
    assert await leftovers_after_cleanup(target) == []


# -- restarts -----------------------------------------------------------------------------------

async def stop_server(server) -> None:
    """Stop a server and wait until its port no longer answers."""
    await server.stop()
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", server.running.port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.01)


async def test_a_restart_fails_the_import_that_was_running(start_server, tmp_path):
    server = await start_server("restart")
    async with server.connect("admin") as client:
        # A committed import, whose files must survive the restart's clean-up.
        listings, files, archive, key = legacy_backup(tmp_path / "done")
        final, _ = await import_from(client, archive, key)
        assert final["status"] == "completed", final
        # An import caught half-way: processing, a staged file and a restored file with no row.
        _, _, archive2, key2 = legacy_backup(tmp_path / "cut")
        init = await client.call("initiate_backup_import", {"timeout_seconds": 600})
        await client.upload_file(init["archive_task_id"], archive2)
        await client.upload_file(init["key_task_id"], key2)
    task_id = init["backup_task_id"]
    before = await dump_store(server)
    await server.app.store.write(backup_tasks.update_backup_task, task_id, status="processing",
                                 started_time=time.time(), current_step="Importing files",
                                 progress_percent=50)
    content = server.root / "content"
    orphan = content / "restore" / "files" / secrets.token_hex(16)
    orphan.write_bytes(b"moved but never committed")
    staging = content / "tmp" / "staging" / task_id
    staging.mkdir(parents=True)
    (staging / secrets.token_hex(16)).write_bytes(b"staged")
    # Uploads a committed import set aside, not yet removed when the server stopped.
    set_aside = content / "tmp" / "removed" / f"{secrets.token_hex(8)}.upload.cfms.enc"
    set_aside.write_bytes(b"an uploaded archive")
    await stop_server(server)

    server = await start_server("restart")
    async with server.connect("admin") as client:
        status = await client.call("get_backup_import_status", {"backup_task_id": task_id})
        assert status["status"] == "failed", status
        assert "server restarted" in status["error_message"]
        assert status["completed_time"] is not None
        assert not orphan.exists()
        assert not staging.exists()
        assert not set_aside.exists()
        assert leftovers(server) == []
        after = await dump_store(server)
        for table in PERSISTENT_TABLES:
            assert after[table] == before[table]
        # The uploads of the failed import are gone; the committed import is intact.
        assert {f["id"] for f in after["files"]} == set(files)
        assert sorted(p.name for p in restored_dir(server).iterdir()) == sorted(files)
        reply = await client.request("start_backup_import", {"backup_task_id": task_id})
        assert reply["code"] == 409, reply
        blank = (await client.call("list_directory", {}))["documents"][0]
        task = await client.call("get_document", {"document_id": blank["id"]})
        await client.download_file(task["task_id"], tmp_path / "blank")
        assert (tmp_path / "blank").read_bytes() == b""


async def test_a_pending_import_keeps_its_deadline_across_a_restart(start_server):
    server = await start_server("deadline")
    async with server.connect("admin") as client:
        init = await client.call("initiate_backup_import", {"timeout_seconds": 4})
        status = await client.call("get_backup_import_status",
                                   {"backup_task_id": init["backup_task_id"]})
    deadline = status["timeout_time"]
    await trio.sleep(2.0)  # a fresh deadline would come 2 s or more after the first
    await stop_server(server)
    server = await start_server("deadline")
    async with server.connect("admin") as client:
        status = await client.call("get_backup_import_status",
                                   {"backup_task_id": init["backup_task_id"]})
        assert status["status"] == "pending", status
        final = await wait_timeout(client, init["backup_task_id"])
        # The original deadline, not a fresh one counted from the restart (which would be
        # at least 2 s later; the margin is for a loaded machine).
        assert deadline - 0.05 <= final["completed_time"] < deadline + 1.5, (final, deadline)
        reply = await client.request("start_backup_import",
                                     {"backup_task_id": init["backup_task_id"]})
        assert reply["code"] == 408, reply
    assert leftovers(server) == []


# -- the command line -------------------------------------------------------------------------

async def test_client_backup_import_command(source, tmp_path):
    built, archive, key, _ = await exported_backup(source, tmp_path)
    async with serve_subprocess(tmp_path / "cli-target") as served:
        base = cli_command("client", "backup-import", "--server", served.url, "--cafile",
                           str(served.cafile), "--password-file", str(served.password_file),
                           "--poll", "0.05", "--timeout", "120")
        done = await run_cli(*base, "--archive", str(archive), "--key", str(key))
        assert done.returncode == 0, done.stderr.decode()
        assert (f"import completed: {len(built.folders)} folders, {len(built.documents)} "
                f"documents, {len(built.contents)} files") in done.stdout.decode()

        bad_key = tmp_path / "bad.key"
        bad_key.write_text(json.dumps(dict(json.loads(key.read_text()),
                                           key=secrets.token_hex(32))))
        failed = await run_cli(*base, "--archive", str(archive), "--key", str(bad_key))
        assert failed.returncode == 1, failed
        assert "import failed: wrong key for this archive" in failed.stderr.decode()


async def test_pending_imports_per_user_are_capped(start_server):
    srv = await start_server("capped", limits=Limits(pending_imports_per_user=2))
    async with srv.connect("admin") as client:
        for _ in range(2):
            await client.call("initiate_backup_import", {"timeout_seconds": 60})
        with pytest.raises(ClientError) as info:
            await client.call("initiate_backup_import", {"timeout_seconds": 60})
        assert info.value.code == 409
        assert "2 imports pending or running" in info.value.message
