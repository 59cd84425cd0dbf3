"""Server settings and limits, with safe defaults.

Every limit is a plain attribute with its unit in the name, so documentation, CLI flags and
tests refer to the same thing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
# A sealed transfer chunk is its plaintext plus the 16-byte AES-GCM tag (SPEC §6). WebSocket
# libraries commonly refuse messages over 1 MiB by default (the `websockets` library does), so
# the default chunk keeps every binary frame at exactly 1 MiB.
TRANSFER_FRAME_DEFAULT_BYTES = 1 * MiB
TRANSFER_TAG_BYTES = 16


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    """Bounds applied to every backup archive and key file read by the server."""

    archive_bytes: int = 64 * GiB
    extracted_bytes: int = 256 * GiB
    member_count: int = 2_000_000
    json_member_bytes: int = 512 * MiB
    # metadata.json is one small object, decoded whole: it gets a bound of its own.
    metadata_member_bytes: int = 1 * MiB
    json_depth: int = 64
    # Payload 3.0 listings come in newline-delimited pieces, each read whole: bytes and records
    # per piece (the writer makes pieces of PIECE_RECORDS records).
    piece_bytes: int = 16 * MiB
    piece_records: int = 10_000
    key_file_bytes: int = 64 * 1024
    # zstd frames may not ask the decoder for a window larger than this (bomb protection).
    zstd_window_bytes: int = 128 * MiB
    # Passphrase stanzas of format 3 name their own scrypt factors; a reader refuses, before
    # deriving, more memory (128·r·N bytes) or work (N·r·p block mixes) than this.
    scrypt_memory_bytes: int = 256 * MiB
    scrypt_work: int = 2**21


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on client input: messages, uploads, tasks."""

    message_bytes: int = 1 * MiB
    upload_bytes: int = 64 * GiB
    transfer_chunk_bytes: int = TRANSFER_FRAME_DEFAULT_BYTES - TRANSFER_TAG_BYTES
    listener_queue_events: int = 256
    # Imports one user may hold at once, pending or running (each may receive an
    # archive_bytes upload, and a running one holds a bulk worker).
    pending_imports_per_user: int = 4
    # Connections, bounded when they are accepted, before any TLS or WebSocket handshake.
    # Behind a reverse proxy every client has the proxy's address: raise the per-address bound.
    connections_max: int = 512
    connections_per_address_max: int = 64
    # TLS plus WebSocket handshake of a new connection; slower ones are dropped.
    handshake_timeout_s: float = 10.0
    # A connection must authenticate (log in, or send a request with a valid token) within this
    # long of its handshake, or it is closed (code 1008).
    login_timeout_s: float = 30.0
    # The largest WebSocket message before a connection has authenticated: a login is tiny, and
    # a partial message is buffered whole, so strangers get little memory each (code 1009).
    unauthenticated_message_bytes: int = 64 * 1024
    archive: ArchiveLimits = dataclasses.field(default_factory=ArchiveLimits)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a server instance needs to know about where it lives and what it accepts."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 5104
    tls: bool = True
    certfile: Path | None = None
    keyfile: Path | None = None
    token_ttl_s: float = 3600.0
    transfer_task_ttl_s: float = 3600.0
    login_failure_delay_s: float = 0.5
    # Used on first start only; None means generate one and write content/admin_password.txt.
    initial_admin_password: str | None = None
    limits: Limits = dataclasses.field(default_factory=Limits)
    # Where the database is: None for the SQLite file content/cfms.db, else a URL
    # (postgresql://USER[:PASSWORD]@HOST[:PORT]/DB, or sqlite:///PATH).
    database_url: str | None = None
    # S3 backup targets (issue 18): None leaves it to boto3's defaults, i.e. the standard
    # AWS_ENDPOINT_URL / AWS_DEFAULT_REGION environment variables and AWS configuration files.
    # Credentials always come from there (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...).
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # Where document contents, partial uploads, restored files and backups live: None is the
    # local `content/` folder; "s3://BUCKET/PREFIX" a bucket (with the endpoint and region above).
    storage_url: str | None = None
    # Bytes per part of a multipart upload (S3 wants at least 5 MiB for all but the last).
    s3_part_bytes: int = 8 * MiB
    # Several instances on one database (issue 16): an instance renews the leases of its
    # imports and uploads every third of this; one silent for this long is taken for dead.
    lease_s: float = 30.0
    # The name this instance's leases carry, the same across restarts, so a restarted
    # instance fails at once the imports it was running; None: host name, root and port
    # (`cluster.default_instance_name`).
    instance_name: str | None = None

    @property
    def content(self) -> Path:
        return self.root / "content"


_SIZE_UNITS = {"": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str) -> int:
    """'512M', '64G', '1048576' -> bytes (binary units; a trailing 'B' or 'iB' is allowed)."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in _SIZE_UNITS:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 64G)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value * _SIZE_UNITS[unit])
