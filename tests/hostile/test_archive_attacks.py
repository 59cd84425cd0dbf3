"""Issue 12, items 8-10: archives whose cost or shape the member checks did not see.

8. Every GNU sparse encoding (old GNU type 'S'; pax 0.0 offset/numbytes, 0.1 map, 1.0
   major/minor) is refused, in format 2 and legacy 1.0, with an error naming the sparse member,
   before tarfile reads a sparse map: a map claiming a billion entries costs the server (a
   subprocess, its peak RSS read from /proc) less than 100 MB.
9. A 3 KB archive carrying a 32 MiB `folders.json` of `[[],[],...]` fails naming folders.json,
   with the server's peak RSS growing by less than 150 MB.
10. Two documents whose revisions share one file import; deleting either keeps the other's
    content downloadable, deleting both removes the file; the same through delete_directory.
"""

from __future__ import annotations

import copy
import io
import tarfile

import pytest
import trio
import zstandard

from cfms_trio.backup.format import segments as cs
from cfms_trio.client import open_client

from helpers import ADMIN_PASSWORD

from . import corpus
from .support import run_import
from .test_crash_restart import serve_process
from .test_hostile_imports import import_and_check

pytestmark = pytest.mark.timeout(120)

CASE_TIMEOUT_S = 60
SPARSE_MEMBER = "files/hx1"
SPARSE_PEAK_GROWTH_LIMIT_BYTES = 100 * 2**20
LISTING_PEAK_GROWTH_LIMIT_BYTES = 150 * 2**20


def sparse_member(encoding: str, data: bytes = b"first draft") -> tuple[tarfile.TarInfo, bytes]:
    """A member named files/hx1 in one GNU sparse encoding, with `data` as its payload (for
    1.0 the sparse map comes first in the payload)."""
    info = tarfile.TarInfo(SPARSE_MEMBER)
    info.mtime = int(corpus.CREATED_AT)
    size = str(len(data))
    if encoding == "gnu_type_S":
        info.type = tarfile.GNUTYPE_SPARSE
    elif encoding == "pax_0.0":
        info.pax_headers = {"GNU.sparse.offset": "0", "GNU.sparse.numbytes": size,
                            "GNU.sparse.size": size}
    elif encoding == "pax_0.1":
        info.pax_headers = {"GNU.sparse.numblocks": "1", "GNU.sparse.map": f"0,{size}",
                            "GNU.sparse.size": size}
    else:  # pax_1.0: the map is "count\n offset\n numbytes\n", padded to a block, then data
        sparse_map = f"1\n0\n{size}\n".encode()
        data = sparse_map + bytes(512 - len(sparse_map)) + data
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": SPARSE_MEMBER, "GNU.sparse.realsize": size}
    info.size = len(data)
    return info, data


def tar_with(members: list, tar_format: int) -> bytes:
    """A tar of (name, data) pairs and (TarInfo, data) pairs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            elif isinstance(member[0], tarfile.TarInfo):
                tar.addfile(member[0], io.BytesIO(member[1]))
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), int(corpus.CREATED_AT)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _replace(members: list, name: str, replacement) -> list:
    out = []
    for member in members:
        current = member.name if isinstance(member, tarfile.TarInfo) else member[0]
        out.append(replacement if current == name else member)
    return out


def sparse_case(encoding: str, legacy: bool) -> tuple[bytes, bytes]:
    dataset = corpus.base_dataset()
    if legacy:
        members = _replace(corpus.legacy_members(dataset), "./" + SPARSE_MEMBER,
                           sparse_member(encoding))
        tar_format = tarfile.GNU_FORMAT if encoding == "gnu_type_S" else tarfile.PAX_FORMAT
        return corpus.legacy_encrypt(tar_with(members, tar_format)), corpus.legacy_key()
    members = _replace(corpus.standard_members(dataset), SPARSE_MEMBER, sparse_member(encoding))
    tar_format = tarfile.GNU_FORMAT if encoding == "gnu_type_S" else tarfile.PAX_FORMAT
    return corpus.seal(tar_with(members, tar_format)), corpus.v2_key()


SPARSE_ENCODINGS = ("gnu_type_S", "pax_0.0", "pax_0.1", "pax_1.0")


@pytest.mark.parametrize("legacy", [False, True], ids=["v2", "legacy"])
@pytest.mark.parametrize("encoding", SPARSE_ENCODINGS)
async def test_sparse_members_are_refused(hostile_server, encoding, legacy):
    archive, key = sparse_case(encoding, legacy)
    with trio.fail_after(CASE_TIMEOUT_S):
        status = await import_and_check(hostile_server, archive, key)
    message = status["error_message"]
    assert "sparse" in message and "files/hx1" in message, message


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


async def import_on_subprocess(tmp_path, archive: bytes, key: bytes) -> tuple[dict, int]:
    """Import into a fresh `serve` subprocess; return the final status and how much the
    server's peak RSS grew during the import."""
    root = tmp_path / "root"
    root.mkdir()
    async with serve_process(root) as server:
        async with open_client(server.url) as admin:
            await admin.login("admin", ADMIN_PASSWORD)
            await admin.listen()
            before = peak_rss_bytes(server.process.pid)
            with trio.fail_after(CASE_TIMEOUT_S):
                status = await run_import(admin, archive, key, tmp_path)
            growth = peak_rss_bytes(server.process.pid) - before
            assert (await admin.call("server_info"))["name"] == "cfms-trio"
    return status, growth


