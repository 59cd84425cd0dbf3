"""The segment layer of backup archive format 2 (SPEC §7): header, key derivation, AEAD segments.

An archive is a fixed 83-byte header followed by AES-256-GCM segments. Every segment is sealed
under a key derived from the backup key and the header's salt, with a nonce that encodes the
segment's index and whether it is the final one, and with the whole header as associated data.
That makes reordering, dropping, truncating or extending the stream, or editing the header,
detectable, while the data is produced and consumed one segment at a time: memory stays bounded
by a segment (at most 16 MiB plaintext) whatever the archive size.

Everything here is synchronous and blocking; the server runs it in worker threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import os
import struct
from typing import BinaryIO

from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF

from cfms_trio.errors import ArchiveError

from .streams import WRITE_BEHIND_PIECES, HelperThread, read_into, read_up_to

MAGIC = b"CFMSBAK2"
KEY_BYTES = 32
SALT_BYTES = 32
NONCE_PREFIX_BYTES = 7
KEY_CHECK_BYTES = 32
SEGMENT_TAG_BYTES = 16
SEGMENT_INDEX_BYTES = 4
# magic, compression, chunk_log2, reserved, salt, nonce_prefix — the bytes key_check covers.
_HEADER_PREFIX = struct.Struct(f">8sBBH{SALT_BYTES}s{NONCE_PREFIX_BYTES}s")
HEADER_BYTES = _HEADER_PREFIX.size + KEY_CHECK_BYTES  # 83

MIN_CHUNK_LOG2 = 16  # 64 KiB plaintext per segment
MAX_CHUNK_LOG2 = 24  # 16 MiB plaintext per segment
DEFAULT_CHUNK_LOG2 = 20  # 1 MiB plaintext per segment
MAX_SEGMENT_COUNT = 2**32  # the segment index is a uint32 in the nonce

COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_CODES = (COMPRESSION_NONE, COMPRESSION_ZSTD)

PAYLOAD_KEY_INFO = b"cfms-backup-v2 payload"
COMMIT_KEY_INFO = b"cfms-backup-v2 commit"


@dataclasses.dataclass(frozen=True)
class ArchiveHeader:
    """The parsed fixed-size header of a format 2 archive."""

    compression: int
    chunk_log2: int
    salt: bytes
    nonce_prefix: bytes
    key_check: bytes

    @property
    def segment_plain_bytes(self) -> int:
        """Plaintext bytes held by every segment but the last."""
        return 1 << self.chunk_log2

    def prefix_bytes(self) -> bytes:
        """The header bytes that precede (and are authenticated by) key_check."""
        return _HEADER_PREFIX.pack(
            MAGIC, self.compression, self.chunk_log2, 0, self.salt, self.nonce_prefix
        )

    def to_bytes(self) -> bytes:
        """The header exactly as written at the start of the archive (HEADER_BYTES long)."""
        return self.prefix_bytes() + self.key_check


def derive_subkeys(key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """Return ``(payload_key, commit_key)`` derived from the backup key with HKDF-SHA256.

    Two independent subkeys keep the key-check MAC and the segment cipher from ever sharing a key,
    and the per-archive salt makes the payload key unique even when a backup key were reused.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"backup key must be {KEY_BYTES} bytes")
    payload_key = HKDF(key, KEY_BYTES, salt, SHA256, context=PAYLOAD_KEY_INFO)
    commit_key = HKDF(key, KEY_BYTES, salt, SHA256, context=COMMIT_KEY_INFO)
    return payload_key, commit_key


def compute_key_check(commit_key: bytes, prefix: bytes) -> bytes:
    """HMAC-SHA256 of the header prefix under the commit key."""
    return hmac.new(commit_key, prefix, hashlib.sha256).digest()


