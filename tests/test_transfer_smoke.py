import os

async def test_round_trip(server, admin, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    created = await admin.call("create_document", {"title": "doc"})
    res = await admin.upload_file(created["task_id"], src)
    assert res["size"] == src.stat().st_size
    dl = await admin.call("get_document", {"document_id": created["document_id"]})
    out = tmp_path / "b.bin"
    await admin.download_file(dl["task_id"], out)
    assert out.read_bytes() == src.read_bytes()
