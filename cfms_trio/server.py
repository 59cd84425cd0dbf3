"""The WebSocket server: one nursery holding the listener, per-connection nurseries inside it."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Awaitable, Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from . import protocol
from .actions import ROUTES
from .backup import supervisor as backup_supervisor
from .transfer import sweeper as upload_sweeper
from .app import App, prepare_root
from .config import Settings
from .connection import Connection
from .dispatch import Dispatcher
from .errors import BadRequest
from .tls import ensure_self_signed, server_context

log = logging.getLogger(__name__)

# WebSocket frames may exceed a transfer chunk's ciphertext by this much before the library
# itself refuses them (close code 1009); text messages are held to the smaller message limit.
FRAME_SLACK_BYTES = 64 * 1024
HANDSHAKE_TIMEOUT_S = 30
# Bytes asked of the TLS stream per read. trio-websocket's default (4 KiB) turns every 1 MiB
# chunk into hundreds of reads and parser passes; larger reads keep transfers at disk speed.
WS_RECEIVE_BYTES = 256 * 1024
# Closing a connection is best effort: a peer that stopped reading cannot delay it longer.
CLOSE_TIMEOUT_S = 2
SHUTDOWN_CLOSE_TIMEOUT_S = 0.2

# Coroutines run once at start-up with the App, before the listener opens (recovery work).
StartupHook = Callable[[App], Awaitable[None]]
STARTUP_HOOKS: list[StartupHook] = [backup_supervisor.startup, upload_sweeper.startup]


@dataclasses.dataclass
class Running:
    """What `serve` reports once it accepts connections."""

    app: App
    port: int
    url: str
    generated_admin_password: str | None


class Server:
    def __init__(self, app: App):
        self.app = app
        self.dispatcher = Dispatcher(app, ROUTES)

    async def handle(self, request: WebSocketRequest) -> None:
        """One connection's life. Nothing escapes: an escaped exception would take the whole
        listener, and every other connection, down with it."""
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        remote = ws.remote
        address = f"{getattr(remote, 'address', remote)}"
        conn = Connection(ws, address, self.app.settings.limits.message_bytes)
        try:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                await self._serve_messages(conn)
                nursery.cancel_scope.cancel()
        except Exception:
            log.exception("connection from %s failed", address)
        finally:
            code, reason, close_timeout = 1000, None, CLOSE_TIMEOUT_S
            if conn.listener is not None:
                self.app.hub.unregister(conn.listener)
                if conn.listener.dropped:
                    code, reason = 1008, "event queue overflow"
            if trio.current_effective_deadline() == -math.inf:
                # The server is shutting down: trio-websocket's reader task is cancelled along
                # with this handler, so the peer's close reply can never be read. Send the close
                # frame; do not wait out the handshake.
                code, reason = 1001, "server shutting down"
                close_timeout = SHUTDOWN_CLOSE_TIMEOUT_S
            with trio.move_on_after(close_timeout) as scope:
                scope.shield = True
                await ws.aclose(code, reason)

    async def _serve_messages(self, conn: Connection) -> None:
        """Answer requests in order until the peer goes away (a normal end, not an error)."""
        try:
            while True:
                message = await conn.receive()
                if isinstance(message, bytes):
                    reply = protocol.error_response(
                        BadRequest("binary message outside a file transfer"))
                else:
                    reply = await self.dispatcher.handle_text(conn, message)
                await conn.send_json(reply)
        except ConnectionClosed:
            return


def _tls_context(settings: Settings, app: App):
    if not settings.tls:
        return None
    if settings.certfile:
        return server_context(settings.certfile, settings.keyfile or settings.certfile)
    certfile, keyfile = ensure_self_signed(app.paths.tls, settings.host)
    return server_context(certfile, keyfile)


async def serve(settings: Settings, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the server until cancelled; reports a `Running` once it accepts connections."""
    store, paths, generated = await trio.to_thread.run_sync(prepare_root, settings)
    app = App(settings, store, paths)
    try:
        ssl_context = await trio.to_thread.run_sync(_tls_context, settings, app)
        server = Server(app)
        frame_limit = max(settings.limits.message_bytes,
                          settings.limits.transfer_chunk_bytes + 16) + FRAME_SLACK_BYTES
        async with trio.open_nursery() as nursery:
            app.nursery = nursery
            for hook in STARTUP_HOOKS:
                await hook(app)
            ws_server = await nursery.start(functools.partial(
                serve_websocket, server.handle, settings.host, settings.port, ssl_context,
                handler_nursery=nursery, max_message_size=frame_limit,
                receive_buffer_size=WS_RECEIVE_BYTES,
                connect_timeout=HANDSHAKE_TIMEOUT_S, disconnect_timeout=HANDSHAKE_TIMEOUT_S))
            port = ws_server.port
            scheme = "wss" if ssl_context else "ws"
            host = settings.host if ":" not in settings.host else f"[{settings.host}]"
            task_status.started(Running(app, port, f"{scheme}://{host}:{port}", generated))
    finally:
        # Runs on cancellation (shutdown) too, so it must be shielded to run at all.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)
