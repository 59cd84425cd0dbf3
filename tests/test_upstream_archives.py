"""Importing the backups the upstream CFMS server really writes (issue 11, SPEC §7 format 1.0):
each fixture of tests/fixtures/bk-legacy goes through a running server and is read back through
the API against its truth.json; the decisions for what the upstream allows and we did not each
have their own test. Also `backup verify|inspect`, `client backup-import`, and a download by a
client on the `websockets` library with its default 1 MiB message limit."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl

import pytest
import trio

from cfms_trio.client import ClientError, open_client

from backup_support import (
    SPEC_STEPS, cli_command, content_files, dump_store, run_cli, serve_subprocess, upload_bytes,
)
from helpers import ADMIN_PASSWORD
from upstream_truth import (
    FIXTURE_NAMES, assert_completed, assert_matches_truth, download_sha256, import_upstream,
    load_fixture, read_store, unique_sibling_names, write_variant,
)

# Fixtures the upstream restores completely and that need no option or renaming here.
PLAIN_FIXTURES = ["A_rich", "C01_bk_testsuite", "C02_stock_init", "C04_shared_file",
                  "C05_pending_upload", "C13_null_sha256"]
MISSING_FILE_ID = "9b837b11b88b9b61c6cde6879ac7a5d23230b9eb99fc3ab8adf25e027da4458f"  # C06
WEBSOCKETS_DEFAULT_MAX_BYTES = 2 ** 20


def test_every_fixture_folder_is_covered():
    assert sorted([*PLAIN_FIXTURES, "C06_missing_content", "C08_duplicate_names"]) == FIXTURE_NAMES
    for name in FIXTURE_NAMES:
        fixture = load_fixture(name)
        assert fixture.archive.stat().st_size == fixture.truth["archive"]["size"]
        assert fixture.truth["bk_self_restore"]["status"] == "success"


@pytest.mark.parametrize("name", PLAIN_FIXTURES)
async def test_upstream_archive_imports_and_reads_back_as_its_truth(admin, tmp_path, name):
    fixture = load_fixture(name)
    assert (await read_store(admin)).folders == {}  # a fresh server
    status = await import_upstream(admin, fixture)
    assert_completed(status)
    counts = fixture.truth["counts"]
    assert (status["folders_count"], status["documents_count"], status["files_count"]) == (
        counts["folders"], counts["documents"], counts["files"])
    await assert_matches_truth(admin, fixture, tmp_path / "downloads")


async def test_integer_ids_get_fresh_ids_and_string_ids_are_kept(admin, tmp_path):
    """C13, C01 and C02 all number their revisions from 1: each gets fresh ids, so all three
    land in one store, and folder, document and file ids stay as they were."""
    fixtures = [load_fixture(n) for n in ("C13_null_sha256", "C01_bk_testsuite",
                                          "C02_stock_init")]
    for fixture in fixtures:
        assert_completed(await import_upstream(admin, fixture))
    store = await read_store(admin)
    expected_documents = {d["id"]: d for f in fixtures for d in f.truth["documents"]}
    assert sorted(store.documents) == sorted(expected_documents)
    assert sorted(store.folders) == sorted(
        folder["id"] for f in fixtures for folder in f.truth["folders"])
    revision_ids = []
    for document_id, document in store.documents.items():
        want = expected_documents[document_id]["revisions"]
        assert [r["file_id"] for r in document["revisions"]] == [r["file_id"] for r in want]
        for revision, upstream in zip(document["revisions"], want):
            assert isinstance(upstream["id"], int)
            assert isinstance(revision["id"], str) and revision["id"] != str(upstream["id"])
            revision_ids.append(revision["id"])
    assert len(set(revision_ids)) == len(revision_ids) == 4


async def test_null_sha256_is_computed_from_the_content(admin, tmp_path):
    fixture = load_fixture("C13_null_sha256")
    (entry,) = fixture.truth["files"]
    assert entry["sha256_column"] is None and entry["on_disk"]
    assert_completed(await import_upstream(admin, fixture))
    (document,) = (await read_store(admin)).documents.values()
    (revision,) = document["revisions"]
    assert revision["sha256"] == entry["sha256_actual"]
    assert document["current_revision"]["sha256"] == entry["sha256_actual"]
    assert await download_sha256(admin, tmp_path, document["document_id"]) == entry[
        "sha256_actual"]


@pytest.mark.parametrize("name", ["C02_stock_init", "C05_pending_upload"])
async def test_inactive_revisions_are_kept_but_never_become_current(admin, tmp_path, name):
    """The upstream's `active: false` (an upload that never happened, or the stock `hello`
    file) does not come back as active: the document and its history are kept, the dead
    revision is listed inactive, and nothing serves it."""
    fixture = load_fixture(name)
    assert_completed(await import_upstream(admin, fixture))
    store = await read_store(admin)
    inactive = 0
    for expected in fixture.truth["documents"]:
        document = store.documents[expected["id"]]
        assert len(document["revisions"]) == len(expected["revisions"])
        for revision, upstream in zip(document["revisions"], expected["revisions"]):
            if not fixture.file(upstream["file_id"])["active"]:
                inactive += 1
                assert revision["active"] is False, revision
                assert document["current_revision"] is None or (
                    document["current_revision"]["id"] != revision["id"])
        live = [r for r in document["revisions"] if r["active"]]
        if not live:
            with pytest.raises(ClientError) as info:
                await admin.call("get_document", {"document_id": expected["id"]})
            assert info.value.code == 404
            assert "no uploaded content" in info.value.message
    assert inactive == sum(1 for f in fixture.truth["files"] if not f["active"])


async def test_missing_content_fails_by_default_naming_the_file(server, admin, tmp_path):
    fixture = load_fixture("C06_missing_content")
    before = (await dump_store(server), content_files(server))
    status = await import_upstream(admin, fixture)
    assert status["status"] == "failed", status
    assert MISSING_FILE_ID in status["error_message"]
    assert "allow_missing_content" in status["error_message"]  # the way out is named
    assert (await dump_store(server), content_files(server)) == before
    assert (await read_store(admin)).documents == {}


async def test_missing_content_allowed_restores_everything_else_and_warns(admin, tmp_path):
    fixture = load_fixture("C06_missing_content")
    status = await import_upstream(admin, fixture, allow_missing_content=True)
    assert_completed(status)
    assert isinstance(status["warnings"], list)
    assert any(MISSING_FILE_ID in warning for warning in status["warnings"]), status["warnings"]
    store = await assert_matches_truth(admin, fixture, tmp_path / "downloads")
    (document,) = store.documents.values()
    # No active revision points at missing content.
    for revision in document["revisions"]:
        assert revision["active"] == (revision["file_id"] != MISSING_FILE_ID), revision


async def test_duplicate_sibling_names_are_imported_under_unique_names(admin, tmp_path):
    fixture = load_fixture("C08_duplicate_names")
    names = unique_sibling_names(fixture.truth)
    renamed = {object_id: name for object_id, name in names.items() if name.endswith(" (2)")}
    assert len(renamed) == 3  # the twin folder, the twin in 'dups' and the twin at the root
    status = await import_upstream(admin, fixture)
    assert_completed(status)
    await assert_matches_truth(admin, fixture, tmp_path / "downloads", names=names)
    for object_id, name in renamed.items():
        assert any(object_id in w or name in w for w in status["warnings"]), (name, status)


async def test_names_longer_than_255_characters_are_kept(admin, tmp_path):
    """The upstream has no length limit (issue 11 met a 300-character title): a variant of the
    upstream's own test data with a 300-character folder name and document title."""
    long_name = "長い名前 long name " * 20  # 340 characters
    assert len(long_name) > 255

    def edit(listings, truth, files):
        for folders in (listings["folders.json"], truth["folders"]):
            folders[0]["name"] = long_name
        for documents in (listings["documents.json"], truth["documents"]):
            documents[0]["title"] = long_name + " 文書"

    fixture = write_variant(load_fixture("C01_bk_testsuite"), tmp_path / "variant", "long", edit)
    assert_completed(await import_upstream(admin, fixture))
    await assert_matches_truth(admin, fixture, tmp_path / "downloads")


