"""One client's WebSocket connection: its life from handshake to close, ordered sends,
bounded receives, and the event pump of a listener."""

from __future__ import annotations

import json
import logging
import math
from typing import Awaitable, Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from . import protocol
from .errors import BadRequest, TooLarge
from .events import EventHub
from .protocol import encode

log = logging.getLogger(__name__)

# Closing a connection is best effort: a peer that stopped reading cannot delay it longer.
CLOSE_TIMEOUT_S = 2
SHUTDOWN_CLOSE_TIMEOUT_S = 0.2


# Answers one text message: the dispatcher's `handle_text`.
TextHandler = Callable[["Connection", str], Awaitable[dict]]


async def serve_connection(request: WebSocketRequest, handle_text: TextHandler,
                           hub: EventHub, message_bytes: int) -> None:
    """One connection's life. Nothing escapes: an escaped exception would take the whole
    listener, and every other connection, down with it."""
    try:
        ws = await request.accept()
    except ConnectionClosed:
        return
    remote = ws.remote
    address = f"{getattr(remote, 'address', remote)}"
    conn = Connection(ws, address, message_bytes)
    try:
        async with trio.open_nursery() as nursery:
            conn.nursery = nursery
            await _answer_requests(conn, handle_text)
            nursery.cancel_scope.cancel()
    except Exception:
        log.exception("connection from %s failed", address)
    finally:
        code, reason, close_timeout = 1000, None, CLOSE_TIMEOUT_S
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

    def __init__(self, ws: WebSocketConnection, address: str, message_bytes: int):
        self.ws = ws
        self.address = address
        self.message_bytes = message_bytes
        self._send_lock = trio.Lock()
        self.listener = None
        # The nursery owning this connection's tasks; set by the server while it serves.
        self.nursery: trio.Nursery | None = None

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
