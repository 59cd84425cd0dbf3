"""The async client library shared by tests, scripts and the `cfms-trio client` commands.

    from cfms_trio.client import open_client

    async with open_client("wss://host:5104", cafile=...) as client:
        await client.login("admin", password)
        info = await client.call("server_info")

`connection` speaks the protocol (requests, transfers, events); `flows` builds whole backup
export and import runs on it; `session` logs in from a saved profile (`profiles`), refreshing
its token; `remote` resolves remote paths to folders and documents; `sync` copies files and
folder trees both ways; `files` holds the blocking local-file helpers; `progress` draws a
terminal progress bar. The client never imports the server's modules.
"""

from .connection import (
    Client, ClientError, Progress, TlsError, check_tls, client_ssl_context, open_client,
)
from .files import file_sha256
from .flows import export_backup, import_backup, start_import
from .progress import ProgressBar

__all__ = [
    "Client", "ClientError", "Progress", "ProgressBar", "TlsError", "check_tls",
    "client_ssl_context",
    "export_backup", "file_sha256", "import_backup", "open_client", "start_import",
]
