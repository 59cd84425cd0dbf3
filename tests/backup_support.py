"""Support for the backup test modules (test_backup_export, test_backup_import,
test_backup_cli): an independent reader of the archive format written from SPEC §7 alone, a
builder of a legacy 1.0 archive, a store builder, dumps of the data tables, and runners for
`cfms-trio` subprocesses.

Nothing here uses cfms_trio's backup code: the format is decoded with the `cryptography`
package, `tarfile` and `zstandard`, so a test that compares the two catches a writer and a
reader that agree with each other but not with the spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import trio
import zstandard
from cryptography.hazmat.primitives import hashes, hmac, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cfms_trio.client import export_backup, import_backup
from cfms_trio.conventions import FINAL_STATUSES

import databases
import storage_mode
from helpers import ADMIN_PASSWORD, snapshot_tree

# SPEC §8: the steps of a running import and the progress each one starts at.
SPEC_STEPS = {
    "Decrypting archive": 10, "Extracting archive": 30, "Loading metadata": 40,
    "Importing files": 50, "Importing folders": 60, "Importing documents": 80,
    "Finalizing import": 95, "Restore completed": 100,
}
IMPORT_DEADLINE_S = 30  # bound on any one import in these tests
SUBPROCESS_TIMEOUT_S = 60
POLL_INTERVAL_S = 0.02


# -- SPEC §7, format 2, decoded independently --------------------------------------------------

V2_MAGIC = b"CFMSBAK2"
V2_HEADER_BYTES = 8 + 1 + 1 + 2 + 32 + 7 + 32
V2_TAG_BYTES = 16
V2_MEMBER_ORDER = ("metadata.json", "folders.json", "documents.json", "files.json")


# docs/BACKUP_FORMAT.md §1.6a, payload 3.0: the kinds of pieces in member order, the part each
# belongs to, and the limits of one piece.
V3_KINDS = ("groups", "users", "folders", "documents", "files", "audit")
V3_PART_OF = {"groups": "accounts", "users": "accounts", "folders": "documents",
              "documents": "documents", "files": "documents", "audit": "audit"}
V3_PIECE_NAME = re.compile(r"(groups|users|folders|documents|files|audit)\.(0|[1-9][0-9]*)"
                           r"\.ndjson")
V3_PIECE_RECORDS_MAX = 10_000
V3_PIECE_BYTES_MAX = 16 * 2 ** 20


class SpecDecodeError(Exception):
    """The archive does not follow SPEC §7."""


def _strict_object(line: bytes, where: str) -> dict:
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise SpecDecodeError(f"{where}: duplicate key")
        return dict(pairs)

    def no_constant(name):
        raise SpecDecodeError(f"{where}: {name} is not JSON")

    value = json.loads(line.decode("utf-8"), object_pairs_hook=no_duplicates,
                       parse_constant=no_constant)
    if not isinstance(value, dict):
        raise SpecDecodeError(f"{where}: a line is not a JSON object")
    return value


def _piece_records(name: str, data: bytes) -> list[dict]:
    """The records of one piece: one compact JSON object per line, every line ending in a
    newline, no blank lines, within the piece limits."""
    if not data or not data.endswith(b"\n"):
        raise SpecDecodeError(f"{name}: empty, or the last line has no newline")
    if len(data) > V3_PIECE_BYTES_MAX:
        raise SpecDecodeError(f"{name}: more than {V3_PIECE_BYTES_MAX} bytes")
    lines = data[:-1].split(b"\n")
    if len(lines) > V3_PIECE_RECORDS_MAX:
        raise SpecDecodeError(f"{name}: more than {V3_PIECE_RECORDS_MAX} records")
    records = []
    for number, line in enumerate(lines, 1):
        if line.strip() != line or not line:
            raise SpecDecodeError(f"{name}: line {number} is blank or padded")
        records.append(_strict_object(line, f"{name} line {number}"))
    return records


@dataclasses.dataclass
class DecodedArchive:
    compression: int
    chunk_log2: int
    segment_count: int
    members: list[tuple[str, bytes]]  # in archive order

    def listing(self, name: str):
        return json.loads(dict(self.members)[name])

    def file_bytes(self) -> dict[str, bytes]:
        return {name.removeprefix("files/"): data for name, data in self.members
                if name.startswith("files/")}

    @property
    def payload_version(self) -> str:
        return self.listing("metadata.json")["version"]

    def records(self, kind: str) -> list[dict]:
        """Every record of a listing kind: the `<kind>.json` array of payload 2.0, or the
        records of the `<kind>.N.ndjson` pieces of payload 3.0 in order (checked by
        `v3_layout`)."""
        if self.payload_version == "2.0":
            return self.listing(f"{kind}.json")
        return self.v3_layout()[kind]

    def v3_layout(self) -> dict[str, list[dict]]:
        """Check the members of a payload 3.0 archive against §1.6a (order, piece numbering
        and limits, each files piece followed by its files' contents, counts and parts in
        the metadata) and return every kind's records."""
        names = [name for name, _ in self.members]
        if not names or names[0] != "metadata.json":
            raise SpecDecodeError("metadata.json is not the first member")
        metadata = self.listing("metadata.json")
        if metadata.get("version") != "3.0" or metadata.get("format") != "cfms-backup":
            raise SpecDecodeError(f"not a payload 3.0 metadata: {metadata}")
        parts = metadata["parts"]
        if not set(metadata["requested_parts"]) <= set(parts):
            raise SpecDecodeError("requested_parts is not within parts")
        if "audit" in parts and "accounts" not in parts:
            raise SpecDecodeError("audit is held without accounts")
        records: dict[str, list[dict]] = {kind: [] for kind in V3_KINDS}
        next_piece = {kind: 0 for kind in V3_KINDS}
        kind_rank = -1
        expected_files: list[str] = []  # ids of the current files piece still to come
        for name, data in self.members[1:]:
            if name.startswith("files/"):
                if not expected_files or expected_files[0] != name.removeprefix("files/"):
                    raise SpecDecodeError(f"{name} is not the next file of its files piece")
                expected_files.pop(0)
                continue
            match = V3_PIECE_NAME.fullmatch(name)
            if match is None:
                raise SpecDecodeError(f"unexpected member {name!r}")
            if expected_files:
                raise SpecDecodeError(f"{name} comes before files/{expected_files[0]}")
            kind, number = match.group(1), int(match.group(2))
            rank = V3_KINDS.index(kind)
            if rank < kind_rank or number != next_piece[kind]:
                raise SpecDecodeError(f"{name} is out of order")
            if V3_PART_OF[kind] not in parts:
                raise SpecDecodeError(f"{name} belongs to a part the metadata does not list")
            kind_rank, next_piece[kind] = rank, number + 1
            piece = _piece_records(name, data)
            records[kind].extend(piece)
            if kind == "files":
                expected_files = [entry["id"] for entry in piece]
        if expected_files:
            raise SpecDecodeError(f"files/{expected_files[0]} is missing")
        for kind in V3_KINDS:
            if metadata[f"{kind}_count"] != len(records[kind]):
                raise SpecDecodeError(f"{kind}_count does not match the pieces")
        if metadata["total_file_bytes"] != sum(f["size"] for f in records["files"]):
            raise SpecDecodeError("total_file_bytes does not match the files pieces")
        return records


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def spec_decode(archive: bytes, key_file: dict) -> DecodedArchive:
    """Decrypt and untar a format 2 archive exactly as SPEC §7 describes it."""
    header = archive[:V2_HEADER_BYTES]
    if len(header) < V2_HEADER_BYTES or header[:8] != V2_MAGIC:
        raise SpecDecodeError("bad magic or short header")
    compression, chunk_log2 = header[8], header[9]
    reserved, salt = header[10:12], header[12:44]
    nonce_prefix, key_check = header[44:51], header[51:83]
    if reserved != b"\0\0" or compression not in (0, 1) or not 16 <= chunk_log2 <= 24:
        raise SpecDecodeError("bad header field")
    key = bytes.fromhex(key_file["key"])
    payload_key = _hkdf(key, salt, b"cfms-backup-v2 payload")
    commit_key = _hkdf(key, salt, b"cfms-backup-v2 commit")
    check = hmac.HMAC(commit_key, hashes.SHA256())
    check.update(header[:51])
    check.verify(key_check)  # raises InvalidSignature for a wrong key

    sealed_bytes = 2 ** chunk_log2 + V2_TAG_BYTES
    body = archive[V2_HEADER_BYTES:]
    if len(body) < V2_TAG_BYTES or 0 < len(body) % sealed_bytes < V2_TAG_BYTES:
        raise SpecDecodeError("body is not a whole number of segments")
    count = -(-len(body) // sealed_bytes)
    aead = AESGCM(payload_key)
    plaintext = bytearray()
    for index in range(count):
        last = index == count - 1
        sealed = body[index * sealed_bytes:(index + 1) * sealed_bytes]
        if not last and len(sealed) != sealed_bytes:
            raise SpecDecodeError(f"segment {index} is short")
        nonce = nonce_prefix + struct.pack(">I", index) + (b"\x01" if last else b"\x00")
        plaintext += aead.decrypt(nonce, sealed, header)
    data = bytes(plaintext)
    if compression == 1:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data),
                                                             read_across_frames=True)
        data = reader.read()
    members = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                raise SpecDecodeError(f"member {member.name!r} is not a regular file")
            members.append((member.name, tar.extractfile(member).read()))
    return DecodedArchive(compression, chunk_log2, count, members)


