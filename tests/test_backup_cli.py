"""The offline backup tools (`cfms-trio backup export|verify|inspect`) and
scripts/demo_client.py, run as an administrator runs them: as subprocesses."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from cfms_trio.config import Limits

import databases
from backup_support import (
    build_legacy_archive, build_store, cli_command, legacy_key_file, run_cli, serve_subprocess,
    sha256_hex, spec_decode,
)

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo_client.py"


@pytest.fixture
async def exported(start_server, tmp_path):
    """A store filled by build_store, exported offline with `cfms-trio backup export`."""
    server = await start_server("cli-source", limits=Limits(transfer_chunk_bytes=64 * 1024))
    async with server.connect("admin") as client:
        built = await build_store(client, tmp_path / "src", big_bytes=1_200_000)
    out = tmp_path / "out"
    done = await run_cli(*cli_command("backup", "export", "--root", str(server.root),
                                       *databases.serve_arguments(server.root),
                                       "--out", str(out), "--name", "offline"))
    assert done.returncode == 0, done.stderr.decode()
    return server, built, out / "offline.cfms.enc", out / "offline.key", done.stdout.decode()


def counts_text(built) -> str:
    return (f"{len(built.folders)} folders, {len(built.documents)} documents, "
            f"{len(built.contents)} files, {built.total_bytes} file bytes")


async def test_backup_export_writes_an_archive_the_spec_can_read(exported, tmp_path):
    server, built, archive, key, stdout = exported
    archive_bytes = archive.read_bytes()
    key_doc = json.loads(key.read_text())
    assert f"archive: {archive}" in stdout and f"key:     {key}" in stdout
    assert f"{len(archive_bytes)} bytes, sha256 {sha256_hex(archive_bytes)}" in stdout
    assert f"content: {counts_text(built)}" in stdout
    assert key_doc["archive_sha256"] == sha256_hex(archive_bytes)
    assert oct(key.stat().st_mode & 0o777) == oct(0o600)
    decoded = spec_decode(archive_bytes, key_doc)
    assert decoded.compression == 1  # zstd by default
    assert decoded.file_bytes() == built.contents
    assert decoded.listing("metadata.json")["backup_name"] == "offline"
    assert sorted(p.name for p in archive.parent.iterdir()) == ["offline.cfms.enc",
                                                               "offline.key"]

    plain = await run_cli(*cli_command("backup", "export", "--root", str(server.root),
                                       *databases.serve_arguments(server.root), "--out",
                                       str(tmp_path / "out"), "--name", "plain",
                                       "--compression", "none"))
    assert plain.returncode == 0, plain.stderr.decode()
    plain_archive = tmp_path / "out" / "plain.cfms.enc"
    decoded = spec_decode(plain_archive.read_bytes(),
                          json.loads((tmp_path / "out" / "plain.key").read_text()))
    assert decoded.compression == 0 and decoded.file_bytes() == built.contents

    again = await run_cli(*cli_command("backup", "export", "--root", str(server.root),
                                       *databases.serve_arguments(server.root),
                                       "--out", str(tmp_path / "out"), "--name", "offline"))
    assert again.returncode == 1
    assert "already exists" in again.stderr.decode()
    assert archive.read_bytes() == archive_bytes

    nowhere = await run_cli(*cli_command("backup", "export", "--root", str(tmp_path / "empty"),
                                         "--out", str(tmp_path / "x")))
    assert nowhere.returncode == 1 and "no cfms-trio store" in nowhere.stderr.decode()


async def test_backup_verify_accepts_a_good_archive(exported):
    server, built, archive, key, _ = exported
    done = await run_cli(*cli_command("backup", "verify", str(archive), str(key)))
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith(f"OK: format 3.0, {counts_text(built)}")  # the payload version
    # The parts and their counts (payload 3.0 holds the whole server).
    assert re.fullmatch(r"parts: accounts \(1 users, [1-9][0-9]* groups\); documents \("
                        + re.escape(counts_text(built)) + r"\); audit \([1-9][0-9]* entries\)",
                        lines[1]), lines


def without_recorded_sha256(key: Path, folder: Path) -> Path:
    """The same key file without archive_sha256, so only the archive itself can tell."""
    doc = json.loads(key.read_text())
    doc.pop("archive_sha256")
    path = folder / "no-sha.key"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("damage, recorded_sha_message, own_message", [
    ("flipped byte", "sha256 does not match", "failed authentication"),
    ("truncated", "sha256 does not match", "truncated"),
    ("extra bytes", "sha256 does not match", "segment"),
    ("wrong key", "wrong key", "wrong key"),
])
async def test_backup_verify_rejects_damage_clearly(exported, tmp_path, damage,
                                                    recorded_sha_message, own_message):
    server, built, archive, key, _ = exported
    bad_archive = tmp_path / "bad.cfms.enc"
    data = bytearray(archive.read_bytes())
    bad_key_doc = json.loads(key.read_text())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncated":
        del data[-1000:]
    elif damage == "extra bytes":
        data += b"\0" * 32
    else:
        bad_key_doc["key"] = os.urandom(32).hex()
    bad_archive.write_bytes(bytes(data))
    bad_key = tmp_path / "bad.key"
    bad_key.write_text(json.dumps(bad_key_doc))

    for key_path, message in ((bad_key, recorded_sha_message),
                              (without_recorded_sha256(bad_key, tmp_path), own_message)):
        done = await run_cli(*cli_command("backup", "verify", str(bad_archive), str(key_path)))
        stderr = done.stderr.decode()
        assert done.returncode != 0, done
        assert stderr.startswith("error: ") and message in stderr, stderr
        assert "Traceback" not in stderr
        assert done.stdout == b""


async def test_backup_verify_reads_legacy_archives_and_reports_missing_files(tmp_path):
    file_id = "ab" * 16
    files = {file_id: b"legacy content"}
    listings = {
        "metadata.json": {"version": "1.0"},
        "folders.json": [], "files.json": [{"id": file_id, "sha256": sha256_hex(files[file_id]),
                                            "created_time": 1.5, "path": "files/x"}],
        "documents.json": [{"id": "cd" * 16, "title": "t", "folder_id": None,
                            "created_time": 1.0,
                            "revisions": [{"id": "ef" * 16, "file_id": file_id,
                                           "created_time": 1.0}]}],
    }
    key = os.urandom(32)
    archive = tmp_path / "legacy.cfms.enc"
    archive.write_bytes(build_legacy_archive(listings, files, [
        f"files/{file_id}", "documents.json", "files.json", "folders.json", "metadata.json"],
        key))
    key_path = tmp_path / "legacy.key"
    key_path.write_bytes(legacy_key_file(key, "old"))
    done = await run_cli(*cli_command("backup", "verify", str(archive), str(key_path)))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith("OK: format 1.0, 0 folders, 1 documents, 1 files, 14")

    missing = await run_cli(*cli_command("backup", "verify", str(tmp_path / "nope"),
                                         str(key_path)))
    assert missing.returncode != 0 and "nope" in missing.stderr.decode()
    assert "Traceback" not in missing.stderr.decode()


async def test_backup_inspect_shows_metadata_and_tree(exported):
    server, built, archive, key, _ = exported
    done = await run_cli(*cli_command("backup", "inspect", str(archive), str(key)))
    assert done.returncode == 0, done.stderr.decode()
    text = done.stdout.decode()
    metadata_text, tree = text.split("\n/\n")
    metadata = json.loads(metadata_text)
    assert metadata["backup_name"] == "offline" and metadata["version"] == "3.0"
    assert metadata["files_count"] == len(built.contents)
    lines = tree.splitlines()
    # Folders end in '/', contents are indented under them, documents show their history.
    for expected in ("  readme  (1 revisions, 15 bytes)", "  projects/", "    alpha/",
                     "      deep/", "        big  (1 revisions, 1200000 bytes)",
                     "      spec  (3 revisions, 8 bytes)", "    empty  (1 revisions, 0 bytes)",
                     "  archive/", "    old  (1 revisions, 1000 bytes)",
                     "      notes  (2 revisions, 0 bytes)"):
        assert expected in lines, (expected, lines)
    assert lines.index("    alpha/") < lines.index("      deep/") < lines.index(
        "        big  (1 revisions, 1200000 bytes)")

    as_json = await run_cli(*cli_command("backup", "inspect", "--json", str(archive), str(key)))
    assert as_json.returncode == 0, as_json.stderr.decode()
    listed = json.loads(as_json.stdout)
    decoded = spec_decode(archive.read_bytes(), json.loads(key.read_text()))
    for name in ("folders", "documents", "files"):
        assert listed[name] == decoded.records(name), name
    assert listed["metadata"] == metadata
    records = decoded.v3_layout()
    assert listed["groups"] == records["groups"] and listed["audit"] == records["audit"]
    # Users as in the archive, but inspect never prints password hashes.
    assert listed["users"] == [{k: v for k, v in u.items() if k != "password_hash"}
                               for u in records["users"]]
    assert "scrypt$" not in as_json.stdout.decode()
    assert lines[-1].startswith("parts: accounts (1 users, "), lines

    wrong = await run_cli(*cli_command("backup", "inspect", str(archive), str(archive)))
    assert wrong.returncode != 0 and "key file" in wrong.stderr.decode()


async def test_demo_client_help():
    done = await run_cli(sys.executable, str(DEMO), "--help")
    assert done.returncode == 0, done.stderr.decode()
    usage = done.stdout.decode()
    for word in ("--server", "--archive", "--key", "--export-from", "--listen",
                 "initiate_backup_import", "start_backup_import"):
        assert word in usage
    missing = await run_cli(sys.executable, str(DEMO), "--server", "wss://127.0.0.1:1")
    assert missing.returncode == 2 and "--archive and --key" in missing.stderr.decode()


async def test_demo_client_imports_a_backup_into_a_running_server(exported, tmp_path):
    server, built, archive, key, _ = exported
    async with serve_subprocess(tmp_path / "demo-target") as served:
        done = await run_cli(sys.executable, str(DEMO), "--server", served.url, "--cafile",
                             str(served.cafile), "--password-file", str(served.password_file),
                             "--archive", str(archive), "--key", str(key), "--poll", "0.05",
                             "--listen")
        stdout = done.stdout.decode()
        assert done.returncode == 0, (stdout, done.stderr.decode())
        steps = re.findall(r"^==> (.*)$", stdout, re.M)
        assert [s.split()[0] for s in steps] == [
            "logging", "initiate_backup_import", "uploading", "uploading", "start_backup_import",
            "waiting"], steps
        assert (f"import completed: {len(built.folders)} folders, {len(built.documents)} "
                f"documents, {len(built.contents)} files") in stdout

        again = await run_cli(sys.executable, str(DEMO), "--server", served.url, "--cafile",
                              str(served.cafile), "--password-file", str(served.password_file),
                              "--archive", str(archive), "--key", str(key), "--poll", "0.05")
        assert again.returncode == 1
        assert "import failed" in again.stderr.decode()
        assert "already exists" in again.stderr.decode()


async def test_backup_verify_makes_the_checks_an_import_makes(tmp_path):
    """An archive whose segments and files are all intact but which an import would refuse
    (two sibling folders of one name) fails `verify` too, with the import's message."""
    from hostile import corpus

    case = corpus.duplicate_sibling_folder_names()
    archive, key = tmp_path / "dup.cfms.enc", tmp_path / "dup.key"
    archive.write_bytes(case.archive)
    key.write_bytes(case.key)
    done = await run_cli(*cli_command("backup", "verify", str(archive), str(key)))
    stderr = done.stderr.decode()
    assert done.returncode == 1, done
    assert stderr == f"error: {case.expected}\n"