async def test_a_completed_upstream_import_reports_its_warnings(admin):
    """C04 has integer revision ids, so its import gave fresh ids and says so."""
    status = await import_upstream(admin, load_fixture("C04_shared_file"))
    assert_completed(status)
    assert isinstance(status["warnings"], list) and status["warnings"], status
    assert all(isinstance(w, str) and w for w in status["warnings"])
    assert any("revision" in w for w in status["warnings"]), status["warnings"]


def _drop_a_file(listings, files) -> None:
    """A_rich with one listed file's content left out of the archive."""
    del files["f41eb84910f9fac6e678b891900592eb263614308c5c53fd2f12656543f386de"]


def _bad_access_type(listings, files) -> None:
    """A_rich with a document rule of an access type that does not exist."""
    listings["documents.json"][0]["access_rules"][0]["access_type"] = "delete"


@pytest.mark.parametrize("damage, message", [
    (_drop_a_file, "f41eb84910f9fac6e678b891900592eb263614308c5c53fd2f12656543f386de"),
    (_bad_access_type, "access_type"),
])
async def test_a_failed_import_shows_the_step_that_failed(server, admin, tmp_path, damage,
                                                          message):
    """A_rich (2.4 MB) damaged after it was written: the archive decrypts, so the failed task
    names a later step than the first, and the store is unchanged."""
    fixture = write_variant(load_fixture("A_rich"), tmp_path / "variant", "damaged",
                            lambda listings, truth, files: damage(listings, files))
    before = (await dump_store(server), content_files(server))
    status = await import_upstream(admin, fixture)
    assert status["status"] == "failed", status
    assert status["current_step"] in SPEC_STEPS, status
    assert status["current_step"] not in ("Decrypting archive", "Restore completed"), status
    assert status["progress_percent"] >= SPEC_STEPS[status["current_step"]], status
    assert message in status["error_message"], status
    assert (await dump_store(server), content_files(server)) == before


