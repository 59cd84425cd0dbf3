"""Restore into a live server (issue 14): part of an archive, conflict policies, dry runs and
their plans, cancelling at each step, progress events, the pre-flight disk check, and the
errors of each option. Every scenario runs through a running server."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import trio

from cfms_trio.backup import importer
from cfms_trio.client import ClientError
from cfms_trio.config import Limits

from backup_support import (
    build_store,
    content_files,
    dump_store,
    export_to,
    import_dir_files,
    wait_final,
)
import storage_mode
from helpers import USER_PASSWORD, make_user

SMALL = Limits(transfer_chunk_bytes=64 * 1024)
DATA_TABLES = ("folders", "documents", "revisions", "access_rules")


@pytest.fixture
async def live(start_server):
    return await start_server("live", limits=SMALL)


async def exported(server, folder: Path, prefix: str = ""):
    async with server.connect("admin") as client:
        built = await build_store(client, folder / "src", big_bytes=3000, prefix=prefix)
        archive, key, _ = await export_to(client, folder / "backup")
    return built, archive, key


async def uploaded(client, archive: Path, key: Path, timeout_seconds: int = 120) -> str:
    init = await client.call("initiate_backup_import", {"timeout_seconds": timeout_seconds})
    await client.upload_file(init["archive_task_id"], archive)
    await client.upload_file(init["key_task_id"], key)
    return init["backup_task_id"]


async def run(client, task_id: str, **options) -> dict:
    await client.call("start_backup_import", {"backup_task_id": task_id, **options})
    return await wait_final(client, task_id, seen=None) if not options.get("dry_run") else \
        await wait_planned(client, task_id)


async def wait_planned(client, task_id: str) -> dict:
    with trio.fail_after(30):
        while True:
            status = await client.call("get_backup_import_status", {"backup_task_id": task_id})
            if status["status"] in ("planned", "completed", "failed", "cancelled", "timeout"):
                return status
            await trio.sleep(0.02)


async def restore(client, archive, key, **options) -> dict:
    return await run(client, await uploaded(client, archive, key), **options)


def tables(dump: dict) -> dict:
    return {name: dump[name] for name in DATA_TABLES}


async def state(server) -> tuple[dict, dict]:
    return await dump_store(server), content_files(server)


async def listing(client, folder_id=None) -> dict:
    return await client.call("list_directory", {"folder_id": folder_id})


# -- the scenarios of issue 14 ---------------------------------------------------------------

async def test_a_deleted_folder_comes_back_under_its_ids_and_nothing_else_changes(
        live, tmp_path):
    built, archive, key = await exported(live, tmp_path)
    before = tables(await dump_store(live))
    async with live.connect("admin") as admin:
        await admin.call("delete_directory", {"folder_id": built.folders["alpha"]})
        final = await restore(admin, archive, key, accounts="none",
                              include=[{"path": "/projects/alpha"}])
        assert final["status"] == "completed", final
        assert final["plan"]["actions"]["create"]["folder"] == 2  # alpha and deep
        assert final["plan"]["actions"]["create"]["document"] == 2  # spec and big
        assert final["plan"]["conflicts_count"] == 0
        document = await admin.call("get_document_info", {"document_id": built.documents["spec"]})
        assert document["title"] == "spec"
    assert tables(await dump_store(live)) == before


async def test_one_document_restored_beside_its_current_version_with_new_ids(live, tmp_path):
    built, archive, key = await exported(live, tmp_path)
    readme = built.documents["readme"]
    async with live.connect("admin") as admin:
        before = tables(await dump_store(live))
        final = await restore(admin, archive, key, accounts="none", conflict_policy="new_ids",
                              include=[{"document_id": readme}])
        assert final["status"] == "completed", final
        assert final["plan"]["actions"]["rename"]["document"] == 1
        root = await listing(admin)
        titles = {d["title"]: d["id"] for d in root["documents"]}
        assert titles["readme"] == readme
        copy = titles["readme (2)"]
        assert copy != readme
        after = tables(await dump_store(live))
    # Everything that was there is untouched; the copy adds one document and its revision.
    assert [row for row in after["documents"] if row["id"] != copy] == before["documents"]
    assert len(after["revisions"]) == len(before["revisions"]) + 1
    assert after["folders"] == before["folders"]


async def test_merging_two_servers_with_skip_then_with_overwrite(start_server, tmp_path):
    one = await start_server("one", limits=SMALL)
    two = await start_server("two", limits=SMALL)
    await exported(one, tmp_path / "one", prefix="one-")
    built_two, archive, key = await exported(two, tmp_path / "two", prefix="two-")
    async with one.connect("admin") as admin:
        own = tables(await dump_store(one))
        final = await restore(admin, archive, key, accounts="none", conflict_policy="skip")
        assert final["status"] == "completed", final
        merged = tables(await dump_store(one))
        names = {f["name"] for f in merged["folders"]}
        assert {"one-projects", "two-projects", "two-deep"} <= names
        for table in DATA_TABLES:  # nothing of server one changed
            assert all(row in merged[table] for row in own[table]), table
        # The same archive again with skip: every object exists, nothing changes.
        again = await restore(admin, archive, key, accounts="none", conflict_policy="skip")
        assert again["status"] == "completed", again
        assert again["plan"]["actions"]["skip"]["folder"] == len(built_two.folders)
        assert again["plan"]["actions"]["create"]["document"] == 0
        assert tables(await dump_store(one)) == merged
        # Someone renamed and moved a merged folder; overwrite gives it the archive's name and
        # place back and keeps everything else.
        beta = built_two.folders["beta"]
        await admin.call("rename_directory", {"folder_id": beta, "name": "renamed"})
        await admin.call("move_directory", {"folder_id": beta, "parent_id": None})
        final = await restore(admin, archive, key, accounts="none",
                              conflict_policy="overwrite")
        assert final["status"] == "completed", final
        assert final["plan"]["actions"]["overwrite"]["folder"] == len(built_two.folders)
        info = await admin.call("get_directory_info", {"folder_id": beta})
        assert info["name"] == "two-beta"
        assert info["parent_id"] == built_two.folders["projects"]
        assert tables(await dump_store(one)) == merged


async def test_a_dry_run_plans_exactly_what_the_real_run_then_does(live, tmp_path):
    built, archive, key = await exported(live, tmp_path)
    async with live.connect("admin") as admin:
        await admin.call("delete_directory", {"folder_id": built.folders["beta"]})
        await admin.call("delete_document", {"document_id": built.documents["readme"]})
        await admin.call("create_directory", {"name": "archive (2)", "parent_id": None})
        task_id = await uploaded(admin, archive, key)
        before = await state(live)
        options = {"accounts": "none", "conflict_policy": "skip"}
        planned = await run(admin, task_id, dry_run=True, **options)
        assert planned["status"] == "planned", planned
        plan = planned["plan"]
        assert await state(live) == before  # a dry run commits nothing
        assert plan["actions"]["create"]["folder"] == 1  # beta
        assert plan["actions"]["create"]["document"] == 2  # notes and readme
        assert plan["actions"]["skip"]["folder"] == len(built.folders) - 1
        assert plan["conflicts_count"] >= len(built.folders) - 1
        first = plan["conflicts"][0]
        assert first["reason"] == "id" and first["path"].startswith("/") and first["action"] == "skip"
        assert plan["bytes_to_write"] == sum(
            len(built.contents[f]) for d in ("readme", "notes")
            for f in built.revisions[built.documents[d]])
        assert 0 < plan["free_bytes_needed"] <= plan["free_bytes_available"]
        final = await run(admin, task_id, **options)  # the same task, for real
        assert final["status"] == "completed", final
        assert final["plan"]["actions"] == plan["actions"]
        assert final["plan"]["conflicts"] == plan["conflicts"]
        assert (final["folders_count"], final["documents_count"]) == (1, 2)
        root = await listing(admin)
        assert "readme" in {d["title"] for d in root["documents"]}


async def test_policy_fail_plans_the_conflicts_and_the_real_run_refuses(live, tmp_path):
    _, archive, key = await exported(live, tmp_path)
    async with live.connect("admin") as admin:
        before = await state(live)
        task_id = await uploaded(admin, archive, key)
        planned = await run(admin, task_id, dry_run=True, accounts="none")
        assert planned["plan"]["refusal"].startswith("folder id '"), planned
        final = await run(admin, task_id, accounts="none")
        assert final["status"] == "failed"
        assert final["error_message"] == planned["plan"]["refusal"]
        assert final["startable"] is True  # the options were refused, the uploads are kept
        await admin.call("cancel_backup_import", {"backup_task_id": task_id})
    assert await state(live) == before  # cancelled: the kept uploads are gone too


def upload_files(server) -> set[str]:
    return set(import_dir_files(server))


async def test_refused_options_keep_the_uploads_and_the_task_starts_again(live, tmp_path):
    built, archive, key = await exported(live, tmp_path)
    async with live.connect("admin") as admin:
        await admin.call("delete_directory", {"folder_id": built.folders["alpha"]})
        task_id = await uploaded(admin, archive, key)
        uploads = upload_files(live)
        assert uploads
        final = await run(admin, task_id, accounts="none", include=[{"path": "/no/such"}])
        assert final["status"] == "failed", final
        assert final["error_message"] == ("include entry 1 (path '/no/such') matches nothing "
                                          "in the backup")
        assert final["startable"] is True
        assert upload_files(live) == uploads
        # A dry run refused the same way keeps them too.
        final = await run(admin, task_id, dry_run=True, target_folder_id="f" * 32)
        assert final["error_message"] == f"target folder '{'f' * 32}' does not exist"
        assert final["startable"] is True and upload_files(live) == uploads
        # Started again with good options: no upload, the import completes.
        final = await run(admin, task_id, accounts="none",
                          include=[{"path": "/projects/alpha"}])
        assert final["status"] == "completed", final
        assert final["error_message"] is None and final["startable"] is False
        assert final["plan"]["actions"]["create"]["folder"] == 2
        assert upload_files(live) == set()
        alpha = await admin.call("list_directory", {"folder_id": built.folders["alpha"]})
        assert [f["name"] for f in alpha["folders"]] == ["deep"]
        with pytest.raises(ClientError) as info:
            await admin.call("start_backup_import", {"backup_task_id": task_id})
        assert info.value.code == 409


async def test_a_bad_archive_still_removes_the_uploads(live, tmp_path):
    _, archive, key = await exported(live, tmp_path)
    async with live.connect("admin") as admin:
        task_id = await uploaded(admin, key, key)  # the key file is no archive
        final = await run(admin, task_id, accounts="none", conflict_policy="skip")
        assert final["status"] == "failed", final
        assert final["startable"] is False
        assert upload_files(live) == set()
        with pytest.raises(ClientError) as info:
            await admin.call("start_backup_import", {"backup_task_id": task_id})
        assert info.value.code == 409


async def test_target_folder_places_the_chosen_subtree_under_it(live, tmp_path):
    built, archive, key = await exported(live, tmp_path)
    async with live.connect("admin") as admin:
        into = (await admin.call("create_directory", {"name": "restored", "parent_id": None}))["id"]
        final = await restore(admin, archive, key, accounts="none", conflict_policy="new_ids",
                              include=[{"folder_id": built.folders["alpha"]},
                                       {"path": "/readme"}], target_folder_id=into)
        assert final["status"] == "completed", final
        inside = await listing(admin, into)
        assert [f["name"] for f in inside["folders"]] == ["alpha"]
        assert [d["title"] for d in inside["documents"]] == ["readme"]
        alpha = inside["folders"][0]["id"]
        assert alpha != built.folders["alpha"]
        assert [f["name"] for f in (await listing(admin, alpha))["folders"]] == ["deep"]


# -- cancelling ------------------------------------------------------------------------------

async def test_cancel_a_pending_and_a_planned_import(live, tmp_path):
    _, archive, key = await exported(live, tmp_path)
    async with live.connect("admin") as admin:
        before = await state(live)
        await admin.listen()
        init = await admin.call("initiate_backup_import", {"timeout_seconds": 60})
        reply = await admin.call("cancel_backup_import",
                                 {"backup_task_id": init["backup_task_id"]})
        assert reply["status"] == "cancelled"
        with trio.fail_after(5):
            event = await admin.next_event("backup_import_completed")
        assert event["data"]["status"] == "cancelled"
        task_id = await uploaded(admin, archive, key)
        assert (await run(admin, task_id, dry_run=True, accounts="none"))["status"] == "planned"
        with trio.fail_after(2):
            await admin.call("cancel_backup_import", {"backup_task_id": task_id})
        status = await admin.call("get_backup_import_status", {"backup_task_id": task_id})
        assert status["status"] == "cancelled"
        assert "cancelled by 'admin'" in status["error_message"]
        with pytest.raises(ClientError) as info:
            await admin.call("start_backup_import", {"backup_task_id": task_id})
        assert info.value.code == 409
    dump, files = await state(live)
    assert dump == before[0]  # every table, the upload tasks and files gone again
    assert files == before[1]
    assert list((live.root / "content" / "backups" / "import").iterdir()) == []


class PausedAt:
    """Holds an in-process import's worker thread once it reports `step`, until released:
    what a long batch looks like to a cancel."""

    def __init__(self, monkeypatch, step: str):
        self.step, self.reached, self.release = step, threading.Event(), threading.Event()
        report = importer.ImportProgress.report

        def report_then_hold(progress, name, fraction, **counts):
            report(progress, name, fraction, **counts)
            if name == step and threading.current_thread() is not threading.main_thread():
                self.reached.set()
                self.release.wait(20)

        monkeypatch.setattr(importer.ImportProgress, "report", report_then_hold)


@pytest.mark.parametrize("step", ["Decrypting archive", "Extracting archive",
                                  "Loading metadata", "Importing files", "Importing folders",
                                  "Importing documents"])
async def test_cancel_while_processing_leaves_the_store_byte_identical(
        live, tmp_path, monkeypatch, step):
    built, archive, key = await exported(live, tmp_path)
    async with live.connect("admin") as admin:
        await admin.call("delete_directory", {"folder_id": built.folders["projects"]})
        before = await state(live)
        task_id = await uploaded(admin, archive, key)
        paused = PausedAt(monkeypatch, step)
        await admin.listen()
        await admin.call("start_backup_import", {"backup_task_id": task_id,
                                                 "accounts": "none", "conflict_policy": "skip"})
        await trio.to_thread.run_sync(paused.reached.wait, 20)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admin.call, "cancel_backup_import", {"backup_task_id": task_id})
            await trio.sleep(0.1)
            released = time.monotonic()
            paused.release.set()
        assert time.monotonic() - released < 2  # stopped at its next check
        with trio.fail_after(5):
            event = await admin.next_event("backup_import_completed")
        assert event["data"]["status"] == "cancelled"
        status = await admin.call("get_backup_import_status", {"backup_task_id": task_id})
        assert status["status"] == "cancelled", status
    dump, files = await state(live)
    assert dump == before[0]  # every table, the upload tasks and files gone again
    assert files == before[1]
    assert list((live.root / "content" / "tmp" / "staging").iterdir()) == []


async def test_progress_events_are_throttled_and_carry_counts(live, tmp_path, monkeypatch):
    _, archive, key = await exported(live, tmp_path)
    report = importer.ImportProgress.report

    def slow_report(progress, name, fraction, **counts):  # a long import
        report(progress, name, fraction, **counts)
        time.sleep(0.05)

    monkeypatch.setattr(importer.ImportProgress, "report", slow_report)
    async with live.connect("admin") as admin:
        await admin.listen()
        task_id = await uploaded(admin, archive, key)
        started = time.monotonic()
        final = await run(admin, task_id, accounts="none", conflict_policy="new_ids")
        elapsed = time.monotonic() - started
        assert final["status"] == "completed", final
        events = [e for e in admin.events_nowait() if e.get("action") == "backup_import_progress"]
    assert events, "no progress event"
    assert len(events) <= elapsed * 4 + 2
    for event in events:
        data = event["data"]
        assert data["backup_task_id"] == task_id
        assert set(data) >= {"step", "percent", "bytes_done", "bytes_total", "objects_done"}
    assert any(e["data"]["bytes_done"] > 0 for e in events)


# -- refusals and errors ---------------------------------------------------------------------

async def test_too_little_free_space_is_refused_before_anything_is_written(
        live, tmp_path, monkeypatch):
    _, archive, key = await exported(live, tmp_path)
    real = shutil.disk_usage
    async with live.connect("admin") as admin:
        task_id = await uploaded(admin, archive, key)
        before = await state(live)
        monkeypatch.setattr(importer.shutil, "disk_usage",
                            lambda path: real(path)._replace(free=1000))
        with pytest.raises(ClientError) as info:
            await admin.call("start_backup_import", {"backup_task_id": task_id})
        assert info.value.code == 507
        # On S3 storage the archive is first copied into staging from the bucket: twice.
        needed = archive.stat().st_size * (2 if storage_mode.S3_MODE else 1)
        assert f"at least {needed} bytes" in info.value.message
        assert "1000 bytes are available" in info.value.message
        assert await state(live) == before
        status = await admin.call("get_backup_import_status", {"backup_task_id": task_id})
        assert status["status"] == "pending"  # the same task can start once there is room
        monkeypatch.setattr(importer.shutil, "disk_usage", real)
        final = await run(admin, task_id, accounts="none", conflict_policy="skip")
        assert final["status"] == "completed", final


async def test_bad_options_are_refused_with_clear_errors(live, tmp_path):
    built, archive, key = await exported(live, tmp_path)
    async with live.connect("admin") as admin:
        await make_user(admin, "clerk", permissions=["import_backup"])
        locked = (await admin.call("create_directory", {"name": "locked", "parent_id": None,
                                                        "access_rules": {"write": [
                                                            {"match": "all", "match_groups": [
                                                                {"match": "all", "groups": {
                                                                    "match": "any",
                                                                    "require": ["sysop"]}}]}]}}
                                   ))["id"]
        task_id = await uploaded(admin, archive, key)
        with pytest.raises(ClientError) as info:
            await admin.call("start_backup_import", {"backup_task_id": task_id,
                                                     "conflict_policy": "merge"})
        assert info.value.code == 400 and "conflict_policy" in info.value.message
        with pytest.raises(ClientError) as info:
            await admin.call("start_backup_import", {"backup_task_id": task_id,
                                                     "include": [{"folder": "x"}]})
        assert info.value.code == 400 and "data.include[0]" in info.value.message
        final = await run(admin, task_id, dry_run=True, include=[{"path": "/no/such"}])
        assert final["status"] == "failed"
        assert final["error_message"] == ("include entry 1 (path '/no/such') matches nothing "
                                          "in the backup")
        final = await restore(admin, archive, key, target_folder_id="f" * 32,
                              conflict_policy="new_ids")
        assert final["error_message"] == f"target folder '{'f' * 32}' does not exist"
        completed = await restore(admin, archive, key, accounts="none",
                                  conflict_policy="skip")
        with pytest.raises(ClientError) as info:
            await admin.call("cancel_backup_import",
                             {"backup_task_id": completed["backup_task_id"]})
        assert info.value.code == 409 and "is completed" in info.value.message
    async with live.connect("clerk", USER_PASSWORD) as clerk:
        before = await state(live)
        final = await restore(clerk, archive, key, accounts="none", conflict_policy="new_ids",
                              target_folder_id=locked)
        assert final["status"] == "failed"
        assert f"folder '{locked}'" in final["error_message"]
        assert "no write access" in final["error_message"]
        final = await restore(clerk, archive, key, accounts="none", conflict_policy="overwrite")
        assert final["status"] == "failed" and "may not overwrite" in final["error_message"]
        assert tables(await dump_store(live)) == tables(before[0])
        async with live.connect("admin") as admin:
            theirs = await uploaded(admin, archive, key)
            with pytest.raises(ClientError) as info:
                await clerk.call("cancel_backup_import", {"backup_task_id": theirs})
            assert info.value.code == 403
            await admin.call("cancel_backup_import", {"backup_task_id": theirs})


async def test_kept_uploads_go_at_the_deadline_and_the_failure_stays(live, tmp_path):
    _, archive, key = await exported(live, tmp_path)
    async with live.connect("admin") as admin:
        task_id = await uploaded(admin, archive, key, timeout_seconds=6)
        final = await run(admin, task_id, accounts="none", include=[{"path": "/no/such"}])
        assert final["status"] == "failed" and final["startable"] is True, final
        assert upload_files(live)
        with trio.fail_after(30):
            while upload_files(live):
                await trio.sleep(0.1)
        status = await admin.call("get_backup_import_status", {"backup_task_id": task_id})
        assert status["status"] == "failed" and status["startable"] is False
        assert "matches nothing" in status["error_message"]
        with pytest.raises(ClientError) as info:
            await admin.call("start_backup_import", {"backup_task_id": task_id})
        assert info.value.code in (408, 409)