def segment_nonce(nonce_prefix: bytes, index: int, last: bool) -> bytes:
    """The 12-byte GCM nonce of segment ``index``: prefix ‖ uint32be(index) ‖ last flag."""
    if not 0 <= index < MAX_SEGMENT_COUNT:
        raise ValueError("segment index out of range")
    return nonce_prefix + struct.pack(">IB", index, 1 if last else 0)


def build_header(
    key: bytes,
    *,
    compression: int = COMPRESSION_NONE,
    chunk_log2: int = DEFAULT_CHUNK_LOG2,
    salt: bytes | None = None,
    nonce_prefix: bytes | None = None,
) -> ArchiveHeader:
    """Create a header for a new archive, with fresh random salt and nonce prefix by default."""
    if compression not in COMPRESSION_CODES:
        raise ValueError(f"unknown compression code {compression}")
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise ValueError(f"chunk_log2 must be between {MIN_CHUNK_LOG2} and {MAX_CHUNK_LOG2}")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    nonce_prefix = os.urandom(NONCE_PREFIX_BYTES) if nonce_prefix is None else nonce_prefix
    if len(salt) != SALT_BYTES or len(nonce_prefix) != NONCE_PREFIX_BYTES:
        raise ValueError("salt or nonce_prefix has the wrong length")
    _, commit_key = derive_subkeys(key, salt)
    unsigned = ArchiveHeader(compression, chunk_log2, salt, nonce_prefix, b"")
    key_check = compute_key_check(commit_key, unsigned.prefix_bytes())
    return dataclasses.replace(unsigned, key_check=key_check)


def parse_header(data: bytes) -> ArchiveHeader:
    """Parse and structurally validate a header; the key is checked separately (``check_key``)."""
    if len(data) < HEADER_BYTES:
        raise ArchiveError("archive is too short to hold a format 2 header")
    magic, compression, chunk_log2, reserved, salt, nonce_prefix = _HEADER_PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ArchiveError("not a CFMS backup archive (bad magic; expected CFMSBAK2)")
    if compression not in COMPRESSION_CODES:
        raise ArchiveError(f"archive header names unknown compression {compression}")
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise ArchiveError(
            f"archive header has chunk_log2 {chunk_log2}; "
            f"allowed {MIN_CHUNK_LOG2}..{MAX_CHUNK_LOG2}"
        )
    if reserved != 0:
        raise ArchiveError("archive header reserved field is not zero")
    key_check = bytes(data[_HEADER_PREFIX.size:HEADER_BYTES])
    return ArchiveHeader(compression, chunk_log2, salt, nonce_prefix, key_check)


def check_key(header: ArchiveHeader, key: bytes) -> bytes:
    """Verify ``key`` against the header's key_check and return the payload key.

    Runs before any payload is touched, so a wrong key file fails at once with a clear message
    instead of as a corrupt first segment.
    """
    if len(key) != KEY_BYTES:
        raise ArchiveError(f"backup key must be {KEY_BYTES} bytes")
    payload_key, commit_key = derive_subkeys(key, header.salt)
    expected = compute_key_check(commit_key, header.prefix_bytes())
    if not hmac.compare_digest(expected, header.key_check):
        raise ArchiveError("wrong key for this archive (key check failed)")
    return payload_key


