"""The backups the upstream CFMS server really writes (tests/fixtures/bk-legacy, issue 11) and
their ground truth: loading a fixture, importing it, reading a store back through the API, and
comparing what was read with the fixture's truth.json field by field.

truth.json holds what the upstream's own database and disk held after the export:
`folders` and `documents` exactly as the archive's folders.json/documents.json (archive order;
revisions and access rules in upstream id order, which is also history order), `files` with
`sha256_column` (the stored value, may be null), `sha256_actual` (hash of the bytes on disk,
null when absent), `on_disk`, `size` and `active`, plus `counts`, `archive_notes` and
`bk_self_restore` (the upstream restores every fixture itself).

Decisions of issue 11 encoded here:
- integer revision ids (and rule ids, which the API does not show) get fresh string ids, so
  revisions are compared on everything but their id; string ids are kept;
- a null sha256 is computed from the content;
- a revision whose file is inactive (upload never happened) or whose content is absent stays in
  the history, shown with `active: false`, and never becomes the current revision;
- duplicate sibling names are imported as `name (2)`, `name (3)`... in archive order (the first
  keeps its name).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import trio
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cfms_trio.client import ClientError
from cfms_trio.conventions import FINAL_STATUSES

from backup_support import IMPORT_DEADLINE_S, POLL_INTERVAL_S, build_legacy_archive

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "bk-legacy"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES_DIR.iterdir() if p.is_dir())


@dataclasses.dataclass
class UpstreamFixture:
    name: str
    archive: Path
    key: Path
    truth: dict

    def file(self, file_id: str) -> dict:
        return next(f for f in self.truth["files"] if f["id"] == file_id)

    def restorable(self, file_id: str) -> bool:
        """Whether a revision of this file can become current: active upstream, content there."""
        entry = self.file(file_id)
        return entry["active"] and entry["on_disk"]


def load_fixture(name: str) -> UpstreamFixture:
    folder = FIXTURES_DIR / name
    return UpstreamFixture(name, folder / f"{name}.cfms.enc", folder / f"{name}.key",
                           json.loads((folder / "truth.json").read_text()))


# -- building a variant of an upstream archive ---------------------------------------------------

def decrypt_upstream(fixture: UpstreamFixture) -> tuple[dict, dict[str, bytes]]:
    """The fixture's listings (by member name) and file contents (by file id), decoded as the
    legacy format is described in SPEC §7, independently of cfms_trio's reader."""
    key = bytes.fromhex(json.loads(fixture.key.read_text())["key"])
    data = fixture.archive.read_bytes()
    decryptor = Cipher(algorithms.AES(key), modes.CBC(data[:16])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(decryptor.update(data[16:]) + decryptor.finalize())
    plain += unpadder.finalize()
    listings, files = {}, {}
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.removeprefix("./")
            content = tar.extractfile(member).read()
            if name.startswith("files/"):
                files[name.removeprefix("files/")] = content
            else:
                listings[name] = json.loads(content)
    return listings, files


def write_variant(fixture: UpstreamFixture, folder: Path, name: str, edit) -> UpstreamFixture:
    """A new archive in the upstream's layout (documents.json first, files, then the other
    listings) after `edit(listings, truth, files)` changed them (files: id -> bytes; an id
    left out is a file listed but absent from the archive)."""
    listings, files = decrypt_upstream(fixture)
    truth = copy.deepcopy(fixture.truth)
    edit(listings, truth, files)
    key = os.urandom(32)
    order = (["documents.json"] + [f"files/{file_id}" for file_id in sorted(files)]
             + ["files.json", "folders.json", "metadata.json"])
    folder.mkdir(parents=True, exist_ok=True)
    archive, key_path = folder / f"{name}.cfms.enc", folder / f"{name}.key"
    archive.write_bytes(build_legacy_archive(listings, files, order, key))
    key_doc = dict(json.loads(fixture.key.read_text()), key=key.hex(), backup_name=name)
    key_path.write_text(json.dumps(key_doc))
    return UpstreamFixture(name, archive, key_path, truth)


# -- importing -------------------------------------------------------------------------------------

async def import_upstream(client, fixture: UpstreamFixture, **start_options) -> dict:
    """initiate, upload, start (with `start_options`, e.g. allow_missing_content=True), and
    poll until the task is final; return the final status."""
    init = await client.call("initiate_backup_import", {"timeout_seconds": 120})
    await client.upload_file(init["archive_task_id"], fixture.archive)
    await client.upload_file(init["key_task_id"], fixture.key)
    await client.call("start_backup_import",
                      {"backup_task_id": init["backup_task_id"], **start_options})
    with trio.fail_after(IMPORT_DEADLINE_S):
        while True:
            status = await client.call("get_backup_import_status",
                                       {"backup_task_id": init["backup_task_id"]})
            if status["status"] in FINAL_STATUSES:
                return status
            await trio.sleep(POLL_INTERVAL_S)


def assert_completed(status: dict) -> None:
    assert status["status"] == "completed", (
        f"import {status['status']} at step {status['current_step']!r}: "
        f"{status['error_message']}")


# -- reading a store back through the API --------------------------------------------------------

@dataclasses.dataclass
class ReadBack:
    folders: dict[str, dict]  # id -> list_directory entry + "access_rules"
    documents: dict[str, dict]  # id -> get_document_info + "revisions" + "access_rules"


async def read_store(client) -> ReadBack:
    """Every folder and document reachable from the root, with rules and revision history."""
    store = ReadBack({}, {})
    pending: list[str | None] = [None]
    while pending:
        folder_id = pending.pop()
        listing = await client.call("list_directory", {"folder_id": folder_id})
        for folder in listing["folders"]:
            rules = await client.call("get_directory_access_rules", {"folder_id": folder["id"]})
            store.folders[folder["id"]] = dict(folder, access_rules=rules["access_rules"])
            pending.append(folder["id"])
        for entry in listing["documents"]:
            document_id = entry["id"]
            info = await client.call("get_document_info", {"document_id": document_id})
            history = await client.call("list_revisions", {"document_id": document_id})
            rules = await client.call("get_document_access_rules", {"document_id": document_id})
            store.documents[document_id] = dict(info, revisions=history["revisions"],
                                                access_rules=rules["access_rules"])
    return store


async def download_sha256(client, folder: Path, document_id: str,
                          revision_id: str | None = None) -> str:
    """get_document (+ revision) and download_file; the sha256 of the bytes received."""
    task = await client.call("get_document", {"document_id": document_id,
                                              "revision_id": revision_id})
    path = folder / f"download-{os.urandom(6).hex()}"
    await client.download_file(task["task_id"], path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()
    return digest


# -- the comparison -------------------------------------------------------------------------------

def rules_by_type(rules: list[dict]) -> dict[str, list[dict]]:
    """truth's rule list (upstream id order) as the API shows rules: rule_data per type, in
    order."""
    out: dict[str, list[dict]] = {}
    for rule in rules:
        out.setdefault(rule["access_type"], []).append(rule["rule_data"])
    return out


def unique_sibling_names(truth: dict) -> dict[str, str]:
    """id -> the name it must have after import: duplicates among siblings become
    `name (2)`, `name (3)`... in archive order."""
    names: dict[str, str] = {}
    for kind, field, parent in (("folders", "name", "parent_id"),
                                ("documents", "title", "folder_id")):
        taken: set[tuple] = set()
        for item in truth[kind]:
            name, number = item[field], 2
            while (item[parent], name) in taken:
                name, number = f"{item[field]} ({number})", number + 1
            taken.add((item[parent], name))
            names[item["id"]] = name
    return names


def expected_current(fixture: UpstreamFixture, document: dict) -> dict | None:
    """The newest revision whose content can be served, or None."""
    live = [r for r in document["revisions"] if fixture.restorable(r["file_id"])]
    return live[-1] if live else None


async def assert_matches_truth(client, fixture: UpstreamFixture, download_dir: Path, *,
                               names: dict[str, str] | None = None) -> ReadBack:
    """Read the whole store back and compare it with truth.json, field by field and byte by
    byte. `names` (id -> name) overrides truth's names where the import renamed on purpose."""
    truth = fixture.truth
    names = names or {}
    store = await read_store(client)
    download_dir.mkdir(parents=True, exist_ok=True)

    # folders: ids, names, parents, times, rules per type in order
    assert sorted(store.folders) == sorted(f["id"] for f in truth["folders"])
    assert len(store.folders) == truth["counts"]["folders"]
    for expected in truth["folders"]:
        got = store.folders[expected["id"]]
        where = f"folder {expected['id']}"
        assert got["name"] == names.get(expected["id"], expected["name"]), where
        assert got["parent_id"] == expected["parent_id"], where
        assert got["created_time"] == expected["created_time"], where
        assert got["access_rules"] == rules_by_type(expected["access_rules"]), where

    # documents: ids, titles, folders, times, rules, history, current revision, bytes
    assert sorted(store.documents) == sorted(d["id"] for d in truth["documents"])
    assert len(store.documents) == truth["counts"]["documents"]
    revisions_seen = 0
    for expected in truth["documents"]:
        got = store.documents[expected["id"]]
        where = f"document {expected['id']}"
        assert got["title"] == names.get(expected["id"], expected["title"]), where
        assert got["folder_id"] == expected["folder_id"], where
        assert got["created_time"] == expected["created_time"], where
        assert got["access_rules"] == rules_by_type(expected["access_rules"]), where
        assert got["revisions_count"] == len(expected["revisions"]), where
        history = got["revisions"]
        assert [r["file_id"] for r in history] == [r["file_id"] for r in expected["revisions"]], where
        assert ([r["created_time"] for r in history]
                == [r["created_time"] for r in expected["revisions"]]), where
        for revision, want in zip(history, expected["revisions"]):
            rev_where = f"{where}, revision {want['id']!r}"
            assert isinstance(revision["id"], str) and revision["id"], rev_where
            if isinstance(want["id"], str):
                assert revision["id"] == want["id"], rev_where
            file = fixture.file(want["file_id"])
            assert revision["active"] == fixture.restorable(want["file_id"]), rev_where
            if revision["active"]:
                assert revision["size"] == file["size"], rev_where
                assert revision["sha256"] == file["sha256_actual"], rev_where
                digest = await download_sha256(client, download_dir, expected["id"],
                                               revision["id"])
                assert digest == file["sha256_actual"], rev_where
            else:
                # Never served: neither as a named revision nor as the current one.
                try:
                    await client.call("get_document", {"document_id": expected["id"],
                                                       "revision_id": revision["id"]})
                except ClientError as err:
                    assert err.code == 404, (rev_where, err)
                else:
                    raise AssertionError(f"{rev_where}: an inactive revision is served")
        revisions_seen += len(history)
        current = expected_current(fixture, expected)
        if current is None:
            assert got["current_revision"] is None, where
        else:
            position = expected["revisions"].index(current)
            assert got["current_revision"]["id"] == history[position]["id"], where
            assert got["current_revision"]["file_id"] == current["file_id"], where
            digest = await download_sha256(client, download_dir, expected["id"])
            assert digest == fixture.file(current["file_id"])["sha256_actual"], where
    assert revisions_seen == truth["counts"]["revisions"]
    all_ids = [r["id"] for d in store.documents.values() for r in d["revisions"]]
    assert len(set(all_ids)) == len(all_ids), "revision ids are not unique"
    return store
