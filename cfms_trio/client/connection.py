"""The connection to a server: requests, file transfers and events on one WebSocket.

    async with open_client("wss://host:5104", cafile=...) as client:
        await client.login("admin", password)
        info = await client.call("server_info")

Responses, transfer messages and events arrive on one socket; a reader task sorts events into
their own queue, so they never get mixed up with the answer to a request. Responses and transfer
messages share one ordered queue: within one request they arrive in protocol order.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import ssl
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from ..backup.format import DropBehindWriter
from ..nurseries import single_error_unwrapped
from ..transfer.crypto import ChunkTagError, chunk_count, open_chunk, seal_chunk
from ..transfer import wire
from ..transfer.pipeline import send_ahead
from .files import file_sha256, open_download_target, unlink_if_present

Progress = Callable[[int, int], None]  # (bytes done, bytes total)

TRANSFER_ACTIONS = ("transfer_file", "ready")
# Chunks read and sealed ahead of the one being sent: disk and crypto work in a worker thread
# overlaps with framing and sending on the event loop, at the cost of this many chunks of memory.
UPLOAD_READ_AHEAD_CHUNKS = 2
CLIENT_FRAME_LIMIT_BYTES = 64 * 1024 * 1024
EVENT_QUEUE = 1024
DEFAULT_PORT = 5104
TLS_CHECK_TIMEOUT_S = 30


class ClientError(Exception):
    """A response whose code was not 200."""

    def __init__(self, code: int, message: str, data: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data or {}


class TlsError(ClientError):
    """The server's certificate is not trusted (found by the client, so its code is 0)."""


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

    # -- file transfer ------------------------------------------------------------------------

    async def _expect_transfer(self, action: str) -> dict:
        reply = await self.receive_reply()
        if isinstance(reply, bytes) or "code" in reply:
            if isinstance(reply, dict) and reply["code"] != 200:
                raise ClientError(reply["code"], reply["message"], reply.get("data"))
            raise ClientError(0, f"protocol error: expected '{action}'")
        if reply.get("action") != action:
            raise ClientError(0, f"protocol error: expected '{action}', got {reply.get('action')!r}")
        return reply["data"]

    @staticmethod
    def _final_data(reply: dict | bytes) -> dict:
        if isinstance(reply, bytes) or "code" not in reply:
            raise ClientError(0, "protocol error: expected the final response")
        if reply["code"] != 200:
            raise ClientError(reply["code"], reply["message"], reply.get("data"))
        return reply["data"]

    async def _resync(self) -> None:
        """Skip what is left of a transfer that ended half-way, so the next request reads its
        own answer.

        When an upload fails early the server answers at once and then rejects each chunk still
        in flight with a 400; when a download is abandoned the server still sends its chunks
        and final response. The server answers in order, so everything up to the answer of a
        fresh `server_info` belongs to the failed transfer.
        """
        marker = self.envelope("server_info")
        await self.ws.send_message(json.dumps(marker))
        while True:
            reply = await self.receive_reply()
            if isinstance(reply, dict) and reply.get("request_id") == marker["request_id"]:
                return

    async def upload_file(self, task_id: str, path: str | Path,
                          progress: Progress | None = None) -> dict:
        """Upload a local file for `task_id`; resumes where the server kept verified bytes.

        `progress(done, total)` is called once with the starting offset, then after each chunk.
        """
        path = Path(path)
        size = path.stat().st_size
        sha256 = await trio.to_thread.run_sync(file_sha256, path)
        async with self._call_lock:
            await self.ws.send_message(json.dumps(self.envelope("upload_file",
                                                                {"task_id": task_id})))
            await self._expect_transfer("transfer_file")
            await self.ws.send_message(json.dumps({"action": "transfer_file", "data": {
                "file_size": size, "sha256": sha256}}))
            ready = await self._expect_transfer("ready")
            key = base64.b64decode(ready["key"])
            prefix = base64.b64decode(ready["nonce_prefix"])
            chunk_size, offset = ready["chunk_size"], ready["offset"]
            if progress:
                progress(offset, size)
            reply = None
            first = offset // chunk_size
            last = chunk_count(size, chunk_size)

            async def send(index: int, sealed: bytes) -> bool:
                nonlocal reply
                await self.ws.send_message(sealed)
                if progress:
                    progress(min(size, (index + 1) * chunk_size), size)
                try:
                    # The server only answers before the last chunk when it gave up:
                    # stop sending what it would reject anyway.
                    reply = self._replies.receive_nowait()
                    return True
                except (trio.WouldBlock, trio.EndOfChannel):
                    return False

            with open(path, "rb") as f:
                f.seek(offset)
                await send_ahead(range(first, last),
                                 lambda index: _read_and_seal(f, chunk_size, key, prefix, index),
                                 send, depth=UPLOAD_READ_AHEAD_CHUNKS)
            if reply is None:
                reply = await self.receive_reply()
            if last > first and (isinstance(reply, bytes) or reply.get("code") != 200):
                await self._resync()
            return self._final_data(reply)

    async def download_file(self, task_id: str, path: str | Path, offset: int = 0,
                            progress: Progress | None = None, *, exclusive: bool = False,
                            secret: bool = False) -> dict:
        """Download `task_id` into `path` (appending from `offset` when resuming) and check
        the file's sha256 when it is complete.

        `exclusive` refuses to write into a file that already exists (ClientError, before
        anything is asked of the server), and removes the file again if the download fails:
        an exclusive download either completes or leaves nothing behind. `secret` gives the
        file mode 0600 from its creation on (a key file is never readable by others, not even
        half-written). `progress(done, total)` is called once with the starting offset, then
        after each chunk.
        """
        path = Path(path)
        if exclusive and offset:
            raise ValueError("an exclusive download writes a new file and starts at offset 0")
        try:
            f, created = await trio.to_thread.run_sync(
                lambda: open_download_target(path, exclusive=exclusive, secret=secret))
        except FileExistsError:
            raise ClientError(0, f"{path} already exists; not overwriting it") from None
        started = False
        try:
            with f:
                async with self._call_lock:
                    await self.ws.send_message(json.dumps(self.envelope(
                        "download_file", {"task_id": task_id, "offset": offset})))
                    header = await self._expect_transfer("transfer_file")
                    key = base64.b64decode(header["key"])
                    prefix = base64.b64decode(header["nonce_prefix"])
                    size, chunk_size = header["file_size"], header["chunk_size"]
                    await self.ws.send_message(json.dumps({"action": "ready"}))
                    started = True
                    if progress:
                        progress(offset, size)
                    # A whole download is hashed as it is written; a resumed one is read back
                    # at the end.
                    digest = None if offset else hashlib.sha256()
                    await trio.to_thread.run_sync(_seek_and_truncate, f, offset)
                    writer = DropBehindWriter(f, offset)
                    for index in range(offset // chunk_size, chunk_count(size, chunk_size)):
                        sealed = await self.receive_reply()
                        if not isinstance(sealed, bytes):
                            # only an error can come instead of a chunk; it ends the download
                            self._final_data(sealed)
                            raise ClientError(0, "protocol error: expected a binary chunk")
                        # Meanwhile the reader task keeps receiving the next chunks.
                        try:
                            await trio.to_thread.run_sync(_open_and_write, writer, digest,
                                                          key, prefix, index, sealed)
                        except ChunkTagError as err:
                            await self._resync()
                            raise ClientError(0, f"download failed: {err}") from None
                        if progress:
                            progress(min(size, (index + 1) * chunk_size), size)
                    result = self._final_data(await self.receive_reply())
            if digest is not None:
                actual = digest.hexdigest()
            else:
                actual = await trio.to_thread.run_sync(file_sha256, path)
            if actual != header["sha256"]:
                raise ClientError(0, "downloaded file does not match its sha256")
        except BaseException:
            # A partial download stays for resuming; an empty file made for a refused request,
            # or anything an exclusive download wrote, goes.
            if created and (exclusive or not started):
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(unlink_if_present, path)
            raise
        return result

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


async def check_tls(url: str, ssl_context: ssl.SSLContext) -> None:
    """Complete one TLS handshake with the server of a wss:// URL, raising ClientError with
    advice when its certificate is not trusted. (trio-websocket reports a failed certificate
    check only as a connection timeout, after a minute; this answers at once.)"""
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or DEFAULT_PORT
    with trio.fail_after(TLS_CHECK_TIMEOUT_S):
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise TlsError(0, f"the certificate of {host}:{port} is not trusted "
                                     f"({exc.__cause__.verify_message}); trust the server's "
                                     "certificate (its content/tls/cert.pem; --cafile on the "
                                     "command line) or connect insecurely (--insecure)") from None
            raise
        finally:
            await trio.aclose_forcefully(stream)


@contextlib.asynccontextmanager
async def open_client(url: str, *, cafile: str | Path | None = None, insecure: bool = False,
                      ssl_context: ssl.SSLContext | None = None,
                      max_message_size: int = CLIENT_FRAME_LIMIT_BYTES,
                      check_certificate_first: bool = False) -> AsyncIterator[Client]:
    """Connect to a server; the connection closes when the block ends.

    `check_certificate_first` makes one extra TLS handshake so that an untrusted certificate
    is reported at once and clearly (the command-line tools use it)."""
    wire.install()  # C masking and reused buffers for this process (transfer/wire.py)
    if url.startswith("wss://") and ssl_context is None:
        ssl_context = client_ssl_context(cafile, insecure)
    if check_certificate_first and url.startswith("wss://"):
        await check_tls(url, ssl_context)
    async with open_websocket_url(url, ssl_context=ssl_context,
                                  max_message_size=max_message_size,
                                  receive_buffer_size=wire.WS_RECEIVE_BYTES) as ws:
        wire.speed_up_client_tls(ws)
        client = Client(ws)
        # The reader task never fails on its own, so a group here holds the caller's own
        # exception: it comes back unwrapped.
        with single_error_unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read_loop)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()


def _seek_and_truncate(f, offset: int) -> None:
    f.seek(offset)
    f.truncate(offset)


def _read_and_seal(f, chunk_size: int, key: bytes, prefix: bytes, index: int) -> bytes:
    return seal_chunk(key, prefix, index, f.read(chunk_size))


def _open_and_write(f, digest, key: bytes, prefix: bytes, index: int, sealed: bytes) -> None:
    """Verify and decrypt one downloaded chunk, append it to `f` (a DropBehindWriter) and to
    `digest` (if any)."""
    plaintext = open_chunk(key, prefix, index, sealed)
    f.write(plaintext)
    if digest is not None:
        digest.update(plaintext)
