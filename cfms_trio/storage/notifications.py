"""PostgreSQL LISTEN/NOTIFY between server instances (issue 16), blocking.

A notification is sent inside a write transaction (`notify`), so it leaves when that commits.
Its payload is limited (about 8000 bytes): a larger message is stored in `ClusterEvent` and
the notification carries only its id (`stored_event`). The receiving side holds a connection
of its own (`open_listening`), outside the pool; `drain` takes what has arrived without
waiting, so the caller can wait for the socket to become readable itself.
"""

from __future__ import annotations

import json
import time

import peewee as pw

from . import backends

CHANNEL = "cfms_events"
# The first key of the advisory locks on instance names (the second is the name's hash), so
# they do not collide with other users of advisory locks on the same database.
NAME_LOCK_CLASS = 0x0CF5
# Below PostgreSQL's limit of 8000 bytes, with room for the envelope around a stored id.
NOTIFY_PAYLOAD_MAX_BYTES = 7000
# A stored event is read by every instance within moments of its notification.
STORED_EVENT_KEEP_S = 600.0


def notify(m, payload: dict) -> None:
    """Send `payload` (JSON-able) to every listening instance when this transaction commits."""
    text = json.dumps(payload, separators=(",", ":"))
    if len(text.encode()) > NOTIFY_PAYLOAD_MAX_BYTES:
        now = time.time()
        m.ClusterEvent.delete().where(m.ClusterEvent.created_time < now - STORED_EVENT_KEEP_S
                                      ).execute()
        row = m.ClusterEvent.create(payload=text, created_time=now)
        text = json.dumps({"stored": row.id})
    m.db.execute_sql("SELECT pg_notify(%s, %s)", (CHANNEL, text))


def stored_event(m, event_id: int) -> dict | None:
    row = m.ClusterEvent.get_or_none(m.ClusterEvent.id == event_id)
    return None if row is None else json.loads(row.payload)


class ListeningConnection:
    """A connection of its own that LISTENs on the channel (autocommit, no pool)."""

    def __init__(self, database: pw.Database):
        if not backends.is_postgresql(database):
            raise ValueError("LISTEN needs PostgreSQL")
        database.connect()
        self._raw = database.connection()
        self._raw.autocommit = True
        with self._raw.cursor() as cursor:
            cursor.execute(f"LISTEN {CHANNEL}")

    def fileno(self) -> int:
        return self._raw.fileno()

    def drain(self) -> list[dict]:
        """The payloads that have arrived (a stored one as {"stored": id}); never waits for
        more. Raises the driver's error when the connection is lost."""
        self._raw.poll()
        arrived = [json.loads(n.payload) for n in self._raw.notifies]
        self._raw.notifies.clear()
        return arrived

    def close(self) -> None:
        """Close the connection itself (from any thread: peewee's own state is per thread)."""
        try:
            self._raw.close()
        except Exception:
            pass


class NameLock:
    """A connection of its own holding session advisory locks (autocommit, no pool): one
    instance's name (`try_lock`), until `close` or the process dies."""

    def __init__(self, database: pw.Database):
        if not backends.is_postgresql(database):
            raise ValueError("advisory locks need PostgreSQL")
        database.connect()
        self._raw = database.connection()
        self._raw.autocommit = True

    def try_lock(self, name: str) -> bool:
        """Take the lock on `name`; False when another session holds it."""
        with self._raw.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                           (NAME_LOCK_CLASS, name))
            return bool(cursor.fetchone()[0])

    def close(self) -> None:
        """Close the connection itself (from any thread: peewee's own state is per thread)."""
        try:
            self._raw.close()
        except Exception:
            pass
