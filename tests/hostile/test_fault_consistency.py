"""Issue 12, items 11-12: faults at the worst moment leave a consistent, working server.

11. A server killed right after the restore transaction commits says, after the restart, that
    the task `completed`, and the restored data is there: the final status is written in the
    same transaction as the rows. The kill lands where `paused_serve.py` holds the import
    when it reports "Restore completed": the importer reports that step from the worker thread
    that starts the clean-up, after the commit and before the uploads are removed and the
    completion event is published. The restart removes the uploads left behind.
12. An upload that fills the disk answers 507 (or 413) with a message about disk space, its
    partial file is gone at once, and logins keep working.
"""

from __future__ import annotations

import errno
import shutil

import pytest
import trio

from cfms_trio.client import ClientError
from cfms_trio.content import local as local_content

from . import corpus
from .support import assert_no_leftovers, entries, run_import, start_import
from .test_crash_restart import admin_client, seeded_root, serve_process  # noqa: F401
from .test_faults import FaultyOs

pytestmark = pytest.mark.timeout(90)

STEP_TIMEOUT_S = 30
PAUSE_STEP = "Restore completed"
PAUSED_LINE = f"paused at {PAUSE_STEP!r}"  # what paused_serve.py prints


async def test_kill_right_after_the_restore_commits(seeded_root, tmp_path):  # noqa: F811
    root = tmp_path / "root"
    shutil.copytree(seeded_root, root)
    archive, key = corpus.valid_v2_archive()
    async with serve_process(root, pause_at=PAUSE_STEP) as server:
        async with admin_client(server.url) as admin:
            task_id = await start_import(admin, archive, key, tmp_path)
            with trio.fail_after(STEP_TIMEOUT_S):
                while PAUSED_LINE not in (tmp_path / "stderr.txt").read_text():
                    await trio.sleep(0.02)
            status = await admin.call("get_backup_import_status", {"backup_task_id": task_id})
            # Held after the commit: the task already says so, and the commit's transaction
            # removed the uploads and the staging folder before it could be seen.
            assert (status["status"], status["current_step"]) == ("completed", PAUSE_STEP), status
            assert entries(root / "content" / "tmp" / "staging") == []
            assert entries(root / "content" / "backups" / "import") == []
            await server.kill()
    async with serve_process(root) as server:
        async with admin_client(server.url) as admin:
            status = await admin.call("get_backup_import_status", {"backup_task_id": task_id})
            assert status["status"] == "completed", status
            assert status["error_message"] is None, status
            assert (status["folders_count"], status["documents_count"],
                    status["files_count"]) == (2, 2, 3)
            info = await admin.call("get_document_info", {"document_id": "hd1"})
            assert info["title"] == "hReport"
            assert {"hx1", "hx2", "hx3"} <= set(entries(root / "content" / "restore" / "files"))
            assert_no_leftovers(root)
            # The same backup again collides with what is there, as any second restore does.
            with trio.fail_after(STEP_TIMEOUT_S):
                again = await run_import(admin, archive, key, tmp_path)
            assert again["status"] == "failed" and "already" in again["error_message"], again
        await server.terminate()


async def test_disk_full_upload_answers_clearly_and_cleans_up(start_server, tmp_path,
                                                              monkeypatch):
    server = await start_server("diskfull")
    source = tmp_path / "big"
    source.write_bytes(b"d" * (3 * 1024 * 1024 + 17))
    uploads = server.root / "content" / "tmp" / "uploads"
    async with server.connect("admin") as admin:
        created = await admin.call("create_document", {"title": "big"})
        faulty = FaultyOs(errno.ENOSPC, write_from_call=2)
        monkeypatch.setattr(local_content, "os", faulty)
        with trio.fail_after(STEP_TIMEOUT_S):
            with pytest.raises(ClientError) as caught:
                await admin.upload_file(created["task_id"], source)
        assert faulty.raised >= 1
        assert caught.value.code in (507, 413), caught.value
        assert "disk" in caught.value.message or "space" in caught.value.message, caught.value
        assert entries(uploads) == [], "the partial upload was kept"
        # The disk is still full: logins and reads work all the same.
        async with server.connect("admin") as other:
            assert (await other.call("server_info"))["name"] == "cfms-trio"
        info = await admin.call("get_document_info", {"document_id": created["document_id"]})
        assert info["current_revision"] is None
        monkeypatch.undo()
        # With space again the upload goes through (the task is still open).
        assert (await admin.upload_file(created["task_id"], source))["size"] == source.stat().st_size