# -- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", PLAIN_FIXTURES + ["C08_duplicate_names"])
async def test_backup_verify_accepts_upstream_archives(name):
    fixture = load_fixture(name)
    done = await run_cli(*cli_command("backup", "verify", str(fixture.archive),
                                      str(fixture.key)))
    stdout = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    counts = fixture.truth["counts"]
    assert stdout.startswith(f"OK: format 1.0, {counts['folders']} folders, "
                             f"{counts['documents']} documents, {counts['files']} files"), stdout
    assert "segment" not in stdout  # format 1.0 has no segments


async def test_backup_inspect_reads_the_rich_upstream_archive():
    fixture = load_fixture("A_rich")
    done = await run_cli(*cli_command("backup", "inspect", str(fixture.archive),
                                      str(fixture.key)))
    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode()
    metadata_text, tree = text.split("\n/\n")
    assert json.loads(metadata_text)["version"] == "1.0"
    assert "segment" not in text
    lines = tree.splitlines()
    for folder in fixture.truth["folders"]:
        assert any(line.strip() == folder["name"] + "/" for line in lines), folder["name"]
    for document in fixture.truth["documents"]:
        assert any(line.strip().startswith(document["title"] + "  (") for line in lines), (
            document["title"])

    as_json = await run_cli(*cli_command("backup", "inspect", "--json", str(fixture.archive),
                                         str(fixture.key)))
    assert as_json.returncode == 0, as_json.stderr.decode()
    listed = json.loads(as_json.stdout)
    assert [f["id"] for f in listed["folders"]] == [f["id"] for f in fixture.truth["folders"]]
    assert [d["id"] for d in listed["documents"]] == [
        d["id"] for d in fixture.truth["documents"]]


async def test_client_backup_import_of_the_rich_archive_lists_the_warnings(tmp_path):
    fixture = load_fixture("A_rich")
    async with serve_subprocess(tmp_path / "cli-target") as served:
        done = await run_cli(*cli_command(
            "client", "backup-import", "--server", served.url, "--cafile", str(served.cafile),
            "--password-file", str(served.password_file), "--poll", "0.05", "--timeout", "120",
            "--archive", str(fixture.archive), "--key", str(fixture.key)))
        stdout = done.stdout.decode()
        assert done.returncode == 0, (stdout, done.stderr.decode())
        counts = fixture.truth["counts"]
        assert (f"import completed: {counts['folders']} folders, {counts['documents']} "
                f"documents, {counts['files']} files") in stdout
        task_id = stdout.rsplit("(task ", 1)[1].split(")", 1)[0]

        context = ssl.create_default_context(cafile=str(served.cafile))
        async with open_client(served.url, ssl_context=context) as client:
            await client.login("admin", ADMIN_PASSWORD)
            status = await client.call("get_backup_import_status", {"backup_task_id": task_id})
            await assert_matches_truth(client, fixture, tmp_path / "downloads")
    warnings = status["warnings"]
    assert warnings, status  # integer ids and a null sha256 in this archive
    # The empty file's sha256 was null and is computed: reported by its id.
    assert any("dfcb36e7cab06e4413e4cc8e5e09fe3570e1c1cd0503edf98131aadc7a617ff4" in w
               for w in warnings), warnings
    final_lines = stdout[stdout.index("import completed"):]
    for warning in warnings:
        assert warning in final_lines, (warning, final_lines)


