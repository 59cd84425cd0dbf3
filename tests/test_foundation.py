"""Server foundation: the envelope of SPEC §3, sessions, users and groups, audit, events, and
isolation of connections from each other (SPEC §3, §4, §9)."""

from __future__ import annotations

import functools
import json
import logging
import time

import psutil
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from trio_websocket import ConnectionClosed, open_websocket_url

from cfms_trio import protocol
from cfms_trio.client import ClientError
from cfms_trio.config import Limits
from cfms_trio.storage import accounts as accounts_storage

from helpers import ADMIN_PASSWORD, USER_PASSWORD, make_user

# A hard bound on every test, on top of the fail_after around each wait.
pytestmark = pytest.mark.timeout(60)

IO_TIMEOUT_S = 10


# -- helpers -------------------------------------------------------------------------------


async def raw_request(client, message) -> dict:
    """Send `message` (a dict, or a str/bytes sent verbatim) and return the response envelope."""
    text = message if isinstance(message, (str, bytes)) else json.dumps(message)
    with trio.fail_after(IO_TIMEOUT_S):
        await client.send_raw(text)
        return await client.receive_reply()


async def expect_error(client, action, data=None, *, code: int, mentions: str = "") -> ClientError:
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(ClientError) as caught:
            await client.call(action, data)
    assert caught.value.code == code, caught.value
    assert mentions in caught.value.message
    return caught.value


def assert_error_envelope(reply: dict, code: int, mentions: str = "") -> None:
    assert reply["code"] == code, reply
    assert set(reply) >= {"code", "message", "data", "timestamp"}
    assert mentions in reply["message"]


async def assert_usable(client) -> None:
    """The connection still answers requests."""
    with trio.fail_after(IO_TIMEOUT_S):
        info = await client.call("server_info")
    assert info["name"] == "cfms-trio"


def audit_entries(audit_log: dict, **match) -> list[dict]:
    return [e for e in audit_log["entries"] if all(e[k] == v for k, v in match.items())]


async def open_raw_tls_websocket(server):
    """A TLS stream with a completed WebSocket handshake driven by wsproto directly, so a test
    can put arbitrary bytes on the wire."""
    tcp = await trio.open_tcp_stream("127.0.0.1", server.running.port)
    stream = trio.SSLStream(tcp, server.ssl_context, server_hostname="127.0.0.1")
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(wsproto.events.Request(host="127.0.0.1", target="/")))
    while True:
        data = await stream.receive_some(65536)
        assert data, "server closed the connection during the handshake"
        ws.receive_data(data)
        if any(isinstance(e, wsproto.events.AcceptConnection) for e in ws.events()):
            return stream, ws


async def receive_close_code(stream, ws) -> int | None:
    """Read until the server closes; the close code it sent, or None if it just hung up."""
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return None
        if not data:
            return None
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, wsproto.events.CloseConnection):
                return event.code


# -- envelope -------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", ["abc", 7, 2.5, None, [1, "two"], {"nested": {"x": 1}}])
async def test_request_id_is_echoed_whatever_its_json_type(server, request_id):
    async with server.connect() as client:
        reply = await raw_request(client, {"action": "server_info", "request_id": request_id})
        assert reply["request_id"] == request_id
        assert reply["code"] == 200
        error = await raw_request(client, {"action": "no_such_thing", "request_id": request_id})
        assert error["request_id"] == request_id
        assert error["code"] == 400


async def test_success_envelope_shape_and_no_request_id_when_none_sent(server):
    async with server.connect() as client:
        reply = await raw_request(client, {"action": "server_info"})
    assert set(reply) == {"code", "message", "data", "timestamp"}
    assert reply["code"] == 200 and reply["message"] == "success"
    assert isinstance(reply["data"], dict) and isinstance(reply["timestamp"], float)
    assert reply["data"]["name"] == "cfms-trio"


async def test_malformed_json_is_400_and_connection_stays_usable(server):
    async with server.connect() as client:
        reply = await raw_request(client, '{"action": "server_info", ')
        assert_error_envelope(reply, 400, "malformed JSON")
        assert "request_id" not in reply
        await assert_usable(client)


