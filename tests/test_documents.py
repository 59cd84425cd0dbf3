"""The document store as a user sees it: folders, documents, revisions, permissions, access
rules and the audit trail (SPEC §4, §5)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from cfms_trio.client import ClientError

from helpers import USER_PASSWORD, make_user

TEST_DEADLINE_S = 20
SECRET_GROUP = "secret"


def group_rule(group: str) -> dict:
    """One access rule that requires membership of `group`."""
    return {"match": "all", "match_groups": [
        {"match": "all", "groups": {"match": "all", "require": [group]}}]}


def only_group(group: str, *access_types: str) -> dict:
    return {kind: [group_rule(group)] for kind in access_types}


async def expect_error(client, code: int, action: str, data: dict | None = None) -> str:
    """Call `action` and check it fails with `code`; return the error message."""
    with pytest.raises(ClientError) as info:
        await client.call(action, data)
    assert info.value.code == code, info.value
    return info.value.message


async def upload_bytes(client, task_id: str, content: bytes, tmp_path: Path) -> dict:
    source = tmp_path / f"upload-{os.urandom(4).hex()}"
    source.write_bytes(content)
    return await client.upload_file(task_id, source)


async def download_bytes(client, document_id: str, tmp_path: Path,
                         revision_id: str | None = None) -> bytes:
    request = {"document_id": document_id}
    if revision_id is not None:
        request["revision_id"] = revision_id
    ticket = await client.call("get_document", request)
    target = tmp_path / f"download-{os.urandom(4).hex()}"
    await client.download_file(ticket["task_id"], target)
    return target.read_bytes()


async def new_document(client, title: str, content: bytes | None, tmp_path: Path,
                       folder_id: str | None = None, access_rules: dict | None = None) -> dict:
    request = {"title": title, "folder_id": folder_id}
    if access_rules is not None:
        request["access_rules"] = access_rules
    created = await client.call("create_document", request)
    if content is not None:
        await upload_bytes(client, created["task_id"], content, tmp_path)
    return created


async def listing(client, folder_id: str | None = None) -> tuple[list[str], list[str]]:
    """(folder names, document titles) of a folder as `client` sees it."""
    listed = await client.call("list_directory", {"folder_id": folder_id})
    return ([f["name"] for f in listed["folders"]], [d["title"] for d in listed["documents"]])


def stored_files(root: Path) -> set[str]:
    files = root / "content" / "files"
    return {str(p.relative_to(files)) for p in files.rglob("*") if p.is_file()}


def stored_path(root: Path, file_id: str) -> Path:
    return root / "content" / "files" / file_id[:2] / file_id


# -- folders ----------------------------------------------------------------------------------

async def test_folder_create_list_info_rename_move_delete(admin):
    with trio.fail_after(TEST_DEADLINE_S):
        projects = await admin.call("create_directory", {"name": "projects"})
        archive = await admin.call("create_directory", {"name": "archive"})
        assert projects["parent_id"] is None and isinstance(projects["created_time"], float)
        alpha = await admin.call("create_directory", {"name": "alpha",
                                                      "parent_id": projects["id"]})
        assert alpha["parent_id"] == projects["id"]

        assert await listing(admin) == (["archive", "projects"], [])
        assert await listing(admin, projects["id"]) == (["alpha"], [])
        info = await admin.call("get_directory_info", {"folder_id": alpha["id"]})
        assert info["path"] == "/projects/alpha" and info["name"] == "alpha"

        renamed = await admin.call("rename_directory", {"folder_id": alpha["id"], "name": "beta"})
        assert renamed["name"] == "beta"
        info = await admin.call("get_directory_info", {"folder_id": alpha["id"]})
        assert info["path"] == "/projects/beta"

        moved = await admin.call("move_directory", {"folder_id": alpha["id"],
                                                    "parent_id": archive["id"]})
        assert moved["parent_id"] == archive["id"]
        assert await listing(admin, projects["id"]) == ([], [])
        assert await listing(admin, archive["id"]) == (["beta"], [])
        await admin.call("move_directory", {"folder_id": alpha["id"], "parent_id": None})
        assert await listing(admin) == (["archive", "beta", "projects"], [])

        await admin.call("delete_directory", {"folder_id": alpha["id"]})
        assert await listing(admin) == (["archive", "projects"], [])
        await expect_error(admin, 404, "get_directory_info", {"folder_id": alpha["id"]})
        await expect_error(admin, 404, "list_directory", {"folder_id": alpha["id"]})
        await expect_error(admin, 404, "delete_directory", {"folder_id": alpha["id"]})
        await expect_error(admin, 404, "create_directory", {"name": "x",
                                                            "parent_id": alpha["id"]})
        await expect_error(admin, 404, "move_directory", {"folder_id": projects["id"],
                                                          "parent_id": alpha["id"]})


async def test_sibling_names_are_unique(admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        top = await admin.call("create_directory", {"name": "top"})
        other = await admin.call("create_directory", {"name": "other"})
        await admin.call("create_directory", {"name": "same", "parent_id": top["id"]})
        await admin.call("create_directory", {"name": "same", "parent_id": other["id"]})
        await expect_error(admin, 409, "create_directory", {"name": "top"})
        await expect_error(admin, 409, "create_directory", {"name": "same",
                                                            "parent_id": top["id"]})
        await expect_error(admin, 409, "rename_directory", {"folder_id": other["id"],
                                                            "name": "top"})
        same_in_other = (await admin.call("list_directory",
                                          {"folder_id": other["id"]}))["folders"][0]
        await expect_error(admin, 409, "move_directory", {"folder_id": same_in_other["id"],
                                                          "parent_id": top["id"]})

        doc = await new_document(admin, "report", None, tmp_path, folder_id=top["id"])
        await new_document(admin, "report", None, tmp_path)  # same title, other folder: fine
        second = await new_document(admin, "draft", None, tmp_path, folder_id=top["id"])
        await expect_error(admin, 409, "create_document", {"title": "report",
                                                           "folder_id": top["id"]})
        await expect_error(admin, 409, "rename_document", {"document_id": second["document_id"],
                                                           "title": "report"})
        await expect_error(admin, 409, "move_document", {"document_id": doc["document_id"],
                                                         "folder_id": None})
        # a folder and a document may share a name: they are different kinds of children
        await admin.call("create_directory", {"name": "report", "parent_id": top["id"]})
        assert await listing(admin, top["id"]) == (["report", "same"], ["draft", "report"])


async def test_folder_cannot_move_under_itself_or_descendant(admin):
    with trio.fail_after(TEST_DEADLINE_S):
        a = await admin.call("create_directory", {"name": "a"})
        b = await admin.call("create_directory", {"name": "b", "parent_id": a["id"]})
        c = await admin.call("create_directory", {"name": "c", "parent_id": b["id"]})
        for target in (a, b, c):
            message = await expect_error(admin, 400, "move_directory",
                                         {"folder_id": a["id"], "parent_id": target["id"]})
            assert "descendant" in message
        await expect_error(admin, 400, "move_directory", {"folder_id": b["id"],
                                                          "parent_id": c["id"]})
        for folder, path in ((a, "/a"), (b, "/a/b"), (c, "/a/b/c")):
            info = await admin.call("get_directory_info", {"folder_id": folder["id"]})
            assert info["path"] == path
        # moving down the tree the other way round is fine
        await admin.call("move_directory", {"folder_id": c["id"], "parent_id": a["id"]})
        info = await admin.call("get_directory_info", {"folder_id": c["id"]})
        assert info["path"] == "/a/c"


async def test_recursive_delete_removes_everything_below(server, admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        keep = await new_document(admin, "keep", b"kept content", tmp_path)
        top = await admin.call("create_directory", {"name": "top"})
        mid = await admin.call("create_directory", {"name": "mid", "parent_id": top["id"]})
        leaf = await admin.call("create_directory", {"name": "leaf", "parent_id": mid["id"]})
        documents = [
            await new_document(admin, "in-top", b"top", tmp_path, folder_id=top["id"]),
            await new_document(admin, "in-leaf", b"leaf", tmp_path, folder_id=leaf["id"],
                               access_rules=only_group(SECRET_GROUP, "read")),
            await new_document(admin, "never-uploaded", None, tmp_path, folder_id=mid["id"]),
        ]
        second = await admin.call("upload_document",
                                  {"document_id": documents[0]["document_id"]})
        await upload_bytes(admin, second["task_id"], b"top v2", tmp_path)
        doomed_files = [d["file_id"] for d in documents[:2]] + [second["file_id"]]
        for file_id in doomed_files + [keep["file_id"]]:
            assert stored_path(server.root, file_id).is_file()

        await admin.call("delete_directory", {"folder_id": top["id"]})

        assert await listing(admin) == ([], ["keep"])
        for folder in (top, mid, leaf):
            await expect_error(admin, 404, "get_directory_info", {"folder_id": folder["id"]})
        for document in documents:
            await expect_error(admin, 404, "get_document_info",
                               {"document_id": document["document_id"]})
        for file_id in doomed_files:
            assert not stored_path(server.root, file_id).exists()
        assert stored_files(server.root) == {f"{keep['file_id'][:2]}/{keep['file_id']}"}
        assert await download_bytes(admin, keep["document_id"], tmp_path) == b"kept content"


async def test_recursive_delete_needs_write_access_to_everything_below(server, admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        await make_user(admin, "alice")
        top = await admin.call("create_directory", {"name": "shared"})
        guarded = await new_document(admin, "guarded", b"guarded", tmp_path,
                                     folder_id=top["id"],
                                     access_rules=only_group("sysop", "write"))
        async with server.connect("alice", USER_PASSWORD) as alice:
            assert await listing(alice, top["id"]) == ([], ["guarded"])
            await expect_error(alice, 403, "delete_directory", {"folder_id": top["id"]})
        info = await admin.call("get_document_info", {"document_id": guarded["document_id"]})
        assert info["current_revision"]["size"] == len(b"guarded")
        assert stored_path(server.root, guarded["file_id"]).is_file()


# -- documents and revisions -------------------------------------------------------------------

async def test_document_create_info_rename_move_delete(server, admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        folder = await admin.call("create_directory", {"name": "docs"})
        other = await admin.call("create_directory", {"name": "other"})
        created = await new_document(admin, "notes", b"hello", tmp_path, folder_id=folder["id"])
        assert set(created) == {"document_id", "revision_id", "file_id", "task_id"}

        listed = (await admin.call("list_directory", {"folder_id": folder["id"]}))["documents"]
        assert [(d["id"], d["title"], d["size"]) for d in listed] == [
            (created["document_id"], "notes", 5)]
        assert listed[0]["last_modified"] is not None

        info = await admin.call("get_document_info", {"document_id": created["document_id"]})
        assert info["title"] == "notes" and info["folder_id"] == folder["id"]
        assert info["revisions_count"] == 1
        assert info["current_revision"]["id"] == created["revision_id"]
        assert info["current_revision"]["sha256"] is not None

        renamed = await admin.call("rename_document", {"document_id": created["document_id"],
                                                       "title": "notes-v2"})
        assert renamed["title"] == "notes-v2"
        moved = await admin.call("move_document", {"document_id": created["document_id"],
                                                   "folder_id": other["id"]})
        assert moved["folder_id"] == other["id"]
        assert await listing(admin, folder["id"]) == ([], [])
        assert await listing(admin, other["id"]) == ([], ["notes-v2"])
        await admin.call("move_document", {"document_id": created["document_id"],
                                           "folder_id": None})
        assert await listing(admin) == (["docs", "other"], ["notes-v2"])
        await expect_error(admin, 404, "move_document", {"document_id": created["document_id"],
                                                         "folder_id": "no-such-folder"})

        assert stored_path(server.root, created["file_id"]).is_file()
        await admin.call("delete_document", {"document_id": created["document_id"]})
        assert not stored_path(server.root, created["file_id"]).exists()
        assert stored_files(server.root) == set()
        assert await listing(admin) == (["docs", "other"], [])
        for action in ("get_document_info", "list_revisions", "get_document", "delete_document"):
            await expect_error(admin, 404, action, {"document_id": created["document_id"]})


async def test_revisions_and_get_document(admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        blank = await new_document(admin, "blank", None, tmp_path)
        message = await expect_error(admin, 404, "get_document",
                                     {"document_id": blank["document_id"]})
        assert "no uploaded content" in message
        info = await admin.call("get_document_info", {"document_id": blank["document_id"]})
        assert info["current_revision"] is None

        first = await new_document(admin, "history", b"version one", tmp_path)
        second = await admin.call("upload_document", {"document_id": first["document_id"]})
        await upload_bytes(admin, second["task_id"], b"version two!", tmp_path)
        pending = await admin.call("upload_document", {"document_id": first["document_id"]})

        revisions = (await admin.call("list_revisions",
                                      {"document_id": first["document_id"]}))["revisions"]
        assert [r["id"] for r in revisions] == [first["revision_id"], second["revision_id"],
                                                pending["revision_id"]]
        assert [r["active"] for r in revisions] == [True, True, False]
        assert [r["size"] for r in revisions] == [11, 12, None]
        times = [r["created_time"] for r in revisions]
        assert times == sorted(times)

        # The current revision is the newest one with uploaded content.
        info = await admin.call("get_document_info", {"document_id": first["document_id"]})
        assert info["current_revision"]["id"] == second["revision_id"]
        assert info["revisions_count"] == 3
        ticket = await admin.call("get_document", {"document_id": first["document_id"]})
        assert ticket["revision_id"] == second["revision_id"] and ticket["file_size"] == 12
        assert await download_bytes(admin, first["document_id"], tmp_path) == b"version two!"
        assert await download_bytes(admin, first["document_id"], tmp_path,
                                    first["revision_id"]) == b"version one"
        await expect_error(admin, 404, "get_document", {"document_id": first["document_id"],
                                                        "revision_id": pending["revision_id"]})
        await expect_error(admin, 404, "get_document", {"document_id": first["document_id"],
                                                        "revision_id": "no-such-revision"})
        # a revision id of another document is not a revision of this one
        await expect_error(admin, 404, "get_document", {"document_id": blank["document_id"],
                                                        "revision_id": first["revision_id"]})

        await upload_bytes(admin, pending["task_id"], b"three", tmp_path)
        assert await download_bytes(admin, first["document_id"], tmp_path) == b"three"


async def test_schema_errors_name_the_field(admin):
    with trio.fail_after(TEST_DEADLINE_S):
        message = await expect_error(admin, 400, "create_directory", {})
        assert "data.name" in message
        message = await expect_error(admin, 400, "create_directory", {"name": ""})
        assert "data.name" in message
        message = await expect_error(admin, 400, "get_document_info", {"document_id": "../x"})
        assert "data.document_id" in message
        message = await expect_error(admin, 400, "list_directory", {"folder": None})
        assert "data.folder" in message


# -- permissions and access rules --------------------------------------------------------------

async def test_actions_need_their_permission(server, admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        await make_user(admin, "outsider", groups=())
        folder = await admin.call("create_directory", {"name": "open"})
        doc = await new_document(admin, "doc", b"content", tmp_path, folder_id=folder["id"])
        async with server.connect("outsider", USER_PASSWORD) as outsider:
            # reading an object without rules needs no permission
            assert await listing(outsider) == (["open"], [])
            assert await download_bytes(outsider, doc["document_id"], tmp_path) == b"content"
            denied = [
                ("create_directory", {"name": "mine"}),
                ("create_document", {"title": "mine"}),
                ("rename_directory", {"folder_id": folder["id"], "name": "x"}),
                ("move_directory", {"folder_id": folder["id"], "parent_id": None}),
                ("delete_directory", {"folder_id": folder["id"]}),
                ("rename_document", {"document_id": doc["document_id"], "title": "x"}),
                ("move_document", {"document_id": doc["document_id"], "folder_id": None}),
                ("delete_document", {"document_id": doc["document_id"]}),
                ("get_directory_access_rules", {"folder_id": folder["id"]}),
                ("set_directory_rules", {"folder_id": folder["id"], "access_rules": {}}),
                ("get_document_access_rules", {"document_id": doc["document_id"]}),
                ("set_document_rules", {"document_id": doc["document_id"], "access_rules": {}}),
            ]
            for action, data in denied:
                message = await expect_error(outsider, 403, action, data)
                assert "permission" in message
        assert await listing(admin, folder["id"]) == ([], ["doc"])


async def test_read_rule_hides_a_folder_and_everything_in_it(server, admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        await admin.call("create_group", {"name": SECRET_GROUP})
        await make_user(admin, "alice")
        await make_user(admin, "bob", groups=("user", SECRET_GROUP))
        await admin.call("create_directory", {"name": "public"})
        vault = await admin.call("create_directory", {
            "name": "vault", "access_rules": only_group(SECRET_GROUP, "read")})
        inner = await admin.call("create_directory", {"name": "inner", "parent_id": vault["id"]})
        deep = await new_document(admin, "plans", b"secret plans", tmp_path,
                                  folder_id=inner["id"])
        hidden = await new_document(admin, "memo", b"memo", tmp_path,
                                    access_rules=only_group(SECRET_GROUP, "read"))

        async with server.connect("alice", USER_PASSWORD) as alice:
            assert await listing(alice) == (["public"], [])
            for action, data in (
                ("list_directory", {"folder_id": vault["id"]}),
                ("get_directory_info", {"folder_id": vault["id"]}),
                ("get_directory_info", {"folder_id": inner["id"]}),  # ancestor rule
                ("list_directory", {"folder_id": inner["id"]}),
                ("get_document_info", {"document_id": deep["document_id"]}),
                ("list_revisions", {"document_id": deep["document_id"]}),
                ("get_document", {"document_id": deep["document_id"]}),
                ("get_document_info", {"document_id": hidden["document_id"]}),
                ("get_document", {"document_id": hidden["document_id"]}),
                # reading is the base of every other kind of access
                ("rename_document", {"document_id": deep["document_id"], "title": "x"}),
                ("upload_document", {"document_id": deep["document_id"]}),
                ("delete_document", {"document_id": deep["document_id"]}),
                ("create_directory", {"name": "mine", "parent_id": inner["id"]}),
                ("create_document", {"title": "mine", "folder_id": vault["id"]}),
                ("move_directory", {"folder_id": inner["id"], "parent_id": None}),
            ):
                await expect_error(alice, 403, action, data)

        async with server.connect("bob", USER_PASSWORD) as bob:
            assert await listing(bob) == (["public", "vault"], ["memo"])
            assert await listing(bob, vault["id"]) == (["inner"], [])
            assert await listing(bob, inner["id"]) == ([], ["plans"])
            info = await bob.call("get_directory_info", {"folder_id": inner["id"]})
            assert info["path"] == "/vault/inner"
            assert await download_bytes(bob, deep["document_id"], tmp_path) == b"secret plans"
            assert await download_bytes(bob, hidden["document_id"], tmp_path) == b"memo"
            await bob.call("rename_document", {"document_id": deep["document_id"],
                                               "title": "plans-v2"})

        # sysop passes every rule even without the group
        assert await listing(admin) == (["public", "vault"], ["memo"])
        assert await download_bytes(admin, deep["document_id"], tmp_path) == b"secret plans"


async def test_write_and_move_rules(server, admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        await admin.call("create_group", {"name": SECRET_GROUP})
        await make_user(admin, "alice")
        await make_user(admin, "bob", groups=("user", SECRET_GROUP))
        locked = await admin.call("create_directory", {
            "name": "locked", "access_rules": only_group(SECRET_GROUP, "write")})
        pinned = await new_document(admin, "pinned", b"x", tmp_path,
                                    access_rules=only_group(SECRET_GROUP, "move"))
        async with server.connect("alice", USER_PASSWORD) as alice:
            assert await listing(alice) == (["locked"], ["pinned"])  # readable, not writable
            await expect_error(alice, 403, "create_document", {"title": "t",
                                                               "folder_id": locked["id"]})
            await expect_error(alice, 403, "rename_directory", {"folder_id": locked["id"],
                                                                "name": "mine"})
            await expect_error(alice, 403, "move_document", {"document_id": pinned["document_id"],
                                                             "folder_id": None})
            await alice.call("rename_document", {"document_id": pinned["document_id"],
                                                 "title": "renamed"})
        async with server.connect("bob", USER_PASSWORD) as bob:
            await bob.call("create_document", {"title": "t", "folder_id": locked["id"]})
            await bob.call("move_document", {"document_id": pinned["document_id"],
                                             "folder_id": locked["id"]})
        assert await listing(admin, locked["id"]) == ([], ["renamed", "t"])


async def test_manage_rules_gate_setting_rules(server, admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        await admin.call("create_group", {"name": SECRET_GROUP})
        rights = ("set_access_rules", "view_access_rules")
        await make_user(admin, "carol", permissions=rights)
        await make_user(admin, "dave", groups=("user", SECRET_GROUP), permissions=rights)
        manage_rules = only_group(SECRET_GROUP, "manage")
        folder = await admin.call("create_directory", {"name": "managed",
                                                       "access_rules": manage_rules})
        doc = await new_document(admin, "managed-doc", None, tmp_path,
                                 access_rules=manage_rules)
        stored = await admin.call("get_directory_access_rules", {"folder_id": folder["id"]})
        assert stored["access_rules"] == manage_rules
        new_rules = {"read": [group_rule("user")], "manage": [group_rule(SECRET_GROUP)]}

        async with server.connect("carol", USER_PASSWORD) as carol:
            # viewing needs read access only; changing needs manage access
            seen = await carol.call("get_document_access_rules",
                                    {"document_id": doc["document_id"]})
            assert seen["access_rules"] == manage_rules
            await expect_error(carol, 403, "set_directory_rules",
                               {"folder_id": folder["id"], "access_rules": {}})
            await expect_error(carol, 403, "set_document_rules",
                               {"document_id": doc["document_id"], "access_rules": {}})
        async with server.connect("dave", USER_PASSWORD) as dave:
            result = await dave.call("set_directory_rules", {"folder_id": folder["id"],
                                                             "access_rules": new_rules})
            assert result["access_rules"] == new_rules
            await dave.call("set_document_rules", {"document_id": doc["document_id"],
                                                   "access_rules": {}})
        stored = await admin.call("get_document_access_rules",
                                  {"document_id": doc["document_id"]})
        assert stored["access_rules"] == {}
        async with server.connect("carol", USER_PASSWORD) as carol:
            await carol.call("set_document_rules", {"document_id": doc["document_id"],
                                                    "access_rules": manage_rules})
        # sysop may always repair rules, here ones that lock out even their author
        await admin.call("set_directory_rules", {"folder_id": folder["id"],
                                                 "access_rules": only_group("nobody", "read")})
        await admin.call("set_directory_rules", {"folder_id": folder["id"], "access_rules": {}})


def rule(match: str, *entries: dict) -> dict:
    return {"match": match, "match_groups": list(entries)}


def entry(match: str = "all", rights: list | None = None, groups: list | None = None,
          rights_match: str = "all", groups_match: str = "all") -> dict:
    out: dict = {"match": match}
    if rights is not None:
        out["rights"] = {"match": rights_match, "require": rights}
    if groups is not None:
        out["groups"] = {"match": groups_match, "require": groups}
    return out


# (read rules, may alice read?, may bob read?) -- alice: group `user` only; bob: `user` and
# `secret`, and the permission `view_audit_logs` granted directly.
RULE_CASES = [
    ([], True, True),
    ([rule("all")], True, True),
    ([rule("all", entry(groups=[SECRET_GROUP]))], False, True),
    # an entry matching "any" of what it states: a missing `rights` does not open it
    ([rule("all", entry("any", groups=[SECRET_GROUP]))], False, True),
    ([rule("all", entry("any", rights=["view_audit_logs"], groups=[SECRET_GROUP]))],
     False, True),
    ([rule("all", entry("any", rights=["create_document"], groups=[SECRET_GROUP]))],
     True, True),
    ([rule("all", entry("all", rights=["create_document"], groups=[SECRET_GROUP]))],
     False, True),
    ([rule("all", entry(groups=["user", SECRET_GROUP], groups_match="any"))], True, True),
    ([rule("all", entry(groups=["user", SECRET_GROUP], groups_match="all"))], False, True),
    ([rule("all", entry(rights=["view_audit_logs"]))], False, True),
    ([rule("any", entry(groups=[SECRET_GROUP]), entry(groups=["nobody"]))], False, True),
    ([rule("all", entry(groups=[SECRET_GROUP]), entry(groups=["nobody"]))], False, False),
    ([rule("any", entry(groups=["user"]), entry(groups=["nobody"]))], True, True),
    # every rule of a kind must allow
    ([rule("all", entry(groups=["user"])), rule("all", entry(groups=[SECRET_GROUP]))],
     False, True),
    # an empty requirement states nothing
    ([rule("all", entry("any", groups=[]))], True, True),
]


async def test_rule_evaluation(server, admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        await admin.call("create_group", {"name": SECRET_GROUP})
        await make_user(admin, "alice")
        await make_user(admin, "bob", groups=("user", SECRET_GROUP),
                        permissions=("view_audit_logs",))
        documents = []
        for index, (rules, _, _) in enumerate(RULE_CASES):
            created = await new_document(admin, f"case-{index:02}", None, tmp_path,
                                         access_rules={"read": rules})
            documents.append(created["document_id"])
        for username, column in (("alice", 1), ("bob", 2)):
            async with server.connect(username, USER_PASSWORD) as client:
                _, visible = await listing(client)
                for index, case in enumerate(RULE_CASES):
                    assert (f"case-{index:02}" in visible) is case[column], (username, case)
                    if not case[column]:
                        await expect_error(client, 403, "get_document_info",
                                           {"document_id": documents[index]})


@pytest.mark.parametrize("rules", [
    ["not", "an", "object"],
    {"delete": []},
    {"read": {"match": "all"}},
    {"read": ["rule"]},
    {"read": [{"match": "some"}]},
    {"read": [{"match_groups": {"groups": {}}}]},
    {"read": [{"match_groups": ["x"]}]},
    {"read": [{"extra": 1}]},
    {"read": [{"match_groups": [{"groups": {"require": "sysop"}}]}]},
    {"read": [{"match_groups": [{"rights": {"require": [1]}}]}]},
    {"read": [{"match_groups": [{"groups": {"match": "none", "require": []}}]}]},
    {"read": [{"match_groups": [{"who": {}}]}]},
])
async def test_invalid_rules_are_refused(admin, tmp_path, rules):
    with trio.fail_after(TEST_DEADLINE_S):
        folder = await admin.call("create_directory", {"name": "f"})
        doc = await new_document(admin, "d", None, tmp_path)
        for action, data in (
            ("create_directory", {"name": "g", "access_rules": rules}),
            ("create_document", {"title": "e", "access_rules": rules}),
            ("set_directory_rules", {"folder_id": folder["id"], "access_rules": rules}),
            ("set_document_rules", {"document_id": doc["document_id"], "access_rules": rules}),
        ):
            message = await expect_error(admin, 400, action, data)
            assert "access_rules" in message
        assert await listing(admin) == (["f"], ["d"])
        stored = await admin.call("get_directory_access_rules", {"folder_id": folder["id"]})
        assert stored["access_rules"] == {}


# -- audit --------------------------------------------------------------------------------------

async def test_every_state_change_is_audited(server, admin, tmp_path):
    with trio.fail_after(TEST_DEADLINE_S):
        await make_user(admin, "outsider", groups=())
        folder = await admin.call("create_directory", {"name": "a"})
        other = await admin.call("create_directory", {"name": "b"})
        await expect_error(admin, 409, "create_directory", {"name": "b"})
        await admin.call("rename_directory", {"folder_id": folder["id"], "name": "a2"})
        await admin.call("move_directory", {"folder_id": folder["id"], "parent_id": other["id"]})
        await admin.call("set_directory_rules", {"folder_id": folder["id"], "access_rules": {}})
        doc = await new_document(admin, "d", b"content", tmp_path, folder_id=folder["id"])
        revision = await admin.call("upload_document", {"document_id": doc["document_id"]})
        await admin.call("rename_document", {"document_id": doc["document_id"], "title": "d2"})
        await admin.call("move_document", {"document_id": doc["document_id"], "folder_id": None})
        await admin.call("set_document_rules", {"document_id": doc["document_id"],
                                                "access_rules": {}})
        await admin.call("delete_document", {"document_id": doc["document_id"]})
        await admin.call("delete_directory", {"folder_id": other["id"]})
        async with server.connect("outsider", USER_PASSWORD) as outsider:
            await expect_error(outsider, 403, "create_directory", {"name": "nope"})

        entries = (await admin.call("view_audit_logs", {"limit": 1000}))["entries"]
        seen = {(e["username"], e["action"], e["target"], e["result"]) for e in entries}
        expected = {
            ("admin", "create_directory", folder["id"], 200),
            ("admin", "create_directory", other["id"], 200),
            ("admin", "rename_directory", folder["id"], 200),
            ("admin", "move_directory", folder["id"], 200),
            ("admin", "set_directory_rules", folder["id"], 200),
            ("admin", "create_document", doc["document_id"], 200),
            ("admin", "upload_file", doc["task_id"], 200),
            ("admin", "upload_document", doc["document_id"], 200),
            ("admin", "rename_document", doc["document_id"], 200),
            ("admin", "move_document", doc["document_id"], 200),
            ("admin", "set_document_rules", doc["document_id"], 200),
            ("admin", "delete_document", doc["document_id"], 200),
            ("admin", "delete_directory", other["id"], 200),
            ("admin", "create_directory", None, 409),
            ("outsider", "create_directory", None, 403),
        }
        assert expected <= seen, expected - seen
        assert revision["task_id"] not in {e["target"] for e in entries}
        for entry in entries:
            assert isinstance(entry["time"], float) and entry["address"]


async def test_folders_nest_at_most_max_tree_depth(admin, monkeypatch):
    """Creating or moving folders beyond MAX_TREE_DEPTH levels is refused with 400, so the
    server never holds a tree it would refuse to serve or to restore from a backup."""
    from cfms_trio.storage import documents as storage_documents

    monkeypatch.setattr(storage_documents, "MAX_TREE_DEPTH", 3)
    a = await admin.call("create_directory", {"name": "a"})
    b = await admin.call("create_directory", {"name": "b", "parent_id": a["id"]})
    c = await admin.call("create_directory", {"name": "c", "parent_id": b["id"]})
    message = await expect_error(admin, 400, "create_directory", {"name": "d", "parent_id": c["id"]})
    assert "at most 3 levels deep" in message
    # A two-level subtree fits at the root and one level down, not two levels down.
    x = await admin.call("create_directory", {"name": "x"})
    await admin.call("create_directory", {"name": "y", "parent_id": x["id"]})
    await admin.call("move_directory", {"folder_id": x["id"], "parent_id": a["id"]})
    message = await expect_error(admin, 400, "move_directory",
                                 {"folder_id": x["id"], "parent_id": b["id"]})
    assert "this would make 4" in message
    info = await admin.call("get_directory_info", {"folder_id": x["id"]})
    assert info["parent_id"] == a["id"]
