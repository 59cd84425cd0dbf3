"""Issue 12, items 1-4: privilege and access, attacked through a running server.

1. A caller may grant only what it holds itself: groups it is a member of (sysop members hold
   everything) and permissions it has. create_user, change_user_groups, set_group_permissions
   and create_group are each checked; a refusal is 403 naming what was refused and changes
   nothing.
2. No change may leave the server without an active member of `sysop` holding every
   permission: 409, store unchanged, the administrator still administers.
3. Events go to who may see them at publish time: a listener that lost `import_backup`, logged
   out or was deleted receives no `backup_import_completed`.
4. The pending import of a deleted user is closed, and a new account with the same name can
   neither read nor start it.
"""

from __future__ import annotations

import pytest
import trio

from cfms_trio.client import ClientError
from cfms_trio.conventions import ALL_PERMISSIONS, DEFAULT_USER_PERMISSIONS

from helpers import ADMIN_PASSWORD, USER_PASSWORD, make_user

from .support import COMPLETED_EVENT

pytestmark = pytest.mark.timeout(60)

IO_TIMEOUT_S = 10
# How long a listener that should get nothing is given after the control listener got it.
SILENCE_S = 0.5


async def refused(client, action: str, data: dict, code: int, mentions: str = "") -> str:
    with trio.fail_after(IO_TIMEOUT_S):
        with pytest.raises(ClientError) as caught:
            await client.call(action, data)
    assert caught.value.code == code, caught.value
    assert mentions in caught.value.message, caught.value.message
    return caught.value.message


async def user_names(admin) -> list[str]:
    return [u["username"] for u in (await admin.call("list_users"))["users"]]


async def groups_by_name(admin) -> dict[str, dict]:
    return {g["name"]: g for g in (await admin.call("list_groups"))["groups"]}


async def groups_of(admin, username: str) -> list[str]:
    return (await admin.call("get_user_info", {"username": username}))["groups"]


# -- 1. escalation ------------------------------------------------------------------------------


async def test_create_user_grants_only_what_the_caller_holds(server, admin):
    await make_user(admin, "creator", permissions=["create_user"])
    async with server.connect("creator", USER_PASSWORD) as creator:
        await refused(creator, "create_user", {"username": "evil-sysop", "password": "x" * 12,
                                               "groups": ["sysop"]}, 403, "'sysop'")
        await refused(creator, "create_user", {"username": "evil-super", "password": "x" * 12,
                                               "groups": ["user"],
                                               "permissions": ["super_set_passwd"]},
                      403, "'super_set_passwd'")
        # What the caller holds itself it may hand on: its group, its own and its group's rights.
        await creator.call("create_user", {"username": "helper", "password": "x" * 12,
                                           "groups": ["user"],
                                           "permissions": ["create_user", "create_document"]})
    names = await user_names(admin)
    assert "evil-sysop" not in names and "evil-super" not in names
    assert await groups_of(admin, "helper") == ["user"]
    async with server.connect() as outsider:
        await refused(outsider, "login", {"username": "evil-sysop", "password": "x" * 12}, 401)
    # A sysop member holds everything, so it may grant everything.
    await admin.call("create_user", {"username": "second-admin", "password": "x" * 12,
                                     "groups": ["sysop"], "permissions": ["super_set_passwd"]})


async def test_change_user_groups_grants_only_groups_the_caller_is_in(server, admin):
    await admin.call("create_group", {"name": "auditors", "permissions": ["view_audit_logs"]})
    await make_user(admin, "grouper", permissions=["change_user_groups"])
    await make_user(admin, "bob", groups=())
    async with server.connect("grouper", USER_PASSWORD) as grouper:
        await refused(grouper, "change_user_groups",
                      {"username": "grouper", "groups": ["user", "sysop"]}, 403, "'sysop'")
        await refused(grouper, "change_user_groups",
                      {"username": "bob", "groups": ["sysop"]}, 403, "'sysop'")
        await refused(grouper, "change_user_groups",
                      {"username": "bob", "groups": ["user", "auditors"]}, 403, "'auditors'")
        assert await groups_of(admin, "grouper") == ["user"]
        assert await groups_of(admin, "bob") == []
        await grouper.call("change_user_groups", {"username": "bob", "groups": ["user"]})
    assert await groups_of(admin, "bob") == ["user"]


async def test_set_group_permissions_grants_only_what_the_caller_holds(server, admin):
    await admin.call("create_group", {"name": "team", "permissions": []})
    await make_user(admin, "perms", permissions=["set_group_permissions"])
    async with server.connect("perms", USER_PASSWORD) as perms:
        await refused(perms, "set_group_permissions",
                      {"name": "user",
                       "permissions": [*DEFAULT_USER_PERMISSIONS, "super_set_passwd"]},
                      403, "'super_set_passwd'")
        await refused(perms, "set_group_permissions",
                      {"name": "team", "permissions": ["create_document", "list_users"]},
                      403, "'list_users'")
        groups = await groups_by_name(admin)
        assert groups["user"]["permissions"] == sorted(DEFAULT_USER_PERMISSIONS)
        assert groups["team"]["permissions"] == []
        await perms.call("set_group_permissions",
                         {"name": "team", "permissions": ["create_document",
                                                          "set_group_permissions"]})
    groups = await groups_by_name(admin)
    assert groups["team"]["permissions"] == ["create_document", "set_group_permissions"]


