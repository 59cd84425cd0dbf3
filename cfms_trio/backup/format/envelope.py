"""Format 3: a recipient block in front of a format 2 stream (docs/BACKUP_FORMAT.md §2).

```
archive  = "CFMSBAK3" ‖ block ‖ recipients_mac (32) ‖ payload
block    = version (1, = 1) ‖ count (1, 1..64) ‖ stanza × count
stanza   = type (1) ‖ uint16be body length ‖ body
payload  = a complete format 2 archive (83-byte CFMSBAK2 header ‖ segments) under the file key
recipients_mac = HMAC-SHA256(HKDF(file key, payload salt, "cfms-backup-v3 recipients"),
                             "CFMSBAK3" ‖ block ‖ payload header)
```

The payload's associated data is its own header only, so rotating recipients (``rekey``)
rewrites the block and its MAC and copies the payload byte for byte. The block is still
authenticated: its MAC needs the file key, which only a recipient can unwrap, and it also covers
the payload header, so a block cannot be moved onto another archive. Blocking and pure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from typing import BinaryIO, Sequence

from Crypto.Hash import SHA256
from Crypto.Protocol.KDF import HKDF

from cfms_trio.config import ArchiveLimits
from cfms_trio.errors import ArchiveError

from .recipients import (
    STANZA_SCRYPT,
    STANZA_X25519,
    Passphrase,
    Recipient,
    Stanza,
    Unlock,
    check_stanza,
    unwrap_scrypt,
    unwrap_x25519,
    wrap_file_key,
)
from .segments import HEADER_BYTES, KEY_BYTES, ArchiveHeader, check_key, parse_header
from .streams import COPY_BYTES, read_up_to

MAGIC_V3 = b"CFMSBAK3"
BLOCK_VERSION = 1
MAX_STANZAS = 64
UNKNOWN_STANZA_MAX_BYTES = 1024
MAC_BYTES = 32
RECIPIENTS_KEY_INFO = b"cfms-backup-v3 recipients"


def _recipients_mac(file_key: bytes, block: bytes, payload_header: bytes) -> bytes:
    salt = parse_header(payload_header).salt
    mac_key = HKDF(file_key, KEY_BYTES, salt, SHA256, context=RECIPIENTS_KEY_INFO)
    return hmac.new(mac_key, MAGIC_V3 + block + payload_header, hashlib.sha256).digest()


def encode_block(stanzas: Sequence[Stanza]) -> bytes:
    if not 1 <= len(stanzas) <= MAX_STANZAS:
        raise ValueError(f"an archive has 1 to {MAX_STANZAS} recipients, not {len(stanzas)}")
    parts = [bytes([BLOCK_VERSION, len(stanzas)])]
    for stanza in stanzas:
        parts.append(struct.pack(">BH", stanza.kind, len(stanza.body)) + stanza.body)
    return b"".join(parts)


def envelope_bytes(file_key: bytes, to: Sequence[Recipient | Passphrase],
                   header: ArchiveHeader) -> bytes:
    """Everything a format 3 archive holds before its payload header, for a new archive."""
    block = encode_block([wrap_file_key(file_key, recipient) for recipient in to])
    return MAGIC_V3 + block + _recipients_mac(file_key, block, header.to_bytes())


@dataclasses.dataclass(frozen=True)
class Envelope:
    """The recipient block of a format 3 archive as read (not yet opened)."""

    stanzas: tuple[Stanza, ...]
    mac: bytes
    payload_header: bytes  # the 83-byte CFMSBAK2 header that starts the payload

    @property
    def block(self) -> bytes:
        return encode_block(self.stanzas)

    def describe(self) -> list[str]:
        return [stanza.describe() for stanza in self.stanzas]

    @property
    def payload_offset(self) -> int:
        return len(MAGIC_V3) + len(self.block) + MAC_BYTES


def _read_exact(source: BinaryIO, size: int, what: str) -> bytes:
    data = read_up_to(source, size)
    if len(data) != size:
        raise ArchiveError(f"archive is truncated inside its {what}")
    return data


def read_envelope(source: BinaryIO) -> Envelope:
    """Read the recipient block, its MAC and the payload header that follow the magic (which
    the caller has already read). Structure only; nothing is decrypted."""
    version, count = _read_exact(source, 2, "recipient block")
    if version != BLOCK_VERSION:
        raise ArchiveError(f"recipient block version {version} is not supported")
    if not 1 <= count <= MAX_STANZAS:
        raise ArchiveError(f"recipient block holds {count} stanzas; allowed 1..{MAX_STANZAS}")
    stanzas = []
    for _ in range(count):
        kind, length = struct.unpack(">BH", _read_exact(source, 3, "recipient block"))
        if kind not in (STANZA_X25519, STANZA_SCRYPT) and length > UNKNOWN_STANZA_MAX_BYTES:
            raise ArchiveError(f"recipient block: unknown stanza type {kind} is {length} bytes; "
                               f"at most {UNKNOWN_STANZA_MAX_BYTES} are allowed")
        body = _read_exact(source, length, "recipient block")
        check_stanza(kind, body)
        stanzas.append(Stanza(kind, body))
    mac = _read_exact(source, MAC_BYTES, "recipient block")
    payload_header = read_up_to(source, HEADER_BYTES)
    parse_header(payload_header)
    return Envelope(tuple(stanzas), mac, payload_header)


def _no_key_message(envelope: Envelope, unlock: Unlock, passphrase_failed: bool) -> str:
    recipients = [s.describe() for s in envelope.stanzas]
    if passphrase_failed and not unlock.identities:
        return "wrong passphrase for this archive"
    tried = []
    if unlock.identities:
        tried.append("none of the given identities is a recipient")
    if unlock.passphrase is not None:
        tried.append("the passphrase is wrong" if passphrase_failed
                     else "it has no passphrase")
    return f"cannot open this archive: {' and '.join(tried)} (it opens with: " \
           f"{'; '.join(recipients)})"


def open_envelope(envelope: Envelope, unlock: Unlock, limits: ArchiveLimits) -> bytes:
    """Unwrap the file key with an identity or the passphrase, check it against the payload
    header and check the recipient block's MAC; return the file key."""
    file_key = unlock.file_key
    for identity in unlock.identities if file_key is None else ():
        for stanza in envelope.stanzas:
            if stanza.kind == STANZA_X25519:
                file_key = unwrap_x25519(stanza, identity)
                if file_key is not None:
                    break
        if file_key is not None:
            break
    passphrase_failed = False
    if file_key is None and unlock.passphrase is not None:
        for stanza in envelope.stanzas:
            if stanza.kind == STANZA_SCRYPT:
                file_key = unwrap_scrypt(stanza, unlock.passphrase, limits)
                if file_key is not None:
                    break
                passphrase_failed = True
    if file_key is None:
        raise ArchiveError(_no_key_message(envelope, unlock, passphrase_failed))
    try:
        check_key(parse_header(envelope.payload_header), file_key)
    except ArchiveError:
        raise ArchiveError("the recipient block does not belong to this payload "
                           "(archive tampered with)") from None
    expected = _recipients_mac(file_key, envelope.block, envelope.payload_header)
    if not hmac.compare_digest(expected, envelope.mac):
        raise ArchiveError("the recipient block failed authentication (archive tampered with)")
    return file_key


