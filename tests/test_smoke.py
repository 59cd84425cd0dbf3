async def test_admin_can_log_in_and_list_groups(server, admin):
    groups = {g["name"]: g for g in (await admin.call("list_groups"))["groups"]}
    assert set(groups) == {"sysop", "user"}
    assert "import_backup" in groups["sysop"]["permissions"]
    assert groups["sysop"]["members"] == ["admin"]
