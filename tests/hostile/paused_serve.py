"""`python paused_serve.py STEP serve ARGS...`: `cfms-trio serve` whose imports hold still once
they report STEP, so a crash test can kill the process at exactly that point of an import.

The pause wraps the importer's progress reporter, which the import's stages call from their
worker threads; the server itself runs unchanged.
"""

from __future__ import annotations

import sys
import threading
import time

from cfms_trio.backup import importer
from cfms_trio.cli import main

PAUSE_LIMIT_S = 600  # the test kills the process long before this


def pause_imports_at(step: str) -> None:
    report = importer.ImportProgress.report

    def report_then_pause(progress, name: str, fraction: float) -> None:
        report(progress, name, fraction)
        if name == step and threading.current_thread() is not threading.main_thread():
            print(f"import paused at {step!r}", file=sys.stderr, flush=True)
            time.sleep(PAUSE_LIMIT_S)

    importer.ImportProgress.report = report_then_pause


if __name__ == "__main__":
    pause_imports_at(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
