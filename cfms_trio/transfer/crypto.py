"""Per-chunk sealing for transfers: AES-256-GCM, nonce = 4-byte prefix ‖ 8-byte chunk index."""

from __future__ import annotations

import secrets
import struct

from Crypto.Cipher import AES

from ..config import TRANSFER_TAG_BYTES

KEY_BYTES = 32
NONCE_PREFIX_BYTES = 4
TAG_BYTES = TRANSFER_TAG_BYTES


class ChunkTagError(ValueError):
    """A chunk failed authentication: tampered, reordered or sealed under another key."""


def new_session() -> tuple[bytes, bytes]:
    """A fresh (key, nonce_prefix): every `ready` gets its own, so no pair is ever reused."""
    return secrets.token_bytes(KEY_BYTES), secrets.token_bytes(NONCE_PREFIX_BYTES)


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">Q", index)


def seal_chunk(key: bytes, prefix: bytes, index: int, plaintext: bytes) -> bytes:
    cipher = AES.new(key, AES.MODE_GCM, nonce=_nonce(prefix, index))
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return ciphertext + tag


def open_chunk(key: bytes, prefix: bytes, index: int, sealed: bytes) -> bytes:
    if len(sealed) < TAG_BYTES:
        raise ChunkTagError(f"chunk {index} is shorter than its tag")
    cipher = AES.new(key, AES.MODE_GCM, nonce=_nonce(prefix, index))
    view = memoryview(sealed)  # slices of a view: no copy of the chunk
    try:
        return cipher.decrypt_and_verify(view[:-TAG_BYTES], view[-TAG_BYTES:])
    except ValueError:
        raise ChunkTagError(f"chunk {index} failed authentication") from None


def chunk_count(file_size: int, chunk_size: int) -> int:
    return (file_size + chunk_size - 1) // chunk_size
