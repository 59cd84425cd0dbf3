"""Fixtures of the hostile-input tests: one server shared by every test of a module.

pytest-trio runs each test in a fresh Trio loop, so a server that outlives one test cannot live
in a test's loop. `ServerThread` runs it in a thread with a loop of its own; tests reach it over
loopback like any client would, and read its database through their own SQLite connection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
import threading
from pathlib import Path

import pytest
import trio

from cfms_trio.client import open_client
from cfms_trio.config import Limits, Settings
from cfms_trio.server import Running, serve

import databases
from helpers import ADMIN_PASSWORD, snapshot_tree

from . import corpus, support

SERVER_START_TIMEOUT_S = 30
SERVER_STOP_TIMEOUT_S = 15
SEED_TIMEOUT_S = 30


class ServerThread:
    """A server running in a background thread, in its own Trio loop, until `stop()`."""

    def __init__(self, settings):
        self.settings = settings
        self.running: Running | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._main, name="cfms-test-server", daemon=True)

    def start(self) -> Running:
        self._thread.start()
        if not self._ready.wait(SERVER_START_TIMEOUT_S):
            raise RuntimeError("the server thread did not start in time")
        if self._error is not None:
            raise self._error
        return self.running

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # handed to the test thread by start() and stop()
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                self.running = await nursery.start(serve, self.settings)
                self._ready.set()

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(SERVER_STOP_TIMEOUT_S)
        assert not self._thread.is_alive(), "the server thread did not stop"
        if self._error is not None:
            raise self._error


@dataclasses.dataclass
class SharedServer:
    """What tests need to reach a shared server and to check it afterwards."""

    url: str
    root: Path
    outside: Path  # holds the root and, next to it, a sentinel folder nothing may touch
    workdir: Path  # scratch space for the files clients upload
    ssl_context: ssl.SSLContext
    admin_token: str

    @property
    def content(self) -> Path:
        return self.root / "content"

    @contextlib.asynccontextmanager
    async def connect(self):
        async with open_client(self.url, ssl_context=self.ssl_context) as client:
            yield client

    @contextlib.asynccontextmanager
    async def admin(self):
        """A connection acting as admin (with the token issued at start-up), listening."""
        async with self.connect() as client:
            client.username, client.token = "admin", self.admin_token
            await client.listen()
            yield client

    def outside_snapshot(self) -> dict[str, str]:
        """Every file next to the root (the sentinel folder), with its sha256."""
        root = self.root.relative_to(self.outside).as_posix() + "/"
        return {path: digest for path, digest in snapshot_tree(self.outside).items()
                if not path.startswith(root)}


def _client_context(tls_ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


async def _log_in_and_seed(url: str, context: ssl.SSLContext, workdir: Path, seed: bool) -> str:
    with trio.fail_after(SEED_TIMEOUT_S):
        async with open_client(url, ssl_context=context) as client:
            await client.login("admin", ADMIN_PASSWORD)
            if seed:
                await client.listen()
                await support.seed_store(client, workdir)
            return client.token


@contextlib.contextmanager
def shared_server(tmp_path_factory, tls_files, tls_ca, *, limits: Limits, seed: bool):
    """Start a server in a thread on a fresh root, optionally seed it, stop it at the end."""
    outside = tmp_path_factory.mktemp("outside")
    workdir = tmp_path_factory.mktemp("uploads")
    root = outside / "root"
    root.mkdir()
    sentinel = outside / "sentinel"
    sentinel.mkdir()
    (sentinel / "untouched.txt").write_text("nothing may change this file\n")
    certfile, keyfile = tls_files
    settings = Settings(root=root, host="127.0.0.1", port=0, certfile=certfile, keyfile=keyfile,
                        initial_admin_password=ADMIN_PASSWORD, login_failure_delay_s=0.05,
                        limits=limits, database_url=databases.database_url_for(root))
    thread = ServerThread(settings)
    running = thread.start()
    try:
        context = _client_context(tls_ca)
        token = trio.run(_log_in_and_seed, running.url, context, workdir, seed)
        yield SharedServer(running.url, root, outside, workdir, context, token)
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory, tls_files, tls_ca):
    """A seeded server with the corpus's small archive limits."""
    limits = Limits(archive=corpus.HOSTILE_LIMITS)
    with shared_server(tmp_path_factory, tls_files, tls_ca, limits=limits, seed=True) as shared:
        yield shared


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory, tls_files, tls_ca):
    """An unseeded server with the default limits."""
    with shared_server(tmp_path_factory, tls_files, tls_ca, limits=Limits(),
                       seed=False) as shared:
        yield shared