# -- SPEC §7, legacy format 1.0, built independently ------------------------------------------

def build_legacy_archive(listings: dict[str, object], files: dict[str, bytes],
                         order: list[str], key: bytes) -> bytes:
    """16-byte IV ‖ AES-256-CBC (PKCS#7) over an uncompressed tar whose members are named
    './<name>' and come in `order` (names without the './')."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        directory = tarfile.TarInfo("./files")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        for name in order:
            if name.startswith("files/"):
                data = files[name.removeprefix("files/")]
            else:
                data = json.dumps(listings[name]).encode()
            info = tarfile.TarInfo("./" + name)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    padder = padding.PKCS7(128).padder()
    padded = padder.update(raw.getvalue()) + padder.finalize()
    iv = os.urandom(16)
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return iv + encryptor.update(padded) + encryptor.finalize()


def legacy_key_file(key: bytes, name: str) -> bytes:
    return json.dumps({"key": key.hex(), "algorithm": "AES-256-CBC", "created_at": time.time(),
                       "backup_name": name}).encode()


# -- a store with a bit of everything -----------------------------------------------------------

def rule(*, groups=(), rights=(), match="all") -> dict:
    return {"match": match, "match_groups": [
        {"match": "all", "groups": {"match": "any", "require": list(groups)},
         "rights": {"match": "all", "require": list(rights)}}]}


@dataclasses.dataclass
class BuiltStore:
    folders: dict[str, str]  # name -> id
    documents: dict[str, str]  # title -> id
    revisions: dict[str, list[str]]  # document id -> file ids, oldest first
    contents: dict[str, bytes]  # file id -> bytes

    @property
    def total_bytes(self) -> int:
        return sum(len(b) for b in self.contents.values())


async def upload_bytes(client, task_id: str, folder: Path, content: bytes) -> None:
    path = folder / f"upload-{os.urandom(6).hex()}"
    path.write_bytes(content)
    await client.upload_file(task_id, path)
    path.unlink()


async def build_store(client, folder: Path, *, big_bytes: int = 2_300_000,
                      prefix: str = "") -> BuiltStore:
    """Nested folders, several revisions, access rules, and empty, small, multi-chunk and
    multi-segment files (segments are 1 MiB, so `big_bytes` spans several)."""
    folder.mkdir(parents=True, exist_ok=True)
    store = BuiltStore({}, {}, {}, {})

    async def make_folder(name, parent=None, rules=None):
        data = {"name": prefix + name, "parent_id": store.folders.get(parent)}
        if rules:
            data["access_rules"] = rules
        store.folders[name] = (await client.call("create_directory", data))["id"]

    async def make_document(title, parent, revisions, rules=None):
        data = {"title": prefix + title, "folder_id": store.folders.get(parent)}
        if rules:
            data["access_rules"] = rules
        created = await client.call("create_document", data)
        document_id = created["document_id"]
        store.documents[title] = document_id
        store.revisions[document_id] = []
        for index, content in enumerate(revisions):
            if index:
                created = await client.call("upload_document", {"document_id": document_id})
            await upload_bytes(client, created["task_id"], folder, content)
            store.revisions[document_id].append(created["file_id"])
            store.contents[created["file_id"]] = content

    await make_folder("projects", rules={
        "read": [rule(groups=["user", "sysop"])],
        "manage": [rule(groups=["sysop"]), rule(rights=["set_access_rules"], match="any")]})
    await make_folder("alpha", "projects")
    await make_folder("deep", "alpha", rules={"write": [rule(groups=["sysop"])]})
    await make_folder("beta", "projects")
    await make_folder("archive")
    await make_document("readme", None, [b"hello, restore\n"])
    await make_document("empty", "projects", [b""])
    await make_document("spec", "alpha", [b"v1", os.urandom(150_000), b"v3 final"],
                        rules={"read": [rule(groups=["sysop", "user"])],
                               "write": [rule(rights=["create_document"])]})
    await make_document("big", "deep", [os.urandom(big_bytes)])
    await make_document("notes", "beta", [os.urandom(70_000), b""])
    await make_document("old", "archive", [os.urandom(1000)],
                        rules={"move": [rule(groups=["sysop"])]})
    return store


# -- what the store holds ------------------------------------------------------------------------

def dump_data_tables(m) -> dict:
    """Every row of the tables a backup touches, comparable with ==."""
    def rows(model):
        return sorted((dict(r) for r in model.select().dicts()), key=lambda r: str(r["id"]))

    rules = rows(m.AccessRule)
    for r in rules:
        r["rule_data"] = json.loads(r["rule_data"])
    return {"folders": rows(m.Folder), "documents": rows(m.Document),
            "revisions": rows(m.Revision), "files": rows(m.File), "access_rules": rules,
            "file_tasks": rows(m.FileTask)}


async def dump_store(server) -> dict:
    return await server.app.store.read(dump_data_tables)


IGNORED_CONTENT = re.compile(
    r"^(cfms\.db(-wal|-shm|-journal)?|logs/.*|backups/import/.*|tmp/removed/.*)$")


def content_files(server) -> dict[str, str]:
    """snapshot_tree of content/ without the database, its WAL, the logs and uploaded imports
    (also those set aside for removal)."""
    return {path: digest for path, digest in snapshot_tree(server.root / "content").items()
            if not IGNORED_CONTENT.match(path)}


def import_dir_files(server) -> list[str]:
    return sorted(p.name for p in (server.root / "content" / "backups" / "import").iterdir())


# -- flows ---------------------------------------------------------------------------------------

async def export_to(client, folder: Path, name: str | None = None, compression: str = "zstd"):
    """generate_backup and download archive and key into `folder`."""
    return await export_backup(client, folder, name, compression)


async def import_from(client, archive: Path, key: Path | None, timeout_seconds: int = 120,
                      passphrase: str | None = None):
    """The whole import flow; returns (final status, every status seen while polling)."""
    seen: list[dict] = []
    with trio.fail_after(IMPORT_DEADLINE_S):
        final = await import_backup(client, archive, key, timeout_seconds=timeout_seconds,
                                    poll_interval_s=POLL_INTERVAL_S, on_status=seen.append,
                                    passphrase=passphrase)
    return final, seen


async def wait_final(client, task_id: str, timeout_s: float = IMPORT_DEADLINE_S,
                     seen: list | None = None) -> dict:
    with trio.fail_after(timeout_s):
        while True:
            status = await client.call("get_backup_import_status", {"backup_task_id": task_id})
            if seen is not None:
                seen.append(status)
            if status["status"] in FINAL_STATUSES:
                return status
            await trio.sleep(POLL_INTERVAL_S)


async def start_only(client, archive: Path, key: Path, timeout_seconds: int = 120) -> str:
    """Initiate, upload both files and start; return the backup task id."""
    init = await client.call("initiate_backup_import", {"timeout_seconds": timeout_seconds})
    await client.upload_file(init["archive_task_id"], archive)
    await client.upload_file(init["key_task_id"], key)
    await client.call("start_backup_import", {"backup_task_id": init["backup_task_id"]})
    return init["backup_task_id"]


def assert_progress_monotonic(seen: list[dict]) -> None:
    percents = [s["progress_percent"] for s in seen]
    assert percents == sorted(percents), percents
    for status in seen:
        assert 0 <= status["progress_percent"] <= 100
        if status["status"] == "processing":
            assert status["current_step"] in SPEC_STEPS, status
            assert status["progress_percent"] >= SPEC_STEPS[status["current_step"]], status


# -- subprocesses --------------------------------------------------------------------------------

def cli_command(*args: str) -> list[str]:
    """`cfms-trio ARGS` through the installed entry point (python -m as a fallback)."""
    script = Path(sys.executable).with_name("cfms-trio")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "cfms_trio", *args]


async def run_cli(*args: str, env: dict | None = None,
                  stdin_text: str | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    stdin = stdin_text.encode() if stdin_text is not None else b""
    with trio.fail_after(SUBPROCESS_TIMEOUT_S):
        return await trio.run_process(list(args), capture_stdout=True, capture_stderr=True,
                                      check=False, env=full_env, stdin=stdin)


LISTENING = re.compile(r"^listening on (wss?://\S+)$")


@dataclasses.dataclass
class ServedProcess:
    url: str
    cafile: Path
    password_file: Path


@contextlib.asynccontextmanager
async def serve_subprocess(root: Path):
    """`python -m cfms_trio serve --root ROOT --port 0`; yields once it printed its
    `listening on` line; always stopped at the end."""
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CFMS_ADMIN_PASSWORD=ADMIN_PASSWORD)
    stderr_path = root.parent / f"{root.name}-serve-stderr.txt"
    with open(stderr_path, "wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "cfms_trio", "serve", "--root", str(root), "--port", "0",
             *databases.serve_arguments(root), *storage_mode.server_args(root)],
            stdout=subprocess.PIPE, stderr=stderr, env=env)
    try:
        buffer = b""
        url = None
        with trio.fail_after(SUBPROCESS_TIMEOUT_S):
            while url is None:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    await process.wait()
                    pytest.fail(f"serve exited before listening:\n{stderr_path.read_text()}")
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    match = LISTENING.match(line.decode().strip())
                    if match:
                        url = match.group(1)
        password_file = root.parent / f"{root.name}-password.txt"
        password_file.write_text(ADMIN_PASSWORD + "\n")
        yield ServedProcess(url, root / "content" / "tls" / "cert.pem", password_file)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.stdout.aclose()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- reading archives through the staging index, as an import does ---------------------------


@dataclasses.dataclass
class ReadBack:
    """What an archive held, rebuilt in the listing shape from the staging index (small
    archives only: tests compare whole listings)."""

    contents: object  # the reader's BackupContents
    folders: list
    documents: list
    files: list
    groups: list
    users: list
    audit: list

    def __getattr__(self, name):
        return getattr(self.contents, name)


def listings_of(index) -> dict:
    """Every listing of a StagingIndex, in archive order and the listing shape."""
    db = index.db
    rules: dict = {}
    for object_id, rule_id, access_type, rule_data in db.execute(
            "SELECT object_id, id, access_type, rule_data FROM rules ORDER BY seq"):
        rules.setdefault(object_id, []).append(
            {"id": rule_id, "access_type": access_type, "rule_data": json.loads(rule_data)})
    revisions: dict = {}
    for document_id, revision_id, file_id, created_time in db.execute(
            "SELECT document_id, id, file_id, created_time FROM revisions ORDER BY seq"):
        revisions.setdefault(document_id, []).append(
            {"id": revision_id, "file_id": file_id, "created_time": created_time})
    groups_of: dict = {}
    for username, group in db.execute("SELECT username, group_name FROM memberships"):
        groups_of.setdefault(username, []).append(group)
    return {
        "folders": [{"id": i, "name": n, "parent_id": p or None, "created_time": t,
                     "access_rules": rules.get(i, [])} for i, n, p, t in db.execute(
            "SELECT id, name, parent_key, created_time FROM folders ORDER BY seq")],
        "documents": [{"id": i, "title": n, "folder_id": p or None, "created_time": t,
                       "access_rules": rules.get(i, []), "revisions": revisions.get(i, [])}
                      for i, n, p, t in db.execute(
            "SELECT id, title, folder_key, created_time FROM documents ORDER BY seq")],
        "files": [{"id": i, "sha256": s, "size": z, "created_time": t} for i, s, z, t in
                  db.execute("SELECT id, sha256, size, created_time FROM files ORDER BY seq")],
        "groups": [{"name": n, "permissions": json.loads(p), "created_time": t}
                   for n, p, t in db.execute(
            "SELECT name, permissions, created_time FROM account_groups ORDER BY seq")],
        "users": [{"username": u, "password_hash": h, "nickname": n,
                   "permissions": json.loads(p), "groups": sorted(groups_of.get(u, [])),
                   "created_time": c, "passwd_last_modified": m}
                  for u, h, n, p, c, m in db.execute(
            "SELECT username, password_hash, nickname, permissions, created_time, "
            "passwd_last_modified FROM users ORDER BY seq")],
        "audit": [{"time": t, "username": u, "action": a, "target": g, "result": r,
                   "address": d} for t, u, a, g, r, d in db.execute(
            "SELECT time, username, action, target, result, address FROM audit ORDER BY seq")],
    }


def read_back(source, key_info, staging_dir: Path, limits, **kwargs) -> ReadBack:
    """read_backup_archive into a staging index, with the import's whole-set checks."""
    from cfms_trio.backup.format import read_backup_archive
    from cfms_trio.backup.restore import check_contents
    from cfms_trio.backup.staging_index import StagingIndex

    index = StagingIndex.create(staging_dir)
    try:
        contents = read_backup_archive(source, key_info, staging_dir, limits, index, **kwargs)
        check_contents(contents, index)
        return ReadBack(contents, **listings_of(index))
    finally:
        index.close()
        (staging_dir / "index.sqlite").unlink(missing_ok=True)


def v3_metadata(listings: dict, parts=("documents",), **extra) -> dict:
    """metadata.json of a payload 3.0 archive holding `listings` (kind -> records)."""
    counts = {f"{kind}_count": len(listings.get(kind, ())) for kind in
              ("folders", "documents", "files", "groups", "users", "audit")}
    return {"format": "cfms-backup", "version": "3.0", "created_at": 1700000000.0,
            "backup_name": "nightly", "server_version": "0.1.0", "parts": list(parts),
            "requested_parts": list(parts),
            "total_file_bytes": sum(f["size"] for f in listings.get("files", ())),
            **counts, **extra}
