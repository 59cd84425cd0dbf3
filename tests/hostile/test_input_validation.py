"""Issue 12, items 13-14: input the schema let through answers 400 naming the field.

13. A lone surrogate in any string field, and an integer past SQLite's range, answer 400 naming
    the field, never 500; a login refused so still writes an audit entry (action `login`,
    result 400), as every audited request does whatever its outcome.
14. Every pattern-checked field refuses a trailing newline (full matches, not `re.match`).
"""

from __future__ import annotations

import json

import pytest
import trio

from helpers import USER_PASSWORD

pytestmark = pytest.mark.timeout(60)

IO_TIMEOUT_S = 10
LONE = "\ud800"
PAST_SQLITE = 2**63


async def raw(client, action: str, data: dict) -> dict:
    """Send a request whose strings may hold lone surrogates (json.dumps escapes them)."""
    with trio.fail_after(IO_TIMEOUT_S):
        await client.send_raw(json.dumps(client.envelope(action, data)))
        return await client.receive_reply()


def assert_names_field(reply: dict, field: str) -> None:
    assert reply["code"] == 400, reply
    assert f"'data.{field}'" in reply["message"], reply


SURROGATE_CASES = [
    ("create_directory", {"name": f"x{LONE}"}, "name"),
    ("create_document", {"title": f"x{LONE}"}, "title"),
    ("create_user", {"username": f"u{LONE}", "password": USER_PASSWORD}, "username"),
    ("create_user", {"username": "nick", "password": USER_PASSWORD, "nickname": LONE},
     "nickname"),
    ("create_group", {"name": f"g{LONE}"}, "name"),
    ("set_passwd", {"new_password": f"{LONE}{USER_PASSWORD}"}, "new_password"),
    ("view_audit_logs", {"username": LONE}, "username"),
    ("view_audit_logs", {"action": LONE}, "action"),
    ("get_user_info", {"username": LONE}, "username"),
    ("generate_backup", {"backup_name": LONE}, "backup_name"),
]


async def test_lone_surrogates_are_refused_naming_the_field(server, admin):
    for action, data, field in SURROGATE_CASES:
        assert_names_field(await raw(admin, action, data), field)
    assert (await admin.call("server_info"))["name"] == "cfms-trio"


async def test_login_with_a_lone_surrogate_is_refused_and_audited(server, admin):
    async def login_400s() -> int:
        logs = await admin.call("view_audit_logs", {"action": "login", "limit": 1000})
        return sum(1 for entry in logs["entries"] if entry["result"] == 400)

    before = await login_400s()
    async with server.connect() as outsider:
        assert_names_field(await raw(outsider, "login", {"username": f"admin{LONE}",
                                                         "password": "whatever1"}), "username")
        assert_names_field(await raw(outsider, "login", {"username": "admin",
                                                         "password": f"x{LONE}"}), "password")
    assert await login_400s() == before + 2


async def test_integers_past_sqlite_range_are_refused_naming_the_field(server, admin, tmp_path):
    created = await admin.call("create_document", {"title": "doc"})
    source = tmp_path / "doc"
    source.write_bytes(b"content")
    await admin.upload_file(created["task_id"], source)
    ticket = await admin.call("get_document", {"document_id": created["document_id"]})
    cases = [
        ("download_file", {"task_id": ticket["task_id"], "offset": PAST_SQLITE}, "offset"),
        ("view_audit_logs", {"offset": PAST_SQLITE}, "offset"),
        ("view_audit_logs", {"limit": PAST_SQLITE}, "limit"),
        ("initiate_backup_import", {"timeout_seconds": PAST_SQLITE}, "timeout_seconds"),
    ]
    for action, data, field in cases:
        assert_names_field(await raw(admin, action, data), field)
    assert (await admin.call("server_info"))["name"] == "cfms-trio"


NEWLINE_CASES = [
    ("generate_backup", {"backup_name": "evil\n"}, "backup_name"),
    ("get_directory_info", {"folder_id": "abc\n"}, "folder_id"),
    ("list_directory", {"folder_id": "abc\n"}, "folder_id"),
    ("create_directory", {"name": "n", "parent_id": "abc\n"}, "parent_id"),
    ("get_document_info", {"document_id": "abc\n"}, "document_id"),
    ("get_document", {"document_id": "abc\n"}, "document_id"),
    ("download_file", {"task_id": "abc\n"}, "task_id"),
    ("upload_file", {"task_id": "abc\n"}, "task_id"),
    ("get_backup_import_status", {"backup_task_id": "abc\n"}, "backup_task_id"),
    ("start_backup_import", {"backup_task_id": "abc\n"}, "backup_task_id"),
]


@pytest.mark.parametrize("action, data, field", NEWLINE_CASES,
                         ids=[f"{a}-{f}" for a, _, f in NEWLINE_CASES])
async def test_a_trailing_newline_is_refused(server, admin, action, data, field):
    assert_names_field(await raw(admin, action, data), field)
    backups = server.root / "content" / "backups"
    assert not [p for p in backups.rglob("*") if "\n" in p.name]
