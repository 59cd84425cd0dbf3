"""Every limit of `cfms_trio.config` is configuration, and each one alone stops an input that
the defaults accept, with a clear error: 413 for uploads and messages, a failed import naming
the limit for what is only found inside an archive."""

from __future__ import annotations

import io
import json

import pytest
import trio
import zstandard

from cfms_trio.backup.format import segments as cs
from cfms_trio.client import ClientError
from cfms_trio.config import ArchiveLimits, Limits

from . import corpus
from .support import (
    assert_no_leftovers,
    assert_store_unchanged,
    capture,
    refused_upload,
    run_import,
    wait_for_outcome,
)

TEST_TIMEOUT_S = 30


def streamed_zstd_archive() -> bytes:
    """The valid backup compressed as the exporter does (streaming: a 2 MiB window at level 3)."""
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
    writer.write(corpus.tar_bytes(corpus.standard_members(corpus.base_dataset())))
    writer.close()
    return corpus.seal(out.getvalue(), compression=cs.COMPRESSION_ZSTD)


VALID = {
    "v2": corpus.valid_v2_archive,
    "v2_zstd": lambda: (streamed_zstd_archive(), corpus.v2_key()),
    "legacy": corpus.valid_legacy_archive,
}


@pytest.mark.parametrize("backup", sorted(VALID))
async def test_default_limits_accept_the_valid_backups(start_server, tmp_path, backup):
    server = await start_server("defaults")
    archive, key = VALID[backup]()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with server.connect("admin") as admin:
            await admin.listen()
            status = await run_import(admin, archive, key, tmp_path)
    assert status["status"] == "completed", status
    assert (status["folders_count"], status["documents_count"], status["files_count"]) == (2, 2, 3)


# (backup, the one limit changed, what the failed import's error_message says)
ARCHIVE_LIMITS = {
    "extracted_bytes": ("v2", {"extracted_bytes": 5000},
                        "archive expands to more than the limit of 5000 bytes"),
    "extracted_bytes_legacy": ("legacy", {"extracted_bytes": 5000},
                               "archive expands to more than the limit of 5000 bytes"),
    "member_count": ("v2", {"member_count": 5}, "archive lists 7 members; the limit is 5"),
    "member_count_legacy": ("legacy", {"member_count": 5},
                            "archive has more than the limit of 5 members"),
    "json_member_bytes": ("v2", {"json_member_bytes": 300},
                          "archive member folders.json is 386 bytes; the limit is 300 bytes"),
    "json_depth": ("v2", {"json_depth": 4},
                   "archive member folders.json nests deeper than the limit of 4"),
    "zstd_window_bytes": ("v2_zstd", {"zstd_window_bytes": 1024 * 1024},
                          "zstd data needs a decoding window larger than the limit of "
                          "1048576 bytes"),
}


@pytest.mark.parametrize("limit", sorted(ARCHIVE_LIMITS))
async def test_archive_limit_fails_the_import(start_server, tmp_path, limit):
    backup, change, expected = ARCHIVE_LIMITS[limit]
    server = await start_server("limited", limits=Limits(archive=ArchiveLimits(**change)))
    archive, key = VALID[backup]()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with server.connect("admin") as admin:
            await admin.listen()
            before = await capture(server.root)
            status = await run_import(admin, archive, key, tmp_path)
            after = await capture(server.root)
    assert status["status"] == "failed"
    assert status["error_message"] == expected
    assert_store_unchanged(before, after)
    assert_no_leftovers(server.root)


def _refused(which: str, data: bytes, expected: str) -> corpus.Case:
    archive, key = corpus.valid_v2_archive()
    if which == "archive":
        return corpus.Case(data, key, expected, refused_upload="archive")
    return corpus.Case(archive, data, expected, refused_upload="key")