@pytest.mark.parametrize("text", ["[1, 2]", '"login"', "42", "null"])
async def test_non_object_json_is_400(server, text):
    async with server.connect() as client:
        assert_error_envelope(await raw_request(client, text), 400, "JSON object")
        await assert_usable(client)


@pytest.mark.parametrize("message, mentions", [
    ({"data": {}}, "'action'"),
    ({"action": "", "data": {}}, "'action'"),
    ({"action": 5, "data": {}}, "'action'"),
    ({"action": "server_info", "data": [1]}, "'data'"),
    ({"action": "server_info", "data": "x"}, "'data'"),
    ({"action": "server_info", "username": 3, "token": "t"}, "'username'"),
    ({"action": "server_info", "username": "admin", "token": ["t"]}, "'token'"),
])
async def test_invalid_envelope_is_400_naming_the_field_with_request_id(server, message, mentions):
    async with server.connect() as client:
        reply = await raw_request(client, {**message, "request_id": "rid"})
        assert_error_envelope(reply, 400, mentions)
        assert reply["request_id"] == "rid"
        await assert_usable(client)


async def test_data_may_be_omitted_or_null(server):
    async with server.connect() as client:
        assert (await raw_request(client, {"action": "server_info", "data": None}))["code"] == 200
        assert (await raw_request(client, {"action": "server_info"}))["code"] == 200


async def test_unknown_action_is_400_naming_it_even_without_credentials(server, admin):
    async with server.connect() as anonymous:
        await expect_error(anonymous, "frobnicate", code=400, mentions="'frobnicate'")
    await expect_error(admin, "frobnicate", code=400, mentions="unknown action 'frobnicate'")


@pytest.mark.parametrize("data, mentions", [
    ({"username": "admin"}, "missing field 'data.password'"),
    ({"password": "x"}, "missing field 'data.username'"),
    ({"username": 5, "password": "x"}, "'data.username' must be a string"),
    ({"username": "admin", "password": None}, "'data.password' must be a string"),
    ({"username": "", "password": "x"}, "'data.username'"),
    ({"username": "admin", "password": "x", "extra": 1}, "unknown field 'data.extra'"),
])
async def test_login_schema_violations_name_the_field(server, data, mentions):
    async with server.connect() as client:
        await expect_error(client, "login", data, code=400, mentions=mentions)


async def test_schema_violations_on_authenticated_actions(admin):
    await expect_error(admin, "view_audit_logs", {"limit": "ten"}, code=400,
                       mentions="'data.limit' must be an integer")
    await expect_error(admin, "view_audit_logs", {"limit": 0}, code=400, mentions="'data.limit'")
    await expect_error(admin, "view_audit_logs", {"limit": True}, code=400,
                       mentions="'data.limit'")
    await expect_error(admin, "create_group", {"name": "g", "permissions": "list_users"},
                       code=400, mentions="'data.permissions' must be a list")
    await expect_error(admin, "delete_user", {}, code=400, mentions="missing field 'data.username'")
    await expect_error(admin, "list_users", {"verbose": True}, code=400,
                       mentions="unknown field 'data.verbose'")


async def test_text_message_over_message_limit_is_413_and_connection_stays_usable(start_server):
    server = await start_server(limits=Limits(message_bytes=1024))
    async with server.connect("admin") as client:
        big = json.dumps({"action": "server_info", "data": {}, "pad": "x" * 2000})
        assert_error_envelope(await raw_request(client, big), 413, "1024 bytes")
        # The limit counts bytes, not characters: 600 two-byte characters are 1200 bytes.
        wide = json.dumps({"action": "server_info", "pad": "é" * 600}, ensure_ascii=False)
        assert len(wide) < 1024 < len(wide.encode())
        assert_error_envelope(await raw_request(client, wide), 413, "1024 bytes")
        await assert_usable(client)
        assert (await client.call("list_users"))["users"]


async def test_frame_over_websocket_limit_closes_with_1009_and_others_keep_working(start_server):
    server = await start_server(limits=Limits(message_bytes=1024, transfer_chunk_bytes=1024))
    async with server.connect("admin") as bystander:
        async with open_websocket_url(server.url, ssl_context=server.ssl_context) as ws:
            with trio.fail_after(IO_TIMEOUT_S):
                await ws.send_message("x" * 200_000)
                with pytest.raises(ConnectionClosed) as caught:
                    await ws.get_message()
            assert caught.value.reason.code == 1009
        await assert_usable(bystander)
        assert (await bystander.call("list_users"))["users"]


