"""Broadcast of server events to registered listeners (SPEC §3).

Who receives an event is decided when it is published, from the rights and sessions committed
then, not from a picture taken when the listener registered (issue 12 item 3). A listener is
known by its session (token hash and username); `publish` reads, in one store read, which of
those sessions are still live (not logged out, not expired, account not deleted, password not
changed) and what their users hold now, then offers the event to those allowed to see it.
Listeners whose session ended are dropped and their queue closed, so their event pump ends.
Because the audience comes from the store at publish time, no code that changes rights or
sessions has to tell the hub about it.

With several instances on one database (issue 16) the hub also hands every event it publishes
to its relay (`cluster_events.EventRelay`), which sends it to the other instances; each of them
`deliver`s it to its own listeners, deciding the audience there, as above. The audience
therefore travels as data (`Audience`), not as a function.

Delivery never blocks: each listener has a bounded queue, and a listener whose queue is full is
dropped on the spot and its `on_drop` callback ends its connection, so a slow or dead client
never delays the server or any other listener.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Awaitable, Callable

import trio

from .permissions import Principal
from .storage import Store, accounts

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Audience:
    """Who may see an event: the user `owner` and anyone holding one of `rights`."""

    owner: str
    rights: tuple[str, ...] = ()

    def __call__(self, principal: Principal) -> bool:
        return principal.username == self.owner or any(principal.has(r) for r in self.rights)

    def to_wire(self) -> dict:
        return {"owner": self.owner, "rights": list(self.rights)}

    @classmethod
    def from_wire(cls, data: dict) -> "Audience":
        return cls(str(data["owner"]), tuple(str(r) for r in data["rights"]))


class Listener:
    """One registered connection: whose session it follows and the queue its events wait in."""

    def __init__(self, username: str, token_hash: str, send: trio.MemorySendChannel,
                 on_drop: Callable[[], None] | None = None):
        self.username = username
        self.token_hash = token_hash
        self._send = send
        self._on_drop = on_drop
        self.dropped = False  # its queue overflowed; its connection is being ended
        self.ended = False  # its session ended; the connection may register again

    @property
    def active(self) -> bool:
        return not (self.dropped or self.ended)

    def offer(self, message: dict) -> None:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            log.warning("dropping slow event listener %s", self.username)
            self.dropped = True
            self._send.close()
            if self._on_drop is not None:
                self._on_drop()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def end(self) -> None:
        """Its session is over: no more events, and its pump stops after the queued ones."""
        self.ended = True
        self._send.close()


class EventHub:
    def __init__(self, store: Store, queue_events: int,
                 relay: Callable[[dict, Audience], Awaitable[None]] | None = None):
        """`relay(message, audience)` sends each published event to the other instances."""
        self._store = store
        self.queue_events = queue_events
        self._listeners: set[Listener] = set()
        self._relay = relay

    def register(self, username: str, token_hash: str,
                 on_drop: Callable[[], None] | None = None
                 ) -> tuple[Listener, trio.MemoryReceiveChannel]:
        """A new listener following the session `token_hash` of `username`. `on_drop` is called
        (synchronously, from the publisher) if its queue overflows; it must not block."""
        send, receive = trio.open_memory_channel(self.queue_events)
        listener = Listener(username, token_hash, send, on_drop)
        self._listeners.add(listener)
        return listener, receive

    def unregister(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    def renew(self, old_token_hash: str, new_token_hash: str) -> None:
        """A session continues under a new token (refresh_token): its listeners follow it.
        Called before the old token is deleted, so no publish finds the session ended."""
        for listener in self._listeners:
            if listener.token_hash == old_token_hash:
                listener.token_hash = new_token_hash

    async def publish(self, message: dict, audience: Audience) -> int:
        """Deliver `message` here and relay it to the other instances (which deliver it to
        theirs); return how many listeners of this instance got it."""
        delivered = await self.deliver(message, audience)
        if self._relay is not None:
            await self._relay(message, audience)
        return delivered

    async def deliver(self, message: dict, visible_to: Callable[[Principal], bool]) -> int:
        """Queue `message` for every listener of this instance whose session is live and whose
        user, as the store has it now, may see it; return how many got it."""
        listeners = [listener for listener in self._listeners if listener.active]
        if not listeners:
            return 0
        sessions = sorted({(listener.token_hash, listener.username) for listener in listeners})
        current = await self._store.read(accounts.live_principals, sessions, time.time())
        asked = {token_hash for token_hash, _ in sessions}
        delivered = 0
        for listener in listeners:
            if listener not in self._listeners or not listener.active:
                continue  # unregistered or dropped while the store was read
            principal = current.get(listener.token_hash)
            if principal is None:
                if listener.token_hash in asked:
                    self._listeners.discard(listener)
                    listener.end()
                continue  # renewed while the store was read: it takes part from the next one
            if visible_to(principal):
                listener.offer(message)
                if listener.dropped:
                    self._listeners.discard(listener)
                else:
                    delivered += 1
        return delivered
