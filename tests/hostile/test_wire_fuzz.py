"""Wire fuzzing: random and malformed messages, the wrong kind of message, transfer messages out
of order, oversize frames. The offending connection gets an error response (400/413, never a
500) or, for frames over the WebSocket limit, a clean close; the server and another connection
carry on, and server_info is answered after every case."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import uuid

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from cfms_trio.actions import ROUTES
from cfms_trio.client import ClientError
from cfms_trio.config import Limits
from cfms_trio.server import FRAME_SLACK_BYTES
from cfms_trio.transfer.crypto import seal_chunk

CASE_TIMEOUT_S = 30
CHUNK = 1024 * 1024  # the default transfer chunk size
MESSAGE_LIMIT = 1024 * 1024  # the default message_bytes
FRAME_LIMIT = max(MESSAGE_LIMIT, CHUNK + 16) + FRAME_SLACK_BYTES
# Until a connection authenticates, larger messages close it with 1009 (issue 12 item 7).
STRANGER_LIMIT = Limits().unauthenticated_message_bytes
ERROR_CODES = (400, 401, 403, 404, 408, 409, 413)
ACTIONS = [route.action for route in ROUTES]
# Actions a fuzzer may call with the admin's token without changing what other cases rely on.
READ_ONLY_ACTIONS = ["server_info", "list_users", "get_user_info", "list_groups",
                     "view_audit_logs", "list_directory", "get_directory_info",
                     "get_directory_access_rules", "get_document_info", "list_revisions",
                     "get_document_access_rules", "get_backup_import_status", "download_file",
                     "get_document", "no_such_action"]


async def assert_alive(*clients) -> None:
    for client in clients:
        reply = await client.request("server_info")
        assert reply["code"] == 200 and reply["data"]["name"] == "cfms-trio", reply


async def error_reply(client, *codes: int) -> dict:
    """The next reply must be an error response with one of `codes` (any error by default)."""
    reply = await client.receive_reply()
    assert isinstance(reply, dict) and "code" in reply, reply
    assert reply["code"] in (codes or ERROR_CODES), reply
    assert set(reply) >= {"code", "message", "data", "timestamp"}
    return reply


@contextlib.asynccontextmanager
async def fuzz_connections(server, *, as_admin: bool = False):
    """(fuzzed connection, bystander); on exit both must still be answered, unless the fuzzed
    one was closed by the server."""
    with trio.fail_after(CASE_TIMEOUT_S):
        async with server.connect() as bystander:
            await assert_alive(bystander)
            async with server.connect() as fuzzed:
                if as_admin:
                    fuzzed.username, fuzzed.token = "admin", server.admin_token
                yield fuzzed, bystander
                if fuzzed.closed_reason is None:
                    await assert_alive(fuzzed)
            await assert_alive(bystander)
        async with server.connect() as newcomer:
            await assert_alive(newcomer)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request(client, action: str, data: dict | None = None) -> str:
    return json.dumps(client.envelope(action, data))


async def new_upload_task(server) -> str:
    """An open upload task for a fresh document of the admin."""
    async with server.connect() as admin:
        admin.username, admin.token = "admin", server.admin_token
        created = await admin.call("create_document", {"title": f"fuzz {uuid.uuid4()}"})
        return created["task_id"]


async def new_download_task(server, content: bytes = b"downloadable " * 100) -> str:
    async with server.connect() as admin:
        admin.username, admin.token = "admin", server.admin_token
        created = await admin.call("create_document", {"title": f"fuzz {uuid.uuid4()}"})
        path = server.workdir / f"{created['document_id']}.bin"
        path.write_bytes(content)
        await admin.upload_file(created["task_id"], path)
        return (await admin.call("get_document", {"document_id": created["document_id"]}))[
            "task_id"]


async def begin_upload(client, task_id: str) -> dict:
    """Send upload_file and receive the server's transfer_file message."""
    await client.send_raw(request(client, "upload_file", {"task_id": task_id}))
    message = await client.receive_reply()
    assert message["action"] == "transfer_file", message
    return message["data"]


