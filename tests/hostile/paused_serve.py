"""`python paused_serve.py STEP serve ARGS...`: `cfms-trio serve` whose imports hold still once
they report STEP, so a crash test can kill the process at exactly that point of an import;
with STEP `EXPORTING`, its exports hold still before they write anything instead.

The pause wraps the importer's progress reporter, which the import's stages call from their
worker threads; the server itself runs unchanged.
"""

from __future__ import annotations

import sys
import threading
import time

from cfms_trio.actions import backup_export
from cfms_trio.backup import importer
from cfms_trio.backup.format import payload3, tarmembers
from cfms_trio.cli import main

PAUSE_LIMIT_S = 600  # the test kills the process long before this
EXTRACTING = "Extracting archive"
EXPORTING = "Exporting"


def _pause(step: str) -> None:
    print(f"paused at {step!r}", file=sys.stderr, flush=True)
    time.sleep(PAUSE_LIMIT_S)


def pause_exports() -> None:
    """generate_backup's export (in its worker thread) holds still before it starts."""
    export = backup_export.export_store

    def pause_then_export(*args, **kwargs):
        _pause(EXPORTING)
        return export(*args, **kwargs)

    backup_export.export_store = pause_then_export


def pause_imports_at(step: str) -> None:
    report = importer.ImportProgress.report
    if step == EXTRACTING:
        _pause_once_a_file_is_staged(report)
        return

    def report_then_pause(progress, name: str, fraction: float, **counts) -> None:
        report(progress, name, fraction, **counts)
        if name == step and threading.current_thread() is not threading.main_thread():
            _pause(step)

    importer.ImportProgress.report = report_then_pause


def _pause_once_a_file_is_staged(report) -> None:
    """"Extracting archive" is reported before the first listing is parsed, when nothing is
    staged yet; a kill in this step must find files half-way into staging. So the step's
    reports are held back until the first file is staged, then the step is reported and the
    import pauses right there."""
    held: list = []  # the ImportProgress of the import, once it reported the step
    write = tarmembers.write_staging_file  # the same function in both readers

    def hold(progress, name: str, fraction: float, **counts) -> None:
        if name == EXTRACTING:
            held[:] = [progress]
            return
        report(progress, name, fraction, **counts)

    def write_then_pause(*args, **kwargs):
        result = write(*args, **kwargs)
        if held:
            report(held[0], EXTRACTING, 0.0)
            _pause(EXTRACTING)
        return result

    importer.ImportProgress.report = hold
    tarmembers.write_staging_file = payload3.write_staging_file = write_then_pause


if __name__ == "__main__":
    if sys.argv[1] == EXPORTING:
        pause_exports()
    else:
        pause_imports_at(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