async def test_binary_message_outside_a_transfer_is_400(server):
    async with server.connect() as client:
        assert_error_envelope(await raw_request(client, b"\x00\x01binary"), 400, "binary")
        await assert_usable(client)


async def test_requests_on_one_connection_are_answered_in_order(server):
    async with server.connect("admin") as client:
        actions = ["server_info", "list_users", "nope", "list_groups", "server_info"] * 4
        with trio.fail_after(IO_TIMEOUT_S):
            for number, action in enumerate(actions):
                await client.send_raw(json.dumps({
                    "action": action, "request_id": number, "username": "admin",
                    "token": client.token}))
            replies = [await client.receive_reply() for _ in actions]
    assert [r["request_id"] for r in replies] == list(range(len(actions)))
    assert [r["code"] for r in replies] == [400 if a == "nope" else 200 for a in actions]


async def test_unexpected_failure_is_500_with_log_reference_only(server, admin, monkeypatch,
                                                                 caplog):
    def broken(m):
        raise RuntimeError("disk on fire at /srv/secret/cfms.db")

    monkeypatch.setattr(accounts_storage, "list_users", broken)
    reply = await raw_request(admin, {"action": "list_users", "username": "admin",
                                      "token": admin.token, "request_id": "boom"})
    assert_error_envelope(reply, 500, "log reference")
    assert reply["request_id"] == "boom"
    assert "secret" not in json.dumps(reply) and "Traceback" not in json.dumps(reply)
    reference = reply["message"].rsplit(" ", 1)[-1].rstrip(")")
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)
    await assert_usable(admin)


# -- authentication -------------------------------------------------------------------------


async def test_login_returns_token_expiry_nickname_permissions_groups(server):
    async with server.connect() as client:
        data = await client.login("admin", ADMIN_PASSWORD)
    assert isinstance(data["token"], str) and len(data["token"]) >= 32
    assert time.time() + server.settings.token_ttl_s - 60 < data["exp"] <= (
        time.time() + server.settings.token_ttl_s)
    assert data["nickname"] == "Administrator"
    assert data["groups"] == ["sysop", "user"]
    assert {"import_backup", "export_backup", "list_users", "view_audit_logs"} <= set(
        data["permissions"])


async def test_wrong_password_and_unknown_user_are_both_401(server):
    async with server.connect() as client:
        wrong = await expect_error(client, "login", {"username": "admin", "password": "nope"},
                                   code=401)
        unknown = await expect_error(client, "login", {"username": "ghost", "password": "nope"},
                                     code=401)
        # Same answer either way: the reply does not tell which accounts exist.
        assert wrong.message == unknown.message == "wrong username or password"
        await assert_usable(client)


async def test_failed_login_does_not_block_other_connections(start_server):
    server = await start_server(login_failure_delay_s=3)
    async with server.connect("admin") as other, server.connect() as guesser:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                expect_error, guesser, "login", {"username": "admin", "password": "nope"},
                code=401))
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)  # the guess is pending
            with trio.fail_after(2):
                assert (await other.call("list_users"))["users"]
            nursery.cancel_scope.cancel()


async def test_missing_or_bad_credentials_401_but_missing_permission_403(server, admin):
    await make_user(admin, "bob")
    async with server.connect() as anonymous:
        await expect_error(anonymous, "list_users", code=401, mentions="'token'")
        reply = await raw_request(anonymous, {"action": "list_users", "username": "admin",
                                              "token": "forged", "request_id": 1})
        assert_error_envelope(reply, 401, "invalid or expired token")
        # A real token presented under another username is no good either.
        reply = await raw_request(anonymous, {"action": "list_users", "username": "bob",
                                              "token": admin.token})
        assert_error_envelope(reply, 401)
    async with server.connect("bob", USER_PASSWORD) as bob:
        await expect_error(bob, "list_users", code=403, mentions="'list_users'")


async def test_expired_token_is_401(start_server):
    server = await start_server(token_ttl_s=0.5)
    async with server.connect("admin") as client:
        assert await client.call("list_users")
        await trio.sleep(0.6)
        await expect_error(client, "list_users", code=401, mentions="expired")


