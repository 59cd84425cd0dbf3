"""Two `cfms-trio serve` processes on one PostgreSQL database and one content folder (issue
16): content uploaded through one is downloaded through the other, an upload interrupted on
one resumes on the other (and is never run on both at once), an import's outcome reaches a
listener of the other instance exactly once, and an instance killed in the middle of an
import has the import failed by the other within the lease time, the store unchanged. The
same on one S3 bucket prefix, each instance with a root folder of its own (as on two
machines): upload on A, download on B, A's import announced on B; A killed mid-import, B
fails it and neither the store nor the bucket keeps anything of it (nothing under restore/).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time

import pytest
import trio
from trio_websocket import ConnectionClosed

from cfms_trio.backup.supervisor import (
    EXPORT_LEASE_EXPIRED_MESSAGE,
    EXPORT_RESTART_MESSAGE,
    LEASE_EXPIRED_MESSAGE,
)
from cfms_trio.config import Limits
from cfms_trio.content.s3 import PART_TARGET_BYTES, part_bytes_for

import databases
import storage_mode
from helpers import ADMIN_PASSWORD
from test_backup_live_restore import PausedAt
from test_transfer import raw_announce, raw_begin, sealed, sha256_hex

from . import corpus
from .support import (
    COMPLETED_EVENT,
    DATA_TABLES,
    assert_no_leftovers,
    assert_store_unchanged,
    capture,
    start_import,
    upload_bytes,
    wait_for_outcome,
)
from .paused_serve import EXPORTING
from .test_crash_restart import STEP_TIMEOUT_S, admin_client, serve_process
from .test_s3_storage import bucket_keys, open_uploads

pytestmark = pytest.mark.skipif(
    not databases.on_postgresql(),
    reason="several instances need PostgreSQL (a SQLite root serves one instance: a second "
           "serve on it is refused)")

LEASE_S = 2.0
LEASE_ARGS = ("--lease-seconds", str(LEASE_S))
# An instance notices an expired lease within a third of the lease time after it expired.
TAKEOVER_S = LEASE_S * 2 + 10


async def _events_of(client, task_id: str, wait_s: float) -> list[dict]:
    """Every completion event of `task_id` the listener `client` receives within `wait_s`."""
    seen = []
    with trio.move_on_after(wait_s):
        while True:
            event = await client.next_event(COMPLETED_EVENT)
            if event["data"]["backup_task_id"] == task_id:
                seen.append(event["data"])
    return seen


async def upload_here_download_there(on_a, on_b, tmp_path) -> None:
    """A document uploaded through `on_a` downloads through `on_b`, byte for byte."""
    with trio.fail_after(STEP_TIMEOUT_S):
        content = os.urandom(3 * 1024 * 1024 + 5)
        created = await on_a.call("create_document", {"title": "shared"})
        await upload_bytes(on_a, created["task_id"], content, tmp_path)
        ticket = await on_b.call("get_document", {"document_id": created["document_id"]})
        target = tmp_path / "downloaded"
        await on_b.download_file(ticket["task_id"], target)
        assert target.read_bytes() == content


async def test_upload_on_one_instance_download_on_the_other(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    async with serve_process(root, extra_args=LEASE_ARGS) as a, \
            serve_process(root, extra_args=LEASE_ARGS) as b:
        async with admin_client(a.url) as on_a, admin_client(b.url) as on_b:
            await upload_here_download_there(on_a, on_b, tmp_path)


async def test_an_upload_runs_on_one_instance_at_a_time_and_resumes_on_another(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    async with serve_process(root, extra_args=LEASE_ARGS) as a, \
            serve_process(root, extra_args=LEASE_ARGS) as b:
        # A sends some chunks, B resumes after what A kept: the verified chunks with local
        # files, the whole parts sent with S3 (so there A sends one part and a chunk more).
        chunk = Limits().transfer_chunk_bytes
        sent_chunks, size, kept = 3, 5 * 1024 * 1024 + 100, 3 * chunk
        if storage_mode.S3_MODE:
            part = part_bytes_for(3 * PART_TARGET_BYTES, chunk)
            sent_chunks, size, kept = part // chunk + 1, 2 * part + 100, part
        content = os.urandom(size)
        async with admin_client(b.url) as on_b:
            with trio.fail_after(STEP_TIMEOUT_S):
                created = await on_b.call("create_document", {"title": "resumed"})
                task_id = created["task_id"]
                async with admin_client(a.url) as on_a:
                    assert (await raw_begin(on_a, task_id))["action"] == "transfer_file"
                    ready = (await raw_announce(on_a, len(content), sha256_hex(content)))["data"]
                    # The same task on the other instance, while A runs it: refused.
                    refused = await on_b.request("upload_file", {"task_id": task_id})
                    assert refused["code"] == 409, refused
                    assert "another server instance" in refused["message"]
                    assert ready["chunk_size"] == chunk
                    for index in range(sent_chunks):
                        await on_a.send_raw(sealed(ready, content, index))
                    await trio.sleep(2.0)  # A verifies and keeps them before the drop
                # A noticed the dropped connection and released the task: B resumes it.
                path = tmp_path / "content"
                path.write_bytes(content)
                while True:
                    progress: list[tuple[int, int]] = []
                    try:
                        await on_b.upload_file(task_id, path,
                                               progress=lambda *p: progress.append(p))
                        break
                    except Exception as exc:  # A has not let go yet
                        assert getattr(exc, "code", None) == 409, exc
                        await trio.sleep(0.1)
                assert progress[0] == (kept, len(content))
                ticket = await on_b.call("get_document", {"document_id": created["document_id"]})
                await on_b.download_file(ticket["task_id"], tmp_path / "back")
                assert (tmp_path / "back").read_bytes() == content


async def test_an_import_on_one_instance_is_announced_once_on_every_instance(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    async with serve_process(root, extra_args=LEASE_ARGS) as a, \
            serve_process(root, extra_args=LEASE_ARGS) as b:
        async with admin_client(a.url) as on_a, admin_client(b.url) as on_b:
            archive, key = corpus.valid_v2_archive(corpus.seed_dataset())
            task_id = await start_import(on_a, archive, key, tmp_path)
            status = await wait_for_outcome(on_b, task_id)
            assert status["status"] == "completed", status
            # Exactly once per listener: no second copy on either instance.
            assert await _events_of(on_b, task_id, 1.0) == []
            on_a_events = await _events_of(on_a, task_id, 1.0)
            assert [e["status"] for e in on_a_events] == ["completed"]


async def test_an_instance_killed_mid_import_has_it_failed_by_the_other(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    async with serve_process(root, pause_at="Importing files", extra_args=LEASE_ARGS) as a, \
            serve_process(root, extra_args=LEASE_ARGS) as b:
        async with admin_client(b.url) as on_b:
            before = await capture(root)
            async with admin_client(a.url) as on_a:
                task_id = await start_import(on_a, corpus.big_archive(), corpus.v2_key(),
                                             tmp_path)
                with trio.fail_after(STEP_TIMEOUT_S):
                    while (await on_a.call("get_backup_import_status", {
                            "backup_task_id": task_id}))["current_step"] != "Importing files":
                        await trio.sleep(0.05)
            await a.kill()
            killed = time.monotonic()
            with trio.fail_after(TAKEOVER_S):
                event = await on_b.next_event(COMPLETED_EVENT)
            assert time.monotonic() - killed < TAKEOVER_S
            assert event["data"]["backup_task_id"] == task_id
            assert event["data"]["status"] == "failed"
            assert event["data"]["error"] == LEASE_EXPIRED_MESSAGE
            status = await on_b.call("get_backup_import_status", {"backup_task_id": task_id})
            assert status["status"] == "failed" and status["files_count"] == 0, status
            assert_store_unchanged(before, await capture(root))
            assert_no_leftovers(root)


def _exports(root) -> list[tuple]:
    """(status, error_message, lease_owner) of every export task in `root`'s database."""
    import psycopg2

    with contextlib.closing(psycopg2.connect(databases.database_url_for(root))) as db:
        cursor = db.cursor()
        cursor.execute("SELECT status, error_message, lease_owner FROM backup_task "
                       "WHERE operation = 'export'")
        rows = cursor.fetchall()
        db.rollback()
        return rows


