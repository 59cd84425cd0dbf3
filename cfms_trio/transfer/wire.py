"""Speed-ups of the WebSocket byte path, shared by both ends of a transfer (issue 15).

Profiles of a 1 GiB upload showed two costs outside our code, both on the event loops:

- wsproto masks and unmasks client frames in Python (`XorMaskerSimple`: strided slices and
  `bytes.translate`), about 950 µs per MiB. `FastXorMasker` gives the same bytes with
  pycryptodome's `strxor` (C), about 60 µs per MiB.
- wsproto and trio-websocket copy every message a few times. Each copy of a 1 MiB buffer is a
  fresh allocation, and glibc hands the freed memory straight back to the kernel (its trim
  threshold follows the size of the last large block freed), so the next copy page-faults all
  256 pages again: about 900 µs per MiB on this VM instead of 40 µs. `tune_allocator` keeps
  freed memory up to `ALLOCATOR_TRIM_BYTES` for reuse.

- TLS hands out one record (16 KiB) per read, and trio's `SSLStream` reads its socket 64 KiB
  at a time: a 1 MiB message took 64 passes through trio, trio-websocket and wsproto. With
  `speed_up_tls` a receive returns every record already received, up to the size asked for
  (`WS_RECEIVE_BYTES`), from socket reads of up to `TRANSPORT_RECEIVE_BYTES`.

`install()` applies the first two, once per process; the server calls it when it starts, the
client library when it opens a connection. Both ends apply `speed_up_tls` to every connection.
"""

from __future__ import annotations

import ctypes
import ssl
import sys

import trio
import wsproto.frame_protocol
from Crypto.Util.strxor import strxor

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Freed memory kept by the process for reuse instead of being returned to the kernel. It is a
# ceiling on what stays resident after a peak, not memory taken: a transfer holds a few chunks.
ALLOCATOR_TRIM_BYTES = 64 * 1024 * 1024
# Blocks at least this large get their own mapping (and are unmapped when freed). Above the
# largest archive segment (16 MiB) and transfer chunk, so those reuse memory too.
ALLOCATOR_MMAP_BYTES = 32 * 1024 * 1024

# Bytes asked of the TLS stream per WebSocket read (both ends), and of the socket per TLS read.
WS_RECEIVE_BYTES = 256 * 1024
TRANSPORT_RECEIVE_BYTES = 1024 * 1024

_installed = False


class FastXorMasker:
    """wsproto's `XorMaskerSimple` (the same interface and bytes), XORing in C.

    `process` returns a new bytearray of `data` masked with the 4-byte key, and rotates the key
    so that the next call continues where this one ended, as a frame's payload arrives in
    pieces."""

    def __init__(self, masking_key: bytes | bytearray):
        self._masking_key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        data = bytearray(data)
        size = len(data)
        if size:
            key = self._masking_key
            stream = memoryview(key * (size // 4 + 1))[:size]
            strxor(data, stream, output=data)
            rotation = size % 4
            self._masking_key = key[rotation:] + key[:rotation]
        return data


def tune_allocator() -> bool:
    """Keep glibc from returning freed large blocks to the kernel at once; False where the C
    library is not glibc (nothing to tune)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_TRIM_BYTES)
                and mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_MMAP_BYTES))


def install() -> None:
    """Apply the speed-ups of this module to the current process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    wsproto.frame_protocol.XorMaskerSimple = FastXorMasker
    tune_allocator()


class _LargeReads(trio.abc.HalfCloseableStream):
    """The socket under a TLS stream, read `TRANSPORT_RECEIVE_BYTES` at a time when the TLS
    stream asks for no particular size. Everything else passes through; `socket` is there
    for trio-websocket, which reads the peer's address from it."""

    def __init__(self, inner: trio.SocketStream):
        self.inner = inner

    @property
    def socket(self):
        return self.inner.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes or TRANSPORT_RECEIVE_BYTES)

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


# trio's SSLStream keeps its ssl.SSLObject under this private name, and has no public way to
# read the records it has already received without a scheduler pass for each (see
# `_tls_object`, the only place that reads it).
_TRIO_TLS_OBJECT_ATTRIBUTE = "_ssl_object"


def _tls_object(stream: trio.SSLStream) -> ssl.SSLObject | None:
    """The TLS object of ``stream``, or None when this trio keeps it elsewhere (then receives
    take trio's public path: one record each)."""
    tls_object = getattr(stream, _TRIO_TLS_OBJECT_ATTRIBUTE, None)
    return tls_object if isinstance(tls_object, ssl.SSLObject) else None


def speed_up_tls(stream: trio.SSLStream) -> trio.SSLStream:
    """Make `stream.receive_some(n)` return up to `n` bytes: after trio's own receive, the
    records already in the TLS object's buffer are decrypted too, without waiting for more.
    Whatever that extra reading meets (a close, an error) is left for the next receive, which
    meets it through trio's handling. Call it before the stream is used, or while nothing but
    its receiver waits on it.

    The socket underneath is read `TRANSPORT_RECEIVE_BYTES` at a time in any case (its
    `transport_stream` is public). Without the TLS object (`_tls_object`), receives stay
    trio's own, one record each: slower, never wrong."""
    if isinstance(stream.transport_stream, trio.SocketStream):
        stream.transport_stream = _LargeReads(stream.transport_stream)
    tls_object = _tls_object(stream)
    if tls_object is None:
        return stream
    receive = stream.receive_some

    async def receive_some(max_bytes: int | None = None) -> bytes | bytearray:
        data = await receive(max_bytes)
        if max_bytes is None or not data or len(data) >= max_bytes:
            return data
        parts, total = [data], len(data)
        while total < max_bytes:
            try:
                more = tls_object.read(max_bytes - total)
            except ssl.SSLError:  # want-read: no whole record left; or a close to report
                break
            if not more:
                break
            parts.append(more)
            total += len(more)
        return data if len(parts) == 1 else b"".join(parts)

    stream.receive_some = receive_some
    return stream


def speed_up_client_tls(ws) -> None:
    """`speed_up_tls` for the stream of a client connection trio-websocket opened itself.

    trio-websocket offers no public handle on that stream (`wrap_client_stream` takes one, but
    would mean doing `open_websocket_url`'s connect, timeouts and close here again), so it is
    taken from the connection's private `_stream`; without one, nothing changes."""
    stream = getattr(ws, "_stream", None)
    if isinstance(stream, trio.SSLStream):
        speed_up_tls(stream)
