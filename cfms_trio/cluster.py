"""What several server instances on one PostgreSQL database tell each other (issue 16).

Each instance has a name of its own, the same across its restarts, which its leases carry
(storage/leases.py): an instance that starts again under its name fails at once the imports it
was running. While it runs it holds a PostgreSQL advisory lock on its name (on a connection of
its own, released by the database server when the process dies: `claim_instance_name`), so
two running instances never share one. The name is `serve --instance-name` (refused at the
start while another instance holds it), or by default the host name, the root folder and the
port (`default_instance_name`), followed by "#2", "#3", ... when an instance running now holds
that already (two instances on one root and port 0): a restarted instance takes the first free
one, its own. `ClusterRelay` sends small messages to every other instance through
PostgreSQL NOTIFY and receives theirs on a connection of its own, kept LISTENing: the event
loop waits for that connection's socket to become readable, and reads what arrived without
blocking. A message has a `kind`; the services register what to do with each kind (the event
hub delivers `event`s to its own listeners; the transfer registry aborts a transfer asked to
stop by the instance that enforces an import's deadline). A message never comes back to the
instance that sent it, so the sender acts for itself directly and every message is handled
once per instance. On SQLite (one instance) the relay sends nothing and listens to nothing.

A lost LISTEN connection is opened again after `RECONNECT_DELAY_S`; what was sent meanwhile
does not arrive (an event is a notification: the task's status in the store stays the truth).
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Awaitable, Callable

import trio

from .errors import StartupError
from .storage import Store, notifications
from .storage.backends import POSTGRESQL

log = logging.getLogger(__name__)

RECONNECT_DELAY_S = 1.0
# Default names tried at a start: the base name, then "#2", "#3", ... up to this many.
DEFAULT_NAME_SLOTS = 64

Handler = Callable[[dict], Awaitable[None]]


def default_instance_name(root: Path, port: int) -> str:
    """The name of an instance given none: host name, root folder and port (two instances on
    one host differ in root or port; with port 0 give each its own root or name)."""
    return f"{socket.gethostname()}:{root.absolute()}:{port}"


def claim_instance_name(store: Store, explicit: str | None, default: str
                        ) -> tuple[str, notifications.NameLock | None]:
    """This instance's name and the lock that keeps it its own (to close at shutdown; None on
    SQLite, which serves one instance). Blocking. StartupError when `explicit` is taken."""
    if store.backend != POSTGRESQL:
        return explicit or default, None
    lock = notifications.NameLock(store.open_side_connection())
    try:
        candidates = ([explicit] if explicit else
                      [default] + [f"{default}#{n}" for n in range(2, DEFAULT_NAME_SLOTS + 1)])
        for name in candidates:
            if lock.try_lock(name):
                return name, lock
    except BaseException:
        lock.close()
        raise
    lock.close()
    if explicit:
        raise StartupError(f"another server instance named {explicit!r} is running on this "
                           "database; give each instance its own name (--instance-name)")
    raise StartupError(f"{DEFAULT_NAME_SLOTS} server instances named {default!r} are running "
                       "on this database; give this one a name of its own (--instance-name)")


class ClusterRelay:
    def __init__(self, store: Store, instance_id: str):
        self._store = store
        self.instance_id = instance_id
        self.enabled = store.backend == POSTGRESQL
        self._handlers: dict[str, Handler] = {}

    def on(self, kind: str, handler: Handler) -> None:
        """Run `handler(body)` for each message of `kind` another instance sends."""
        self._handlers[kind] = handler

    async def send(self, kind: str, body: dict) -> None:
        """Send `body` to every other instance (nothing on SQLite)."""
        if self.enabled:
            await self._store.write(notifications.notify,
                                    {"origin": self.instance_id, "kind": kind, "body": body})

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ready once the first LISTEN is in place."""
        if not self.enabled:
            task_status.started()
            await trio.sleep_forever()
        started = False
        while True:
            connection = None
            try:
                connection = await trio.to_thread.run_sync(
                    notifications.ListeningConnection, self._store.open_side_connection())
                if not started:
                    started = True
                    task_status.started()
                await self._receive(connection)
            except Exception as exc:
                if not started:
                    raise
                log.warning("lost the connection listening to other instances (%s); "
                            "reconnecting", exc)
            finally:
                if connection is not None:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(connection.close)
            await trio.sleep(RECONNECT_DELAY_S)

    async def _receive(self, connection: notifications.ListeningConnection) -> None:
        while True:
            await trio.lowlevel.wait_readable(connection.fileno())
            for payload in connection.drain():
                try:
                    await self._handle(payload)
                except Exception:
                    log.exception("could not handle a message from another instance")

    async def _handle(self, payload: dict) -> None:
        if "stored" in payload:
            payload = await self._store.read(notifications.stored_event, int(payload["stored"]))
            if payload is None:
                log.warning("a message from another instance was removed before it was read")
                return
        if payload.get("origin") == self.instance_id:
            return
        handler = self._handlers.get(payload.get("kind"))
        if handler is None:
            log.warning("ignored a message of unknown kind %r from instance %s",
                        payload.get("kind"), payload.get("origin"))
            return
        await handler(payload["body"])
