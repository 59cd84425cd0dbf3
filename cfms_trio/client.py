"""The async client library shared by tests, scripts and the `cfms-trio client` commands.

    async with open_client("wss://host:5104", cafile=...) as client:
        await client.login("admin", password)
        info = await client.call("server_info")

Responses, transfer messages and events arrive on one socket; a reader task sorts events into
their own queue, so they never get mixed up with the answer to a request. Responses and transfer
messages share one ordered queue: within one request they arrive in protocol order.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import ssl
from pathlib import Path
from typing import Any, AsyncIterator

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

TRANSFER_ACTIONS = ("transfer_file", "ready")
CLIENT_FRAME_LIMIT_BYTES = 64 * 1024 * 1024
EVENT_QUEUE = 1024


class ClientError(Exception):
    """A response whose code was not 200."""

    def __init__(self, code: int, message: str, data: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data or {}


def client_ssl_context(cafile: str | Path | None = None, insecure: bool = False) -> ssl.SSLContext:
    """Verify against `cafile` (e.g. the server's content/tls/cert.pem), the system store, or
    nothing at all when `insecure`."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Client:
    def __init__(self, ws):
        self.ws = ws
        self.username: str | None = None
        self.token: str | None = None
        self._ids = itertools.count(1)
        self._call_lock = trio.Lock()
        self._replies_send, self._replies = trio.open_memory_channel(16)
        self._events_send, self._events = trio.open_memory_channel(EVENT_QUEUE)
        self.closed_reason = None

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                if isinstance(message, bytes):
                    await self._replies_send.send(message)
                    continue
                obj = json.loads(message)
                if "code" in obj or obj.get("action") in TRANSFER_ACTIONS:
                    await self._replies_send.send(obj)
                else:
                    try:
                        self._events_send.send_nowait(obj)
                    except trio.WouldBlock:
                        pass  # nobody reads events on this client; keep the socket moving
        except ConnectionClosed as exc:
            self.closed_reason = exc.reason
        finally:
            self._replies_send.close()
            self._events_send.close()

    # -- requests ---------------------------------------------------------------------------

    def envelope(self, action: str, data: dict | None = None) -> dict:
        message: dict[str, Any] = {"action": action, "data": data or {},
                                   "request_id": next(self._ids)}
        if self.token:
            message["username"] = self.username
            message["token"] = self.token
        return message

    async def send_raw(self, message: str | bytes) -> None:
        await self.ws.send_message(message)

    async def receive_reply(self) -> dict | bytes:
        """The next response or transfer message (a JSON object, or bytes for a chunk)."""
        try:
            return await self._replies.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(self.closed_reason) from None

    async def request(self, action: str, data: dict | None = None) -> dict:
        """Send one request and return the whole response envelope, whatever its code."""
        async with self._call_lock:
            await self.ws.send_message(json.dumps(self.envelope(action, data)))
            return await self.receive_reply()

    async def call(self, action: str, data: dict | None = None) -> dict:
        """Send one request; return its data, or raise ClientError for a non-200 code."""
        reply = await self.request(action, data)
        if reply["code"] != 200:
            raise ClientError(reply["code"], reply["message"], reply.get("data"))
        return reply["data"]

    async def login(self, username: str, password: str) -> dict:
        data = await self.call("login", {"username": username, "password": password})
        self.username, self.token = username, data["token"]
        return data

    # -- events ---------------------------------------------------------------------------

    async def listen(self) -> dict:
        """Register this connection for events."""
        return await self.call("register_listener")

    async def next_event(self, action: str | None = None) -> dict:
        """The next event (optionally the next one named `action`)."""
        while True:
            try:
                event = await self._events.receive()
            except trio.EndOfChannel:
                raise ConnectionClosed(self.closed_reason) from None
            if action is None or event.get("action") == action:
                return event

    def events_nowait(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self._events.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return out

    async def aclose(self) -> None:
        await self.ws.aclose()


@contextlib.asynccontextmanager
async def open_client(url: str, *, cafile: str | Path | None = None, insecure: bool = False,
                      ssl_context: ssl.SSLContext | None = None,
                      max_message_size: int = CLIENT_FRAME_LIMIT_BYTES) -> AsyncIterator[Client]:
    """Connect to a server; the connection closes when the block ends."""
    if url.startswith("wss://") and ssl_context is None:
        ssl_context = client_ssl_context(cafile, insecure)
    async with open_websocket_url(url, ssl_context=ssl_context,
                                  max_message_size=max_message_size) as ws:
        client = Client(ws)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read_loop)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader task never fails on its own, so a group here holds the caller's own
            # exception: hand it back unwrapped, as if no task had been involved.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
