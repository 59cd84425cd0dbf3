"""generate_backup (SPEC §7): what an administrator downloads is the whole store, in the format
the spec describes, decoded here by an independent reader written from the spec alone."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
import trio

from cfms_trio import __version__
from cfms_trio.backup import export as export_module
from cfms_trio.client import ClientError
from cfms_trio.config import Limits
from cfms_trio.storage.backup_tasks import get_backup_task

from backup_support import (
    V3_KINDS, build_store, dump_store, export_to, sha256_hex, spec_decode, upload_bytes,
)
from helpers import USER_PASSWORD, make_user

CHUNK = 64 * 1024
TEST_DEADLINE_S = 30
SEGMENT_BYTES = 1 << 20


@pytest.fixture
async def small(start_server):
    """Small transfer chunks, so multi-chunk files stay small."""
    return await start_server("small", limits=Limits(transfer_chunk_bytes=CHUNK))


@pytest.fixture
async def client(small):
    async with small.connect("admin") as connected:
        yield connected


def backups_dir(server):
    return server.root / "content" / "backups"


def backup_entries(server) -> list[str]:
    """What lies in content/backups besides the import folder."""
    return sorted(p.name for p in backups_dir(server).iterdir() if p.name != "import")


async def backup_task(server, task_id: str) -> dict:
    return await server.app.store.read(get_backup_task, task_id)


def expected_listings(dump: dict) -> dict:
    """folders/documents/files as SPEC §7 lays them out, built from the database rows."""
    rules: dict[str, list] = {}
    for r in dump["access_rules"]:
        rules.setdefault(r["object_id"], []).append(
            {"id": r["id"], "access_type": r["access_type"], "rule_data": r["rule_data"]})
    for items in rules.values():
        items.sort(key=lambda r: r["id"])
    files = {f["id"]: f for f in dump["files"]}
    revisions: dict[str, list] = {}
    for r in sorted(dump["revisions"], key=lambda r: r["seq"]):
        revisions.setdefault(r["document"], []).append(
            {"id": r["id"], "file_id": r["file"], "created_time": r["created_time"]})
    folders = {f["id"]: {"id": f["id"], "name": f["name"], "parent_id": f["parent"],
                         "created_time": f["created_time"], "access_rules": rules.get(f["id"], [])}
               for f in dump["folders"]}
    documents = {d["id"]: {"id": d["id"], "title": d["title"], "folder_id": d["folder"],
                           "created_time": d["created_time"],
                           "access_rules": rules.get(d["id"], []),
                           "revisions": revisions.get(d["id"], [])}
                 for d in dump["documents"]}
    referenced = {r["file_id"] for revs in revisions.values() for r in revs}
    out_files = {i: {"id": i, "sha256": files[i]["sha256"], "size": files[i]["size"],
                     "created_time": files[i]["created_time"]} for i in referenced}
    return {"folders": folders, "documents": documents, "files": out_files}


def by_id(entries: list[dict], sort_rules: bool = True) -> dict[str, dict]:
    out = {}
    for entry in entries:
        entry = dict(entry)
        if sort_rules and "access_rules" in entry:
            entry["access_rules"] = sorted(entry["access_rules"], key=lambda r: r["id"])
        out[entry["id"]] = entry
    return out


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_export_holds_the_whole_store_as_the_spec_describes(small, client, tmp_path,
                                                                  compression):
    built = await build_store(client, tmp_path / "src")
    expected = expected_listings(await dump_store(small))
    name = f"full-{compression}"
    before = time.time()
    with trio.fail_after(TEST_DEADLINE_S):
        archive, key, result = await export_to(client, tmp_path / "dl", name, compression)
    archive_bytes, key_doc = archive.read_bytes(), json.loads(key.read_text())

    # The answer describes exactly the bytes that were downloaded.
    assert result["backup_name"] == name
    assert result["archive_size"] == len(archive_bytes)
    assert result["archive_sha256"] == sha256_hex(archive_bytes)
    assert set(result) >= {"backup_task_id", "archive_task_id", "key_task_id", "archive_size",
                           "archive_sha256", "metadata"}
    assert (backups_dir(small) / f"{name}.cfms.enc").read_bytes() == archive_bytes
    assert backup_entries(small) == [f"{name}.cfms.enc", f"{name}.key"]  # no temporary left

    # Key file.
    assert key_doc["format"] == 2 and key_doc["algorithm"] == "AES-256-GCM-STREAM"
    assert re.fullmatch(r"[0-9a-f]{64}", key_doc["key"])
    assert key_doc["backup_name"] == name
    assert key_doc["archive_sha256"] == sha256_hex(archive_bytes)
    assert before - 1 <= key_doc["created_at"] <= time.time() + 1

    decoded = spec_decode(archive_bytes, key_doc)
    assert decoded.compression == (1 if compression == "zstd" else 0)
    assert decoded.segment_count >= 3  # the big file alone spans more than two segments

    # Payload 3.0 (docs/BACKUP_FORMAT.md §1.6a): order, pieces, counts and parts checked by
    # the independent decoder; a store this small has one piece of each kind, and the files
    # of the files piece come right after it.
    listings = decoded.v3_layout()
    names = [n for n, _ in decoded.members]
    files_listing = listings["files"]
    expected_names = ["metadata.json"]
    for kind in V3_KINDS:
        if listings[kind]:
            expected_names.append(f"{kind}.0.ndjson")
        if kind == "files":
            expected_names += [f"files/{f['id']}" for f in files_listing]
    assert names == expected_names
    assert [u["username"] for u in listings["users"]] == ["admin"]
    assert listings["audit"], "the audit log is in a full backup"

    metadata = decoded.listing("metadata.json")
    assert metadata == result["metadata"]
    assert metadata["format"] == "cfms-backup" and metadata["version"] == "3.0"
    assert set(metadata["parts"]) == set(metadata["requested_parts"]) == {
        "accounts", "documents", "audit"}
    assert metadata["backup_name"] == name and metadata["server_version"] == __version__
    assert before - 1 <= metadata["created_at"] <= time.time() + 1
    assert (metadata["folders_count"], metadata["documents_count"], metadata["files_count"]) == (
        len(built.folders), len(built.documents), len(built.contents))
    assert metadata["total_file_bytes"] == built.total_bytes

    folders = listings["folders"]
    assert by_id(folders) == expected["folders"]
    # Payload 3.0 folders need not come parents first (§1.6a): the export streams them in
    # storage order; the importer orders them from its staging index.
    documents = listings["documents"]
    assert by_id(documents) == expected["documents"]
    for document in documents:  # revisions in history order
        assert [r["file_id"] for r in document["revisions"]] == built.revisions[document["id"]]
    assert by_id(files_listing) == expected["files"]
    assert all(set(f) == {"id", "sha256", "size", "created_time"} for f in files_listing)

    # Every file's bytes, the empty one included.
    contents = decoded.file_bytes()
    assert contents == built.contents
    assert b"" in contents.values()
    for entry in files_listing:
        assert entry["sha256"] == sha256_hex(contents[entry["id"]])
        assert entry["size"] == len(contents[entry["id"]])

    task = await backup_task(small, result["backup_task_id"])
    assert (task["operation"], task["status"], task["progress_percent"]) == ("export",
                                                                             "completed", 100)
    assert task["username"] == "admin" and task["backup_name"] == name
    assert (task["folders_count"], task["documents_count"], task["files_count"]) == (
        len(built.folders), len(built.documents), len(built.contents))
    assert task["completed_time"] >= task["started_time"]


async def test_an_empty_store_exports_an_empty_backup(server, admin, tmp_path):
    archive, key, result = await export_to(admin, tmp_path, None, "none")
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", result["backup_name"])
    decoded = spec_decode(archive.read_bytes(), json.loads(key.read_text()))
    # No documents: no folders, documents or files pieces (a listing with no records has none).
    listings = decoded.v3_layout()
    assert not any(name.startswith(("folders.", "documents.", "files"))
                   for name, _ in decoded.members)
    assert listings["folders"] == listings["documents"] == listings["files"] == []
    assert [u["username"] for u in listings["users"]] == ["admin"]
    assert result["metadata"]["total_file_bytes"] == 0


@pytest.mark.parametrize("bad_name", ["../x", ".hidden", "a/b", "a\\b", "..", "/abs", "a b",
                                      "-dash-first", "x" * 101, "nul\0byte"])
async def test_backup_names_never_leave_the_backups_folder(server, admin, bad_name):
    reply = await admin.request("generate_backup", {"backup_name": bad_name})
    assert reply["code"] == 400, reply
    assert "backup_name" in reply["message"]
    assert backup_entries(server) == []
    assert not list(server.root.rglob("*.cfms.enc"))


async def test_a_duplicate_name_is_refused_and_leaves_the_first_backup_alone(
        server, admin, tmp_path):
    await build_store(admin, tmp_path / "src", big_bytes=10_000)
    first = await admin.call("generate_backup", {"backup_name": "nightly"})
    archive_path = backups_dir(server) / "nightly.cfms.enc"
    key_path = backups_dir(server) / "nightly.key"
    archive_before, key_before = archive_path.read_bytes(), key_path.read_bytes()

    reply = await admin.request("generate_backup", {"backup_name": "nightly",
                                                    "compression": "none"})
    assert reply["code"] == 409, reply
    assert "nightly" in reply["message"]
    assert archive_path.read_bytes() == archive_before
    assert key_path.read_bytes() == key_before
    assert backup_entries(server) == ["nightly.cfms.enc", "nightly.key"]
    # The first backup's downloads still work and still give the same bytes.
    await admin.download_file(first["archive_task_id"], tmp_path / "a")
    await admin.download_file(first["key_task_id"], tmp_path / "k")
    assert (tmp_path / "a").read_bytes() == archive_before
    assert (tmp_path / "k").read_bytes() == key_before
    spec_decode(archive_before, json.loads(key_before))


async def test_exporting_needs_the_export_backup_permission(server, admin):
    await make_user(admin, "bob", permissions=["import_backup"])
    async with server.connect("bob", USER_PASSWORD) as bob:
        reply = await bob.request("generate_backup", {"backup_name": "mine"})
        assert reply["code"] == 403, reply
        assert "export_backup" in reply["message"]
    assert backup_entries(server) == []
    await make_user(admin, "eve", permissions=["export_backup"])
    async with server.connect("eve", USER_PASSWORD) as eve:
        result = await eve.call("generate_backup", {"backup_name": "eves"})
    assert backup_entries(server) == ["eves.cfms.enc", "eves.key"]
    assert (await backup_task(server, result["backup_task_id"]))["username"] == "eve"


async def test_bad_compression_is_refused(server, admin):
    reply = await admin.request("generate_backup", {"compression": "gzip"})
    assert reply["code"] == 400 and "compression" in reply["message"], reply


# -- exporting without stopping the world -------------------------------------------------------

BIG_DOCUMENT_BYTES = 10 * 1024 * 1024


async def make_big_documents(client, folder, count: int) -> dict[str, tuple[str, str, bytes]]:
    """`count` documents of BIG_DOCUMENT_BYTES each: title -> (document id, file id, content)."""
    folder.mkdir(exist_ok=True)
    out = {}
    for index in range(count):
        content = os.urandom(BIG_DOCUMENT_BYTES)
        created = await client.call("create_document", {"title": f"big-{index}"})
        await upload_bytes(client, created["task_id"], folder, content)
        out[f"big-{index}"] = (created["document_id"], created["file_id"], content)
    return out


async def test_the_server_keeps_answering_while_an_export_runs(server, admin, tmp_path):
    await make_big_documents(admin, tmp_path / "src", 3)
    answers: list[float] = []
    window: dict[str, float] = {}

    async def export():
        window["sent"] = trio.current_time()
        await admin.call("generate_backup", {"backup_name": "big", "compression": "zstd"})
        window["answered"] = trio.current_time()

    async def poll_server_info():
        async with server.connect() as other:
            while "answered" not in window:
                await other.call("server_info")
                answers.append(trio.current_time())

    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll_server_info)
            nursery.start_soon(export)
    during = [t for t in answers if window["sent"] < t < window["answered"]]
    took = window["answered"] - window["sent"]
    # Answers keep coming all along the export, not in a burst before or after it.
    assert len(during) >= 5, (len(during), took)
    gaps = [b - a for a, b in zip([window["sent"], *during], [*during, window["answered"]])]
    assert max(gaps) < max(1.0, took / 2), (gaps, took)


async def test_deleting_documents_during_an_export_waits_for_the_export(
        server, admin, tmp_path, monkeypatch):
    big = await make_big_documents(admin, tmp_path / "src", 2)
    stored = {title: server.root / "content" / "files" / file_id[:2] / file_id
              for title, (_, file_id, _) in big.items()}
    assert all(path.exists() for path in stored.values())
    # Hold the export after its snapshot, before it reads any file's content, until the
    # deletions below are done: the test does not depend on how fast the export runs.
    snapshot_taken, deletions_done = threading.Event(), threading.Event()
    real_write = export_module.write_backup_archive

    def gated_write(out, key, **kwargs):
        real_open = kwargs["open_file"]

        def open_file(file_id):
            snapshot_taken.set()
            if not deletions_done.wait(TEST_DEADLINE_S):
                raise TimeoutError("test gate was never opened")
            return real_open(file_id)

        return real_write(out, key, **{**kwargs, "open_file": open_file})

    monkeypatch.setattr(export_module, "write_backup_archive", gated_write)
    outcome: dict = {}

    async def export():
        outcome["result"] = await admin.call("generate_backup",
                                             {"backup_name": "during", "compression": "none"})

    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(export)
            await trio.to_thread.run_sync(snapshot_taken.wait, TEST_DEADLINE_S)
            try:
                async with server.connect("admin") as other:
                    for document_id, _, _ in big.values():
                        await other.call("delete_document", {"document_id": document_id})
                # Still exporting: the contents it is about to read are still there.
                assert "result" not in outcome
                assert all(path.exists() for path in stored.values())
            finally:
                deletions_done.set()
    result = outcome["result"]
    # Once the export is over, the deleted documents' contents are gone.
    assert not any(path.exists() for path in stored.values())
    with pytest.raises(ClientError) as info:
        await admin.call("get_document_info", {"document_id": big["big-0"][0]})
    assert info.value.code == 404
    # And the backup holds them whole, as they were when it started.
    await admin.download_file(result["archive_task_id"], tmp_path / "a")
    await admin.download_file(result["key_task_id"], tmp_path / "k")
    decoded = spec_decode((tmp_path / "a").read_bytes(), json.loads((tmp_path / "k").read_text()))
    assert decoded.file_bytes() == {file_id: content for _, file_id, content in big.values()}
    task = await backup_task(server, result["backup_task_id"])
    assert (task["operation"], task["status"]) == ("export", "completed")
