"""Backups as a product (issue 18): schedules with short intervals, retention, the self-check
before publishing, verification and re-verification, failures reported, S3 targets, the CLI."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import trio

from cfms_trio.backup import export as export_module
from cfms_trio.backup.format import generate_identity
from cfms_trio.backup.retention import plan_pruning
from cfms_trio.client import ClientError

from backup_support import build_store, dump_store, import_from
from cli_support import Cli

WAIT_S = 30  # bound on any wait for the scheduler in these tests
POLL_S = 0.05


@pytest.fixture
def person():
    return generate_identity()


async def _small_store(client, folder: Path) -> None:
    await client.call("create_directory", {"name": "reports"})
    created = await client.call("create_document", {"title": "q1.txt"})
    path = folder / "q1.txt"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"quarterly numbers\n" * 100)
    await client.upload_file(created["task_id"], path)


async def _schedule(client, name: str) -> dict:
    listed = (await client.call("list_backup_schedules"))["schedules"]
    return next(s for s in listed if s["name"] == name)


async def _backups(client, schedule: str | None = None) -> list[dict]:
    data = {"schedule": schedule} if schedule else {}
    return (await client.call("list_backups", data))["backups"]


async def _until(predicate, what: str):
    with trio.fail_after(WAIT_S):
        while not (result := await predicate()):
            await trio.sleep(POLL_S)
    return result


async def _stop_schedule(server, client, name: str) -> None:
    """Remove a schedule and wait for a run it had in progress to end."""
    await client.call("delete_backup_schedule", {"name": name})
    with trio.fail_after(WAIT_S):
        while name in server.app.backups.running:
            await trio.sleep(POLL_S)


def _archives(server) -> list[str]:
    return sorted(p.name for p in (server.root / "content" / "backups").iterdir()
                  if p.name != "import")


# -- schedules and retention ------------------------------------------------------------------

async def test_keep_last_two_ends_with_exactly_the_two_newest_verified_backups(
        server, admin, person, tmp_path):
    await _small_store(admin, tmp_path / "files")
    made = await admin.call("create_backup_schedule", {
        "name": "often", "interval_seconds": 1, "recipients": [str(person.recipient)],
        "keep": {"last": 2}})
    assert made["target"] == {"type": "local"} and made["keep"] == {"last": 2}

    async def four_runs():
        return (await _schedule(admin, "often"))["runs_count"] >= 4
    await _until(four_runs, "four runs")
    await _stop_schedule(server, admin, "often")

    listed = await _backups(admin, "often")
    assert len(listed) == 2
    assert all(b["verify_result"] == "ok" for b in listed)
    assert listed[0]["created_time"] >= listed[1]["created_time"]
    assert _archives(server) == sorted(f"{b['name']}.cfms.enc" for b in listed)
    for backup in listed:
        stored = server.root / "content" / backup["location"]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == backup["archive_sha256"]
        assert backup["target"] == {"type": "local"} and backup["format"] == 3
        assert backup["recipients"] == [str(person.recipient)]
    info = await admin.call("server_info")
    assert info["backup_failures"] == {"export": 0, "upload": 0, "verify": 0, "prune": 0}


async def test_a_restart_runs_the_missed_backup_once_then_keeps_the_interval(
        start_server, person, tmp_path):
    first = await start_server("restarting")
    async with first.connect("admin") as admin:
        await _small_store(admin, tmp_path / "files")
        await admin.call("create_backup_schedule", {
            "name": "nightly", "interval_seconds": 2, "recipients": [str(person.recipient)]})

        async def one_backup():
            return len(await _backups(admin)) == 1 and not first.app.backups.running
        await _until(one_backup, "the first backup")
    await first.stop()
    await trio.sleep(5.5)  # the server is down for more than two intervals

    again = await start_server("restarting")
    async with again.connect("admin") as admin:
        async def two_backups():
            return len(await _backups(admin)) == 2
        with trio.fail_after(1.5):
            await _until(two_backups, "the missed run")
        ran = (await _schedule(admin, "nightly"))["last_run_time"]
        await trio.sleep(max(0.0, ran + 1.5 - time.time()))  # still within one interval
        schedule = await _schedule(admin, "nightly")
        assert len(await _backups(admin)) == 2  # the missed runs ran once, not three times
        assert schedule["runs_count"] == 2
        assert schedule["next_run_time"] == pytest.approx(schedule["last_run_time"] + 2)


def test_retention_keeps_the_newest_of_each_day_week_and_month():
    day = 86400.0
    start = 1_767_225_600.0  # 2026-01-01 00:00 UTC, a Thursday
    made = [{"name": f"b{i:02d}", "created_time": start + i * day / 2, "verify_result": "ok"}
            for i in range(40)]  # two a day for twenty days
    made[39]["verify_result"] = "failed"  # the newest failed its re-verification
    kept, pruned = plan_pruning(made, {"daily": 3, "weekly": 2})
    names = {b["name"] for b in kept}
    # the newest verified (b38) is kept and also the newest of its day; b39 is newer: kept
    assert {"b39", "b38", "b37", "b35"} <= names
    assert "b36" not in names and "b00" in {b["name"] for b in pruned}
    assert plan_pruning(made, None) == (sorted(made, key=lambda b: b["created_time"],
                                               reverse=True), [])
    unverified = [dict(b, verify_result=None) for b in made]
    assert plan_pruning(unverified, {"last": 1})[1] == []


async def test_schedule_requests_are_checked_and_dry_run_prunes_nothing(
        server, admin, person):
    recipient = str(person.recipient)
    refused = {
        "field 'data.recipients' must name at least one": {"recipients": []},
        "recipients\\[0\\].*mistyped": {"recipients": [recipient[:-1] + "x"]},
        "data.interval_seconds' must be at least 1": {"interval_seconds": 0},
        "data.keep.hourly": {"keep": {"hourly": 3}},
        "data.keep' must keep at least one": {"keep": {"last": 0}},
        "data.target.type": {"target": {"type": "ftp"}},
        "data.target.bucket": {"target": {"type": "s3", "bucket": "No_Such"}},
        "data.parts\\[0\\].*'settings' is not a part": {"parts": ["settings"]},
        "data.name": {"name": "../etc"},
    }
    for message, change in refused.items():
        data = {"name": "s", "interval_seconds": 60, "recipients": [recipient], **change}
        with pytest.raises(ClientError, match=message) as caught:
            await admin.call("create_backup_schedule", data)
        assert caught.value.code == 400
    await admin.call("create_backup_schedule", {"name": "s", "interval_seconds": 3600,
                                                "recipients": [recipient],
                                                "parts": ["documents"], "keep": {"last": 1}})
    with pytest.raises(ClientError, match="already exists"):
        await admin.call("create_backup_schedule", {"name": "s", "interval_seconds": 60,
                                                    "recipients": [recipient]})
    await _until(lambda: _has_backups(admin, 1), "the first run")
    await admin.call("generate_backup", {"backup_name": "by-hand"})
    await trio.sleep(0)
    dry = await admin.call("prune_backups", {"dry_run": True})
    assert dry["dry_run"] is True and dry["pruned"] == []
    assert {b["name"] for b in await _backups(admin)} >= {"by-hand"}
    hand = next(b for b in await _backups(admin) if b["name"] == "by-hand")
    assert hand["schedule"] is None and hand["format"] == 2 and hand["verify_result"] == "ok"
    with pytest.raises(ClientError, match="does not exist") as caught:
        await admin.call("delete_backup_schedule", {"name": "nope"})
    assert caught.value.code == 404


async def _has_backups(client, count: int) -> bool:
    return len(await _backups(client)) >= count


async def test_pruning_waits_for_a_verified_backup_and_a_dry_run_changes_nothing(
        server, admin, person, tmp_path, monkeypatch):
    await _small_store(admin, tmp_path / "files")
    recipient = str(person.recipient)
    await admin.call("create_backup_schedule", {
        "name": "daily", "interval_seconds": 1, "recipients": [recipient]})
    await _until(lambda: _has_backups(admin, 3), "three backups")
    await _stop_schedule(server, admin, "daily")
    before = await _backups(admin, "daily")

    def failing_read_back(path, key_info, staging_dir, limits):
        raise export_module.ArchiveError("simulated damage")

    # The same schedule again, now keeping one: its run fails, so nothing may be pruned.
    monkeypatch.setattr(export_module, "read_back", failing_read_back)
    await admin.call("create_backup_schedule", {
        "name": "daily", "interval_seconds": 3600, "recipients": [recipient],
        "keep": {"last": 1}})

    async def failed_run():
        schedule = await _schedule(admin, "daily")
        return schedule["last_error"] and not server.app.backups.running
    await _until(failed_run, "the failed run")
    assert await _backups(admin, "daily") == before

    dry = await admin.call("prune_backups", {"dry_run": True})
    assert dry["pruned"] == [b["name"] for b in before[1:]] and dry["errors"] == []
    assert await _backups(admin, "daily") == before

    done = await admin.call("prune_backups", {"schedule": "daily"})
    assert done["pruned"] == dry["pruned"] and done["dry_run"] is False
    assert [b["name"] for b in await _backups(admin, "daily")] == [before[0]["name"]]
    assert _archives(server) == [f"{before[0]['name']}.cfms.enc"]


# -- the self-check before publishing ---------------------------------------------------------

async def test_an_export_that_fails_its_self_check_is_never_listed(
        server, admin, person, tmp_path, monkeypatch):
    await _small_store(admin, tmp_path / "files")
    real_read_back = export_module.read_back

    def corrupting_read_back(path, key_info, staging_dir, limits):
        # between writing and reading back: one flipped byte in the last segment
        with open(path, "r+b") as archive:
            archive.seek(-20, os.SEEK_END)
            byte = archive.read(1)
            archive.seek(-20, os.SEEK_END)
            archive.write(bytes([byte[0] ^ 0x01]))
        return real_read_back(path, key_info, staging_dir, limits)

    monkeypatch.setattr(export_module, "read_back", corrupting_read_back)
    await admin.listen()
    with pytest.raises(ClientError, match="failed its self-check and was not published") as e:
        await admin.call("generate_backup", {"backup_name": "by-hand",
                                             "recipients": [str(person.recipient)]})
    assert e.value.code == 500
    failed = await admin.next_event("backup_failed")
    assert failed["data"]["stage"] == "export" and failed["data"]["backup_name"] == "by-hand"

    await admin.call("create_backup_schedule", {
        "name": "doomed", "interval_seconds": 3600, "recipients": [str(person.recipient)]})
    failed = await admin.next_event("backup_failed")
    assert failed["data"]["schedule"] == "doomed"
    assert "self-check" in failed["data"]["error"]

    async def recorded():
        schedule = await _schedule(admin, "doomed")
        return schedule if schedule["last_error"] else None
    schedule = await _until(recorded, "the failed run")
    assert "failed its self-check" in schedule["last_error"]
    assert schedule["last_success_time"] is None and schedule["failures_count"] == 1
    assert await _backups(admin) == []
    assert _archives(server) == []  # no archive, no temporary file, no self-check folder
    info = await admin.call("server_info")
    assert info["backup_failures"]["export"] == 2


# -- verification -------------------------------------------------------------------------------

async def test_a_corrupted_stored_archive_is_caught_by_reverification_and_reported(
        server, admin, person, tmp_path):
    await _small_store(admin, tmp_path / "files")
    identity = person.identity_line()
    await admin.call("create_backup_schedule", {
        "name": "rolling", "interval_seconds": 1, "recipients": [str(person.recipient)]})
    await _until(lambda: _has_backups(admin, 2), "two backups")
    oldest = (await _backups(admin))[-1]

    good = (await _backups(admin))[0]
    shallow = await admin.call("verify_backup", {"name": good["name"]})
    assert shallow["result"] == "ok" and shallow["level"] == "archive"
    assert shallow["complete"] is False
    assert "the recipient block's MAC" in shallow["not_checked"]
    assert "every file's size and sha256" in shallow["not_checked"]
    deep = await admin.call("verify_backup", {"name": good["name"], "deep": True,
                                              "identity": identity})
    assert deep["result"] == "ok" and deep["level"] == "deep" and deep["complete"] is True
    assert deep["counts"]["documents"] == 1 and deep["backup"]["verify_level"] == "deep"
    stranger = await admin.call("verify_backup", {"name": good["name"], "deep": True,
                                                  "identity": generate_identity()
                                                  .identity_line()})
    assert stranger["result"] == "failed" and stranger["damaged"] is False
    assert "none of the given identities is a recipient" in stranger["error"]
    assert stranger["backup"]["verify_result"] == "ok"  # the backup itself is fine

    await admin.listen()
    stored = server.root / "content" / oldest["location"]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))

    async def caught():
        listed = {b["name"]: b for b in await _backups(admin)}
        return listed[oldest["name"]]["verify_result"] == "failed" and listed
    listed = await _until(caught, "the re-verification")
    assert "sha256 differs" in listed[oldest["name"]]["last_error"]
    event = await admin.next_event("backup_failed")
    assert event["data"]["stage"] == "verify" and event["data"]["backup_name"] == oldest["name"]
    await _stop_schedule(server, admin, "rolling")
    assert (await admin.call("server_info"))["backup_failures"]["verify"] >= 1
    by_hand = await admin.call("verify_backup", {"name": oldest["name"], "deep": True,
                                                 "identity": identity})
    assert by_hand["result"] == "failed" and by_hand["damaged"] is True
    assert await dump_store(server) is not None


# -- S3 targets ----------------------------------------------------------------------------------

async def test_a_backup_written_to_s3_in_parts_restores_on_another_server(
        start_server, s3, person, tmp_path):
    bucket = "cfms-backups"
    s3.client().create_bucket(Bucket=bucket)
    source = await start_server("source", s3_endpoint_url=s3.endpoint,
                                s3_part_bytes=5 * 1024 * 1024)
    async with source.connect("admin") as admin:
        built = await build_store(admin, tmp_path / "src", big_bytes=11 * 1024 * 1024)
        await admin.call("create_backup_schedule", {
            "name": "offsite", "interval_seconds": 3600, "recipients": [str(person.recipient)],
            "compression": "none",
            "target": {"type": "s3", "bucket": bucket, "prefix": "nightly"}})
        await _until(lambda: _has_backups(admin, 1), "the S3 backup")
        backup = (await _backups(admin))[0]
        assert backup["target"] == {"type": "s3", "bucket": bucket, "prefix": "nightly/"}
        assert backup["location"] == f"nightly/{backup['name']}.cfms.enc"
        assert _archives(source) == []  # nothing published locally, no temporary file left
        verified = await admin.call("verify_backup", {"name": backup["name"], "deep": True,
                                                      "identity": person.identity_line()})
        assert verified["result"] == "ok" and verified["level"] == "deep", verified

    head = s3.client().head_object(Bucket=bucket, Key=backup["location"])
    assert head["ContentLength"] == backup["size"]
    assert head["ETag"].strip('"').endswith("-3")  # three parts of at most 5 MiB
    downloaded = tmp_path / "downloaded.cfms.enc"
    s3.client().download_file(bucket, backup["location"], str(downloaded))
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == backup["archive_sha256"]
    identity = tmp_path / "restore.identity"
    identity.write_text(person.identity_line() + "\n")

    other = await start_server("other")
    async with other.connect("admin") as admin:
        final, _ = await import_from(admin, downloaded, identity)
        assert final["status"] == "completed", final
        assert final["files_count"] == len(built.contents)
        assert final["documents_count"] == len(built.documents)


async def test_an_unreachable_s3_target_is_an_upload_failure(start_server, s3, person,
                                                             tmp_path):
    server = await start_server("nobucket", s3_endpoint_url=s3.endpoint)
    async with server.connect("admin") as admin:
        await _small_store(admin, tmp_path / "files")
        await admin.listen()
        await admin.call("create_backup_schedule", {
            "name": "lost", "interval_seconds": 3600, "recipients": [str(person.recipient)],
            "target": {"type": "s3", "bucket": "no-such-bucket", "prefix": ""}})
        event = await admin.next_event("backup_failed")
        assert event["data"]["stage"] == "upload"
        assert "NoSuchBucket" in event["data"]["error"]
        assert await _backups(admin) == [] and _archives(server) == []
        assert (await admin.call("server_info"))["backup_failures"]["upload"] == 1


# -- the command line ---------------------------------------------------------------------------

async def test_cli_schedules_lists_and_verifies(server, tls_ca, person, tmp_path):
    cafile = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(cafile))
    cli = Cli(tmp_path / "config", cafile, server.url)
    await cli.login()
    added = await cli("backup-schedule", "add", "cli", "--interval", "3600", "--recipient",
                      str(person.recipient), "--keep-last", "2")
    assert added.code == 0 and "added schedule cli: every 3600 s to local, keeping last 2" \
        in added.out, added
    async with server.connect("admin") as admin:
        await _until(lambda: _has_backups(admin, 1), "the first run")
    listed = await cli("backup-list", "--json")
    name = listed.json()["backups"][0]["name"]
    shown = await cli("backup-list")
    assert name in shown.out and "ok (self-check)" in shown.out
    schedules = await cli("backup-schedule", "list")
    assert schedules.code == 0 and "cli" in schedules.out and "last=2" in schedules.out
    identity = tmp_path / "id.txt"
    identity.write_text(person.identity_line() + "\n")
    deep = await cli("backup-verify", name, "--deep", "--identity", str(identity))
    assert deep.code == 0 and f"OK: backup {name} (deep check)" in deep.out, deep
    shallow = await cli("backup-verify", name)
    assert shallow.code == 0 and "not checked: the recipient block's MAC" in shallow.out
    missing = await cli("backup-verify", "nope")
    assert missing.code == 1 and "does not exist" in missing.err
    pruned = await cli("backup-prune", "--dry-run")
    assert pruned.code == 0 and "would prune nothing" in pruned.out
    removed = await cli("backup-schedule", "rm", "cli")
    assert removed.code == 0 and "its backups are kept" in removed.out
