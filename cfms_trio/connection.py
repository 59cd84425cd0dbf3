"""One client's WebSocket connection: its life from handshake to close, ordered sends,
bounded receives, and the event pump of a listener.

Until a connection authenticates (a successful login, or any request with a valid token) it
may send only small messages (`Limits.unauthenticated_message_bytes`) and must authenticate
within `Limits.login_timeout_s`; a stranger costs little memory and not for long.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Awaitable, Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from . import protocol
from .config import Limits
from .errors import BadRequest, TooLarge
from .events import EventHub
from .listener import ConnectionGate, peer_of
from .protocol import encode

log = logging.getLogger(__name__)

# Closing a connection is best effort: a peer that stopped reading cannot delay it longer.
CLOSE_TIMEOUT_S = 2
SHUTDOWN_CLOSE_TIMEOUT_S = 0.2


# Answers one text message: the dispatcher's `handle_text`.
TextHandler = Callable[["Connection", str], Awaitable[dict]]


LOGIN_TIMEOUT_REASON = "no login within the time allowed"


async def serve_connection(request: WebSocketRequest, handle_text: TextHandler,
                           hub: EventHub, limits: Limits, frame_bytes: int,
                           gate: ConnectionGate) -> None:
    """One connection's life. Nothing escapes: an escaped exception would take the whole
    listener, and every other connection, down with it. `frame_bytes` is the WebSocket message
    limit once the connection has authenticated."""
    try:
        remote = request.remote
        peer = peer_of(str(remote.address), remote.port)
    except (OSError, AttributeError):
        return  # reset before we got here; the gate forgets it when it next needs room
    try:
        await _serve_accepted(request, handle_text, hub, limits, frame_bytes, str(peer[0]))
    finally:
        # trio-websocket leaves the socket open after some closes (a 1009, a peer that went
        # away): closing it here is what gives the connection's place back.
        with trio.CancelScope(shield=True):
            await gate.close(peer)


async def _serve_accepted(request: WebSocketRequest, handle_text: TextHandler, hub: EventHub,
                          limits: Limits, frame_bytes: int, address: str) -> None:
    try:
        ws = await request.accept()
    except ConnectionClosed:
        return
    login_scope = trio.CancelScope(deadline=trio.current_time() + limits.login_timeout_s)
    conn = Connection(ws, address, limits.message_bytes, frame_bytes=frame_bytes,
                      login_scope=login_scope)
    try:
        with login_scope:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                await _answer_requests(conn, handle_text)
                nursery.cancel_scope.cancel()
    except Exception:
        log.exception("connection from %s failed", address)
    finally:
        code, reason, close_timeout = 1000, None, CLOSE_TIMEOUT_S
        if login_scope.cancelled_caught:
            code, reason = 1008, LOGIN_TIMEOUT_REASON
        if conn.listener is not None:
            hub.unregister(conn.listener)
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


async def _answer_requests(conn: "Connection", handle_text: TextHandler) -> None:
    """Answer requests in order until the peer goes away (a normal end, not an error)."""
    try:
        while True:
            message = await conn.receive()
            if isinstance(message, bytes):
                reply = protocol.error_response(
                    BadRequest("binary message outside a file transfer"))
            else:
                reply = await handle_text(conn, message)
            await conn.send_json(reply)
    except ConnectionClosed:
        return


class Connection:
    """Wraps a WebSocket with a send lock (responses and events interleave safely) and the
    text-message size limit."""

    def __init__(self, ws: WebSocketConnection, address: str, message_bytes: int, *,
                 frame_bytes: int, login_scope: trio.CancelScope):
        self.ws = ws
        self.address = address
        self.message_bytes = message_bytes
        self._frame_bytes = frame_bytes
        self._login_scope = login_scope
        self.is_authenticated = False
        self._send_lock = trio.Lock()
        self.listener = None
        # The nursery owning this connection's tasks; set by the server while it serves.
        self.nursery: trio.Nursery | None = None

    def authenticated(self) -> None:
        """The client proved who it is: lift the login deadline and the small message limit
        of strangers (from the next message on)."""
        if self.is_authenticated:
            return
        self.is_authenticated = True
        self._login_scope.deadline = math.inf
        # trio-websocket takes one max_message_size for every connection of a server and reads
        # it from this attribute for each message; there is no public per-connection setter.
        if not hasattr(self.ws, "_max_message_size"):
            raise RuntimeError("trio-websocket no longer has a per-connection message limit")
        self.ws._max_message_size = self._frame_bytes

    async def send_json(self, message: dict) -> None:
        async with self._send_lock:
            await self.ws.send_message(encode(message))

    async def send_bytes(self, payload: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_message(payload)

    async def receive(self) -> str | bytes:
        """The next message; raises ConnectionClosed when the peer is gone."""
        return await self.ws.get_message()

    def check_text_size(self, text: str) -> None:
        # The limit is in bytes: a character takes up to 4 bytes in UTF-8, so only text near
        # the limit needs encoding to be measured.
        if len(text) > self.message_bytes or (
                len(text) * 4 > self.message_bytes
                and len(text.encode()) > self.message_bytes):
            raise TooLarge(f"message larger than {self.message_bytes} bytes")

    async def receive_json(self) -> dict:
        """Receive a text message holding a JSON object (used inside multi-message flows)."""
        message = await self.receive()
        if isinstance(message, bytes):
            raise BadRequest("expected a JSON text message, got a binary message")
        self.check_text_size(message)
        try:
            obj = json.loads(message)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
            raise BadRequest("malformed JSON message") from None
        if not isinstance(obj, dict):
            raise BadRequest("message must be a JSON object")
        return obj

    async def pump_events(self, receive: trio.MemoryReceiveChannel) -> None:
        """Forward queued events to the client until the queue ends or the connection closes."""
        try:
            async with receive:
                async for message in receive:
                    await self.send_json(message)
        except ConnectionClosed:
            return

    def drop_listener(self) -> None:
        """The event queue overflowed: end this connection now. Waiting for the pump to notice
        would never end for a client that stopped reading, since its send would block forever;
        cancelling the connection's nursery also cancels that send."""
        if self.nursery is not None:
            self.nursery.cancel_scope.cancel()
