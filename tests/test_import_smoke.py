import os
import trio
from helpers import snapshot_tree

async def wait_final(c, tid):
    with trio.fail_after(30):
        while True:
            st = await c.call("get_backup_import_status", {"backup_task_id": tid})
            if st["status"] in ("completed", "failed", "timeout"):
                return st
            await trio.sleep(0.05)

async def test_round_trip(start_server, tmp_path):
    a = await start_server("a")
    b = await start_server("b")
    src = tmp_path / "f.bin"; src.write_bytes(os.urandom(200000))
    async with a.connect("admin") as ca:
        f = await ca.call("create_directory", {"name": "top"})
        d = await ca.call("create_document", {"title": "doc", "folder_id": f["id"]})
        await ca.upload_file(d["task_id"], src)
        r = await ca.call("generate_backup", {})
        await ca.download_file(r["archive_task_id"], tmp_path / "x.enc")
        await ca.download_file(r["key_task_id"], tmp_path / "x.key")
    async with b.connect("admin") as cb:
        await cb.listen()
        init = await cb.call("initiate_backup_import", {"timeout_seconds": 60})
        await cb.upload_file(init["archive_task_id"], tmp_path / "x.enc")
        await cb.upload_file(init["key_task_id"], tmp_path / "x.key")
        s = await cb.call("start_backup_import", {"backup_task_id": init["backup_task_id"]})
        st = await wait_final(cb, init["backup_task_id"])
        print(st)
        assert st["status"] == "completed", st
        ev = await cb.next_event("backup_import_completed")
        print(ev)
        lst = await cb.call("list_directory", {"folder_id": f["id"]})
        print(lst)
        dl = await cb.call("get_document", {"document_id": d["document_id"]})
        await cb.download_file(dl["task_id"], tmp_path / "out.bin")
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
        # second import of same archive -> collision
        before = snapshot_tree(b.root / "content")
        init = await cb.call("initiate_backup_import", {"timeout_seconds": 60})
        await cb.upload_file(init["archive_task_id"], tmp_path / "x.enc")
        await cb.upload_file(init["key_task_id"], tmp_path / "x.key")
        await cb.call("start_backup_import", {"backup_task_id": init["backup_task_id"]})
        st = await wait_final(cb, init["backup_task_id"])
        print(st)
        assert st["status"] == "failed"
        after = snapshot_tree(b.root / "content")
        print(set(before) ^ set(after))

async def test_timeout(server, admin):
    init = await admin.call("initiate_backup_import", {"timeout_seconds": 1})
    await trio.sleep(1.5)
    st = await admin.call("get_backup_import_status", {"backup_task_id": init["backup_task_id"]})
    print(st)
    assert st["status"] == "timeout"
