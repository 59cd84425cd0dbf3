"""One client's WebSocket connection: ordered sends, bounded receives, event pump."""

from __future__ import annotations

import json
import logging

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .errors import BadRequest, TooLarge
from .protocol import encode

log = logging.getLogger(__name__)


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