async def _answered_or_cut(client, action: str, data: dict) -> None:
    """A request whose server may be killed before it answers."""
    with contextlib.suppress(ConnectionClosed):
        await client.request(action, data)


@contextlib.asynccontextmanager
async def _export_running(client, root):
    """generate_backup of "cut" asked through `client` of a server that holds its exports
    paused: entered once the export's task exists, its request given up on leaving."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answered_or_cut, client, "generate_backup", {"backup_name": "cut"})
        with trio.fail_after(STEP_TIMEOUT_S):
            while not await trio.to_thread.run_sync(_exports, root):
                await trio.sleep(0.05)
        yield
        nursery.cancel_scope.cancel()


async def test_an_instance_killed_mid_export_has_it_failed_by_the_other(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    async with serve_process(root, pause_at=EXPORTING, extra_args=LEASE_ARGS) as a, \
            serve_process(root, extra_args=LEASE_ARGS) as b:
        async with admin_client(a.url) as on_a, _export_running(on_a, root):
            # Running longer than its lease: A renews it meanwhile, B leaves it alone.
            await trio.sleep(LEASE_S * 2)
            [(status, _, owner)] = await trio.to_thread.run_sync(_exports, root)
            assert status == "processing" and owner is not None
            await a.kill()
        killed = time.monotonic()
        with trio.fail_after(TAKEOVER_S):
            while (await trio.to_thread.run_sync(_exports, root))[0][0] == "processing":
                await trio.sleep(0.1)
        assert time.monotonic() - killed < TAKEOVER_S
        assert await trio.to_thread.run_sync(_exports, root) == [
            ("failed", EXPORT_LEASE_EXPIRED_MESSAGE, None)]
        assert not list((root / "content" / "backups").glob("cut*"))
        async with admin_client(b.url) as on_b:  # the name is free again
            made = await on_b.call("generate_backup", {"backup_name": "cut"})
            assert made["backup_name"] == "cut"


async def test_an_instance_restarted_under_its_name_fails_the_export_it_was_running(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    named = ("--instance-name", "exporter", "--lease-seconds", "600")  # no expiry in this test
    async with serve_process(root, pause_at=EXPORTING, extra_args=named) as a:
        async with admin_client(a.url) as on_a, _export_running(on_a, root):
            await a.kill()
    async with serve_process(root, extra_args=named):
        assert await trio.to_thread.run_sync(_exports, root) == [
            ("failed", EXPORT_RESTART_MESSAGE, None)]


# -- on one bucket: the content storage in S3, each instance with a folder of its own ----------

@pytest.fixture
def shared_bucket(s3):
    """A bucket both instances keep their content in, under one prefix."""
    name = f"cfms-{secrets.token_hex(4)}"
    s3.client().create_bucket(Bucket=name)
    return name


def _on_bucket(s3, bucket: str, database_root) -> tuple[str, ...]:
    """`serve` flags for an instance on the shared prefix and on `database_root`'s database."""
    return (*LEASE_ARGS, *databases.serve_arguments(database_root),
            "--storage", f"s3://{bucket}/{SHARED_PREFIX}", "--s3-endpoint", s3.endpoint)