async def test_refresh_token_issues_a_new_token_and_retires_the_old(server, admin):
    old = admin.token
    data = await admin.call("refresh_token")
    assert data["token"] != old and data["groups"] == ["sysop", "user"]
    admin.token = data["token"]
    assert await admin.call("list_users")
    admin.token = old
    await expect_error(admin, "list_users", code=401)


async def test_logout_invalidates_the_token(server, admin):
    async with server.connect("admin") as second:
        await admin.call("logout")
        await expect_error(admin, "list_users", code=401)
        # Other sessions of the same user are untouched.
        assert await second.call("list_users")


async def test_set_passwd_own_with_old_password(server, admin):
    await make_user(admin, "bob")
    async with server.connect("bob", USER_PASSWORD) as bob:
        await expect_error(bob, "set_passwd", {"old_password": "wrong-old", "new_password":
                                               "brand-new-pass"}, code=401, mentions="old password")
        assert await bob.call("get_user_info")  # a wrong guess does not end the session
        await expect_error(bob, "set_passwd", {"new_password": "brand-new-pass"}, code=400,
                           mentions="'data.old_password'")
        await expect_error(bob, "set_passwd", {"old_password": USER_PASSWORD,
                                               "new_password": "short"},
                           code=400, mentions="'data.new_password'")
        await bob.call("set_passwd", {"old_password": USER_PASSWORD,
                                      "new_password": "brand-new-pass"})
        # A password change ends the user's sessions, this one included.
        await expect_error(bob, "get_user_info", code=401)
        await expect_error(bob, "login", {"username": "bob", "password": USER_PASSWORD},
                           code=401)
        await bob.login("bob", "brand-new-pass")
        assert (await bob.call("get_user_info"))["username"] == "bob"


async def test_set_passwd_needs_the_permission_for_ones_own_password(server, admin):
    await make_user(admin, "nopass", groups=())
    async with server.connect("nopass", USER_PASSWORD) as user:
        await expect_error(user, "set_passwd", {"old_password": USER_PASSWORD,
                                                "new_password": "brand-new-pass"},
                           code=403, mentions="'set_passwd'")


async def test_admin_resets_another_password_and_ends_their_sessions(server, admin):
    await make_user(admin, "bob")
    await make_user(admin, "carol")
    async with server.connect("bob", USER_PASSWORD) as bob:
        await expect_error(bob, "set_passwd", {"username": "carol",
                                               "new_password": "taken-over-pass"},
                           code=403, mentions="'super_set_passwd'")
        await expect_error(bob, "set_passwd", {"username": "carol", "old_password": USER_PASSWORD,
                                               "new_password": "taken-over-pass"},
                           code=403, mentions="'super_set_passwd'")
        await admin.call("set_passwd", {"username": "bob", "new_password": "reset-by-admin"})
        await expect_error(bob, "get_user_info", code=401)
        await bob.login("bob", "reset-by-admin")
    await expect_error(admin, "set_passwd", {"username": "ghost", "new_password": "whatever-1"},
                       code=404, mentions="'ghost'")
    async with server.connect("carol", USER_PASSWORD) as carol:  # carol was never changed
        assert (await carol.call("get_user_info"))["username"] == "carol"


# -- users and groups -----------------------------------------------------------------------


