"""Every case of the hostile corpus, imported through the API of one seeded server.

Each import must end `failed` with the case's specific message (or be refused with 413 while
uploading), and afterwards the store must be exactly as before, nothing may exist outside the
server root that was not there, nothing of the import may remain, and another connection must
have been answered all along.
"""

from __future__ import annotations

import io
import re

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backup_support import read_back
from cfms_trio.backup.format import parse_key_file
from cfms_trio.conventions import MAX_TREE_DEPTH

from . import corpus
from .support import (
    assert_no_leftovers,
    assert_store_unchanged,
    capture,
    escaped_files,
    refused_upload,
    run_import,
)

CASE_TIMEOUT_S = 60
# A flipped bit is caught by one of these, depending on where it lands.
# A flip in the magic's last bit turns CFMSBAK2 into CFMSBAK3, the recipient envelope of
# format 3: then the archive is refused as a damaged envelope.
BIT_FLIP_ERRORS = re.compile(
    r"bad magic|unknown compression|chunk_log2|reserved field|wrong key for this archive"
    r"|segment 0 failed authentication|recipient block")


async def import_and_check(server, archive: bytes, key: bytes) -> dict:
    """Import through the API and check everything but the error; return the final status."""
    outside_before = server.outside_snapshot()
    async with server.admin() as admin, server.connect() as bystander:
        before = await capture(server.root)
        status = await run_import(admin, archive, key, server.workdir, bystander)
        if status.get("startable"):
            # Refused because of the options (ids that exist here, policy fail): the uploads
            # wait for another start; cancelling removes them.
            await admin.call("cancel_backup_import", {"backup_task_id": status["backup_task_id"]})
        after = await capture(server.root)
        assert (await bystander.call("server_info"))["name"] == "cfms-trio"
    assert status["status"] == "failed", status
    assert (status["documents_count"], status["folders_count"], status["files_count"]) == (0, 0, 0)
    assert_store_unchanged(before, after)
    assert server.outside_snapshot() == outside_before
    assert escaped_files(server.outside) == []
    assert_no_leftovers(server.root)
    return status


@pytest.mark.parametrize("name", sorted(corpus.CASES))
async def test_hostile_archive_fails_cleanly(hostile_server, name):
    case = corpus.CASES[name]()
    with trio.fail_after(CASE_TIMEOUT_S):
        if case.refused_upload is None:
            status = await import_and_check(hostile_server, case.archive, case.key)
            assert case.expected in status["error_message"], status["error_message"]
            return
        outside_before = hostile_server.outside_snapshot()
        async with hostile_server.admin() as admin, hostile_server.connect() as bystander:
            before = await capture(hostile_server.root)
            code, message = await refused_upload(admin, case, hostile_server.workdir)
            after = await capture(hostile_server.root)
            assert (await bystander.call("server_info"))["name"] == "cfms-trio"
        assert code == 413 and case.expected in message, message
        assert_store_unchanged(before, after)
        assert hostile_server.outside_snapshot() == outside_before
        assert_no_leftovers(hostile_server.root)


FLIP_ARCHIVE, FLIP_KEY = corpus.valid_v2_archive()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bit=st.integers(min_value=0, max_value=len(FLIP_ARCHIVE) * 8 - 1))
async def test_any_flipped_bit_fails_the_import(hostile_server, bit):
    """Every bit of a format 2 archive is authenticated: the header by key_check, the
    segments by their GCM tags (which cover the header too)."""
    flipped = bytearray(FLIP_ARCHIVE)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with trio.fail_after(CASE_TIMEOUT_S):
        status = await import_and_check(hostile_server, bytes(flipped), FLIP_KEY)
    assert BIT_FLIP_ERRORS.search(status["error_message"]), status["error_message"]


async def test_folder_tree_as_deep_as_the_server_allows_imports(start_server, tmp_path):
    """The counterpart of the folder_tree_too_deep case: one level less restores, and the
    deepest folder is served."""
    server = await start_server("deep")
    dataset = corpus.folder_chain_dataset(MAX_TREE_DEPTH)
    with trio.fail_after(CASE_TIMEOUT_S):
        async with server.connect("admin") as admin:
            await admin.listen()
            status = await run_import(admin, *corpus.valid_v2_archive(dataset), tmp_path)
            assert status["status"] == "completed", status
            info = await admin.call("get_directory_info", {"folder_id": f"hc{MAX_TREE_DEPTH}"})
    assert info["path"].count("/") == MAX_TREE_DEPTH


# ------------------------------------------------------------------------------------------
# The corpus itself


def test_baselines_are_valid(tmp_path):
    """Each case breaks one thing of a backup that is otherwise valid: the unchanged backups
    read cleanly under the same limits."""
    for name, (archive, key) in {"v2": corpus.valid_v2_archive(),
                                 "legacy": corpus.valid_legacy_archive(),
                                 "big": (corpus.big_archive(), corpus.v2_key())}.items():
        contents = read_back(io.BytesIO(archive),
                                       parse_key_file(key, corpus.HOSTILE_LIMITS),
                                       tmp_path / name, corpus.HOSTILE_LIMITS)
        assert [f["id"] for f in contents.files] == ["hx1", "hx2", "hx3"]


def test_big_archive_has_the_segments_the_truncation_cases_cut():
    assert corpus.segment_count(corpus.big_archive()) == corpus.BIG_SEGMENTS
