"""Payload 3.0 listings: newline-delimited JSON records in bounded pieces, and the record sink.

A listing of kind ``k`` is the tar members ``k.0.ndjson``, ``k.1.ndjson``, ... in that order,
each holding at most ``ArchiveLimits.piece_records`` records (the writer puts ``PIECE_RECORDS``)
in at most ``ArchiveLimits.piece_bytes`` bytes: one compact JSON object per line, every line
ending in ``\\n``. A piece is read whole and decoded line by line, so a reader holds one piece,
never a listing.

The reader hands every validated record to a ``RecordSink`` as it arrives: whatever needs the
whole set (unique ids, parents, cycles, references between listings) is the sink's to check.
The format knows nothing of how a sink stores them; the server's is an SQLite index in the
import's staging folder (``cfms_trio.backup.staging_index``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Protocol

from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

from .jsonstream import _SurrogateScanner

# Listing kinds of payload 3.0 in archive order, and the part each belongs to.
LISTING_KINDS = ("groups", "users", "folders", "documents", "files", "audit")
PART_OF_KIND = {"groups": "accounts", "users": "accounts", "folders": "documents",
                "documents": "documents", "files": "documents", "audit": "audit"}
COUNT_FIELD_OF_KIND = {kind: f"{kind}_count" for kind in LISTING_KINDS}
PIECE_RECORDS = 1000  # records per piece the writer makes
PIECE_SUFFIX = ".ndjson"
PIECE_NAME = re.compile(r"(" + "|".join(LISTING_KINDS) + r")\.(0|[1-9][0-9]{0,8})\.ndjson")


def piece_name(kind: str, number: int) -> str:
    return f"{kind}.{number}{PIECE_SUFFIX}"


def parse_piece_name(name: str) -> tuple[str, int] | None:
    match = PIECE_NAME.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else None


class RecordSink(Protocol):
    """Where a reader puts validated records, and what it asks back while reading."""

    def add(self, kind: str, record: dict) -> None:
        """One record of a listing kind (``folders``, ``documents``, ``files``, ``groups``,
        ``users``, ``audit``), in archive order. May raise ``ArchiveError`` (a duplicate id)."""

    def listed_file(self, file_id: str) -> dict | None:
        """A files listing entry added before, by id (formats 2.0 and 1.0)."""

    def listed_file_at(self, position: int) -> str | None:
        """The id of the ``position``-th file entry added (from 0), None past the end."""

    def file_extracted(self, file_id: str, size: int, sha256: str) -> None:
        """Legacy: a listed file's content arrived with this size and sha256 (filling a size
        or sha256 its entry lacked)."""

    def files_without_content(self) -> list[str]:
        """Legacy: ids of listed files for which ``file_extracted`` was never called."""


def _pairs(pairs: list) -> dict:
    """An object without duplicate keys (json.loads calls this for every object)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise ArchiveError(f"not valid JSON: duplicate key {key[:100]!r}")
            seen.add(key)
    return obj


def _no_constant(name: str):
    raise ArchiveError(f"not valid JSON: {name} is not allowed")


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_no_constant)


def piece_records(data: bytes, member: str, records_max: int) -> Iterator[Any]:
    """The JSON values of a piece, one per line. The piece must be UTF-8, hold no unpaired
    surrogate escape, and end with a line break; blank lines, NaN/Infinity and duplicate
    keys are refused."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError(f"archive member {member} is not valid UTF-8") from None
    _SurrogateScanner(f"archive member {member}").feed(data, final=True)
    if text and not text.endswith("\n"):
        raise ArchiveError(f"archive member {member} does not end with a line break")
    lines = text.split("\n")
    lines.pop()
    if len(lines) > records_max:
        raise ArchiveLimitExceeded(f"archive member {member} holds {len(lines)} records; the "
                                   f"limit is {records_max} a piece")
    for number, line in enumerate(lines, 1):
        try:
            value, end = _DECODER.raw_decode(line)
        except ArchiveError as exc:
            raise ArchiveError(f"archive member {member}, line {number}: {exc.message}") from None
        except (ValueError, RecursionError) as exc:
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ArchiveError(f"archive member {member}, line {number} is not valid JSON: "
                               f"{detail}") from None
        if end != len(line):
            raise ArchiveError(f"archive member {member}, line {number}: trailing data after "
                               "the record")
        yield value


def encode_record(value: dict) -> bytes:
    """One line of a piece: compact, key-sorted UTF-8 JSON and a line break."""
    return (json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                       allow_nan=False) + "\n").encode("utf-8")