async def test_create_group_grants_only_what_the_caller_holds(server, admin):
    await make_user(admin, "maker", permissions=["create_group"])
    async with server.connect("maker", USER_PASSWORD) as maker:
        await refused(maker, "create_group",
                      {"name": "takeover", "permissions": ["create_document", "super_set_passwd"]},
                      403, "'super_set_passwd'")
        await maker.call("create_group", {"name": "writers", "permissions": ["create_document"]})
    groups = await groups_by_name(admin)
    assert "takeover" not in groups
    assert groups["writers"]["permissions"] == ["create_document"]


# -- 2. lock-out --------------------------------------------------------------------------------


async def assert_admin_administers(server) -> None:
    """A fresh login as admin still works and may administer."""
    async with server.connect("admin") as fresh:
        assert "sysop" in await groups_of(fresh, "admin")
        assert "admin" in await user_names(fresh)
        groups = await groups_by_name(fresh)
        assert groups["sysop"]["permissions"] == sorted(ALL_PERMISSIONS)


async def test_the_last_administrator_cannot_be_locked_out(server, admin):
    await refused(admin, "set_group_permissions", {"name": "sysop", "permissions": []},
                  409, "'sysop'")
    await refused(admin, "set_group_permissions",
                  {"name": "sysop", "permissions": [p for p in ALL_PERMISSIONS
                                                    if p != "super_set_passwd"]},
                  409, "'sysop'")
    await refused(admin, "change_user_groups", {"username": "admin", "groups": ["user"]},
                  409, "'sysop'")
    await make_user(admin, "remover", permissions=["delete_user"])
    async with server.connect("remover", USER_PASSWORD) as remover:
        await refused(remover, "delete_user", {"username": "admin"}, 409, "'sysop'")
    await assert_admin_administers(server)


async def test_a_second_administrator_allows_the_first_to_go(server, admin):
    await admin.call("create_user", {"username": "admin2", "password": ADMIN_PASSWORD,
                                     "groups": ["sysop"]})
    await admin.call("change_user_groups", {"username": "admin", "groups": ["user"]})
    async with server.connect("admin2") as admin2:
        # admin2 is now the last one: it may not demote itself, but it may delete admin.
        await refused(admin2, "change_user_groups", {"username": "admin2", "groups": []},
                      409, "'sysop'")
        await admin2.call("delete_user", {"username": "admin"})
        assert "admin" not in await user_names(admin2)
        assert (await groups_by_name(admin2))["sysop"]["members"] == ["admin2"]


# -- 3. events after revocation -----------------------------------------------------------------


async def test_revoked_listeners_get_no_import_events(server, admin):
    await admin.call("create_group", {"name": "importers", "permissions": ["import_backup"]})
    for name in ("control", "demoted", "leaver", "deleted"):
        await make_user(admin, name, groups=["user", "importers"])
    async with server.connect("control", USER_PASSWORD) as control, \
            server.connect("demoted", USER_PASSWORD) as demoted, \
            server.connect("leaver", USER_PASSWORD) as leaver, \
            server.connect("deleted", USER_PASSWORD) as deleted:
        for client in (control, demoted, leaver, deleted):
            await client.listen()
        await admin.call("change_user_groups", {"username": "demoted", "groups": ["user"]})
        await leaver.call("logout")
        await admin.call("delete_user", {"username": "deleted"})
        # An import that times out after a second completes with a `timeout` event.
        init = await admin.call("initiate_backup_import", {"timeout_seconds": 1})
        with trio.fail_after(IO_TIMEOUT_S):
            event = await control.next_event(COMPLETED_EVENT)
        assert event["data"]["backup_task_id"] == init["backup_task_id"]
        assert event["data"]["status"] == "timeout"
        await trio.sleep(SILENCE_S)
        for name, client in (("demoted", demoted), ("leaver", leaver), ("deleted", deleted)):
            got = [e for e in client.events_nowait() if e.get("action") == COMPLETED_EVENT]
            assert got == [], f"{name} still received {got}"


# -- 4. a deleted user's import -----------------------------------------------------------------

TASK_CLOSE_TIMEOUT_S = 5


async def test_a_deleted_users_import_is_closed_and_not_inherited(server, admin):
    await make_user(admin, "temp", permissions=["import_backup"])
    async with server.connect("temp", USER_PASSWORD) as temp:
        init = await temp.call("initiate_backup_import", {"timeout_seconds": 600})
    task = {"backup_task_id": init["backup_task_id"]}
    await admin.call("delete_user", {"username": "temp"})
    with trio.fail_after(TASK_CLOSE_TIMEOUT_S):
        while (status := await admin.call("get_backup_import_status", task))["status"] \
                == "pending":
            await trio.sleep(0.05)
    assert status["status"] == "failed", status
    assert "deleted" in status["error_message"], status
    await make_user(admin, "temp", permissions=["import_backup"])
    async with server.connect("temp", USER_PASSWORD) as heir:
        for action in ("get_backup_import_status", "start_backup_import"):
            reply = await heir.request(action, task)
            assert reply["code"] in (403, 404, 409), (action, reply)
        for upload in (init["archive_task_id"], init["key_task_id"]):
            reply = await heir.request("upload_file", {"task_id": upload})
            assert reply["code"] in (403, 404, 409, 410), reply
        # The heir's own imports are not held back by the closed one.
        assert (await heir.call("initiate_backup_import", {}))["timeout"] == 3600
    assert (await admin.call("get_backup_import_status", task))["status"] == "failed"