@dataclasses.dataclass(frozen=True)
class RekeyResult:
    before: list[str]
    after: list[str]
    payload_bytes: int
    payload_sha256: str  # of the payload region, identical in the old and the new archive


def rekey_archive(source: BinaryIO, out: BinaryIO, unlock: Unlock, limits: ArchiveLimits, *,
                  add: Sequence[Recipient | Passphrase] = (),
                  remove: Sequence[Recipient] = (),
                  remove_passphrases: bool = False) -> RekeyResult:
    """Write to ``out`` the archive ``source`` with a new recipient block; the payload is
    copied unchanged. Refuses to leave an archive nobody can open."""
    magic = read_up_to(source, len(MAGIC_V3))
    if magic != MAGIC_V3:
        raise ArchiveError("rekey needs a format 3 archive (CFMSBAK3); a format 2 archive has "
                           "a key file instead of recipients")
    envelope = read_envelope(source)
    file_key = open_envelope(envelope, unlock, limits)
    kept = list(envelope.stanzas)
    for recipient in remove:
        if not any(stanza.is_for(recipient) for stanza in kept):
            raise ArchiveError(f"{recipient} is not a recipient of this archive")
        kept = [stanza for stanza in kept if not stanza.is_for(recipient)]
    if remove_passphrases:
        if not any(stanza.kind == STANZA_SCRYPT for stanza in kept):
            raise ArchiveError("this archive has no passphrase to remove")
        kept = [stanza for stanza in kept if stanza.kind != STANZA_SCRYPT]
    for recipient in add:
        if isinstance(recipient, Recipient) and any(s.is_for(recipient) for s in kept):
            raise ArchiveError(f"{recipient} is already a recipient of this archive")
        kept.append(wrap_file_key(file_key, recipient))
    if not kept:
        raise ArchiveError("rekey would leave no recipient and no passphrase: nobody could "
                           "open the archive")
    if len(kept) > MAX_STANZAS:
        raise ArchiveError(f"an archive has at most {MAX_STANZAS} recipients")
    block = encode_block(kept)
    out.write(MAGIC_V3 + block + _recipients_mac(file_key, block, envelope.payload_header))
    digest = hashlib.sha256(envelope.payload_header)
    out.write(envelope.payload_header)
    size = len(envelope.payload_header)
    while piece := source.read(COPY_BYTES):
        digest.update(piece)
        out.write(piece)
        size += len(piece)
    return RekeyResult(envelope.describe(), [s.describe() for s in kept], size,
                       digest.hexdigest())


@dataclasses.dataclass(frozen=True)
class ArchiveSummary:
    """What can be learnt about an archive without any key."""

    format: int  # 2 or 3; 1 for anything that is not a CFMSBAK archive (legacy CBC)
    recipients: list[str]
    payload_offset: int
    payload_sha256: str


def summarize_archive(source: BinaryIO) -> ArchiveSummary:
    """The format, the recipient list and the sha256 of the payload region (for format 3 the
    bytes a rekey keeps, for the others the whole file)."""
    magic = read_up_to(source, len(MAGIC_V3))
    recipients: list[str] = []
    digest = hashlib.sha256()
    if magic == MAGIC_V3:
        envelope = read_envelope(source)
        recipients, offset, file_format = envelope.describe(), envelope.payload_offset, 3
        digest.update(envelope.payload_header)
    else:
        offset, file_format = 0, 2 if magic == b"CFMSBAK2" else 1
        digest.update(magic)
    while piece := source.read(COPY_BYTES):
        digest.update(piece)
    return ArchiveSummary(file_format, recipients, offset, digest.hexdigest())