async def test_create_list_and_delete_users(server, admin):
    await admin.call("create_user", {"username": "bob", "password": USER_PASSWORD,
                                     "nickname": "Bobby", "groups": ["user"],
                                     "permissions": ["list_users"]})
    users = {u["username"]: u for u in (await admin.call("list_users"))["users"]}
    assert set(users) == {"admin", "bob"}
    bob = users["bob"]
    assert bob["nickname"] == "Bobby" and bob["groups"] == ["user"]
    assert bob["permissions"] == ["list_users"]
    assert "list_users" in bob["effective_permissions"]
    assert "create_document" in bob["effective_permissions"]  # from the user group
    assert "password_hash" not in bob and not any("scrypt" in str(v) for v in bob.values())

    await expect_error(admin, "create_user", {"username": "bob", "password": USER_PASSWORD},
                       code=409, mentions="'bob'")
    await expect_error(admin, "create_user", {"username": "eve", "password": USER_PASSWORD,
                                              "groups": ["nosuchgroup"]},
                       code=404, mentions="'nosuchgroup'")
    await expect_error(admin, "create_user", {"username": "eve", "password": USER_PASSWORD,
                                              "permissions": ["fly"]},
                       code=400, mentions="'data.permissions'")
    await expect_error(admin, "create_user", {"username": "eve", "password": "short"},
                       code=400, mentions="'data.password'")
    assert {u["username"] for u in (await admin.call("list_users"))["users"]} == {"admin", "bob"}

    async with server.connect("bob", USER_PASSWORD) as bob_client:
        await admin.call("delete_user", {"username": "bob"})
        await expect_error(bob_client, "get_user_info", code=401)  # sessions end with the user
        await expect_error(bob_client, "login", {"username": "bob", "password": USER_PASSWORD},
                           code=401)
    await expect_error(admin, "delete_user", {"username": "bob"}, code=404, mentions="'bob'")
    await expect_error(admin, "delete_user", {"username": "admin"}, code=400, mentions="own")
    assert [u["username"] for u in (await admin.call("list_users"))["users"]] == ["admin"]


async def test_user_management_needs_permissions(server, admin):
    await make_user(admin, "bob")
    async with server.connect("bob", USER_PASSWORD) as bob:
        await expect_error(bob, "create_user", {"username": "x", "password": USER_PASSWORD},
                           code=403, mentions="'create_user'")
        await expect_error(bob, "delete_user", {"username": "admin"}, code=403,
                           mentions="'delete_user'")
        for action in ("list_groups", "view_audit_logs"):
            await expect_error(bob, action, code=403, mentions=f"'{action}'")
        await expect_error(bob, "create_group", {"name": "g"}, code=403)
        await expect_error(bob, "delete_group", {"name": "user"}, code=403)
        await expect_error(bob, "change_user_groups", {"username": "bob", "groups": ["sysop"]},
                           code=403)
        await expect_error(bob, "set_group_permissions", {"name": "user", "permissions": []},
                           code=403)
    assert "sysop" not in (await admin.call("get_user_info", {"username": "bob"}))["groups"]


async def test_get_user_info_self_and_others(server, admin):
    await make_user(admin, "bob")
    await make_user(admin, "carol")
    async with server.connect("bob", USER_PASSWORD) as bob:
        me = await bob.call("get_user_info")
        assert me["username"] == "bob" and me["groups"] == ["user"]
        assert (await bob.call("get_user_info", {"username": "bob"}))["username"] == "bob"
        await expect_error(bob, "get_user_info", {"username": "carol"}, code=403,
                           mentions="'list_users'")
    carol = await admin.call("get_user_info", {"username": "carol"})
    assert carol["username"] == "carol" and isinstance(carol["created_time"], float)
    await expect_error(admin, "get_user_info", {"username": "ghost"}, code=404,
                       mentions="'ghost'")


