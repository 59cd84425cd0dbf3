"""`scripts/bench_backup.py --quick` runs end to end and prints its table of figures.

Only that it runs is checked, never its timings: they depend on the machine and its load.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import databases

REPO = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT_S = 170  # the quick mode takes well under a minute; pytest's own bound is 180 s
FIGURES = ("1. export", "2. import", "3. peak server RSS", "4. server_info",
           "5. metadata set export", "5. metadata set import", "6. upload", "6. download",
           "7. scale 2000 docs", "7. scale 4000 docs", "6. upload, websockets client",
           "8. export, large files", "8. import, large files")


@databases.skip_on_postgresql_run(
    "the benchmark starts its own servers on SQLite: the PostgreSQL run would repeat the "
    "SQLite run's")
def test_quick_benchmark_runs_and_prints_its_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_backup.py"), "--quick",
         "--workdir", str(tmp_path), "--timeout", "120"],
        cwd=REPO, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("| figure"))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "figure", "value", "baseline", "ratio", "goal", "met?"]
    for figure in FIGURES:
        assert figure in result.stdout, figure
    assert list(tmp_path.iterdir()) == [], "the benchmark left its temporary roots behind"
