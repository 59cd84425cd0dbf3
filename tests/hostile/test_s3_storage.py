"""Content in an S3 bucket (`serve --storage s3://BUCKET/PREFIX`), against moto's server, in
either test mode: uploads (multipart, resumed after a dropped connection) and downloads,
imports that land in the bucket and failed or killed ones that leave nothing there, exports
to the bucket, and a backup moving from local storage to S3 storage and back, identical."""

from __future__ import annotations

import os
import secrets
import sys

import pytest
import trio

from cfms_trio.client import ClientError, export_backup, import_backup
from cfms_trio.config import Limits

from backup_support import dump_store
from test_transfer import CHUNK, raw_ready, send_chunks, sha256_hex, wait_until_idle, write_file

from . import corpus
from .support import run_import, start_import
from .test_crash_restart import admin_client, serve_process

TEST_DEADLINE_S = 60
PART_CHUNKS = 128  # content.s3.part_bytes_for(...) with 64 KiB chunks: 8 MiB parts


def bucket_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    """Every object under `prefix`, as the bucket lists it."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                   Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


def open_uploads(s3, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.client().list_multipart_uploads(Bucket=bucket).get(
        "Uploads", ())]


@pytest.fixture
def bucket(s3) -> str:
    name = f"cfms-{secrets.token_hex(4)}"
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
async def on_s3(start_server, s3, bucket):
    return await start_server("on-s3", storage_url=f"s3://{bucket}/data",
                              s3_endpoint_url=s3.endpoint,
                              limits=Limits(transfer_chunk_bytes=CHUNK))


async def test_upload_resumes_in_parts_and_downloads_from_the_bucket(on_s3, s3, bucket,
                                                                     tmp_path):
    content = os.urandom((2 * PART_CHUNKS + 40) * CHUNK + 123)
    with trio.fail_after(TEST_DEADLINE_S):
        async with on_s3.connect("admin") as first:
            created = await first.call("create_document", {"title": "big"})
            ready = await raw_ready(first, created["task_id"], content)
            await send_chunks(first, ready, content, range(PART_CHUNKS + 50))
        # One whole part reached the bucket; the 50 chunks after it were only buffered.
        async with on_s3.connect("admin") as second:
            await wait_until_idle(on_s3, created["task_id"])
            assert open_uploads(s3, bucket) == [f"data/files/{created['file_id'][:2]}/"
                                                f"{created['file_id']}"]
            ready = await raw_ready(second, created["task_id"], content)
            assert ready["offset"] == PART_CHUNKS * CHUNK
        async with on_s3.connect("admin") as third:
            await wait_until_idle(on_s3, created["task_id"])
            result = await third.upload_file(created["task_id"], write_file(tmp_path, content))
            assert result["sha256"] == sha256_hex(content)
            ticket = await third.call("get_document", {"document_id": created["document_id"]})
            target = tmp_path / "downloaded"
            await third.download_file(ticket["task_id"], target)
            assert target.read_bytes() == content
            # A resumed download reads a range of the object.
            resumed = tmp_path / "resumed"
            resumed.write_bytes(content[:3 * CHUNK])
            ticket = await third.call("get_document", {"document_id": created["document_id"]})
            await third.download_file(ticket["task_id"], resumed, offset=3 * CHUNK)
            assert resumed.read_bytes() == content
    key = f"data/files/{created['file_id'][:2]}/{created['file_id']}"
    assert bucket_keys(s3, bucket) == [key]
    assert open_uploads(s3, bucket) == []
    assert not list((on_s3.root / "content" / "files").rglob("*")), "nothing on local disk"


async def test_a_wrong_resumed_upload_leaves_no_object(on_s3, s3, bucket, tmp_path):
    """The sha256 of a resumed upload is checked on the stored object, which goes if wrong."""
    content = os.urandom((PART_CHUNKS + 3) * CHUNK)
    with trio.fail_after(TEST_DEADLINE_S):
        async with on_s3.connect("admin") as first:
            created = await first.call("create_document", {"title": "f"})
            ready = await raw_ready(first, created["task_id"], content)
            await send_chunks(first, ready, content, range(PART_CHUNKS + 1))
        async with on_s3.connect("admin") as second:
            await wait_until_idle(on_s3, created["task_id"])
            ready = await raw_ready(second, created["task_id"], content)
            assert ready["offset"] == PART_CHUNKS * CHUNK
            forged = content[:PART_CHUNKS * CHUNK] + os.urandom(3 * CHUNK)
            await send_chunks(second, ready, forged, range(PART_CHUNKS, PART_CHUNKS + 3))
            reply = await second.receive_reply()
            assert reply["code"] == 400 and "sha256" in reply["message"]
    assert bucket_keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []


async def test_import_puts_exactly_the_restored_files_in_the_bucket(on_s3, s3, bucket,
                                                                    tmp_path):
    async with on_s3.connect("admin") as admin:
        await admin.listen()
        status = await run_import(admin, corpus.big_archive(), corpus.v2_key(), tmp_path)
        assert status["status"] == "completed", status
        task_id = status["backup_task_id"]
        listed = await on_s3.app.store.read(
            lambda m: sorted(f.path for f in m.File.select().where(m.File.active == True)))  # noqa: E712
    assert bucket_keys(s3, bucket) == sorted(f"data/{path}" for path in listed)
    assert all(key.startswith(f"data/restore/files/{task_id}/") for key in
               bucket_keys(s3, bucket))
    assert len(listed) == 3
    # The same archive again collides with what it restored: refused by its plan before any
    # file is stored; its uploads are kept for a retry with other options until it is
    # cancelled, which removes them.
    async with on_s3.connect("admin") as admin:
        await admin.listen()
        again = await run_import(admin, corpus.big_archive(), corpus.v2_key(), tmp_path)
        assert again["status"] == "failed" and "already exists" in again["error_message"]
        assert again["startable"] is True
        kept = [key for key in bucket_keys(s3, bucket) if key.startswith("data/backups/import/")]
        assert len(kept) == 2
        await admin.call("cancel_backup_import", {"backup_task_id": again["backup_task_id"]})
    assert bucket_keys(s3, bucket) == sorted(f"data/{path}" for path in listed)
    assert open_uploads(s3, bucket) == []


async def test_an_archive_with_a_bad_hash_leaves_no_object(on_s3, s3, bucket, tmp_path):
    bad = corpus.CASES["file_sha256_mismatch"]()
    before = bucket_keys(s3, bucket)
    async with on_s3.connect("admin") as admin:
        await admin.listen()
        status = await run_import(admin, bad.archive, bad.key, tmp_path)
    assert status["status"] == "failed" and bad.expected in status["error_message"]
    assert before == [] and bucket_keys(s3, bucket) == []
    assert open_uploads(s3, bucket) == []


async def test_an_import_killed_while_storing_files_leaves_no_object_after_restart(
        s3, bucket, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    args = ("--storage", f"s3://{bucket}/killed", "--s3-endpoint", s3.endpoint)
    # Paused at the step after the files: they are stored (inside the commit's transaction),
    # and the transaction never commits.
    async with serve_process(root, pause_at="Importing folders", extra_args=args) as server:
        async with admin_client(server.url) as admin:
            task_id = await start_import(admin, corpus.big_archive(), corpus.v2_key(), tmp_path)
            with trio.fail_after(TEST_DEADLINE_S):
                while (await admin.call("get_backup_import_status", {
                        "backup_task_id": task_id}))["current_step"] != "Importing folders":
                    await trio.sleep(0.02)
            await server.kill()
    staged = bucket_keys(s3, bucket, f"killed/restore/files/{task_id}/")
    assert staged, "the kill came after the restored files were stored"
    async with serve_process(root, extra_args=args) as server:
        async with admin_client(server.url) as admin:
            status = await admin.call("get_backup_import_status", {"backup_task_id": task_id})
            assert status["status"] == "failed", status
        assert bucket_keys(s3, bucket, "killed/restore/") == []
        await server.terminate()


async def test_a_backup_moves_from_local_to_s3_storage_and_back_identical(
        start_server, s3, bucket, tmp_path):
    # SQLite + local files, to the tests' database (PostgreSQL in CI's second run) + S3, and
    # back to SQLite + local files.
    local = await start_server("local", storage_url=None, database_url=None)
    async with local.connect("admin") as admin:
        folder = await admin.call("create_directory", {"name": "docs", "parent_id": None})
        for name, size in (("empty", 0), ("small", 10), ("big", 3 * 1024 * 1024 + 5)):
            created = await admin.call("create_document", {"title": name,
                                                           "folder_id": folder["id"]})
            await admin.upload_file(created["task_id"], write_file(tmp_path, os.urandom(size)))
        archive, key, _ = await export_backup(admin, tmp_path / "from-local")
    original = await dump_store(local)

    remote = await start_server("remote", storage_url=f"s3://{bucket}/moved",
                                s3_endpoint_url=s3.endpoint)
    async with remote.connect("admin") as admin:
        status = await import_backup(admin, archive, key, poll_interval_s=0.05)
        assert status["status"] == "completed", status
        archive2, key2, _ = await export_backup(admin, tmp_path / "from-s3")
    # The export lives in the bucket, not on the server's disk.
    assert f"moved/backups/{archive2.name}" in bucket_keys(s3, bucket)
    assert not (remote.root / "content" / "backups" / archive2.name).exists()

    back = await start_server("back", storage_url=None, database_url=None)
    async with back.connect("admin") as admin:
        status = await import_backup(admin, archive2, key2, poll_interval_s=0.05)
        assert status["status"] == "completed", status
    returned = await dump_store(back)

    def comparable(dump: dict) -> dict:
        """The restored rows; where content is stored and the transfer tasks are the
        server's own business."""
        files = [{k: v for k, v in row.items() if k != "path"} for row in dump["files"]
                 if not row["path"].startswith("backups/")]
        return {**{k: v for k, v in dump.items() if k not in ("files", "file_tasks")},
                "files": files}

    assert comparable(returned) == comparable(original)
    for row in comparable(original)["files"]:
        if row["size"]:
            got = await back.app.store.read(
                lambda m, i=row["id"]: m.File.get_by_id(i).path)
            data = (back.root / "content" / got).read_bytes()
            assert sha256_hex(data) == row["sha256"]


async def test_a_missing_bucket_stops_the_start_with_one_clear_line(s3, tmp_path):
    command = [sys.executable, "-m", "cfms_trio", "serve", "--root", str(tmp_path),
               "--port", "0", "--storage", "s3://no-such-bucket-here/x",
               "--s3-endpoint", s3.endpoint]
    with trio.fail_after(TEST_DEADLINE_S):
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                        check=False)
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines()[-1] == (
        "error: S3 storage s3://no-such-bucket-here/x/ is not usable: no such bucket")


async def test_a_bucket_gone_while_running_answers_503_naming_it(on_s3, s3, bucket, tmp_path):
    async with on_s3.connect("admin") as admin:
        created = await admin.call("create_document", {"title": "f"})
        s3.client().delete_bucket(Bucket=bucket)
        with pytest.raises(ClientError) as info:
            await admin.upload_file(created["task_id"], write_file(tmp_path, b"some bytes"))
        assert info.value.code == 503
        assert f"S3 storage s3://{bucket}/data/" in info.value.message
        assert "NoSuchBucket" in info.value.message
        assert (await admin.call("server_info"))["name"] == "cfms-trio"
