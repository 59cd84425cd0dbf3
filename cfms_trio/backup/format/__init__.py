"""Backup archive formats (SPEC §7, docs/BACKUP_FORMAT.md): formats 2 and 3 written and read,
legacy 1.0 read.

Blocking and pure: from cfms_trio it imports only ``errors``, ``config`` and ``conventions``, and
the server runs it in worker threads. Code outside the package uses only the names below; the
submodules (segments, nonces, subkeys, stanzas, tar members) are the package's own business.
"""

from .envelope import ArchiveSummary, RekeyResult, rekey_archive, summarize_archive
from .keyfile import KeyInfo, make_key_file, parse_key_file, parse_key_upload
from .listings import (
    FORMAT_NAME,
    VERSION_LEGACY,
    VERSION_V2,
    VERSION_V3,
    BackupContents,
    itemised,
    parts_of,
)
from .reader import read_backup_archive
from .recipients import (
    Identity,
    Passphrase,
    Recipient,
    Unlock,
    generate_identity,
    identity_file_text,
    parse_identity,
    parse_identity_file,
    parse_recipient,
)
from .records import COUNT_FIELD_OF_KIND, LISTING_KINDS, PART_OF_KIND, RecordSink
from .segments import KEY_BYTES
from .staged import STAGE_BRIEFLY, STAGE_DURABLE, STAGE_HASH_ONLY
from .streams import (
    DropBehindReader,
    DropBehindWriter,
    HashingWriter,
    WriteBehind,
    release_pages,
)
from .writer import COMPRESSION_NAMES, write_backup_archive

__all__ = [
    # entry points
    "write_backup_archive",
    "read_backup_archive",
    "rekey_archive",
    "summarize_archive",
    "make_key_file",
    "parse_key_file",
    "parse_key_upload",
    "BackupContents",
    "RecordSink",
    "KeyInfo",
    "RekeyResult",
    "ArchiveSummary",
    # who may open a format 3 archive
    "Identity",
    "Recipient",
    "Passphrase",
    "Unlock",
    "generate_identity",
    "identity_file_text",
    "parse_identity",
    "parse_identity_file",
    "parse_recipient",
    "itemised",
    # wrappers the exporter puts around its output file
    "HashingWriter",
    "WriteBehind",
    "DropBehindReader",
    "DropBehindWriter",
    # transfers keep the page cache from filling with what they stream
    "release_pages",
    # what a new archive's metadata, key and options are made of
    "FORMAT_NAME",
    "VERSION_V2",
    "VERSION_V3",
    "VERSION_LEGACY",
    "LISTING_KINDS",
    "PART_OF_KIND",
    "COUNT_FIELD_OF_KIND",
    "parts_of",
    "KEY_BYTES",
    "STAGE_DURABLE",
    "STAGE_BRIEFLY",
    "STAGE_HASH_ONLY",
    "COMPRESSION_NAMES",
]