UPLOAD_LIMITS = {
    # The upload task of an import's archive carries archive_bytes, the key's key_file_bytes;
    # upload_bytes caps every upload whatever its task allows.
    "archive_bytes": (Limits(archive=ArchiveLimits(archive_bytes=10_000)), "archive",
                      "file of 10339 bytes is larger than the limit of 10000 bytes"),
    "key_file_bytes": (Limits(archive=ArchiveLimits(key_file_bytes=100)), "key",
                       "is larger than the limit of 100 bytes"),
    "upload_bytes_caps_the_archive": (Limits(upload_bytes=10_000), "archive",
                                      "file of 10339 bytes is larger than the limit of 10000 "
                                      "bytes"),
}


@pytest.mark.parametrize("limit", sorted(UPLOAD_LIMITS))
async def test_upload_limit_refuses_the_import_upload(start_server, tmp_path, limit):
    limits, which, expected = UPLOAD_LIMITS[limit]
    server = await start_server("limited", limits=limits)
    archive, key = corpus.valid_v2_archive()
    case = _refused(which, archive if which == "archive" else key, expected)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with server.connect("admin") as admin:
            await admin.listen()
            before = await capture(server.root)
            code, message = await refused_upload(admin, case, tmp_path)
            after = await capture(server.root)
    assert code == 413 and expected in message, message
    assert_store_unchanged(before, after)
    assert_no_leftovers(server.root)


async def test_upload_bytes_refuses_a_document_upload(start_server, tmp_path):
    server = await start_server("limited", limits=Limits(upload_bytes=1000))
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(b"s" * 1000)
    large.write_bytes(b"l" * 1001)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with server.connect("admin") as admin:
            created = await admin.call("create_document", {"title": "limited"})
            with pytest.raises(ClientError) as refused:
                await admin.upload_file(created["task_id"], large)
            assert refused.value.code == 413
            assert refused.value.message == ("file of 1001 bytes is larger than the limit of "
                                             "1000 bytes")
            assert (await admin.upload_file(created["task_id"], small))["size"] == 1000


async def test_message_bytes_refuses_a_larger_message(start_server):
    server = await start_server("limited", limits=Limits(message_bytes=4096))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with server.connect() as client:
            envelope = {"action": "server_info", "request_id": "x" * 5000}
            await client.send_raw(json.dumps(envelope))
            reply = await client.receive_reply()
            assert reply["code"] == 413
            assert reply["message"] == "message larger than 4096 bytes"
            info = await client.call("server_info")
            assert info["max_message_bytes"] == 4096


@pytest.mark.parametrize("limit, expected", [
    ("archive_bytes", "archive is 10339 bytes; the limit is 10000 bytes"),
    ("key_file_bytes", "key file is {key_size} bytes; the limit is 100 bytes"),
])
async def test_limits_lowered_after_the_uploads_apply_at_import(start_server, tmp_path, limit,
                                                                 expected):
    """The upload tasks carry the limits of the day they were issued; a restart with lower
    limits still holds the import to the new ones."""
    archive, key = corpus.valid_v2_archive()
    server = await start_server("relimited")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with server.connect("admin") as admin:
            init = await admin.call("initiate_backup_import", {"timeout_seconds": 60})
            for task_id, data in ((init["archive_task_id"], archive), (init["key_task_id"], key)):
                path = tmp_path / task_id
                path.write_bytes(data)
                await admin.upload_file(task_id, path)
    await server.stop()
    value = {"archive_bytes": 10_000, "key_file_bytes": 100}[limit]
    server = await start_server("relimited",
                                limits=Limits(archive=ArchiveLimits(**{limit: value})))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with server.connect("admin") as admin:
            await admin.listen()
            before = await capture(server.root)
            await admin.call("start_backup_import", {"backup_task_id": init["backup_task_id"]})
            status = await wait_for_outcome(admin, init["backup_task_id"])
            after = await capture(server.root)
    assert status["status"] == "failed"
    assert status["error_message"] == expected.format(key_size=len(key))
    # Nothing was restored; only the uploads are gone, as after any finished import.
    for table in ("folder", "document", "revision", "access_rule"):
        assert after.tables[table] == before.tables[table]
    assert {path: digest for path, digest in before.content.items()
            if not path.startswith("backups/import/")} == after.content
    assert_no_leftovers(server.root)
