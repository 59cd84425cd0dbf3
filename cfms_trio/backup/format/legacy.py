"""Legacy format 1.0 made by earlier CFMS servers: 16-byte IV ‖ AES-256-CBC over a plain tar.

Only reading is supported. Nothing authenticates this format: the tar layer and the sha256 of
every file do the validation. The leniencies of 1.0 listings and tars (optional fields, ``./``
names, directory members, any member order) are the ``legacy`` cases of ``listings`` and
``tarmembers``.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from Crypto.Cipher import AES

from cfms_trio.errors import ArchiveError

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