class SegmentWriter(io.RawIOBase):
    """Writable stream that encrypts everything written to it into a format 2 archive.

    The header is written to ``out`` at construction. Data is buffered until a full segment is
    known not to be the last one, so at most one segment of plaintext is held. ``close()``
    seals the final segment (possibly empty); ``abort()`` stops without one, which leaves an
    archive every reader rejects. ``out`` itself is never closed.

    With ``seal_behind`` the segments are sealed and written to ``out`` on a helper thread
    (AES-GCM releases the GIL), so that an exporter reading, verifying and tarring the files
    overlaps with it; a failure there is raised by a later ``write`` or by ``close``.
    """

    def __init__(
        self,
        out: BinaryIO,
        key: bytes,
        *,
        compression: int = COMPRESSION_NONE,
        chunk_log2: int = DEFAULT_CHUNK_LOG2,
        header: ArchiveHeader | None = None,
        seal_behind: bool = False,
    ):
        super().__init__()
        self._out = out
        if header is None:
            header = build_header(key, compression=compression, chunk_log2=chunk_log2)
        self.header = header
        self._header_bytes = self.header.to_bytes()
        self._payload_key, _ = derive_subkeys(key, self.header.salt)
        self._segment_bytes = self.header.segment_plain_bytes
        self._buffer = bytearray()
        self._index = 0
        out.write(self._header_bytes)
        self._helper = None
        if seal_behind:
            self._helper = HelperThread(lambda item: self._seal(*item), WRITE_BEHIND_PIECES,
                                        "seal-behind")

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to a closed SegmentWriter")
        view = memoryview(data).cast("B")
        taken = 0
        while taken < len(view):
            if len(self._buffer) == self._segment_bytes:
                # More data follows, so the buffered full segment is not the final one.
                self._submit(bytes(self._buffer), last=False)
                self._buffer.clear()
            room = self._segment_bytes - len(self._buffer)
            piece = view[taken:taken + room]
            self._buffer += piece
            taken += len(piece)
        return taken

    def _submit(self, plaintext: bytes, *, last: bool) -> None:
        """Seal the next segment now, or hand it to the helper thread."""
        if self._index >= MAX_SEGMENT_COUNT:
            raise ValueError("archive exceeds the maximum number of segments")
        index = self._index
        self._index += 1
        if self._helper is None:
            self._seal(plaintext, index, last)
        else:
            self._helper.put((plaintext, index, last))

    def _seal(self, plaintext: bytes, index: int, last: bool) -> None:
        """Encrypt one segment and write ciphertext ‖ tag."""
        nonce = segment_nonce(self.header.nonce_prefix, index, last)
        cipher = AES.new(self._payload_key, AES.MODE_GCM, nonce=nonce, mac_len=SEGMENT_TAG_BYTES)
        cipher.update(self._header_bytes)
        ciphertext, tag = cipher.encrypt_and_digest(plaintext)
        self._out.write(ciphertext)
        self._out.write(tag)

    def close(self) -> None:
        """Seal the final segment and mark the stream closed (idempotent)."""
        if not self.closed:
            try:
                self._submit(bytes(self._buffer), last=True)
                if self._helper is not None:
                    self._helper.join()
            finally:
                self._buffer.clear()
                super().close()

    def abort(self) -> None:
        """Close without writing the final segment, so the partial output never validates."""
        self._buffer.clear()
        super().close()
        if self._helper is not None:
            try:
                self._helper.join()  # the segments queued before are not final ones
            except BaseException:
                pass  # the failure that made the caller abort is already on its way

    def __del__(self):
        # io.IOBase would call close() on garbage collection and seal a final segment after a
        # failed export; a writer that was never closed explicitly must stay unfinished.
        if not self.closed:
            self.abort()


