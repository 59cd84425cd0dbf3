"""Backup archive formats (SPEC §7): format 2 written and read, legacy 1.0 read.

Blocking and pure: from cfms_trio it imports only ``errors``, ``config`` and ``conventions``, and
the server runs it in worker threads. Code outside the package uses only the names below; the
submodules (segments, nonces, subkeys, tar members) are the package's own business.
"""

from .keyfile import KeyInfo, make_key_file, parse_key_file
from .listings import FORMAT_NAME, VERSION_LEGACY, VERSION_V2, BackupContents, itemised
from .reader import read_backup_archive
from .segments import KEY_BYTES
from .streams import HashingWriter, WriteBehind
from .writer import COMPRESSION_NAMES, write_backup_archive

__all__ = [
    # entry points
    "write_backup_archive",
    "read_backup_archive",
    "make_key_file",
    "parse_key_file",
    "BackupContents",
    "KeyInfo",
    "itemised",
    # wrappers the exporter puts around its output file
    "HashingWriter",
    "WriteBehind",
    # what a new archive's metadata, key and options are made of
    "FORMAT_NAME",
    "VERSION_V2",
    "VERSION_LEGACY",
    "KEY_BYTES",
    "COMPRESSION_NAMES",
]