# -- a client on the websockets library ---------------------------------------------------------

def websockets_download(url: str, context: ssl.SSLContext, document_id: str) -> tuple[bytes, int]:
    """Log in, get_document and download_file as the sample of BACKUP_IMPORT_FEATURE.md does,
    with the library's default max_size; return (content, largest frame in bytes)."""
    from Crypto.Cipher import AES
    from websockets.sync.client import connect

    largest = 0
    with connect(url, ssl=context) as websocket:
        assert websocket.protocol.max_message_size == WEBSOCKETS_DEFAULT_MAX_BYTES

        def call(action, data, token=None, request_id=1):
            message = {"action": action, "data": data, "request_id": request_id}
            if token:
                message.update(username="admin", token=token)
            websocket.send(json.dumps(message))
            return json.loads(websocket.recv(timeout=30))

        token = call("login", {"username": "admin", "password": ADMIN_PASSWORD})["data"]["token"]
        task = call("get_document", {"document_id": document_id}, token, 2)["data"]
        websocket.send(json.dumps({"action": "download_file", "request_id": 3,
                                   "data": {"task_id": task["task_id"]},
                                   "username": "admin", "token": token}))
        header = json.loads(websocket.recv(timeout=30))["data"]
        key = base64.b64decode(header["key"])
        prefix = base64.b64decode(header["nonce_prefix"])
        websocket.send(json.dumps({"action": "ready"}))
        content = bytearray()
        index = 0
        while True:
            message = websocket.recv(timeout=30)
            if isinstance(message, str):
                final = json.loads(message)
                assert final["code"] == 200, final
                break
            largest = max(largest, len(message))
            nonce = prefix + index.to_bytes(8, "big")
            cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
            content += cipher.decrypt_and_verify(message[:-16], message[-16:])
            index += 1
    return bytes(content), largest


async def test_a_websockets_client_with_the_default_limit_can_download(server, admin, tmp_path,
                                                                       client_ssl):
    content = os.urandom(3 * 2 ** 20 + 12345)
    created = await admin.call("create_document", {"title": "big for websockets"})
    await upload_bytes(admin, created["task_id"], tmp_path, content)
    received, largest = await trio.to_thread.run_sync(
        websockets_download, server.url, client_ssl, created["document_id"])
    assert largest <= WEBSOCKETS_DEFAULT_MAX_BYTES
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(content).hexdigest()


async def test_client_backup_import_offers_and_takes_allow_missing_content(tmp_path):
    fixture = load_fixture("C06_missing_content")
    async with serve_subprocess(tmp_path / "cli-target") as served:
        command = ("client", "backup-import", "--server", served.url, "--cafile",
                   str(served.cafile), "--password-file", str(served.password_file),
                   "--poll", "0.05", "--timeout", "120", "--archive", str(fixture.archive),
                   "--key", str(fixture.key))
        refused = await run_cli(*cli_command(*command))
        assert refused.returncode == 1
        stderr = refused.stderr.decode()
        assert MISSING_FILE_ID in stderr and "--allow-missing-content" in stderr, stderr
        done = await run_cli(*cli_command(*command, "--allow-missing-content"))
    stdout = done.stdout.decode()
    assert done.returncode == 0, (stdout, done.stderr.decode())
    assert "import completed: 0 folders, 1 documents, 2 files" in stdout
    final_lines = stdout[stdout.index("import completed"):]
    assert any(MISSING_FILE_ID in line and line.startswith("warning: ")
               for line in final_lines.splitlines()), final_lines
