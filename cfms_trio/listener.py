"""Accept-time bounds on connections: in total and per peer address.

A connection is admitted or refused the moment it is accepted, before the server spends a TLS
or WebSocket handshake (or a handshake timeout) on it. `GatedListener` wraps each TCP listener
for trio-websocket's `WebSocketServer` and does the TLS wrapping itself, so the gate sees the
plain socket. A connection leaves the gate when its socket is closed: `serve_connection` closes
it through `ConnectionGate.close` when it ends (trio-websocket does not always close the socket
itself), and connections that ended during the handshake (the library closes those) are
forgotten the next time a bound is reached.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import ssl
import time

import trio

from .transfer import wire

log = logging.getLogger(__name__)

# Refusals are logged at most this often, with the count since the last log line.
REFUSAL_LOG_INTERVAL_S = 60.0

Peer = tuple[str, int]


def peer_of(host: str, port: int) -> Peer:
    """The gate's key of a connection: its normalized peer address and port (the same whether
    it comes from a socket's `getpeername()` or from trio-websocket's `Endpoint`)."""
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass
    return host, port


class ConnectionGate:
    """Counts open connections in total and per address; refuses those beyond the bounds."""

    def __init__(self, total_max: int, per_address_max: int):
        self.total_max = total_max
        self.per_address_max = per_address_max
        self._streams: dict[Peer, trio.SocketStream] = {}
        self._per_address: collections.Counter[str] = collections.Counter()
        self._refused = 0
        self._refusal_logged_time = -REFUSAL_LOG_INTERVAL_S

    @property
    def open_count(self) -> int:
        return len(self._streams)

    def admit(self, stream: trio.SocketStream) -> bool:
        """Count `stream` in if the bounds allow; False means the caller closes it."""
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            return False  # gone already
        peer = peer_of(host, port)
        self._forget(peer)  # a closed connection whose address and port were reused
        if not self._has_room(peer[0]):
            self._forget_closed()
            if not self._has_room(peer[0]):
                self._note_refusal(peer[0])
                return False
        self._streams[peer] = stream
        self._per_address[peer[0]] += 1
        return True

    async def close(self, peer: Peer) -> None:
        """Close a connection's socket and count it out (idempotent)."""
        stream = self._forget(peer)
        if stream is not None:
            await stream.aclose()

    def _has_room(self, address: str) -> bool:
        return (len(self._streams) < self.total_max
                and self._per_address[address] < self.per_address_max)

    def _forget(self, peer: Peer) -> trio.SocketStream | None:
        stream = self._streams.pop(peer, None)
        if stream is not None:
            self._per_address[peer[0]] -= 1
            if not self._per_address[peer[0]]:
                del self._per_address[peer[0]]
        return stream

    def _forget_closed(self) -> None:
        """Count out connections whose socket is closed, or whose peer reset it."""
        for peer, stream in list(self._streams.items()):
            if stream.socket.fileno() == -1:
                self._forget(peer)
                continue
            try:
                stream.socket.getpeername()
            except OSError:
                stream.socket.close()
                self._forget(peer)

    def _note_refusal(self, address: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_time >= REFUSAL_LOG_INTERVAL_S:
            log.warning("refused %d connection(s) over the bounds (last from %s; %d open, at "
                        "most %d in total and %d per address)", self._refused, address,
                        len(self._streams), self.total_max, self.per_address_max)
            self._refused = 0
            self._refusal_logged_time = now


class GatedListener(trio.abc.Listener[trio.abc.Stream]):
    """A TCP listener whose `accept` returns only connections the gate admits (wrapped in TLS
    when an SSL context is given); refused ones are closed at once."""

    def __init__(self, inner: trio.SocketListener, gate: ConnectionGate,
                 ssl_context: ssl.SSLContext | None):
        self.inner = inner
        self.gate = gate
        self.ssl_context = ssl_context

    @property
    def port(self) -> int:
        return self.inner.socket.getsockname()[1]

    async def accept(self) -> trio.abc.Stream:
        while True:
            stream = await self.inner.accept()
            if self.gate.admit(stream):
                break
            await stream.aclose()
        if self.ssl_context is None:
            return stream
        return wire.speed_up_tls(trio.SSLStream(stream, self.ssl_context, server_side=True,
                                                https_compatible=True))

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"<GatedListener {self.inner.socket.getsockname()!r}>"
