"""`cfms-trio serve` as an administrator runs it: a real subprocess (SPEC §2)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_websocket import ConnectionClosed

from cfms_trio.client import ClientError, open_client

import databases

# A hard bound on every test, on top of the fail_after around each wait.
pytestmark = pytest.mark.timeout(90)

START_TIMEOUT_S = 30
EXIT_TIMEOUT_S = 15
LISTENING = re.compile(r"^listening on (wss?)://127\.0\.0\.1:(\d+)$")
ADMIN_PASSWORD_LINE = re.compile(r"^admin password: (\S+)")


class Served:
    """A running `serve` subprocess and what it printed."""

    def __init__(self, process: trio.Process, stderr_path: Path):
        self.process = process
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._buffer = b""
        self.url: str | None = None

    async def read_line(self) -> str | None:
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode().rstrip("\r")
        self.lines.append(text)
        return text

    async def wait_listening(self) -> str:
        """Read stdout up to the `listening on` line; return the URL it names."""
        with trio.fail_after(START_TIMEOUT_S):
            while True:
                line = await self.read_line()
                if line is None:
                    await self.process.wait()
                    pytest.fail(f"serve exited with {self.process.returncode} before listening:"
                                f"\n{self.stderr()}")
                if LISTENING.match(line):
                    self.url = line.removeprefix("listening on ")
                    return self.url

    @property
    def admin_password(self) -> str | None:
        for line in self.lines:
            match = ADMIN_PASSWORD_LINE.match(line)
            if match:
                return match.group(1)
        return None

    async def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        with trio.fail_after(EXIT_TIMEOUT_S):
            return await self.process.wait()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def run_serve(root: Path, *args: str, admin_password: str | None = None):
    """Start `python -m cfms_trio serve --root ROOT --port 0 ARGS`; always killed at the end."""
    env = {k: v for k, v in os.environ.items() if k != "CFMS_ADMIN_PASSWORD"}
    if admin_password is not None:
        env["CFMS_ADMIN_PASSWORD"] = admin_password
    root.mkdir(parents=True, exist_ok=True)
    stderr_path = root.parent / f"{root.name}-stderr-{len(list(root.parent.iterdir()))}.txt"
    command = [sys.executable, "-m", "cfms_trio", "serve", "--root", str(root),
               *databases.serve_arguments(root)]
    if "--port" not in args:
        command += ["--port", "0"]
    with open(stderr_path, "wb") as stderr:
        process = await trio.lowlevel.open_process(
            command + list(args), stdout=subprocess.PIPE, stderr=stderr, env=env)
    try:
        yield Served(process, stderr_path)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(EXIT_TIMEOUT_S):
                    await process.wait()
            await process.stdout.aclose()


async def login_and_list_users(url: str, password: str, cafile: Path | None) -> list[str]:
    with trio.fail_after(START_TIMEOUT_S):
        async with open_client(url, cafile=cafile) as client:
            await client.login("admin", password)
            return [u["username"] for u in (await client.call("list_users"))["users"]]


async def test_first_start_generates_password_and_certificate_reused_later(tmp_path):
    root = tmp_path / "root"
    content = root / "content"
    async with run_serve(root) as served:
        url = await served.wait_listening()
        assert url.startswith("wss://127.0.0.1:") and not url.endswith(":0")
        password = served.admin_password
        assert password, served.lines
        password_file = content / "admin_password.txt"
        assert password_file.read_text().strip() == password
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        cert = content / "tls" / "cert.pem"
        cert_bytes = cert.read_bytes()
        assert b"BEGIN CERTIFICATE" in cert_bytes
        assert await login_and_list_users(url, password, cafile=cert) == ["admin"]
        assert await served.stop(signal.SIGTERM) == 0
    assert "Traceback" not in served.stderr()

    async with run_serve(root) as served:
        url = await served.wait_listening()
        assert served.admin_password is None  # printed once, on the first start only
        assert cert.read_bytes() == cert_bytes
        assert await login_and_list_users(url, password, cafile=cert) == ["admin"]
        # Stopping with a client connected: the client sees the connection end, exit code 0.
        async with open_client(url, cafile=cert) as client:
            await client.login("admin", password)
            await client.listen()
            assert await served.stop(signal.SIGINT) == 0
            with trio.fail_after(EXIT_TIMEOUT_S), pytest.raises(ConnectionClosed):
                await client.next_event()
            assert client.closed_reason.code == 1001  # going away
    assert "Traceback" not in served.stderr()


async def test_admin_password_from_environment_and_plain_ws(tmp_path):
    root = tmp_path / "root"
    async with run_serve(root, "--no-tls", admin_password="from-the-environment") as served:
        url = await served.wait_listening()
        assert url.startswith("ws://127.0.0.1:")
        assert served.admin_password is None
        assert not (root / "content" / "admin_password.txt").exists()
        assert await login_and_list_users(url, "from-the-environment", cafile=None) == ["admin"]
        assert await served.stop(signal.SIGINT) == 0


async def test_port_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with run_serve(tmp_path / "root", "--port", str(port),
                             admin_password="whatever-password") as served:
            with trio.fail_after(START_TIMEOUT_S):
                assert await served.read_line() is None  # nothing on stdout, then exit
                assert await served.process.wait() == 1
    stderr = served.stderr()
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert f"127.0.0.1:{port}" in errors[0] and "in use" in errors[0]


async def test_unusable_root_is_a_one_line_error(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    # argparse lets the later --root win.
    async with run_serve(tmp_path / "root", "--root", str(not_a_folder)) as served:
        with trio.fail_after(START_TIMEOUT_S):
            assert await served.process.wait() == 1
    stderr = served.stderr()
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")], stderr


def test_size_limits_parse_with_units():
    from cfms_trio.config import GiB, MiB, parse_size

    assert parse_size("512M") == 512 * MiB
    assert parse_size("64G") == 64 * GiB
    assert parse_size("1.5GiB") == int(1.5 * GiB)
    assert parse_size("4096") == 4096
    for bad in ("", "12X", "-1G", "G"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_serve_refuses_a_malformed_size_limit(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cfms_trio", "serve", "--root", str(tmp_path),
                             "--max-upload-bytes", "12X"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "not a size: '12X'" in result.stderr
    assert not (tmp_path / "content").exists()


async def test_size_limit_flags_reach_the_server(tmp_path):
    """`--max-upload-bytes 1K`: a 2 KiB upload is refused with 413 before any byte is sent,
    and `--max-archive-bytes` caps what an import's archive upload may announce."""
    root = tmp_path / "root"
    async with run_serve(root, "--no-tls", "--max-upload-bytes", "1K",
                         "--max-archive-bytes", "4K", admin_password="pw-for-limits") as served:
        url = await served.wait_listening()
        with trio.fail_after(START_TIMEOUT_S):
            async with open_client(url) as client:
                await client.login("admin", "pw-for-limits")
                created = await client.call("create_document", {"title": "big"})
                (tmp_path / "two-k").write_bytes(b"x" * 2048)
                with pytest.raises(ClientError) as info:
                    await client.upload_file(created["task_id"], tmp_path / "two-k")
                assert info.value.code == 413
                assert "limit of 1024 bytes" in info.value.message
                (tmp_path / "one-k").write_bytes(b"y" * 1024)
                assert (await client.upload_file(created["task_id"], tmp_path / "one-k"))["size"] == 1024
        assert await served.stop(signal.SIGTERM) == 0


async def test_client_command_reports_an_untrusted_certificate_at_once(tmp_path):
    """Without --cafile the self-signed certificate is refused with advice, in seconds
    rather than after the WebSocket library's one-minute connection timeout."""
    root = tmp_path / "root"
    (tmp_path / "a.cfms.enc").write_bytes(b"x")
    (tmp_path / "a.key").write_bytes(b"{}")
    (tmp_path / "pw").write_text("pw-for-tls")
    async with run_serve(root, admin_password="pw-for-tls") as served:
        url = await served.wait_listening()
        with trio.fail_after(20):
            done = await trio.run_process(
                [sys.executable, "-m", "cfms_trio", "client", "backup-import", "--server", url,
                 "--password-file", str(tmp_path / "pw"), "--archive",
                 str(tmp_path / "a.cfms.enc"), "--key", str(tmp_path / "a.key")],
                capture_stdout=True, capture_stderr=True, check=False)
        stderr = done.stderr.decode()
        assert done.returncode == 3  # a connection or TLS problem (docs/CLI.md)
        assert stderr.startswith("error: the certificate of 127.0.0.1:")
        assert "is not trusted" in stderr and "--cafile" in stderr
        assert "Traceback" not in stderr