async def announce(client, content: bytes) -> dict:
    await client.send_raw(json.dumps({"action": "transfer_file", "data": {
        "file_size": len(content), "sha256": sha(content)}}))
    ready = await client.receive_reply()
    assert ready["action"] == "ready", ready
    return ready["data"]


def seal(ready: dict, index: int, plaintext: bytes) -> bytes:
    return seal_chunk(base64.b64decode(ready["key"]), base64.b64decode(ready["nonce_prefix"]),
                      index, plaintext)


async def begin_download(client, task_id: str) -> dict:
    await client.send_raw(request(client, "download_file", {"task_id": task_id}))
    message = await client.receive_reply()
    assert message["action"] == "transfer_file", message
    return message["data"]


# ------------------------------------------------------------------------------------------
# Malformed text messages


DEEP = 100_000
MALFORMED = {
    "empty": "",
    "not_json": "{action: server_info}",
    "truncated_json": '{"action": "server_info", "data": {',
    "array": '["server_info"]',
    "null": "null",
    "number": "1e999",
    "string": '"server_info"',
    "action_missing": '{"data": {}}',
    "action_not_a_string": '{"action": ["server_info"]}',
    "action_empty": '{"action": ""}',
    "action_unknown": '{"action": "format_disk"}',
    "data_not_an_object": '{"action": "server_info", "data": [1, 2]}',
    "username_not_a_string": '{"action": "list_users", "username": 1, "token": "x"}',
    "bad_token": '{"action": "list_users", "username": "admin", "token": "forged"}',
    "unknown_field": '{"action": "server_info", "data": {"verbose": true}}',
    "field_wrong_type": '{"action": "login", "data": {"username": 7, "password": "x"}}',
    "deeply_nested": "[" * DEEP + "]" * DEEP,
    "deeply_nested_data": '{"action": "server_info", "data": ' + '{"a":' * DEEP + "1"
                          + "}" * DEEP + "}",
    "huge_integer": '{"action": "server_info", "request_id": ' + "9" * 10_000 + "}",
    "lone_surrogate": '{"action": "\\ud800"}',
    "duplicate_keys": '{"action": "server_info", "action": "list_users"}',
    "nul_bytes": '{"action": "server_\\u0000info"}',
    "transfer_file_outside_a_transfer": '{"action": "transfer_file", "data": {"file_size": 1}}',
    "ready_outside_a_transfer": '{"action": "ready"}',
    "just_under_the_size_limit": '{"action": "server_info", "request_id": "'
                                 + "x" * (MESSAGE_LIMIT - 100) + '", "data": [] }',
    "over_the_size_limit": '{"action": "server_info", "request_id": "'
                           + "x" * MESSAGE_LIMIT + '"}',
    "multibyte_over_the_size_limit": '{"action": "x", "request_id": "'
                                     + "\u20ac" * (MESSAGE_LIMIT // 3 + 1) + '"}',
}
# Python's json keeps the last of duplicate keys: this asks for list_users, anonymously.
EXPECTED_CODES = {"bad_token": (401,), "duplicate_keys": (401,), "over_the_size_limit": (413,),
                  "multibyte_over_the_size_limit": (413,)}


async def authenticate(client, server) -> None:
    """Make `client`'s connection an authenticated one (a request with a valid token)."""
    client.username, client.token = "admin", server.admin_token
    await client.call("list_users")


@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_text_message(plain_server, name):
    """Messages too large for a stranger are sent on an authenticated connection, where the
    message limit (not the strangers' one) applies."""
    async with fuzz_connections(plain_server) as (fuzzed, bystander):
        if len(MALFORMED[name].encode()) > STRANGER_LIMIT:
            await authenticate(fuzzed, plain_server)
        await fuzzed.send_raw(MALFORMED[name])
        reply = await error_reply(fuzzed, *EXPECTED_CODES.get(name, (400,)))
        assert "internal" not in reply["message"]


@pytest.mark.parametrize("name", ["deeply_nested", "over_the_size_limit"])
async def test_large_message_from_a_stranger_closes_only_that_connection(plain_server, name):
    async with fuzz_connections(plain_server) as (fuzzed, bystander):
        with pytest.raises(ConnectionClosed):
            with contextlib.suppress(ConnectionClosed):  # the close may come during the send
                await fuzzed.send_raw(MALFORMED[name])
            await fuzzed.receive_reply()
        assert fuzzed.closed_reason is not None and fuzzed.closed_reason.code == 1009


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=15)
ENVELOPES = st.fixed_dictionaries(
    {"action": st.sampled_from(ACTIONS) | st.text(max_size=20)},
    optional={"data": st.dictionaries(st.sampled_from(["task_id", "document_id", "folder_id",
                                                       "name", "title", "offset", "username",
                                                       "backup_task_id", "timeout_seconds",
                                                       "password", "x"]),
                                      JSON_VALUES, max_size=4) | JSON_VALUES,
              "request_id": JSON_VALUES,
              "username": st.sampled_from(["admin", "nobody"]) | JSON_VALUES,
              "token": st.text(max_size=40) | JSON_VALUES})