async def test_groups_lifecycle_and_effect_on_permissions(server, admin):
    await make_user(admin, "bob")
    async with server.connect("bob", USER_PASSWORD) as bob:
        await expect_error(bob, "view_audit_logs", code=403)

        assert await admin.call("create_group", {"name": "auditors",
                                                 "permissions": ["view_audit_logs"]}) == {
            "name": "auditors"}
        await expect_error(admin, "create_group", {"name": "auditors"}, code=409,
                           mentions="'auditors'")
        await expect_error(admin, "create_group", {"name": "bad", "permissions": ["fly"]},
                           code=400, mentions="'data.permissions'")
        changed = await admin.call("change_user_groups", {"username": "bob",
                                                          "groups": ["user", "auditors"]})
        assert changed == {"username": "bob", "groups": ["auditors", "user"]}
        await expect_error(admin, "change_user_groups", {"username": "ghost", "groups": []},
                           code=404, mentions="'ghost'")
        await expect_error(admin, "change_user_groups", {"username": "bob",
                                                         "groups": ["nosuchgroup"]},
                           code=404, mentions="'nosuchgroup'")
        await expect_error(admin, "change_user_groups", {"username": "bob", "groups": [""]},
                           code=400, mentions="'data.groups'")
        # A failed change leaves membership as it was.
        assert (await admin.call("get_user_info", {"username": "bob"}))["groups"] == [
            "auditors", "user"]

        login = await bob.login("bob", USER_PASSWORD)
        assert "auditors" in login["groups"] and "view_audit_logs" in login["permissions"]
        assert "entries" in await bob.call("view_audit_logs")

        await admin.call("set_group_permissions", {"name": "auditors",
                                                   "permissions": ["list_groups"]})
        await expect_error(admin, "set_group_permissions", {"name": "ghosts",
                                                            "permissions": []}, code=404)
        await expect_error(admin, "set_group_permissions", {"name": "auditors",
                                                            "permissions": ["fly"]},
                           code=400, mentions="'data.permissions'")
        login = await bob.login("bob", USER_PASSWORD)
        assert "view_audit_logs" not in login["permissions"]
        assert "list_groups" in login["permissions"]
        await expect_error(bob, "view_audit_logs", code=403)
        groups = {g["name"]: g for g in (await bob.call("list_groups"))["groups"]}
        assert groups["auditors"]["members"] == ["bob"]
        assert groups["auditors"]["permissions"] == ["list_groups"]

        await admin.call("delete_group", {"name": "auditors"})
        await expect_error(admin, "delete_group", {"name": "auditors"}, code=404)
        login = await bob.login("bob", USER_PASSWORD)
        assert login["groups"] == ["user"] and "list_groups" not in login["permissions"]


async def test_sysop_group_cannot_be_deleted(admin):
    await expect_error(admin, "delete_group", {"name": "sysop"}, code=409, mentions="'sysop'")
    groups = {g["name"] for g in (await admin.call("list_groups"))["groups"]}
    assert "sysop" in groups


# -- audit ----------------------------------------------------------------------------------


async def test_state_changing_actions_leave_audit_entries(server, admin):
    async with server.connect() as anonymous:
        await expect_error(anonymous, "login", {"username": "admin", "password": "guess"},
                           code=401)
    await make_user(admin, "bob")
    await expect_error(admin, "delete_user", {"username": "ghost"}, code=404)
    await admin.call("create_group", {"name": "team"})
    async with server.connect("bob", USER_PASSWORD) as bob:
        await expect_error(bob, "delete_user", {"username": "admin"}, code=403)
        await expect_error(bob, "view_audit_logs", code=403, mentions="'view_audit_logs'")
        await bob.call("logout")

    log = await admin.call("view_audit_logs", {"limit": 1000})
    assert log["total"] == len(log["entries"])
    assert all(e["address"] == "127.0.0.1" for e in log["entries"])
    assert all(isinstance(e["time"], float) for e in log["entries"])
    assert audit_entries(log, action="login", username="admin", target="admin", result=200)
    assert audit_entries(log, action="login", target="admin", result=401)
    assert audit_entries(log, action="login", username="bob", target="bob", result=200)
    assert audit_entries(log, action="create_user", username="admin", target="bob", result=200)
    assert audit_entries(log, action="delete_user", username="admin", target="ghost",
                         result=404)
    assert audit_entries(log, action="create_group", username="admin", target="team",
                         result=200)
    assert audit_entries(log, action="delete_user", username="bob", result=403)
    assert audit_entries(log, action="logout", username="bob", result=200)
    # Reads are not audited.
    assert not audit_entries(log, action="view_audit_logs")
    assert not audit_entries(log, action="list_users")
    # Newest first, and filterable.
    ids = [e["id"] for e in log["entries"]]
    assert ids == sorted(ids, reverse=True)
    only_bob = await admin.call("view_audit_logs", {"username": "bob"})
    assert only_bob["entries"] and all(e["username"] == "bob" for e in only_bob["entries"])
    logins = await admin.call("view_audit_logs", {"action": "login", "limit": 1, "offset": 1})
    assert len(logins["entries"]) == 1 and logins["total"] == 3


# -- events ---------------------------------------------------------------------------------


async def publish(server, name: str, data: dict, visible_to=lambda principal: True) -> int:
    return await server.app.hub.deliver(protocol.event(name, data), visible_to=visible_to)


