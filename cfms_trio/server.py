"""The composition root: build every service of one server and run them in one nursery.

`serve` prepares the root (folders, database, first accounts), builds the store, event hub,
transfer registry, file reaper, import supervisor, upload sweeper and backup scheduler into an
`App`, starts each long-lived service with `await nursery.start(service.run)` (so recovery has
finished before the first connection is accepted), then opens the WebSocket listener. Cancelling `serve` stops
them all; the database is closed last.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import logging
import os
import secrets
import time

import trio
from trio_websocket import WebSocketServer

from . import auth
from .actions import ROUTES
from .app import App
from .backup.scheduler import BackupScheduler
from .backup.supervisor import ImportSupervisor
from .backup.targets import S3Options
from .cluster import ClusterRelay, claim_instance_name, default_instance_name
from .config import Settings
from .connection import serve_connection
from .content import open_content_storage
from .dispatch import Dispatcher
from .errors import StartupError
from .events import Audience, EventHub
from .listener import ConnectionGate, GatedListener
from .paths import Paths
from .reaper import FileReaper
from .storage import Store, accounts
from .storage.backends import SQLITE, parse_database_url
from .tls import ensure_self_signed, server_context
from .transfer.registry import TransferRegistry
from .transfer.sweeper import UploadSweeper
from .transfer import wire

log = logging.getLogger(__name__)

# WebSocket frames may exceed a transfer chunk's ciphertext by this much before the library
# itself refuses them (close code 1009); text messages are held to the smaller message limit.
FRAME_SLACK_BYTES = 64 * 1024
# Worker threads for the disk and crypto work of short requests (transfer chunks, removals).
IO_THREADS = 4
# Worker threads for long jobs (an import's unpacking, an export): running jobs beyond this
# many wait in line, so they never take the threads that transfers need.
BULK_IO_THREADS = 4


@dataclasses.dataclass
class Running:
    """What `serve` reports once it accepts connections."""

    app: App
    port: int
    url: str
    generated_admin_password: str | None


def prepare_root(settings: Settings) -> tuple[Store, Paths, str | None]:
    """Blocking first-start work: folders, database, bootstrap accounts.

    Returns the generated admin password when one was generated on this start, else None.
    """
    paths = Paths(settings.content)
    for directory in paths.all_dirs():
        directory.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.content, 0o700)
    store = Store(parse_database_url(settings.database_url) if settings.database_url
                  else paths.database)
    try:
        store.upgrade_schema()
    except BaseException:
        store.close()
        raise
    generated = None
    if not store.run_read(accounts.is_initialized):
        password = settings.initial_admin_password
        if not password:
            password = generated = secrets.token_urlsafe(18)
            fd = os.open(paths.admin_password, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            os.chmod(paths.admin_password, 0o600)
        store.run_write(accounts.bootstrap, auth.hash_password(password), time.time())
    return store, paths, generated


def hold_single_instance_lock(paths: Paths) -> int:
    """SQLite serves one instance: the first `serve` on a root holds `content/serve.lock`
    (an flock, released by the kernel if the process dies) and a second one is refused.
    Returns the descriptor to close at shutdown."""
    fd = os.open(paths.serve_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(
            f"another cfms-trio server is running on {paths.content} (it holds "
            f"{paths.serve_lock.name}); a SQLite database serves one instance: stop the other "
            "one, or run several instances on PostgreSQL (--database postgresql://...)"
        ) from None
    return fd


def build_app(settings: Settings, store: Store, paths: Paths, content,
              instance_name: str) -> App:
    """Every service of one server, wired together (inside `trio.run`: limiters need it)."""
    relay = ClusterRelay(store, instance_name)

    async def relay_event(message: dict, audience: Audience) -> None:
        await relay.send("event", {"message": message, "audience": audience.to_wire()})

    hub = EventHub(store, settings.limits.listener_queue_events,
                   relay=relay_event if relay.enabled else None)
    relay.on("event", lambda body: hub.deliver(body["message"],
                                               Audience.from_wire(body["audience"])))
    transfers = TransferRegistry(store, relay.instance_id, settings.lease_s)
    relay.on("abort_transfer", transfers.abort_from_elsewhere)
    io_limiter = trio.CapacityLimiter(IO_THREADS)
    bulk_io_limiter = trio.CapacityLimiter(BULK_IO_THREADS)
    reaper = FileReaper(io_limiter, content)
    # Imports unpack on the bulk limiter (the supervisor's `io_limiter` argument).
    imports = ImportSupervisor(store, paths, hub, transfers, bulk_io_limiter,
                               settings.limits.archive, content, relay, settings.lease_s)
    relay.on("cancel_import", imports.cancel_from_elsewhere)
    return App(
        settings=settings, paths=paths, store=store, hub=hub, relay=relay, transfers=transfers,
        io_limiter=io_limiter, bulk_io_limiter=bulk_io_limiter, reaper=reaper,
        content=content,
        imports=imports,
        sweeper=UploadSweeper(store, content, transfers),
        backups=BackupScheduler(store, paths, hub, reaper, bulk_io_limiter,
                                settings.limits.archive,
                                S3Options(settings.s3_endpoint_url, settings.s3_region,
                                          settings.s3_part_bytes), content))


def _tls_context(settings: Settings, paths: Paths):
    if not settings.tls:
        return None
    if settings.certfile:
        return server_context(settings.certfile, settings.keyfile or settings.certfile)
    certfile, keyfile = ensure_self_signed(paths.tls, settings.host)
    return server_context(certfile, keyfile)


async def serve(settings: Settings, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the server until cancelled; reports a `Running` once it accepts connections."""
    wire.install()
    lock_fd = None
    if (not settings.database_url
            or parse_database_url(settings.database_url).kind == SQLITE):
        paths = Paths(settings.content)
        await trio.to_thread.run_sync(
            lambda: paths.content.mkdir(parents=True, exist_ok=True))
        lock_fd = await trio.to_thread.run_sync(hold_single_instance_lock, paths)
    try:
        store, paths, generated = await trio.to_thread.run_sync(prepare_root, settings)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    name_lock = None
    try:
        content = open_content_storage(settings, paths)
        # A bucket that is missing or refuses these credentials stops the start, clearly.
        await trio.to_thread.run_sync(content.check)
        log.info("content storage: %s", content.description)
        instance_name, name_lock = await trio.to_thread.run_sync(
            claim_instance_name, store, settings.instance_name,
            default_instance_name(settings.root, settings.port))
        log.info("instance name: %s", instance_name)
        app = build_app(settings, store, paths, content, instance_name)
        ssl_context = await trio.to_thread.run_sync(_tls_context, settings, paths)
        dispatcher = Dispatcher(app, ROUTES)
        limits = settings.limits
        frame_limit = max(limits.message_bytes,
                          limits.transfer_chunk_bytes + 16) + FRAME_SLACK_BYTES
        gate = ConnectionGate(limits.connections_max, limits.connections_per_address_max)
        handler = functools.partial(serve_connection, handle_text=dispatcher.handle_text,
                                    hub=app.hub, limits=limits, frame_bytes=frame_limit,
                                    gate=gate)
        async with trio.open_nursery() as nursery:
            await nursery.start(app.relay.run)  # listening before anything is published
            await nursery.start(app.transfers.run)
            await nursery.start(app.imports.run)
            await nursery.start(app.sweeper.run)
            await nursery.start(app.backups.run)
            listeners = [GatedListener(listener, gate, ssl_context) for listener in
                         await trio.open_tcp_listeners(settings.port, host=settings.host)]
            # Every connection starts with the strangers' message limit; `serve_connection`
            # raises it to `frame_limit` once the connection authenticates.
            ws_server = WebSocketServer(
                handler, listeners, handler_nursery=nursery,
                max_message_size=min(limits.unauthenticated_message_bytes, frame_limit),
                receive_buffer_size=wire.WS_RECEIVE_BYTES,
                connect_timeout=limits.handshake_timeout_s,
                disconnect_timeout=limits.handshake_timeout_s)
            await nursery.start(ws_server.run)
            port = listeners[0].port
            scheme = "wss" if ssl_context else "ws"
            host = settings.host if ":" not in settings.host else f"[{settings.host}]"
            task_status.started(Running(app, port, f"{scheme}://{host}:{port}", generated))
    finally:
        # Runs on cancellation (shutdown) too, so it must be shielded to run at all.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
            if name_lock is not None:
                await trio.to_thread.run_sync(name_lock.close)
            if lock_fd is not None:
                os.close(lock_fd)
