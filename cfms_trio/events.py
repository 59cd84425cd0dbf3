"""Broadcast of server events to registered listeners (SPEC §3).

`publish` never blocks: each listener has a bounded queue, and a listener whose queue is full is
dropped on the spot and its `on_drop` callback ends its connection, so a slow or dead client
never delays the server or any other listener.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

from .permissions import Principal

log = logging.getLogger(__name__)


class Listener:
    """One registered connection: who it is and the queue its events wait in."""

    def __init__(self, principal: Principal, send: trio.MemorySendChannel,
                 on_drop: Callable[[], None] | None = None):
        self.principal = principal
        self._send = send
        self._on_drop = on_drop
        self.dropped = False

    def offer(self, message: dict) -> None:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            log.warning("dropping slow event listener %s", self.principal.username)
            self.dropped = True
            self._send.close()
            if self._on_drop is not None:
                self._on_drop()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass


class EventHub:
    def __init__(self, queue_events: int):
        self.queue_events = queue_events
        self._listeners: set[Listener] = set()

    def register(self, principal: Principal, on_drop: Callable[[], None] | None = None
                 ) -> tuple[Listener, trio.MemoryReceiveChannel]:
        """A new listener for `principal`. `on_drop` is called (synchronously, from the
        publisher) if its queue overflows; it must not block."""
        send, receive = trio.open_memory_channel(self.queue_events)
        listener = Listener(principal, send, on_drop)
        self._listeners.add(listener)
        return listener, receive

    def unregister(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    def publish(self, message: dict, visible_to: Callable[[Principal], bool]) -> int:
        """Queue `message` for every listener allowed to see it; return how many got it."""
        delivered = 0
        for listener in list(self._listeners):
            if listener.dropped:
                self._listeners.discard(listener)
                continue
            if visible_to(listener.principal):
                listener.offer(message)
                if listener.dropped:
                    self._listeners.discard(listener)
                else:
                    delivered += 1
        return delivered
