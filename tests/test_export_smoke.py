import os, json
async def test_export(server, admin, tmp_path):
    src = tmp_path / "a.bin"; src.write_bytes(os.urandom(100000))
    f = await admin.call("create_directory", {"name": "top"})
    c = await admin.call("create_document", {"title": "doc", "folder_id": f["id"]})
    await admin.upload_file(c["task_id"], src)
    r = await admin.call("generate_backup", {"backup_name": "b1"})
    print(r)
    await admin.download_file(r["archive_task_id"], tmp_path/"x.enc")
    await admin.download_file(r["key_task_id"], tmp_path/"x.key")
    print(open(tmp_path/"x.key").read())
    from cfms_trio.backup.archive import read_backup_archive
    from cfms_trio.backup.keyfile import parse_key_file
    from cfms_trio.config import ArchiveLimits
    ki = parse_key_file((tmp_path/"x.key").read_bytes(), ArchiveLimits())
    (tmp_path/"st").mkdir()
    with open(tmp_path/"x.enc","rb") as fh:
        c = read_backup_archive(fh, ki, tmp_path/"st", ArchiveLimits())
    print(c)
    r2 = await admin.request("generate_backup", {"backup_name": "b1"})
    assert r2["code"] == 409, r2
    r3 = await admin.request("generate_backup", {"backup_name": "../x"})
    assert r3["code"] == 400, r3
