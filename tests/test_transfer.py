"""Chunked AES-GCM file transfer (SPEC §6): round trips through the client library, and every
error spoken at the raw protocol level."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
import trio

import cfms_trio.client.connection as client_module
from cfms_trio.client import ClientError
from cfms_trio.config import Limits
from cfms_trio.transfer.crypto import seal_chunk

from helpers import USER_PASSWORD, make_user

CHUNK = 64 * 1024
TEST_DEADLINE_S = 20
SHORT_TTL_S = 0.5


@pytest.fixture
async def small(start_server):
    """A server whose transfer chunks are small, so multi-chunk files stay small."""
    return await start_server("small", limits=Limits(transfer_chunk_bytes=CHUNK))


@pytest.fixture
async def client(small):
    async with small.connect("admin") as connected:
        yield connected


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def write_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / f"file-{os.urandom(4).hex()}"
    path.write_bytes(content)
    return path


def stored_path(server, file_id: str) -> Path:
    return server.root / "content" / "files" / file_id[:2] / file_id


def part_files(server) -> list[Path]:
    return list((server.root / "content" / "tmp" / "uploads").glob("*"))


async def expect_error(client, code: int, action: str, data: dict) -> str:
    with pytest.raises(ClientError) as info:
        await client.call(action, data)
    assert info.value.code == code, info.value
    return info.value.message


async def assert_nothing_stored(server, client, created: dict) -> None:
    """The upload left no trace: no current revision, no stored file, no partial upload."""
    info = await client.call("get_document_info", {"document_id": created["document_id"]})
    assert info["current_revision"] is None
    assert not stored_path(server, created["file_id"]).exists()
    assert part_files(server) == []


# -- speaking the protocol by hand --------------------------------------------------------------

async def raw_begin(client, task_id: str) -> dict:
    """Send `upload_file`; return the server's reply (the transfer_file offer or an error)."""
    await client.send_raw(json.dumps(client.envelope("upload_file", {"task_id": task_id})))
    return await client.receive_reply()


async def raw_announce(client, size: int, digest: str) -> dict:
    await client.send_raw(json.dumps({"action": "transfer_file",
                                      "data": {"file_size": size, "sha256": digest}}))
    return await client.receive_reply()


async def raw_ready(client, task_id: str, content: bytes) -> dict:
    """Run the upload sequence up to `ready` for `content`; return ready's data."""
    offer = await raw_begin(client, task_id)
    assert offer["action"] == "transfer_file", offer
    ready = await raw_announce(client, len(content), sha256_hex(content))
    assert ready["action"] == "ready", ready
    assert ready["data"]["chunk_size"] == CHUNK
    assert len(base64.b64decode(ready["data"]["key"])) == 32
    assert len(base64.b64decode(ready["data"]["nonce_prefix"])) == 4
    return ready["data"]


def sealed(ready: dict, content: bytes, index: int) -> bytes:
    """Chunk `index` of `content`, sealed as SPEC §6 step 4 says."""
    size = ready["chunk_size"]
    return seal_chunk(base64.b64decode(ready["key"]), base64.b64decode(ready["nonce_prefix"]),
                      index, content[index * size:(index + 1) * size])


async def send_chunks(client, ready: dict, content: bytes, indices) -> None:
    for index in indices:
        await client.send_raw(sealed(ready, content, index))


def chunks_of(content: bytes) -> int:
    return (len(content) + CHUNK - 1) // CHUNK


async def wait_until_idle(server, task_id: str) -> None:
    """The server noticed a dropped connection and released the task."""
    while server.app.transfers.is_active(task_id):
        await trio.sleep(0.01)


