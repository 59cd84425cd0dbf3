"""The server process killed with SIGKILL in each step of an import, then restarted on the same
root: the task is failed ("server restarted"), the store is exactly as before, nothing of the
import remains, and the same backup then restores cleanly.

The servers are real `cfms-trio serve` processes; `paused_serve.py` makes the import hold still
at the step under test, so the kill lands exactly there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from cfms_trio.backup.importer import STEP_PERCENT
from cfms_trio.backup.staging_index import INDEX_FILE_NAME
from cfms_trio.backup.supervisor import RESTART_MESSAGE
from cfms_trio.client import open_client

import databases
import storage_mode
from helpers import ADMIN_PASSWORD

from . import corpus
from .support import (
    assert_no_leftovers,
    assert_store_unchanged,
    capture,
    entries,
    run_import,
    seed_store,
    start_import,
)

PAUSED_SERVE = Path(__file__).with_name("paused_serve.py")
START_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 15
STEP_TIMEOUT_S = 30
LISTENING = re.compile(r"^listening on (ws://127\.0\.0\.1:\d+)$")
# Every step an import goes through before it commits.
STEPS = [step for step in STEP_PERCENT if step not in ("Restore completed", "Plan completed")]


class ServeProcess:
    def __init__(self, process: trio.Process, url: str):
        self.process = process
        self.url = url

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        with trio.fail_after(EXIT_TIMEOUT_S):
            assert await self.process.wait() == -signal.SIGKILL

    async def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(EXIT_TIMEOUT_S):
            assert await self.process.wait() == 0


@contextlib.asynccontextmanager
async def serve_process(root: Path, pause_at: str | None = None, extra_args: tuple = ()):
    """`cfms-trio serve` on `root` (plain ws, port 0) with `extra_args`, its imports paused at
    `pause_at` if given; killed at the end if alive."""
    env = dict(os.environ, CFMS_ADMIN_PASSWORD=ADMIN_PASSWORD)
    launcher = ([sys.executable, "-m", "cfms_trio"] if pause_at is None
                else [sys.executable, str(PAUSED_SERVE), pause_at])
    storage = () if "--storage" in extra_args else storage_mode.server_args(root)
    command = [*launcher, "serve", "--root", str(root), "--port", "0", "--no-tls",
               *databases.serve_arguments(root), *extra_args, *storage]
    with open(root.parent / "stderr.txt", "ab") as stderr:
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE,
                                                   stderr=stderr, env=env)
    try:
        with trio.fail_after(START_TIMEOUT_S):
            buffer = b""
            while not (match := LISTENING.match(buffer.decode().split("\n")[0].strip())):
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"serve exited with {await process.wait()} before listening"
                buffer += chunk
        yield ServeProcess(process, match.group(1))
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(EXIT_TIMEOUT_S):
                    await process.wait()
            await process.stdout.aclose()


@contextlib.asynccontextmanager
async def admin_client(url: str):
    async with open_client(url) as client:
        await client.login("admin", ADMIN_PASSWORD)
        await client.listen()
        yield client


@pytest.fixture(scope="module")
def seeded_root(tmp_path_factory) -> Path:
    """A server root holding a seeded store, made once and copied by every test."""
    root = tmp_path_factory.mktemp("template") / "root"
    root.mkdir()
    workdir = tmp_path_factory.mktemp("seed-uploads")

    async def seed():
        async with serve_process(root) as server:
            with trio.fail_after(START_TIMEOUT_S):
                async with admin_client(server.url) as admin:
                    await seed_store(admin, workdir)
            await server.terminate()

    trio.run(seed)
    return root


@pytest.mark.parametrize("step", STEPS)
async def test_sigkill_in_each_step_then_restart(seeded_root, tmp_path, step):
    root = tmp_path / "root"
    shutil.copytree(seeded_root, root)
    archive, key = corpus.big_archive(), corpus.v2_key()
    async with serve_process(root, pause_at=step) as server:
        async with admin_client(server.url) as admin:
            before = await capture(root)
            task_id = await start_import(admin, archive, key, tmp_path)
            with trio.fail_after(STEP_TIMEOUT_S):
                while True:
                    status = await admin.call("get_backup_import_status",
                                              {"backup_task_id": task_id})
                    if status["current_step"] == step:
                        break
                    assert status["status"] == "processing", status
                    await trio.sleep(0.02)
            await server.kill()
    # The kill left work behind that the restart must take back.
    placed = entries(root / "content" / "restore" / "files")
    if STEPS.index(step) > STEPS.index("Importing files"):
        assert {"hx1", "hx2", "hx3"} <= set(placed), placed
    staged_all = [name for task in entries(root / "content" / "tmp" / "staging")
                  for name in entries(root / "content" / "tmp" / "staging" / task)]
    # Since payload 3.0 the staging folder also holds the import's staging index.
    staged = [name for name in staged_all if name != INDEX_FILE_NAME]
    if step in ("Loading metadata", "Importing files"):
        assert INDEX_FILE_NAME in staged_all, staged_all
    if step == "Extracting archive":
        assert staged, "nothing was staged yet"
    if step in ("Loading metadata", "Importing files"):
        assert sorted(staged) == ["hx1", "hx2", "hx3"]
    async with serve_process(root) as server:
        async with admin_client(server.url) as admin:
            status = await admin.call("get_backup_import_status", {"backup_task_id": task_id})
            assert status["status"] == "failed", status
            assert status["error_message"] == RESTART_MESSAGE
            assert_store_unchanged(before, await capture(root))
            assert_no_leftovers(root)
            with trio.fail_after(STEP_TIMEOUT_S):
                status = await run_import(admin, archive, key, tmp_path)
            assert status["status"] == "completed", status
        await server.terminate()