class SegmentReader(io.RawIOBase):
    """Readable stream of the plaintext of a format 2 archive read from ``source``.

    The header is read (or taken from ``header_bytes``, the header bytes the caller already
    read) and the key verified at construction, before any payload byte. Segments
    are then authenticated and decrypted one at a time as the plaintext is consumed. Every
    failure — bad tag, reordered or missing segments, end of file before the final segment,
    bytes after it — raises ``ArchiveError``. Plaintext is only released after its segment
    verified. ``source`` is never closed.
    """

    def __init__(self, source: BinaryIO, key: bytes, header_bytes: bytes | None = None):
        super().__init__()
        self._source = source
        if header_bytes is None or len(header_bytes) < HEADER_BYTES:
            # A caller that already read the start of the header (to tell formats apart)
            # passes it on; the rest comes from the source.
            header_bytes = (header_bytes or b"")
            header_bytes += read_up_to(source, HEADER_BYTES - len(header_bytes))
        self.header = parse_header(header_bytes)
        self._header_bytes = header_bytes
        self._payload_key = check_key(self.header, key)
        self._segment_bytes = self.header.segment_plain_bytes
        self._sealed_bytes = self._segment_bytes + SEGMENT_TAG_BYTES
        self._index = 0
        self._lookahead = b""
        self._plain = b""
        self._plain_pos = 0
        self.finished = False  # True once the final segment has been verified

    def readable(self) -> bool:
        return True

    def _has_plain(self) -> bool:
        """Whether verified plaintext is waiting (decrypting the next segment if needed)."""
        while self._plain_pos >= len(self._plain):
            if self.finished:
                return False
            self._plain = self._next_segment()
            self._plain_pos = 0
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of plaintext; a whole segment's plaintext is handed out as it
        was decrypted, without a copy (the reader on top asks for pieces of its size)."""
        if size is None or size < 0:
            return self.readall()
        if not size or not self._has_plain():
            return b""
        if self._plain_pos == 0 and size >= len(self._plain):
            self._plain_pos = len(self._plain)
            return self._plain
        data = self._plain[self._plain_pos:self._plain_pos + size]
        self._plain_pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if not self._has_plain():
            return 0
        count = min(len(view), len(self._plain) - self._plain_pos)
        view[:count] = self._plain[self._plain_pos:self._plain_pos + count]
        self._plain_pos += count
        return count

    def _read_sealed(self) -> tuple[bytearray, bool]:
        """Return the next sealed segment's bytes and whether the source ended right after it.

        Reading one byte beyond a full segment tells a full final segment from a non-final one
        without trial decryption.
        """
        want = self._sealed_bytes + 1
        data = bytearray(want)
        data[:len(self._lookahead)] = self._lookahead
        filled = len(self._lookahead) + read_into(self._source,
                                                  memoryview(data)[len(self._lookahead):])
        if filled == want:
            self._lookahead = bytes(data[-1:])
            del data[-1:]
            return data, False
        self._lookahead = b""
        del data[filled:]
        return data, True

    def _open(self, sealed: bytearray, last: bool) -> bytes | None:
        """Decrypt and verify a segment as final or non-final; None when the tag is wrong."""
        nonce = segment_nonce(self.header.nonce_prefix, self._index, last)
        cipher = AES.new(self._payload_key, AES.MODE_GCM, nonce=nonce, mac_len=SEGMENT_TAG_BYTES)
        cipher.update(self._header_bytes)
        view = memoryview(sealed)
        try:
            return cipher.decrypt_and_verify(
                view[:-SEGMENT_TAG_BYTES], view[-SEGMENT_TAG_BYTES:]
            )
        except ValueError:
            return None

    def _next_segment(self) -> bytes:
        """Read, verify and return the plaintext of the next segment."""
        if self._index >= MAX_SEGMENT_COUNT:
            raise ArchiveError("archive has more segments than the format allows")
        sealed, at_eof = self._read_sealed()
        index = self._index
        if len(sealed) < SEGMENT_TAG_BYTES:
            if not sealed:
                raise ArchiveError("archive is truncated: the final segment is missing")
            raise ArchiveError(f"archive is truncated inside segment {index}")
        if at_eof:
            plaintext = self._open(sealed, last=True)
            if plaintext is None:
                if len(sealed) == self._sealed_bytes and self._open(sealed, last=False) is not None:
                    raise ArchiveError("archive is truncated: the final segment is missing")
                raise ArchiveError(
                    f"segment {index} failed authentication "
                    "(archive truncated, corrupt or tampered with)"
                )
            self.finished = True
        else:
            plaintext = self._open(sealed, last=False)
            if plaintext is None:
                if self._open(sealed, last=True) is not None:
                    raise ArchiveError("archive has unexpected data after the final segment")
                raise ArchiveError(
                    f"segment {index} failed authentication (archive corrupt or tampered with)"
                )
        self._index += 1
        return plaintext
