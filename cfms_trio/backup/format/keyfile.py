"""Backup key files: writing format 2 key files and parsing format 2 or legacy ones (SPEC §7).

A key file is small JSON that travels next to its archive. It is uploaded by a client, so
``parse_key_file`` treats it as hostile: bounded size, strict types, and messages that say
exactly what is wrong without ever echoing the key.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re

from cfms_trio.config import ArchiveLimits
from cfms_trio.conventions import SHA256_HEX_PATTERN
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

from .jsonstream import decode_json
from .listings import is_number
from .recipients import Unlock, parse_identity_file
from .segments import KEY_BYTES

ALGORITHM_V2 = "AES-256-GCM-STREAM"
ALGORITHM_LEGACY = "AES-256-CBC"
FORMAT_V2 = 2
FORMAT_LEGACY = 1

_HEX_KEY = re.compile(f"[0-9a-fA-F]{{{2 * KEY_BYTES}}}")


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """A parsed key file. ``format`` is 2 (segmented AES-GCM) or 1 (legacy AES-CBC)."""

    format: int
    key: bytes = dataclasses.field(repr=False)  # never shown in logs or tracebacks
    algorithm: str
    backup_name: str | None = None
    created_at: float | None = None
    archive_sha256: str | None = None


def make_key_file(
    key: bytes, backup_name: str, created_at: float, archive_sha256: str | None
) -> bytes:
    """Return the bytes of a format 2 key file for an archive (UTF-8 JSON, trailing newline)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"backup key must be {KEY_BYTES} bytes")
    if archive_sha256 is not None and not SHA256_HEX_PATTERN.fullmatch(archive_sha256):
        raise ValueError("archive_sha256 must be 64 hex digits")
    document = {
        "format": FORMAT_V2,
        "algorithm": ALGORITHM_V2,
        "key": key.hex(),
        "backup_name": backup_name,
        "created_at": created_at,
        "archive_sha256": archive_sha256.lower() if archive_sha256 else None,
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _load_json_object(data: bytes, limits: ArchiveLimits) -> dict:
    if len(data) > limits.key_file_bytes:
        raise ArchiveLimitExceeded(
            f"key file is {len(data)} bytes; the limit is {limits.key_file_bytes} bytes"
        )
    document = decode_json(data.removeprefix(codecs.BOM_UTF8), "key file")  # BOM: text editors
    if not isinstance(document, dict):
        raise ArchiveError("key file must be a JSON object")
    return document


def _parse_key_hex(value) -> bytes:
    if not isinstance(value, str) or not _HEX_KEY.fullmatch(value):
        raise ArchiveError("key must be 32 bytes (64 hex digits)")
    return bytes.fromhex(value)


def _optional(document: dict, field: str, check, expected: str):
    value = document.get(field)
    if value is not None and not check(value):
        raise ArchiveError(f"key file field '{field}' must be {expected}")
    return value


def parse_key_file(data: bytes, limits: ArchiveLimits) -> KeyInfo:
    """Parse and validate an uploaded key file; raise ``ArchiveError`` saying what is wrong.

    Accepts format 2 (``"format": 2, "algorithm": "AES-256-GCM-STREAM"``) and the legacy format
    (``"algorithm": "AES-256-CBC"`` without a format field).
    """
    document = _load_json_object(data, limits)
    algorithm = document.get("algorithm")
    if not isinstance(algorithm, str):
        raise ArchiveError("key file has no 'algorithm' field")
    file_format = document.get("format")
    if algorithm == ALGORITHM_V2:
        if type(file_format) is not int or file_format != FORMAT_V2:
            raise ArchiveError(f"key file for {ALGORITHM_V2} must have \"format\": 2")
        key_format = FORMAT_V2
    elif algorithm == ALGORITHM_LEGACY:
        if file_format is not None and not (type(file_format) is int and file_format == 1):
            raise ArchiveError(f"legacy {ALGORITHM_LEGACY} key file has an unexpected format field")
        key_format = FORMAT_LEGACY
    else:
        raise ArchiveError(f"unsupported key algorithm {algorithm[:64]!r}")
    if "key" not in document:
        raise ArchiveError("key file has no 'key' field")
    key = _parse_key_hex(document["key"])
    backup_name = _optional(document, "backup_name", lambda v: isinstance(v, str), "a string")
    created_at = _optional(document, "created_at", is_number, "a number")
    archive_sha256 = _optional(
        document,
        "archive_sha256",
        lambda v: isinstance(v, str) and SHA256_HEX_PATTERN.fullmatch(v),
        "64 hex digits",
    )
    return KeyInfo(
        format=key_format,
        key=key,
        algorithm=algorithm,
        backup_name=backup_name,
        created_at=float(created_at) if created_at is not None else None,
        archive_sha256=archive_sha256.lower() if archive_sha256 else None,
    )


_IDENTITY_TEXT = re.compile(rb"(#|CFMS-SECRET-|[0-9A-Za-z][0-9A-Za-z \t-]*\r?\n?\Z)", re.I)


def parse_key_upload(data: bytes, limits: ArchiveLimits) -> KeyInfo | Unlock:
    """What an import's "key" upload holds: an identity file (format 3) when it starts with a
    ``#`` comment or ``CFMS-SECRET-``, or is one line of letters, digits, dashes and spaces (a
    typed paper phrase); otherwise a JSON key file (formats 2 and 1.0)."""
    text = data.removeprefix(codecs.BOM_UTF8).lstrip()
    if len(data) <= limits.key_file_bytes and _IDENTITY_TEXT.match(text):
        return Unlock(identities=parse_identity_file(data, limits))
    return parse_key_file(data, limits)
