"""The client treats what a server sends as untrusted (issue 12, items 15 and 16).

A fake server, a few lines of trio-websocket on a loopback port, answers `generate_backup`
with whatever name a test chooses and serves the downloads; the real client flow and the
`cfms-trio client backup-export` command run against it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from cfms_trio.client import ClientError, export_backup, open_client
from cfms_trio.transfer.crypto import chunk_count, new_session, seal_chunk

from backup_support import cli_command, run_cli

TEST_DEADLINE_S = 30
CHUNK_BYTES = 16
ARCHIVE_BYTES = b"sealed archive bytes, three chunks long"
KEY_BYTES = b'{"format": 2, "key": "' + b"ab" * 32 + b'"}'
WAIT_STEP_S = 0.01


@dataclasses.dataclass
class FakeServer:
    """Answers login, generate_backup and download_file like a server would, except that the
    backup name (and where the key download pauses) is the test's choice."""

    backup_name: object
    key_download_code: int = 200  # anything else: the key download is refused with it
    # Called after the first chunk of the key went out, before the rest: the test looks at
    # the half-written key file there.
    between_key_chunks: object = None
    url: str = ""

    def files(self) -> dict[str, bytes]:
        return {"archive-task": ARCHIVE_BYTES, "key-task": KEY_BYTES}

    async def handle(self, request) -> None:
        ws = await request.accept()
        with contextlib.suppress(ConnectionClosed):
            while True:
                message = json.loads(await ws.get_message())
                await self.answer(ws, message)

    async def answer(self, ws, message: dict) -> None:
        action, data, request_id = message["action"], message["data"], message["request_id"]

        async def reply(code: int, body: dict | None = None) -> None:
            await ws.send_message(json.dumps({"code": code, "message": "ok" if code == 200
                                              else "refused", "data": body or {},
                                              "request_id": request_id}))

        if action == "login":
            await reply(200, {"token": "fake-token"})
        elif action == "generate_backup":
            await reply(200, {"backup_name": self.backup_name, "archive_task_id": "archive-task",
                              "key_task_id": "key-task",
                              "metadata": {"folders_count": 0, "documents_count": 0,
                                           "files_count": 0}})
        elif action == "download_file":
            task_id = data["task_id"]
            if task_id == "key-task" and self.key_download_code != 200:
                await reply(self.key_download_code)
                return
            content = self.files()[task_id]
            key, prefix = new_session()
            await ws.send_message(json.dumps({"action": "transfer_file", "data": {
                "task_id": task_id, "file_size": len(content),
                "sha256": hashlib.sha256(content).hexdigest(), "chunk_size": CHUNK_BYTES,
                "key": base64.b64encode(key).decode(), "nonce_prefix":
                base64.b64encode(prefix).decode(), "offset": 0}}))
            assert json.loads(await ws.get_message())["action"] == "ready"
            for index in range(chunk_count(len(content), CHUNK_BYTES)):
                plaintext = content[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES]
                await ws.send_message(seal_chunk(key, prefix, index, plaintext))
                if index == 0 and task_id == "key-task" and self.between_key_chunks:
                    await self.between_key_chunks(len(plaintext))
            await reply(200, {"file_id": task_id, "size": len(content),
                              "sha256": hashlib.sha256(content).hexdigest()})
        else:
            await reply(400)


@contextlib.asynccontextmanager
async def fake_server(fake: FakeServer):
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(serve_websocket, fake.handle, "127.0.0.1", 0, None)
        fake.url = f"ws://127.0.0.1:{listener.port}"
        yield fake
        nursery.cancel_scope.cancel()