FUZZ_SETTINGS = settings(max_examples=60, deadline=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(message=ENVELOPES | JSON_VALUES.map(json.dumps) | st.text(max_size=50)
       | st.binary(max_size=200))
async def test_random_messages_from_a_stranger(plain_server, message):
    async with fuzz_connections(plain_server) as (fuzzed, bystander):
        await fuzzed.send_raw(json.dumps(message) if isinstance(message, dict) else message)
        reply = await fuzzed.receive_reply()
        assert isinstance(reply, dict) and reply["code"] in (200,) + ERROR_CODES, reply
        if isinstance(message, dict) and "request_id" in message:
            assert reply["request_id"] == message["request_id"]


@FUZZ_SETTINGS
@given(action=st.sampled_from(READ_ONLY_ACTIONS),
       data=st.dictionaries(st.sampled_from(["task_id", "document_id", "folder_id", "offset",
                                             "username", "backup_task_id", "revision_id",
                                             "limit", "action", "x"]), JSON_VALUES, max_size=4))
async def test_random_requests_from_the_admin(plain_server, action, data):
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await fuzzed.send_raw(request(fuzzed, action, data))
        reply = await fuzzed.receive_reply()
        if isinstance(reply, dict) and reply.get("action") == "transfer_file":
            # A fuzzed download_file that found its task: abandon it with a bad 'ready'.
            await fuzzed.send_raw(b"not ready")
            reply = await fuzzed.receive_reply()
        assert isinstance(reply, dict) and reply["code"] in (200,) + ERROR_CODES, reply


# ------------------------------------------------------------------------------------------
# Binary where text is expected, and the reverse; transfers out of order


async def test_binary_message_outside_a_transfer(plain_server):
    async with fuzz_connections(plain_server) as (fuzzed, bystander):
        await fuzzed.send_raw(b"\x00\x01 chunk")
        reply = await error_reply(fuzzed, 400)
        assert reply["message"] == "binary message outside a file transfer"


async def test_binary_chunk_before_the_announcement(plain_server):
    task_id = await new_upload_task(plain_server)
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_upload(fuzzed, task_id)
        await fuzzed.send_raw(b"\x00" * 64)
        reply = await error_reply(fuzzed, 400)
        assert "expected a JSON text message" in reply["message"]


async def test_announcement_sent_twice(plain_server):
    task_id = await new_upload_task(plain_server)
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_upload(fuzzed, task_id)
        await announce(fuzzed, b"content")
        await fuzzed.send_raw(json.dumps({"action": "transfer_file", "data": {
            "file_size": 7, "sha256": sha(b"content")}}))
        reply = await error_reply(fuzzed, 400)
        assert "expected binary chunk 0, got a text message" in reply["message"]


async def test_ready_sent_to_an_upload(plain_server):
    task_id = await new_upload_task(plain_server)
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_upload(fuzzed, task_id)
        await fuzzed.send_raw(json.dumps({"action": "ready"}))
        reply = await error_reply(fuzzed, 400)
        assert "expected a 'transfer_file' message" in reply["message"]


@pytest.mark.parametrize("announcement, code, expected", [
    ({"action": "transfer_file", "data": {"file_size": -1, "sha256": sha(b"")}}, 400,
     "'data.file_size' must be a non-negative integer"),
    ({"action": "transfer_file", "data": {"file_size": True, "sha256": sha(b"")}}, 400,
     "'data.file_size' must be a non-negative integer"),
    ({"action": "transfer_file", "data": {"file_size": "12", "sha256": sha(b"")}}, 400,
     "'data.file_size' must be a non-negative integer"),
    ({"action": "transfer_file", "data": {"file_size": 2**70, "sha256": sha(b"")}}, 413,
     "larger than the limit"),
    ({"action": "transfer_file", "data": {"file_size": 1, "sha256": "../../etc/passwd"}}, 400,
     "'data.sha256' must be 64 hex digits"),
    ({"action": "transfer_file", "data": [1]}, 400, "'data' must be an object"),
    ("[" * DEEP + "]" * DEEP, 400, "malformed JSON"),
    ("{not json", 400, "malformed JSON"),
    ("[]", 400, "must be a JSON object"),
    ('{"action": "x", "pad": "' + "x" * MESSAGE_LIMIT + '"}', 413, "message larger than"),
])
async def test_bad_announcement(plain_server, announcement, code, expected):
    task_id = await new_upload_task(plain_server)
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_upload(fuzzed, task_id)
        await fuzzed.send_raw(announcement if isinstance(announcement, str)
                              else json.dumps(announcement))
        reply = await error_reply(fuzzed, code)
        assert expected in reply["message"]


async def test_text_where_a_chunk_is_expected(plain_server):
    task_id = await new_upload_task(plain_server)
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_upload(fuzzed, task_id)
        await announce(fuzzed, b"two chunks? no, one")
        await fuzzed.send_raw(request(fuzzed, "server_info"))
        reply = await error_reply(fuzzed, 400)
        assert "expected binary chunk 0, got a text message" in reply["message"]


@pytest.mark.parametrize("fault", ["bad_tag", "wrong_index", "wrong_size", "empty"])
async def test_bad_chunk(plain_server, fault):
    task_id = await new_upload_task(plain_server)
    content = b"chunk content"
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_upload(fuzzed, task_id)
        ready = await announce(fuzzed, content)
        sealed = seal(ready, 0, content)
        chunk = {"bad_tag": sealed[:-1] + bytes([sealed[-1] ^ 1]),
                 "wrong_index": seal(ready, 1, content),
                 "wrong_size": sealed + b"x",
                 "empty": b""}[fault]
        await fuzzed.send_raw(chunk)
        reply = await error_reply(fuzzed, 400)
        assert "the upload was discarded" in reply["message"] or "bytes, expected" in \
            reply["message"]


async def test_chunks_after_the_last_one(plain_server):
    task_id = await new_upload_task(plain_server)
    content = b"short"
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_upload(fuzzed, task_id)
        ready = await announce(fuzzed, content)
        await fuzzed.send_raw(seal(ready, 0, content))
        await fuzzed.send_raw(seal(ready, 1, content))
        done = await fuzzed.receive_reply()
        assert done["code"] == 200 and done["data"]["sha256"] == sha(content)
        reply = await error_reply(fuzzed, 400)
        assert reply["message"] == "binary message outside a file transfer"


async def test_transfer_file_sent_to_a_download(plain_server):
    task_id = await new_download_task(plain_server)
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_download(fuzzed, task_id)
        await fuzzed.send_raw(json.dumps({"action": "transfer_file", "data": {
            "file_size": 1, "sha256": sha(b"x")}}))
        reply = await error_reply(fuzzed, 400)
        assert "expected a 'ready' message" in reply["message"]


async def test_binary_sent_to_a_download_instead_of_ready(plain_server):
    task_id = await new_download_task(plain_server)
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_download(fuzzed, task_id)
        await fuzzed.send_raw(b"ready")
        reply = await error_reply(fuzzed, 400)
        assert "expected a JSON text message" in reply["message"]


async def test_tasks_used_for_the_wrong_direction(plain_server):
    upload_task = await new_upload_task(plain_server)
    download_task = await new_download_task(plain_server)
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await fuzzed.send_raw(request(fuzzed, "download_file", {"task_id": upload_task}))
        assert "does not exist" in (await error_reply(fuzzed, 404))["message"]
        await fuzzed.send_raw(request(fuzzed, "upload_file", {"task_id": download_task}))
        assert "does not exist" in (await error_reply(fuzzed, 404))["message"]
        await fuzzed.send_raw(request(fuzzed, "download_file", {"task_id": download_task,
                                                                "offset": 3}))
        assert "offset" in (await error_reply(fuzzed, 400))["message"]


async def test_upload_task_of_someone_else(plain_server):
    task_id = await new_upload_task(plain_server)
    async with fuzz_connections(plain_server) as (fuzzed, bystander):
        await fuzzed.send_raw(json.dumps({"action": "upload_file", "data": {"task_id": task_id},
                                          "username": "admin", "token": "0" * 43}))
        await error_reply(fuzzed, 401)


@pytest.mark.parametrize("moment", ["before_announcing", "between_chunks", "downloading"])
async def test_connection_dropped_mid_transfer(plain_server, moment):
    content = b"x" * (CHUNK + 10)
    if moment == "downloading":
        task_id = await new_download_task(plain_server, content)
    else:
        task_id = await new_upload_task(plain_server)
    async with plain_server.connect() as bystander:
        with trio.fail_after(CASE_TIMEOUT_S):
            async with plain_server.connect() as dropped:
                dropped.username, dropped.token = "admin", plain_server.admin_token
                if moment == "downloading":
                    await begin_download(dropped, task_id)
                    await dropped.send_raw(json.dumps({"action": "ready"}))
                    await dropped.receive_reply()  # the first chunk; then hang up
                else:
                    await begin_upload(dropped, task_id)
                    if moment == "between_chunks":
                        ready = await announce(dropped, content)
                        await dropped.send_raw(seal(ready, 0, content[:CHUNK]))
            await assert_alive(bystander)
    if moment != "downloading":
        # The task is free again once the server has seen the connection go: a new connection
        # can upload to it (until then it is told the transfer is still in progress).
        async with plain_server.connect() as again:
            again.username, again.token = "admin", plain_server.admin_token
            path = plain_server.workdir / f"{task_id}.bin"
            path.write_bytes(content)
            with trio.fail_after(CASE_TIMEOUT_S):
                while True:
                    try:
                        result = await again.upload_file(task_id, path)
                        break
                    except ClientError as err:
                        assert err.code == 409 and "already in progress" in err.message, err
                        await trio.sleep(0.01)
            assert result["sha256"] == sha(content)


# ------------------------------------------------------------------------------------------
# Oversize frames


@pytest.mark.parametrize("kind", [str, bytes])
async def test_frame_over_the_websocket_limit_closes_only_that_connection(plain_server, kind):
    payload = "x" * (FRAME_LIMIT + 1)
    async with fuzz_connections(plain_server) as (fuzzed, bystander):
        await authenticate(fuzzed, plain_server)
        with pytest.raises(ConnectionClosed):
            with contextlib.suppress(ConnectionClosed):  # the close may come during the send
                await fuzzed.send_raw(payload if kind is str else payload.encode())
            await fuzzed.receive_reply()
        assert fuzzed.closed_reason is not None and fuzzed.closed_reason.code == 1009


async def test_oversize_chunk_during_an_upload(plain_server):
    task_id = await new_upload_task(plain_server)
    async with fuzz_connections(plain_server, as_admin=True) as (fuzzed, bystander):
        await begin_upload(fuzzed, task_id)
        await announce(fuzzed, b"small")
        await fuzzed.send_raw(b"\x00" * (CHUNK + 1000))
        reply = await error_reply(fuzzed, 400)
        assert f"has {CHUNK + 1000} bytes" in reply["message"]
