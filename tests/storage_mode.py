"""Which content storage the suite's servers use: `CFMS_TEST_STORAGE=s3` runs them on a bucket
of the session's moto server (local files otherwise). Read here, by conftest.py and by the
helpers that start server processes; production code never reads it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

STORAGE = os.environ.get("CFMS_TEST_STORAGE", "local")
S3_MODE = STORAGE == "s3"
BUCKET = "cfms-test-storage"
active_endpoint: str | None = None  # the moto server's, set by conftest in S3 mode


def storage_url_of(root: Path) -> str:
    """The test bucket's prefix for the server on `root` (the same for the same root, so a
    restarted server finds its content; roots are unique per test)."""
    prefix = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    return f"s3://{BUCKET}/{prefix}/"


def server_args(root: Path) -> list[str]:
    """`serve` flags for a server process on `root` in the current mode (the same prefix for
    the same root, so a restarted server finds its content)."""
    if not S3_MODE:
        return []
    return ["--storage", storage_url_of(root), "--s3-endpoint", active_endpoint]


_FILES = "reads stored files or partial uploads under content/ (the S3 counterparts are in " \
         "tests/hostile/test_s3_storage.py)"
_BACKUPS = "reads or damages backups under content/backups/"
_RESTORED = "inspects restore/files/ or staging on local disk"
_OFFLINE = "the offline `cfms-trio backup export --root` reads contents from local files only"
_PATHS = "compares File.path, which on S3 names the import's own prefix"
# Tests that are about local disk, skipped in S3 mode (test file :: function name prefix).
LOCAL_DISK_TESTS = {
    "test_backup_live_restore.py::test_kept_uploads_go_at_the_deadline": _FILES,
    "test_backup_live_restore.py::test_refused_options_keep_the_uploads": _FILES,
    "test_storage_schema.py::test_a_root_made_by_the_release_before_schema_versions":
        "the fixture root made by an older release holds its contents as local files",
    "test_transfer.py::test_round_trip_is_byte_identical": _FILES,
    "test_transfer.py::test_tampered_chunk_discards_the_upload": _FILES,
    "test_transfer.py::test_text_message_instead_of_a_chunk": _FILES,
    "test_transfer.py::test_completed_upload_task_cannot_be_reused": _FILES,
    "test_transfer.py::test_upload_resumes_after_a_dropped_connection":
        "resumes at a chunk boundary; on S3 at a part boundary (test_s3_storage)",
    "test_transfer.py::test_one_upload_at_a_time_per_task": _FILES,
    "test_transfer.py::test_deleting_a_document_removes_its_partial_upload": _FILES,
    "test_transfer.py::test_client_recovers_after_a_failed_upload": _FILES,
    "test_transfer.py::test_abandoned_partial_upload_is_swept_after_expiry": _FILES,
    "test_documents.py::test_recursive_delete_removes_everything_below": _FILES,
    "test_documents.py::test_recursive_delete_needs_write_access_to_everything_below": _FILES,
    "test_documents.py::test_document_create_info_rename_move_delete": _FILES,
    "test_backup_export.py::test_export_holds_the_whole_store_as_the_spec_describes": _BACKUPS,
    "test_backup_export.py::test_a_duplicate_name_is_refused_and_leaves_the_first": _BACKUPS,
    "test_backup_export.py::test_exporting_needs_the_export_backup_permission": _BACKUPS,
    "test_backup_export.py::test_deleting_documents_during_an_export_waits": _FILES,
    "test_backup_schedules.py::test_keep_last_two_ends_with_exactly": _BACKUPS,
    "test_backup_schedules.py::test_pruning_waits_for_a_verified_backup": _BACKUPS,
    "test_backup_schedules.py::test_a_corrupted_stored_archive_is_caught": _BACKUPS,
    "test_keys.py::test_an_export_for_recipients_leaves_no_key": _BACKUPS,
    "test_backup_import.py::test_round_trip_between_two_servers_preserves_every": _PATHS,
    "test_backup_import.py::test_a_legacy_1_0_archive_is_imported": _PATHS,
    "test_backup_import.py::test_an_import_with_one_upload_times_out": _FILES,
    "test_backup_import.py::test_the_deadline_aborts_an_upload_in_progress": _FILES,
    "test_backup_import.py::test_restored_files_are_made_durable_before_the_commit":
        "about fsync/syncfs of local files",
    "test_backup_import.py::test_two_imports_in_flight_at_once_both_complete": _RESTORED,
    "test_backup_import.py::test_a_restart_fails_the_import_that_was_running": _RESTORED,
    "test_backup_cli.py::": _OFFLINE,
    "hostile/test_archive_attacks.py::test_documents_sharing_a_file_stay_deletable": _RESTORED,
    "hostile/test_fault_consistency.py::": "disk full and kills, checked on local disk",
    "hostile/test_faults.py::test_disk_failure_mid_restore": "simulated local disk faults",
    "hostile/test_faults.py::test_database_failing": _RESTORED,
    "hostile/test_crash_restart.py::": _RESTORED + " (S3: test_s3_storage's killed import)",
    "hostile/test_limits.py::test_upload_limit_refuses_the_import_upload": _FILES,
}


def skip_local_disk_tests(items) -> None:
    """In S3 mode, mark the LOCAL_DISK_TESTS skipped with their reason."""
    if not S3_MODE:
        return
    for item in items:
        name = item.nodeid.split("tests/", 1)[-1]
        for prefix, reason in LOCAL_DISK_TESTS.items():
            if name.startswith(prefix):
                item.add_marker(pytest.mark.skip(reason=f"local storage only: {reason}"))
                break