async def listener_count(server) -> int:
    """Listeners the hub holds, counted by a publish that asks about each and sends to none."""
    asked = []
    await server.app.hub.deliver(protocol.event("probe", {}), visible_to=lambda p: asked.append(p))
    return len(asked)


async def test_register_listener_requires_authentication(server):
    async with server.connect() as client:
        await expect_error(client, "register_listener", code=401)
    assert (await listener_count(server)) == 0


async def test_events_reach_only_listeners_allowed_to_see_them(server, admin):
    await make_user(admin, "alice")
    await make_user(admin, "bob")
    async with server.connect("alice", USER_PASSWORD) as alice, \
            server.connect("bob", USER_PASSWORD) as bob:
        assert await alice.listen() == {"listening": True}
        await bob.listen()
        await expect_error(bob, "register_listener", code=409)
        delivered = await publish(server, "secret", {"n": 1},
                            visible_to=lambda p: p.username == "alice")
        assert delivered == 1
        assert (await publish(server, "public", {"n": 2})) == 2
        with trio.fail_after(IO_TIMEOUT_S):
            assert await alice.next_event() == {"action": "secret", "data": {"n": 1}}
            assert await alice.next_event() == {"action": "public", "data": {"n": 2}}
            # bob's first event is the public one: the secret one never reached him.
            assert await bob.next_event() == {"action": "public", "data": {"n": 2}}
        # Events do not disturb request/response pairing.
        assert (await bob.call("get_user_info"))["username"] == "bob"


async def test_events_are_not_delivered_before_register_listener(server, admin):
    assert (await publish(server, "early", {})) == 0
    await admin.call("server_info")
    assert admin.events_nowait() == []
    await admin.listen()
    assert (await publish(server, "late", {"n": 1})) == 1
    with trio.fail_after(IO_TIMEOUT_S):
        assert await admin.next_event() == {"action": "late", "data": {"n": 1}}


async def test_closed_listener_is_unregistered(server, admin):
    async with server.connect("admin") as listener:
        await listener.listen()
        assert (await listener_count(server)) == 1
    with trio.fail_after(IO_TIMEOUT_S):
        while await listener_count(server):
            await trio.sleep(0.01)
    assert (await publish(server, "nobody", {})) == 0


def server_side_open(server, client_port: int) -> bool:
    """Whether the server still holds its end of the TCP connection from `client_port` (server
    and test share this process)."""
    return any(c.laddr and c.raddr and c.laddr.port == server.running.port
               and c.raddr.port == client_port
               for c in psutil.Process().net_connections(kind="tcp"))


async def test_slow_listener_is_dropped_and_others_receive_every_event(start_server):
    server = await start_server(limits=Limits(listener_queue_events=4))
    padding = "x" * 64 * 1024  # large events fill the slow client's socket buffers quickly
    async with server.connect("admin") as fast:
        await fast.listen()
        async with open_websocket_url(server.url, ssl_context=server.ssl_context) as slow:
            with trio.fail_after(IO_TIMEOUT_S):
                await slow.send_message(json.dumps({"action": "login", "data": {
                    "username": "admin", "password": ADMIN_PASSWORD}}))
                token = json.loads(await slow.get_message())["data"]["token"]
                await slow.send_message(json.dumps({"action": "register_listener",
                                                    "username": "admin", "token": token}))
                assert json.loads(await slow.get_message())["code"] == 200
            assert server_side_open(server, slow.local.port)
            # From here on `slow` reads nothing, like a frozen client.
            sent = 0
            with trio.fail_after(30):
                while True:
                    delivered = await publish(server, "tick", {"seq": sent, "padding": padding})
                    assert (await fast.next_event("tick"))["data"]["seq"] == sent
                    sent += 1
                    if delivered == 1:
                        break  # the slow listener was dropped
                    assert sent < 5000, "the slow listener was never dropped"
                for _ in range(10):
                    assert (await publish(server, "tick", {"seq": sent})) == 1
                    assert (await fast.next_event("tick"))["data"]["seq"] == sent
                    sent += 1
            assert (await listener_count(server)) == 1
            # The server hangs up on the dropped listener although it never reads again.
            with trio.fail_after(IO_TIMEOUT_S):
                while server_side_open(server, slow.local.port):
                    await trio.sleep(0.05)
                # What reached the client before the drop, then the end.
                received = 0
                with pytest.raises(ConnectionClosed):
                    while True:
                        await slow.get_message()
                        received += 1
            assert received < sent
        await assert_usable(fast)


