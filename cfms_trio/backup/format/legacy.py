"""Legacy format 1.0 made by earlier CFMS servers: 16-byte IV ‖ AES-256-CBC over a plain tar.

Only reading is supported. Nothing authenticates this format: the tar layer and the sha256 of
every file do the validation. The leniencies of 1.0 tars (``./`` names, directory members, any
member order) and of optional listing fields are the ``legacy`` cases of ``tarmembers`` and
``listings``; what the upstream CFMS server writes that format 2 does not allow is turned into
the format 2 shape here, before the listings are parsed (``LegacyListings``), and each change is
reported as a warning.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from Crypto.Cipher import AES

from cfms_trio.conventions import new_id
from cfms_trio.errors import ArchiveError

from .listings import DOCUMENTS_MEMBER, FILES_MEMBER, FOLDERS_MEMBER
from .segments import MAGIC
from .streams import read_up_to

LEGACY_READ_BYTES = 64 * 1024  # ciphertext read per step from a legacy archive (whole AES blocks)
AES_BLOCK_BYTES = 16
LEGACY_IV_BYTES = 16


def strip_pkcs7(block: bytes) -> bytes:
    """Remove PKCS#7 padding from the last plaintext block of a legacy archive."""
    pad = block[-1]
    if not 1 <= pad <= AES_BLOCK_BYTES or block[-pad:] != bytes([pad]) * pad:
        raise ArchiveError("wrong key or corrupt archive (bad padding)")
    return block[:-pad]


class LegacyCbcReader(io.RawIOBase):
    """Readable plaintext of a legacy 1.0 archive: 16-byte IV ‖ AES-256-CBC, PKCS#7 padded.

    Decrypts block-wise as data is consumed, withholding the last block until end of file so the
    padding can be checked and stripped. Nothing authenticates this format; the tar layer and
    the sha256 checks do the validation.
    """

    def __init__(self, source: BinaryIO, key: bytes):
        super().__init__()
        self._source = source
        iv = read_up_to(source, LEGACY_IV_BYTES)
        if iv.startswith(MAGIC):
            raise ArchiveError(
                "archive is format 2 (CFMSBAK2) but the key file is a legacy AES-256-CBC key"
            )
        if len(iv) < LEGACY_IV_BYTES:
            raise ArchiveError("wrong key or corrupt archive (too short for a legacy archive)")
        self._cipher = AES.new(key, AES.MODE_CBC, iv=iv)
        self._pending = b""  # ciphertext not yet making up a whole block
        self._held = b""  # last decrypted block; it may carry the padding
        self._out = b""
        self._out_pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while self._out_pos >= len(self._out):
            if self._eof:
                return 0
            self._out = self._decrypt_more()
            self._out_pos = 0
        count = min(len(view), len(self._out) - self._out_pos)
        view[:count] = self._out[self._out_pos:self._out_pos + count]
        self._out_pos += count
        return count

    def _decrypt_more(self) -> bytes:
        data = self._source.read(LEGACY_READ_BYTES)
        if not data:
            self._eof = True
            if self._pending or not self._held:
                raise ArchiveError(
                    "wrong key or corrupt archive (ciphertext is not a whole number of blocks)"
                )
            return strip_pkcs7(self._held)
        ciphertext = self._pending + data
        usable = len(ciphertext) - len(ciphertext) % AES_BLOCK_BYTES
        self._pending = ciphertext[usable:]
        if not usable:
            return b""
        plaintext = self._held + self._cipher.decrypt(ciphertext[:usable])
        self._held = plaintext[-AES_BLOCK_BYTES:]
        return plaintext[:-AES_BLOCK_BYTES]


def _is_integer(value) -> bool:
    return type(value) is int


def _integer_ids(count: int, kind: str) -> str:
    return f"1 {kind} id was an integer" if count == 1 else f"{count} {kind} ids were integers"


class LegacyListings:
    """What the upstream CFMS server writes into 1.0 listings, in the format 2 shape.

    - Revision ids and access-rule ids are JSON integers (folder and document rules are numbered
      in separate tables, so one integer occurs in both): each gets a new id. Nothing refers to
      these ids, so nothing else changes.
    - File entries carry ``active``; an inactive file is an upload that never happened (or the
      stock ``hello`` file): its id is kept in ``inactive_file_ids`` and the entry loses the
      field, so it is restored but never served.
    Values are raw JSON from the archive: only the shapes changed here are looked at, everything
    else is left for the strict parsers of ``listings`` to judge.
    """

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.inactive_file_ids: set[str] = set()
        self._fresh_rule_ids = 0
        self._fresh_revision_ids = 0
        self._file_index = 0

    def normalise(self, member: str, entry):
        """One entry of `member` as it is streamed in, in the format 2 shape."""
        if not isinstance(entry, dict):
            return entry
        if member in (FOLDERS_MEMBER, DOCUMENTS_MEMBER):
            self._fresh_rule_ids += _give_fresh_ids(entry.get("access_rules"))
        if member == DOCUMENTS_MEMBER:
            self._fresh_revision_ids += _give_fresh_ids(entry.get("revisions"))
        if member == FILES_MEMBER:
            self._take_active_flag(entry)
        return entry

    def finish(self, member: str) -> None:
        """After the last entry of `member`: say what was changed in it."""
        if member in (FOLDERS_MEMBER, DOCUMENTS_MEMBER) and self._fresh_rule_ids:
            self.warnings.append(
                f"{member}: {_integer_ids(self._fresh_rule_ids, 'access rule')} (the upstream "
                "server's numbering); each was given a new id")
        if member == DOCUMENTS_MEMBER and self._fresh_revision_ids:
            self.warnings.append(
                f"{DOCUMENTS_MEMBER}: {_integer_ids(self._fresh_revision_ids, 'revision')} (the "
                "upstream server's numbering); each was given a new id, the history order is "
                "kept")
        self._fresh_rule_ids = self._fresh_revision_ids = 0

    def _take_active_flag(self, entry: dict) -> None:
        index, self._file_index = self._file_index, self._file_index + 1
        if "active" not in entry:
            return
        active = entry.pop("active")
        if not isinstance(active, bool):
            raise ArchiveError(f"{FILES_MEMBER}: entry {index}: active must be true or false")
        if not active and isinstance(entry.get("id"), str):
            self.inactive_file_ids.add(entry["id"])


def _give_fresh_ids(entries) -> int:
    """Give every entry of `entries` (if a list) whose id is an integer a new id; how many."""
    changed = 0
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and _is_integer(entry.get("id")):
            entry["id"] = new_id()
            changed += 1
    return changed