def every_file(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


HOSTILE_NAMES = [
    "../escaped",  # one level up from --out
    "sub/dir",  # a separator
    "ABSOLUTE",  # replaced by an absolute path under tmp_path in the test
    ".hidden",  # leading dot
    "..",
    "evil\n",  # a trailing newline (re.match with $ would let it through)
    "a" * 101,  # longer than a backup name may be
    "",
    7,  # not even a string
    None,
]


@pytest.mark.parametrize("hostile", HOSTILE_NAMES, ids=repr)
async def test_export_refuses_a_backup_name_that_is_not_a_plain_file_name(tmp_path, hostile):
    if hostile == "ABSOLUTE":
        hostile = str(tmp_path / "absolute")
    out = tmp_path / "out"
    with trio.fail_after(TEST_DEADLINE_S):
        async with fake_server(FakeServer(hostile)) as fake, open_client(fake.url) as client:
            await client.login("admin", "pw")
            with pytest.raises(ClientError) as caught:
                await export_backup(client, out)
    assert caught.value.code == 0
    assert "unusable backup name" in caught.value.message and repr(hostile) in caught.value.message
    assert "nothing was written" in caught.value.message
    assert every_file(tmp_path) == []  # not in --out, not next to it, not at the absolute path


async def test_the_export_command_writes_nothing_outside_out(tmp_path):
    out = tmp_path / "deep" / "out"
    with trio.fail_after(TEST_DEADLINE_S):
        async with fake_server(FakeServer("../../escaped")) as fake:
            done = await run_cli(*cli_command("client", "backup-export", "--server", fake.url,
                                              "--out", str(out)),
                                 env={"CFMS_PASSWORD": "pw"})
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "error: the server answered an unusable backup name '../../escaped'" in stderr
    assert "Traceback" not in stderr
    assert every_file(tmp_path) == []


async def test_the_export_command_never_replaces_an_existing_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    precious = out / "nightly.key"
    precious.write_bytes(b"the key of an earlier backup")
    with trio.fail_after(TEST_DEADLINE_S):
        async with fake_server(FakeServer("nightly")) as fake:
            done = await run_cli(*cli_command("client", "backup-export", "--server", fake.url,
                                              "--out", str(out), "--name", "nightly"),
                                 env={"CFMS_PASSWORD": "pw"})
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert f"error: {precious} already exists; not overwriting it" in stderr
    assert precious.read_bytes() == b"the key of an earlier backup"
    assert every_file(out) == ["nightly.key"]  # no archive downloaded for nothing


async def test_a_failed_key_download_leaves_neither_file(tmp_path):
    out = tmp_path / "out"
    with trio.fail_after(TEST_DEADLINE_S):
        async with fake_server(FakeServer("nightly", key_download_code=404)) as fake, \
                open_client(fake.url) as client:
            await client.login("admin", "pw")
            with pytest.raises(ClientError) as caught:
                await export_backup(client, out)
    assert caught.value.code == 404
    assert every_file(out) == []  # the archive alone is of no use; a retry starts clean


@pytest.fixture
def umask_022():
    """The usual umask, under which a file created with open(..., 'wb') is 0644."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


async def test_the_key_file_is_0600_while_it_is_being_written(tmp_path, umask_022):
    out = tmp_path / "out"
    key_path = out / "nightly.key"
    modes_seen: list[int] = []

    async def look_at_the_half_written_key(first_chunk_bytes: int) -> None:
        # The client has the file open once it reads chunk 0 (its writes are buffered, so the
        # size says nothing); the rest of the key has not been sent yet.
        while not key_path.exists():
            await trio.sleep(WAIT_STEP_S)
        modes_seen.append(stat.S_IMODE(key_path.stat().st_mode))

    fake = FakeServer("nightly", between_key_chunks=look_at_the_half_written_key)
    with trio.fail_after(TEST_DEADLINE_S):
        async with fake_server(fake), open_client(fake.url) as client:
            await client.login("admin", "pw")
            archive, key, _ = await export_backup(client, out)
    assert modes_seen == [0o600]
    assert key == key_path and key.read_bytes() == KEY_BYTES
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert archive.read_bytes() == ARCHIVE_BYTES
    assert stat.S_IMODE(archive.stat().st_mode) == 0o644  # the archive is not a secret