SHARED_PREFIX = "shared"


async def test_on_one_bucket_an_upload_on_one_instance_downloads_and_imports_announce_on_the_other(
        s3, shared_bucket, tmp_path):
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    root_a.mkdir()
    root_b.mkdir()
    args = _on_bucket(s3, shared_bucket, root_a)
    async with serve_process(root_a, extra_args=args) as a, \
            serve_process(root_b, extra_args=args) as b:
        async with admin_client(a.url) as on_a, admin_client(b.url) as on_b:
            await upload_here_download_there(on_a, on_b, tmp_path)
            archive, key = corpus.valid_v2_archive(corpus.seed_dataset())
            task_id = await start_import(on_a, archive, key, tmp_path)
            with trio.fail_after(STEP_TIMEOUT_S):
                event = await on_b.next_event(COMPLETED_EVENT)
            assert event["data"]["backup_task_id"] == task_id
            assert event["data"]["status"] == "completed", event
            assert await _events_of(on_b, task_id, 1.0) == []
            # B sees the outcome A recorded.
            status = await on_b.call("get_backup_import_status", {"backup_task_id": task_id})
            assert status["status"] == "completed" and status["files_count"] == 3, status


async def test_on_one_bucket_an_instance_killed_mid_import_leaves_store_and_bucket_unchanged(
        s3, shared_bucket, tmp_path):
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    root_a.mkdir()
    root_b.mkdir()
    args = _on_bucket(s3, shared_bucket, root_a)
    # Paused at the step after the files: they are stored in the bucket (inside the commit's
    # transaction), and the transaction never commits.
    async with serve_process(root_a, pause_at="Importing folders", extra_args=args) as a, \
            serve_process(root_b, extra_args=args) as b:
        async with admin_client(b.url) as on_b:
            before = await capture(root_a)
            keys_before = bucket_keys(s3, shared_bucket)
            async with admin_client(a.url) as on_a:
                task_id = await start_import(on_a, corpus.big_archive(), corpus.v2_key(),
                                             tmp_path)
                with trio.fail_after(STEP_TIMEOUT_S):
                    while (await on_a.call("get_backup_import_status", {
                            "backup_task_id": task_id}))["current_step"] != "Importing folders":
                        await trio.sleep(0.05)
            await a.kill()
            staged = bucket_keys(s3, shared_bucket, f"{SHARED_PREFIX}/restore/files/{task_id}/")
            assert staged, "the kill came after the restored files were stored"
            with trio.fail_after(TAKEOVER_S):
                event = await on_b.next_event(COMPLETED_EVENT)
            assert event["data"]["backup_task_id"] == task_id
            assert event["data"]["status"] == "failed"
            assert event["data"]["error"] == LEASE_EXPIRED_MESSAGE
            status = await on_b.call("get_backup_import_status", {"backup_task_id": task_id})
            assert status["status"] == "failed" and status["files_count"] == 0, status
            # The database's tables (read through root A, whose database both share).
            after = await capture(root_a)
            for table in DATA_TABLES:
                assert after.tables[table] == before.tables[table], f"table {table} changed"
            assert bucket_keys(s3, shared_bucket, f"{SHARED_PREFIX}/restore/") == []
            assert bucket_keys(s3, shared_bucket) == keys_before
            assert open_uploads(s3, shared_bucket) == []
            assert_no_leftovers(root_b)