async def test_sparse_map_bomb_costs_no_memory(tmp_path):
    """A pax 1.0 sparse map claiming 10**9 entries, followed by 16 million zero entries (32
    MB that zstd makes a few KB of)."""
    info, _ = sparse_member("pax_1.0")
    payload = b"1000000000\n" + b"0\n" * 16_000_000
    info.size = len(payload)
    members = _replace(corpus.standard_members(corpus.base_dataset()), SPARSE_MEMBER,
                       (info, payload))
    compressed = zstandard.ZstdCompressor().compress(tar_with(members, tarfile.PAX_FORMAT))
    archive = corpus.seal(compressed, compression=cs.COMPRESSION_ZSTD)
    assert len(archive) < 64 * 1024
    status, growth = await import_on_subprocess(tmp_path, archive, corpus.v2_key())
    assert status["status"] == "failed", status
    assert growth < SPARSE_PEAK_GROWTH_LIMIT_BYTES, f"server peak grew {growth / 2**20:.0f} MiB"
    assert "sparse" in status["error_message"], status


async def test_listing_of_empty_arrays_costs_bounded_memory(tmp_path):
    folders = b"[" + b"[]," * (32 * 2**20 // 3) + b"[]]"
    members = _replace(corpus.standard_members(corpus.base_dataset()), "folders.json",
                       ("folders.json", folders))
    archive = corpus.v2_archive(members, zstd=True)
    assert len(archive) < 16 * 1024
    status, growth = await import_on_subprocess(tmp_path, archive, corpus.v2_key())
    assert status["status"] == "failed", status
    assert "folders.json" in status["error_message"], status
    assert growth < LISTING_PEAK_GROWTH_LIMIT_BYTES, f"server peak grew {growth / 2**20:.0f} MiB"


# -- 10. files shared between documents -------------------------------------------------------


def shared_file_dataset() -> dict:
    """The base backup with document hd2's only revision on hd1's first file (hx1)."""
    dataset = copy.deepcopy(corpus.base_dataset())
    dataset["documents"][1]["revisions"][0]["file_id"] = "hx1"
    dataset["files"] = [f for f in dataset["files"] if f["id"] != "hx3"]
    dataset["blobs"].pop("hx3")
    dataset["metadata"] = corpus.metadata_for(dataset)
    return dataset


async def download(client, document_id: str, path) -> bytes:
    ticket = await client.call("get_document", {"document_id": document_id})
    await client.download_file(ticket["task_id"], path)
    return path.read_bytes()


@pytest.mark.parametrize("first_delete", ["delete_document", "delete_directory"])
async def test_documents_sharing_a_file_stay_deletable(start_server, tmp_path, first_delete):
    server = await start_server("shared")
    restored = server.root / "content" / "restore" / "files"
    with trio.fail_after(CASE_TIMEOUT_S):
        async with server.connect("admin") as admin:
            await admin.listen()
            status = await run_import(admin, *corpus.valid_v2_archive(shared_file_dataset()),
                                      tmp_path)
            assert status["status"] == "completed", status
            assert (status["documents_count"], status["files_count"]) == (2, 2)
            # hd1 (revisions hx1, hx2) lives in hf2 inside hf1; hd2 (revision hx1) at the root.
            if first_delete == "delete_document":
                await admin.call("delete_document", {"document_id": "hd1"})
            else:
                await admin.call("delete_directory", {"folder_id": "hf1"})
            reply = await admin.request("get_document_info", {"document_id": "hd1"})
            assert reply["code"] == 404, reply
            assert await download(admin, "hd2", tmp_path / "hd2") == b"first draft"
            assert sorted(p.name for p in restored.iterdir()) == ["hx1"]
            await admin.call("delete_document", {"document_id": "hd2"})
            assert list(restored.iterdir()) == []