# -- clients and hostile connections --------------------------------------------------------


async def test_client_written_from_the_spec_alone(server, admin):
    await make_user(admin, "bob")
    async with open_websocket_url(server.url, ssl_context=server.ssl_context) as ws:
        with trio.fail_after(IO_TIMEOUT_S):
            await ws.send_message(json.dumps({
                "action": "login", "data": {"username": "admin", "password": ADMIN_PASSWORD},
                "request_id": "login-1"}))
            login = json.loads(await ws.get_message())
            assert login["code"] == 200 and login["message"] == "success"
            assert login["request_id"] == "login-1"
            await ws.send_message(json.dumps({
                "action": "list_users", "data": {}, "username": "admin",
                "token": login["data"]["token"], "request_id": 2}))
            users = json.loads(await ws.get_message())
    assert users["code"] == 200 and users["request_id"] == 2
    assert [u["username"] for u in users["data"]["users"]] == ["admin", "bob"]


def local_port(stream) -> int:
    while not isinstance(stream, trio.SocketStream):
        stream = stream.transport_stream
    return stream.socket.getsockname()[1]


async def test_bad_connections_never_disturb_another(server, admin, caplog):
    caplog.set_level(logging.WARNING)
    port = server.running.port
    bad_ports = []  # client ports of the connections that completed the WebSocket handshake
    with trio.fail_after(IO_TIMEOUT_S):
        # Plain garbage on the TLS port.
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        await tcp.send_all(b"\x00garbage\r\n\r\n" * 100)
        await tcp.aclose()
        await assert_usable(admin)

        # TLS, then garbage instead of an HTTP upgrade.
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, server.ssl_context, server_hostname="127.0.0.1")
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\xff" * 1000)
        await trio.aclose_forcefully(stream)
        await assert_usable(admin)

        # A WebSocket message cut off mid-frame by an abrupt close.
        stream, ws = await open_raw_tls_websocket(server)
        bad_ports.append(local_port(stream))
        frame = ws.send(wsproto.events.TextMessage(data=json.dumps(
            {"action": "server_info", "pad": "y" * 5000})))
        await stream.send_all(frame[:len(frame) // 2])
        await trio.aclose_forcefully(stream)
        await assert_usable(admin)

        # A message cut off between fragments.
        stream, ws = await open_raw_tls_websocket(server)
        bad_ports.append(local_port(stream))
        await stream.send_all(ws.send(wsproto.events.TextMessage(
            data='{"action": "server', message_finished=False)))
        await trio.aclose_forcefully(stream)
        await assert_usable(admin)

        # Invalid UTF-8 in a text frame: the server closes that connection (1007) only.
        stream, ws = await open_raw_tls_websocket(server)
        bad_ports.append(local_port(stream))
        frame = bytearray(ws.send(wsproto.events.BytesMessage(data=b"\xff\xfe\xfd")))
        frame[0] = 0x81  # FIN + text opcode
        await stream.send_all(bytes(frame))
        assert await receive_close_code(stream, ws) in (1007, None)
        await trio.aclose_forcefully(stream)

        # A request sent and the connection dropped before the answer could be sent.
        stream, ws = await open_raw_tls_websocket(server)
        bad_ports.append(local_port(stream))
        await stream.send_all(ws.send(wsproto.events.TextMessage(data=json.dumps(
            {"action": "login", "data": {"username": "admin", "password": "nope"}}))))
        await trio.aclose_forcefully(stream)

        # Wait until the server has finished with every bad WebSocket connection (failed
        # handshakes linger until the handshake timeout), then check that it logged no failure
        # and still serves the good ones.
        while any(server_side_open(server, p) for p in bad_ports):
            await trio.sleep(0.02)
        await assert_usable(admin)
        assert (await admin.call("list_users"))["users"]
        async with server.connect("admin") as fresh:
            assert (await fresh.call("list_groups"))["groups"]
    failures = [r for r in caplog.records
                if r.name.startswith("cfms_trio") and r.levelno >= logging.ERROR]
    assert failures == []