# -- round trips through the client library --------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 17])
async def test_round_trip_is_byte_identical(small, client, tmp_path, size):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(size)
        created = await client.call("create_document", {"title": "file"})
        uploaded_progress: list[tuple[int, int]] = []
        result = await client.upload_file(created["task_id"], write_file(tmp_path, content),
                                          progress=lambda *p: uploaded_progress.append(p))
        assert result == {"file_id": created["file_id"], "size": size,
                          "sha256": sha256_hex(content)}
        expected_progress = [(0, size)] + [(min(size, (i + 1) * CHUNK), size)
                                           for i in range(chunks_of(content))]
        assert uploaded_progress == expected_progress
        assert stored_path(small, created["file_id"]).read_bytes() == content
        assert part_files(small) == []

        ticket = await client.call("get_document", {"document_id": created["document_id"]})
        assert ticket["file_size"] == size and ticket["sha256"] == sha256_hex(content)
        target = tmp_path / "downloaded"
        downloaded_progress: list[tuple[int, int]] = []
        result = await client.download_file(ticket["task_id"], target,
                                            progress=lambda *p: downloaded_progress.append(p))
        assert result["size"] == size and result["sha256"] == sha256_hex(content)
        assert target.read_bytes() == content
        assert downloaded_progress == expected_progress