async def test_an_import_running_on_one_instance_is_cancelled_from_the_other(
        start_server, tmp_path, monkeypatch):
    """In-process: A runs the import (held in a batch), B is asked to cancel it; B tells A
    through the relay and answers once the store shows it cancelled."""
    a = await start_server("a", lease_s=LEASE_S)
    b = await start_server("b", database_url=a.settings.database_url, lease_s=LEASE_S)
    archive, key = corpus.valid_v2_archive(corpus.seed_dataset())
    before = await trio.to_thread.run_sync(databases.dump_tables, a.root, DATA_TABLES)
    held = PausedAt(monkeypatch, "Importing files")
    async with a.connect("admin") as on_a, b.connect("admin") as on_b:
        await on_b.listen()
        task_id = await start_import(on_a, archive, key, tmp_path)
        assert await trio.to_thread.run_sync(held.reached.wait, 20)
        async with trio.open_nursery() as nursery:
            answers = []

            async def cancel_on_b():
                answers.append(await on_b.call("cancel_backup_import",
                                               {"backup_task_id": task_id}))

            nursery.start_soon(cancel_on_b)
            await trio.sleep(0.3)
            held.release.set()
        assert answers[0]["status"] == "cancelled", answers
        assert answers[0]["message"] == "cancelled by 'admin'"
        with trio.fail_after(STEP_TIMEOUT_S):
            event = await on_b.next_event(COMPLETED_EVENT)
        assert event["data"]["backup_task_id"] == task_id
        assert event["data"]["status"] == "cancelled"
        status = await on_a.call("get_backup_import_status", {"backup_task_id": task_id})
        assert status["status"] == "cancelled" and status["files_count"] == 0, status
    after = await trio.to_thread.run_sync(databases.dump_tables, a.root, DATA_TABLES)
    assert after == before


async def test_a_second_instance_with_a_name_in_use_is_refused(tmp_path):
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    root_a.mkdir()
    root_b.mkdir()
    name = ("--instance-name", "web-1")
    async with serve_process(root_a, extra_args=(*LEASE_ARGS, *name)):
        command = [sys.executable, "-m", "cfms_trio", "serve", "--root", str(root_b),
                   "--port", "0", "--no-tls", *databases.serve_arguments(root_a), *name,
                   *storage_mode.server_args(root_b)]
        with trio.fail_after(STEP_TIMEOUT_S):
            refused = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False,
                env=dict(os.environ, CFMS_ADMIN_PASSWORD=ADMIN_PASSWORD))
    assert refused.returncode == 1
    assert ("error: another server instance named 'web-1' is running on this database; give "
            "each instance its own name (--instance-name)") in refused.stderr.decode()
