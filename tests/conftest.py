"""Shared fixtures: a running server on port 0 with a trustme certificate and a fresh root,
and clients connected to it."""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from cfms_trio.client import Client, open_client
from cfms_trio.config import Settings
from cfms_trio.server import Running, serve

import databases
import storage_mode
from helpers import ADMIN_PASSWORD


# In-process servers hash passwords with a cheaper scrypt cost than production's: every test
# starts a server (hashing the admin password) and logs in, and at the production cost that
# hashing was a large share of the suite's CPU time. Each hash names its own cost, so
# verification is exercised exactly as in production; subprocess servers keep the real cost.
TEST_SCRYPT_N = 2**11


@pytest.fixture(autouse=True, scope="session")
def cheaper_password_hashing():
    from cfms_trio import auth

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(auth, "SCRYPT_N", TEST_SCRYPT_N)
        yield


# -- the PostgreSQL run: only the tests that reach a database -----------------------------------

# Fixtures that start a server (a test using one has it in its fixture closure) and what a test
# module's source says when it starts servers or stores itself (subprocesses, threads).
SERVER_FIXTURES = {"start_server", "hostile_server", "plain_server"}
SERVER_MARKERS = ("serve_subprocess", "serve_process", "Store(", "await serve(",
                  "nursery.start(serve", "databases.")


def _reaches_a_database(item, sources: dict) -> bool:
    if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    path = Path(str(item.fspath))
    if path not in sources:
        sources[path] = path.read_text()
    return any(marker in sources[path] for marker in SERVER_MARKERS)


def pytest_collection_modifyitems(config, items):
    """On PostgreSQL (CFMS_TEST_DATABASE), a test that starts no server and opens no store
    runs exactly as in the SQLite run: it is deselected there, so the two runs together fit
    CI's time. In S3 mode (CFMS_TEST_STORAGE=s3) tests about local disk are skipped."""
    storage_mode.skip_local_disk_tests(items)
    if not databases.on_postgresql():
        return
    sources: dict = {}
    keep, drop = [], []
    for item in items:
        (keep if _reaches_a_database(item, sources) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True, scope="session")
def drop_session_databases():
    """Every test database (CFMS_TEST_DATABASE on PostgreSQL) goes at the end of the session."""
    yield
    databases.drop_all_databases()


@pytest.fixture(autouse=True)
def release_test_databases(drop_session_databases):
    """The databases of a test's servers are emptied after it, for the next test's servers
    (those of longer-lived fixtures stay)."""
    before = databases.roots_with_databases()
    yield
    databases.release_databases(keep=before)


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(tls_ca, tmp_path_factory) -> tuple[Path, Path]:
    cert = tls_ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for pem in cert.cert_chain_pems[1:]:
        with open(certfile, "ab") as f:
            f.write(pem.bytes())
    cert.private_key_pem.write_to_path(str(keyfile))
    return certfile, keyfile


@pytest.fixture
def client_ssl(tls_ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


@dataclasses.dataclass
class ServerUnderTest:
    """A running server plus what a test needs to reach it."""

    running: Running
    settings: Settings
    ssl_context: ssl.SSLContext
    cancel_scope: trio.CancelScope
    stopped: trio.Event  # set once `serve` has returned (its database closed, lock released)

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def app(self):
        return self.running.app

    @property
    def root(self) -> Path:
        return self.settings.root

    @contextlib.asynccontextmanager
    async def connect(self, username: str | None = None, password: str | None = None):
        """A client connection, logged in when a username is given."""
        async with open_client(self.url, ssl_context=self.ssl_context) as client:
            if username is not None:
                await client.login(username, password or ADMIN_PASSWORD)
            yield client

    async def stop(self) -> None:
        """Shut the server down and wait until it has (so the root can be served again)."""
        self.cancel_scope.cancel()
        await self.stopped.wait()


def make_settings(root: Path, tls_files, **overrides) -> Settings:
    certfile, keyfile = tls_files
    base = dict(root=root, host="127.0.0.1", port=0, certfile=certfile, keyfile=keyfile,
                initial_admin_password=ADMIN_PASSWORD, login_failure_delay_s=0.05,
                database_url=databases.database_url_for(root))
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(autouse=True)
def _storage_mode(request):
    """In S3 mode (CFMS_TEST_STORAGE=s3), every test gets the moto server's credentials in
    its environment and the test bucket exists."""
    if not storage_mode.S3_MODE:
        yield None
        return
    service = request.getfixturevalue("s3")
    client = service.client()
    if storage_mode.active_endpoint != service.endpoint:
        client.create_bucket(Bucket=storage_mode.BUCKET)
        storage_mode.active_endpoint = service.endpoint
    yield service


@pytest.fixture
def start_server(nursery, tmp_path, tls_files, client_ssl, _storage_mode):
    """Factory: `await start_server(name="a", **settings_overrides)` starts another server
    (in S3 mode on a fresh prefix of the test bucket, unless `storage_url` is given)."""

    async def start(name: str = "server", **overrides) -> ServerUnderTest:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        if storage_mode.S3_MODE and "storage_url" not in overrides:
            overrides.setdefault("s3_endpoint_url", _storage_mode.endpoint)
            overrides["storage_url"] = storage_mode.storage_url_of(root)
        settings = make_settings(root, tls_files, **overrides)
        scope_holder = {}
        stopped = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with trio.CancelScope() as scope:
                    scope_holder["scope"] = scope
                    await serve(settings, task_status=task_status)
            finally:
                stopped.set()

        running = await nursery.start(run)
        return ServerUnderTest(running, settings, client_ssl, scope_holder["scope"], stopped)

    return start


@pytest.fixture
async def server(start_server) -> ServerUnderTest:
    return await start_server()


@pytest.fixture
async def admin(server) -> Client:
    async with server.connect("admin") as client:
        yield client


# -- an S3-compatible server for backup targets (issue 18) --------------------------------------

S3_STARTUP_TIMEOUT_S = 30.0


@dataclasses.dataclass
class S3Service:
    """moto's standalone S3 server on a loopback port, with the credentials it accepts."""

    endpoint: str
    environment: dict

    def client(self):
        import boto3
        return boto3.session.Session(
            aws_access_key_id=self.environment["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.environment["AWS_SECRET_ACCESS_KEY"],
            region_name=self.environment["AWS_DEFAULT_REGION"]).client(
                "s3", endpoint_url=self.endpoint)


def _free_loopback_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_service():
    """`moto_server` as a subprocess for the whole session (it cannot pick port 0 itself, so
    a free port is chosen first); its startup is waited for, at most S3_STARTUP_TIMEOUT_S."""
    import os
    import shutil
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    executable = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if executable is None:
        pytest.fail("moto_server is not installed (pip install 'moto[server]', the test extra)")
    port = _free_loopback_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([executable, "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + S3_STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"moto_server exited with code {process.returncode} at startup")
            try:
                with urllib.request.urlopen(f"{endpoint}/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answers: up
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer within {S3_STARTUP_TIMEOUT_S} s")
                time.sleep(0.1)
        environment = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}
        yield S3Service(endpoint, environment)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3(s3_service, monkeypatch) -> S3Service:
    """The session's S3 server, with its credentials in this test's environment (where boto3
    reads them, as it would on an operator's machine)."""
    for name, value in s3_service.environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return s3_service