async def test_every_revision_downloads_byte_identical(client, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        versions = [os.urandom(CHUNK + 1), b"", os.urandom(2 * CHUNK), b"x"]
        created = await client.call("create_document", {"title": "history"})
        revision_ids, task_id = [created["revision_id"]], created["task_id"]
        for index, content in enumerate(versions):
            if index:
                added = await client.call("upload_document",
                                          {"document_id": created["document_id"]})
                revision_ids.append(added["revision_id"])
                task_id = added["task_id"]
            await client.upload_file(task_id, write_file(tmp_path, content))
        for revision_id, content in zip(revision_ids, versions):
            ticket = await client.call("get_document", {"document_id": created["document_id"],
                                                        "revision_id": revision_id})
            assert ticket["revision_id"] == revision_id
            target = tmp_path / f"rev-{revision_id}"
            await client.download_file(ticket["task_id"], target)
            assert target.read_bytes() == content


async def test_download_resumes_from_an_offset(client, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(4 * CHUNK + 5)
        created = await client.call("create_document", {"title": "big"})
        await client.upload_file(created["task_id"], write_file(tmp_path, content))
        ticket = await client.call("get_document", {"document_id": created["document_id"]})

        # what an interrupted download left behind: two good chunks and a torn third one
        target = tmp_path / "partial"
        target.write_bytes(content[:2 * CHUNK] + b"torn")
        progress: list[tuple[int, int]] = []
        await client.download_file(ticket["task_id"], target, offset=2 * CHUNK,
                                   progress=lambda *p: progress.append(p))
        assert target.read_bytes() == content
        assert progress[0] == (2 * CHUNK, len(content))
        assert progress[-1] == (len(content), len(content)) and len(progress) == 4

        # raw: the header echoes the offset and the first chunk sent is chunk 2
        await client.send_raw(json.dumps(client.envelope(
            "download_file", {"task_id": ticket["task_id"], "offset": 4 * CHUNK})))
        header = await client.receive_reply()
        assert header["action"] == "transfer_file"
        assert header["data"]["offset"] == 4 * CHUNK
        assert header["data"]["file_size"] == len(content)
        await client.send_raw(json.dumps({"action": "ready"}))
        chunk = await client.receive_reply()
        ready_like = {"key": header["data"]["key"], "nonce_prefix": header["data"]["nonce_prefix"],
                      "chunk_size": CHUNK}
        assert chunk == sealed(ready_like, content, 4)
        final = await client.receive_reply()
        assert final["code"] == 200 and final["data"]["sha256"] == sha256_hex(content)


async def test_download_offset_must_be_a_chunk_multiple_within_the_file(client, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(2 * CHUNK + 1)
        created = await client.call("create_document", {"title": "f"})
        await client.upload_file(created["task_id"], write_file(tmp_path, content))
        ticket = await client.call("get_document", {"document_id": created["document_id"]})
        for offset in (5, CHUNK + 1, 3 * CHUNK, -CHUNK):
            message = await expect_error(client, 400, "download_file",
                                         {"task_id": ticket["task_id"], "offset": offset})
            assert "offset" in message
        target = tmp_path / "whole"
        await client.download_file(ticket["task_id"], target)
        assert target.read_bytes() == content


async def test_download_needs_ready(client, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        created = await client.call("create_document", {"title": "f"})
        await client.upload_file(created["task_id"], write_file(tmp_path, b"abc"))
        ticket = await client.call("get_document", {"document_id": created["document_id"]})
        await client.send_raw(json.dumps(client.envelope("download_file",
                                                         {"task_id": ticket["task_id"]})))
        assert (await client.receive_reply())["action"] == "transfer_file"
        await client.send_raw(json.dumps({"action": "go"}))
        reply = await client.receive_reply()
        assert reply["code"] == 400 and "ready" in reply["message"]
        assert (await client.call("server_info"))["transfer_chunk_bytes"] == CHUNK


# -- upload errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["flipped_bit", "wrong_index", "wrong_key"])
async def test_tampered_chunk_discards_the_upload(small, client, tmp_path, damage):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(3 * CHUNK)
        created = await client.call("create_document", {"title": "f"})
        ready = await raw_ready(client, created["task_id"], content)
        await send_chunks(client, ready, content, [0])
        bad = bytearray(sealed(ready, content, 1))
        if damage == "flipped_bit":
            bad[100] ^= 1
        elif damage == "wrong_index":
            bad = bytearray(sealed(ready, content, 2))
        else:
            bad = bytearray(seal_chunk(os.urandom(32), base64.b64decode(ready["nonce_prefix"]),
                                       1, content[CHUNK:2 * CHUNK]))
        await client.send_raw(bytes(bad))
        reply = await client.receive_reply()
        assert reply["code"] == 400 and "chunk 1" in reply["message"]
        assert "discarded" in reply["message"]
        await assert_nothing_stored(small, client, created)

        # the task stays open: a retry starts from the beginning and succeeds
        progress: list[tuple[int, int]] = []
        await client.upload_file(created["task_id"], write_file(tmp_path, content),
                                 progress=lambda *p: progress.append(p))
        assert progress[0] == (0, len(content))
        assert stored_path(small, created["file_id"]).read_bytes() == content


@pytest.mark.parametrize("index, delta", [(0, 1), (0, -1), (2, 1), (2, -1)])
async def test_wrong_chunk_length_discards_the_upload(small, client, index, delta):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(2 * CHUNK + 10)
        created = await client.call("create_document", {"title": "f"})
        ready = await raw_ready(client, created["task_id"], content)
        await send_chunks(client, ready, content, range(index))
        chunk = sealed(ready, content, index)
        await client.send_raw(chunk + b"\0" if delta > 0 else chunk[:-1])
        reply = await client.receive_reply()
        assert reply["code"] == 400
        assert f"chunk {index} has {len(chunk) + delta} bytes" in reply["message"]
        await assert_nothing_stored(small, client, created)


async def test_sha256_mismatch_discards_the_upload(small, client, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(CHUNK + 3)
        created = await client.call("create_document", {"title": "f"})
        assert (await raw_begin(client, created["task_id"]))["action"] == "transfer_file"
        ready = await raw_announce(client, len(content), sha256_hex(b"something else"))
        await send_chunks(client, ready["data"], content, range(2))
        reply = await client.receive_reply()
        assert reply["code"] == 400 and "sha256" in reply["message"]
        await assert_nothing_stored(small, client, created)
        result = await client.upload_file(created["task_id"], write_file(tmp_path, content))
        assert result["sha256"] == sha256_hex(content)


async def test_file_larger_than_the_limit_is_refused(small, client):
    with trio.fail_after(TEST_DEADLINE_S):
        created = await client.call("create_document", {"title": "f"})
        offer = await raw_begin(client, created["task_id"])
        assert offer["data"] == {"task_id": created["task_id"], "chunk_size": CHUNK,
                                 "max_size": Limits().upload_bytes}
        reply = await raw_announce(client, offer["data"]["max_size"] + 1, sha256_hex(b""))
        assert reply["code"] == 413
        await assert_nothing_stored(small, client, created)


async def test_upload_limit_comes_from_the_settings(start_server, tmp_path):
    server = await start_server("tiny", limits=Limits(transfer_chunk_bytes=CHUNK,
                                                      upload_bytes=1000))
    async with server.connect("admin") as client:
        with trio.fail_after(TEST_DEADLINE_S):
            created = await client.call("create_document", {"title": "f"})
            with pytest.raises(ClientError) as info:
                await client.upload_file(created["task_id"],
                                         write_file(tmp_path, os.urandom(1001)))
            assert info.value.code == 413 and "1000" in info.value.message
            await client.upload_file(created["task_id"], write_file(tmp_path, os.urandom(1000)))


GOOD_SHA = "0" * 64


@pytest.mark.parametrize("message, names", [
    ({"action": "transfer_file", "data": {"file_size": -1, "sha256": GOOD_SHA}}, "file_size"),
    ({"action": "transfer_file", "data": {"file_size": "10", "sha256": GOOD_SHA}}, "file_size"),
    ({"action": "transfer_file", "data": {"file_size": True, "sha256": GOOD_SHA}}, "file_size"),
    ({"action": "transfer_file", "data": {"file_size": 1.5, "sha256": GOOD_SHA}}, "file_size"),
    ({"action": "transfer_file", "data": {"sha256": GOOD_SHA}}, "file_size"),
    ({"action": "transfer_file", "data": {"file_size": 1, "sha256": "abc"}}, "sha256"),
    ({"action": "transfer_file", "data": {"file_size": 1, "sha256": "g" * 64}}, "sha256"),
    ({"action": "transfer_file", "data": {"file_size": 1}}, "sha256"),
    ({"action": "transfer_file", "data": [1]}, "data"),
    ({"action": "upload", "data": {"file_size": 1, "sha256": GOOD_SHA}}, "transfer_file"),
    ("not json at all", "JSON"),
    ("[1, 2]", "object"),
    (b"\x00\x01", "binary"),
])
async def test_malformed_announcement_is_refused(small, client, tmp_path, message, names):
    with trio.fail_after(TEST_DEADLINE_S):
        created = await client.call("create_document", {"title": "f"})
        assert (await raw_begin(client, created["task_id"]))["action"] == "transfer_file"
        if isinstance(message, dict):
            message = json.dumps(message)
        await client.send_raw(message)
        reply = await client.receive_reply()
        assert reply["code"] == 400 and names in reply["message"], reply
        await assert_nothing_stored(small, client, created)
        # the connection and the task are both still usable
        await client.upload_file(created["task_id"], write_file(tmp_path, b"fine"))


async def test_text_message_instead_of_a_chunk(small, client, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(3 * CHUNK)
        created = await client.call("create_document", {"title": "f"})
        ready = await raw_ready(client, created["task_id"], content)
        await send_chunks(client, ready, content, [0])
        await client.send_raw(json.dumps(client.envelope("server_info")))
        reply = await client.receive_reply()
        assert reply["code"] == 400 and "binary chunk 1" in reply["message"]
        assert (await client.call("server_info"))["name"] == "cfms-trio"
        # the verified first chunk was kept: the same upload resumes after it
        again = await raw_ready(client, created["task_id"], content)
        assert again["offset"] == CHUNK
        await send_chunks(client, again, content, range(1, 3))
        final = await client.receive_reply()
        assert final["code"] == 200
        assert stored_path(small, created["file_id"]).read_bytes() == content


# -- tasks ----------------------------------------------------------------------------------

async def test_expired_tasks_are_refused(start_server, tmp_path):
    server = await start_server("short", transfer_task_ttl_s=SHORT_TTL_S,
                                limits=Limits(transfer_chunk_bytes=CHUNK))
    async with server.connect("admin") as client:
        with trio.fail_after(TEST_DEADLINE_S):
            created = await client.call("create_document", {"title": "f"})
            await client.upload_file(created["task_id"], write_file(tmp_path, b"content"))
            ticket = await client.call("get_document", {"document_id": created["document_id"]})
            revision = await client.call("upload_document",
                                         {"document_id": created["document_id"]})
            await trio.sleep(SHORT_TTL_S + 0.1)
            message = await expect_error(client, 408, "upload_file",
                                         {"task_id": revision["task_id"]})
            assert "expired" in message
            await expect_error(client, 408, "download_file", {"task_id": ticket["task_id"]})

            # a task that expires in the middle of an upload ends it and leaves nothing
            created = await client.call("create_document", {"title": "g"})
            content = os.urandom(2 * CHUNK)
            ready = await raw_ready(client, created["task_id"], content)
            await send_chunks(client, ready, content, [0])
            reply = await client.receive_reply()
            assert reply["code"] == 408
            await assert_nothing_stored(server, client, created)


async def test_tasks_belong_to_their_user(small, client, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        await make_user(client, "alice")
        created = await client.call("create_document", {"title": "f"})
        other = await client.call("create_document", {"title": "g"})
        await client.upload_file(other["task_id"], write_file(tmp_path, b"x"))
        ticket = await client.call("get_document", {"document_id": other["document_id"]})
        async with small.connect("alice", USER_PASSWORD) as alice:
            for action, task_id in (("upload_file", created["task_id"]),
                                    ("download_file", ticket["task_id"])):
                message = await expect_error(alice, 403, action, {"task_id": task_id})
                assert "another user" in message
        await assert_nothing_stored(small, client, created)


async def test_unknown_and_mismatched_tasks(client, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        for action in ("upload_file", "download_file"):
            await expect_error(client, 404, action, {"task_id": "0" * 32})
            message = await expect_error(client, 400, action, {"task_id": "../../etc"})
            assert "task_id" in message
            await expect_error(client, 400, action, {})
        created = await client.call("create_document", {"title": "f"})
        await expect_error(client, 404, "download_file", {"task_id": created["task_id"]})
        await client.upload_file(created["task_id"], write_file(tmp_path, b"x"))
        ticket = await client.call("get_document", {"document_id": created["document_id"]})
        await expect_error(client, 404, "upload_file", {"task_id": ticket["task_id"]})


async def test_completed_upload_task_cannot_be_reused(small, client, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        created = await client.call("create_document", {"title": "f"})
        await client.upload_file(created["task_id"], write_file(tmp_path, b"first"))
        with pytest.raises(ClientError) as info:
            await client.upload_file(created["task_id"], write_file(tmp_path, b"second"))
        assert info.value.code == 409
        assert stored_path(small, created["file_id"]).read_bytes() == b"first"


async def test_upload_resumes_after_a_dropped_connection(small, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(5 * CHUNK + 100)
        async with small.connect("admin") as first:
            created = await first.call("create_document", {"title": "f"})
            task_id = created["task_id"]
            ready1 = await raw_ready(first, task_id, content)
            assert ready1["offset"] == 0
            await send_chunks(first, ready1, content, range(3))
        # connection gone mid-upload; the verified chunks stay on the server
        async with small.connect("admin") as second:
            await wait_until_idle(small, task_id)
            ready2 = await raw_ready(second, task_id, content)
            assert ready2["offset"] == 3 * CHUNK
            assert ready2["key"] != ready1["key"]
            # dropped again right after `ready`: nothing is lost either
        async with small.connect("admin") as third:
            await wait_until_idle(small, task_id)
            progress: list[tuple[int, int]] = []
            result = await third.upload_file(task_id, write_file(tmp_path, content),
                                             progress=lambda *p: progress.append(p))
            assert progress[0] == (3 * CHUNK, len(content)) and len(progress) == 4
            assert result["sha256"] == sha256_hex(content)
            target = tmp_path / "downloaded"
            ticket = await third.call("get_document", {"document_id": created["document_id"]})
            await third.download_file(ticket["task_id"], target)
            assert target.read_bytes() == content
        assert part_files(small) == []


async def test_resume_with_different_content_restarts_at_zero(small, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        first_content = os.urandom(4 * CHUNK)
        async with small.connect("admin") as first:
            created = await first.call("create_document", {"title": "f"})
            task_id = created["task_id"]
            ready = await raw_ready(first, task_id, first_content)
            await send_chunks(first, ready, first_content, range(2))
        async with small.connect("admin") as second:
            await wait_until_idle(small, task_id)
            same_size = os.urandom(4 * CHUNK)
            ready = await raw_ready(second, task_id, same_size)
            assert ready["offset"] == 0
            await send_chunks(second, ready, same_size, range(4))
            assert (await second.receive_reply())["code"] == 200
            target = tmp_path / "downloaded"
            ticket = await second.call("get_document", {"document_id": created["document_id"]})
            await second.download_file(ticket["task_id"], target)
            assert target.read_bytes() == same_size


async def test_one_upload_at_a_time_per_task(small, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(2 * CHUNK)
        async with small.connect("admin") as first, small.connect("admin") as second:
            created = await first.call("create_document", {"title": "f"})
            ready = await raw_ready(first, created["task_id"], content)
            await send_chunks(first, ready, content, [0])
            reply = await raw_begin(second, created["task_id"])
            assert reply["code"] == 409 and "in progress" in reply["message"]
            await send_chunks(first, ready, content, [1])
            assert (await first.receive_reply())["code"] == 200
            assert stored_path(small, created["file_id"]).read_bytes() == content


async def test_upload_into_a_document_deleted_meanwhile_leaves_nothing(small, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(2 * CHUNK)
        async with small.connect("admin") as uploader, small.connect("admin") as other:
            created = await uploader.call("create_document", {"title": "f"})
            ready = await raw_ready(uploader, created["task_id"], content)
            await send_chunks(uploader, ready, content, [0])
            await other.call("delete_document", {"document_id": created["document_id"]})
            await send_chunks(uploader, ready, content, [1])
            reply = await uploader.receive_reply()
            assert reply["code"] == 409
        assert not stored_path(small, created["file_id"]).exists()
        assert part_files(small) == []


async def test_deleting_a_document_removes_its_partial_upload(small):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(3 * CHUNK)
        async with small.connect("admin") as first:
            created = await first.call("create_document", {"title": "f"})
            ready = await raw_ready(first, created["task_id"], content)
            await send_chunks(first, ready, content, range(2))
        async with small.connect("admin") as second:
            await wait_until_idle(small, created["task_id"])
            assert len(part_files(small)) == 1
            await second.call("delete_document", {"document_id": created["document_id"]})
        assert part_files(small) == []


async def test_other_connections_stay_responsive_during_an_upload(small, client):
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(4 * 1024 * 1024)
        created = await client.call("create_document", {"title": "big"})
        ready = await raw_ready(client, created["task_id"], content)
        answered = 0
        async with small.connect() as other:
            for start in range(0, chunks_of(content), 8):
                await send_chunks(client, ready, content, range(start, start + 8))
                with trio.fail_after(2):
                    assert (await other.call("server_info"))["name"] == "cfms-trio"
                answered += 1
        assert answered == chunks_of(content) // 8
        final = await client.receive_reply()
        assert final["code"] == 200 and final["data"]["size"] == len(content)


async def test_client_recovers_after_a_failed_upload(small, client, tmp_path, monkeypatch):
    """The library stops sending once the server gave up and skips the server's answers to
    chunks that were already on their way, so the next request reads its own answer."""
    with trio.fail_after(TEST_DEADLINE_S):
        content = os.urandom(6 * CHUNK)
        created = await client.call("create_document", {"title": "f"})
        real_seal = client_module.seal_chunk

        def corrupt_first_chunk(key, prefix, index, plaintext):
            out = real_seal(key, prefix, index, plaintext)
            return out[:-1] + bytes([out[-1] ^ 1]) if index == 0 else out

        monkeypatch.setattr(client_module, "seal_chunk", corrupt_first_chunk)
        with pytest.raises(ClientError) as info:
            await client.upload_file(created["task_id"], write_file(tmp_path, content))
        assert info.value.code == 400 and "chunk 0" in info.value.message
        monkeypatch.setattr(client_module, "seal_chunk", real_seal)
        info_reply = await client.call("get_document_info",
                                       {"document_id": created["document_id"]})
        assert info_reply["current_revision"] is None
        await client.upload_file(created["task_id"], write_file(tmp_path, content))
        assert stored_path(small, created["file_id"]).read_bytes() == content


async def test_abandoned_partial_upload_is_swept_after_expiry(start_server, tmp_path):
    """An interrupted upload keeps its verified chunks while the task lives; once the task
    has expired the sweep closes it and removes the partial file."""
    srv = await start_server("sweep", transfer_task_ttl_s=1.0,
                             limits=Limits(transfer_chunk_bytes=CHUNK))
    uploads = srv.root / "content" / "tmp" / "uploads"
    async with srv.connect("admin") as client:
        created = await client.call("create_document", {"title": "abandoned"})
        task_id = created["task_id"]
    payload = os.urandom(3 * CHUNK)
    async with srv.connect("admin") as client:
        await client.send_raw(json.dumps(client.envelope("upload_file", {"task_id": task_id})))
        await client.receive_reply()
        await client.send_raw(json.dumps({"action": "transfer_file", "data": {
            "file_size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}))
        ready = (await client.receive_reply())["data"]
        key, prefix = base64.b64decode(ready["key"]), base64.b64decode(ready["nonce_prefix"])
        await client.send_raw(seal_chunk(key, prefix, 0, payload[:CHUNK]))
        with trio.fail_after(10):
            while not (uploads / f"{task_id}.part").exists() or \
                    (uploads / f"{task_id}.part").stat().st_size < CHUNK:
                await trio.sleep(0.02)
    assert await srv.app.sweeper.sweep_once() == 0, "a live task's partial upload must be kept"
    assert (uploads / f"{task_id}.part").exists()
    await trio.sleep(1.2)
    assert await srv.app.sweeper.sweep_once() == 1
    assert not (uploads / f"{task_id}.part").exists()
    async with srv.connect("admin") as client:
        reply = await client.request("upload_file", {"task_id": task_id})
    assert reply["code"] == 409 and "closed" in reply["message"]


async def test_content_missing_from_storage_is_a_clear_server_error(small, client, tmp_path):
    """Stored content removed behind the server's back: the download is refused with 500 and a
    message naming the file, and the server keeps serving."""
    with trio.fail_after(TEST_DEADLINE_S):
        created = await client.call("create_document", {"title": "lost"})
        await client.upload_file(created["task_id"], write_file(tmp_path, b"soon gone"))
        file_path = (await small.app.store.read(
            lambda m: m.File.get_by_id(created["file_id"]).path))
        await trio.to_thread.run_sync(small.app.content.delete, [file_path])
        ticket = await client.call("get_document", {"document_id": created["document_id"]})
        with pytest.raises(ClientError) as info:
            await client.download_file(ticket["task_id"], tmp_path / "lost")
        assert info.value.code == 500
        assert f"the content of file '{created['file_id']}' is missing" in info.value.message
        assert small.app.content.description in info.value.message
        assert (await client.call("server_info"))["version"]
