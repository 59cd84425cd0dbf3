"""Who may open a format 3 archive: identities, recipient strings, paper phrases, key stanzas.

A format 3 archive's random 32-byte file key is wrapped once per recipient (docs/BACKUP_FORMAT.md
§2). A recipient is either an X25519 public key, written as a *recipient string*
(``cfms1`` + 58 base32 characters carrying a CRC-32, so a typo is caught), or a passphrase
stretched with scrypt. The matching private key is an *identity*: 32 secret bytes written as
``CFMS-SECRET-`` + fifteen groups of four base32 characters (a version byte, the secret and a
CRC-32). The same groups without the prefix are the *paper phrase* a person can type back in.

Scrypt work factors come from the archive, so they are checked against ``ArchiveLimits``
before anything is derived: a hostile header cannot make the reader spend unbounded memory or
time. Secrets never appear in ``repr()`` or in error messages. Blocking and pure.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import unicodedata
import zlib

from Crypto.Cipher import AES
from Crypto.Hash import SHA256
from Crypto.Protocol.DH import key_agreement
from Crypto.Protocol.KDF import HKDF, scrypt
from Crypto.PublicKey import ECC

from cfms_trio.config import ArchiveLimits
from cfms_trio.errors import ArchiveError, ArchiveLimitExceeded

from .segments import KEY_BYTES

# Crockford's base32: no I, L, O or U, so 0/O and 1/I/L cannot be confused when typed.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TYPED_ALIASES = {"O": "0", "I": "1", "L": "1"}
_VALUE_OF = {ch: i for i, ch in enumerate(ALPHABET)}

RECIPIENT_PREFIX = "cfms1"
IDENTITY_PREFIX = "CFMS-SECRET-"
IDENTITY_VERSION = 1
X25519_BYTES = 32
CHECKSUM_BYTES = 4
PAPER_GROUP_CHARS = 4
RECIPIENT_CHARS = 58   # base32 of public key (32) ‖ crc32 (4)
PAPER_CHARS = 60       # base32 of version (1) ‖ secret (32) ‖ crc32 (4)

STANZA_X25519 = 1
STANZA_SCRYPT = 2
WRAPPED_KEY_BYTES = KEY_BYTES + 16  # AES-256-GCM ciphertext ‖ tag
SCRYPT_SALT_BYTES = 16
X25519_BODY_BYTES = 2 * X25519_BYTES + WRAPPED_KEY_BYTES            # 112
SCRYPT_BODY_BYTES = 3 + SCRYPT_SALT_BYTES + WRAPPED_KEY_BYTES       # 67
X25519_INFO = b"cfms-backup-v3 x25519"
SCRYPT_SALT_LABEL = b"cfms-backup-v3 scrypt"
_WRAP_NONCE = bytes(12)  # every wrap key is used exactly once, so a fixed nonce is safe

# What the writer uses unless told otherwise: 128 MiB of memory, about half a second.
DEFAULT_SCRYPT_LOG2_N = 17
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1
PASSPHRASE_MAX_CHARS = 1024


# -- base32 with a checksum ----------------------------------------------------------------------

def _checksum(data: bytes) -> bytes:
    return struct.pack(">I", zlib.crc32(data))


def _b32encode(data: bytes) -> str:
    bits = int.from_bytes(data, "big")
    count = (len(data) * 8 + 4) // 5
    bits <<= count * 5 - len(data) * 8  # zero padding bits at the end
    return "".join(ALPHABET[(bits >> (5 * (count - 1 - i))) & 31] for i in range(count))


def _b32decode(text: str, byte_count: int, what: str) -> bytes:
    """Decode exactly ``byte_count`` bytes; raise ArchiveError naming the bad character."""
    want = (byte_count * 8 + 4) // 5
    if len(text) != want:
        raise ArchiveError(f"{what} must have {want} characters after its prefix, not {len(text)}")
    bits = 0
    for position, ch in enumerate(text):
        value = _VALUE_OF.get(_TYPED_ALIASES.get(ch, ch))
        if value is None:
            raise ArchiveError(f"{what}: character {position + 1} ({ch!r}) is not one of "
                               f"{ALPHABET}")
        bits = (bits << 5) | value
    pad = want * 5 - byte_count * 8
    if bits & ((1 << pad) - 1):
        raise ArchiveError(f"{what} is mistyped (its last character is not a possible one)")
    return (bits >> pad).to_bytes(byte_count, "big")


def _with_checksum(payload_and_sum: bytes, what: str) -> bytes:
    payload, stored = payload_and_sum[:-CHECKSUM_BYTES], payload_and_sum[-CHECKSUM_BYTES:]
    if _checksum(payload) != stored:
        raise ArchiveError(f"{what} checksum does not match: a character is mistyped")
    return payload


# -- X25519 keys ---------------------------------------------------------------------------------

def _public_key(raw: bytes) -> ECC.EccKey:
    """Import a raw X25519 public key; low-order and invalid points are refused."""
    point = bytearray(raw)
    point[31] &= 0x7F  # RFC 7748 §5: the top bit is ignored
    try:
        return ECC.construct(curve="Curve25519", point_x=int.from_bytes(point, "little"))
    except ValueError:
        raise ArchiveError("not a usable X25519 public key") from None


@dataclasses.dataclass(frozen=True)
class Recipient:
    """An X25519 public key that backups can be made for."""

    public_key: bytes

    def __post_init__(self):
        if len(self.public_key) != X25519_BYTES:
            raise ValueError("an X25519 public key is 32 bytes")

    def __str__(self) -> str:
        return RECIPIENT_PREFIX + _b32encode(self.public_key + _checksum(self.public_key)).lower()


def parse_recipient(text: str) -> Recipient:
    """Parse a recipient string (``cfms1…``); a typo fails the checksum with a clear error."""
    if not isinstance(text, str):
        raise ArchiveError("a recipient must be a string")
    cleaned = text.strip()
    if not cleaned.lower().startswith(RECIPIENT_PREFIX):
        raise ArchiveError(f"recipient {cleaned[:80]!r} does not start with {RECIPIENT_PREFIX!r}")
    body = cleaned[len(RECIPIENT_PREFIX):].upper()
    raw = _b32decode(body, X25519_BYTES + CHECKSUM_BYTES, "recipient")
    public = _with_checksum(raw, "recipient")
    _public_key(public)
    return Recipient(public)


@dataclasses.dataclass(frozen=True)
class Identity:
    """An X25519 private key: opens every archive made for its recipient."""

    secret: bytes = dataclasses.field(repr=False)

    def __post_init__(self):
        if len(self.secret) != X25519_BYTES:
            raise ValueError("an X25519 secret is 32 bytes")

    def private_key(self) -> ECC.EccKey:
        return ECC.construct(curve="Curve25519", seed=self.secret)

    @property
    def recipient(self) -> Recipient:
        return Recipient(self.private_key().public_key().export_key(format="raw"))

    def paper_phrase(self) -> str:
        """Fifteen groups of four characters: version, secret and CRC-32 in base32."""
        payload = bytes([IDENTITY_VERSION]) + self.secret
        text = _b32encode(payload + _checksum(payload))
        return "-".join(text[i:i + PAPER_GROUP_CHARS] for i in range(0, len(text),
                                                                      PAPER_GROUP_CHARS))

    def identity_line(self) -> str:
        return IDENTITY_PREFIX + self.paper_phrase()


def generate_identity() -> Identity:
    return Identity(os.urandom(X25519_BYTES))


def parse_identity(text: str) -> Identity:
    """Parse one identity: an identity line or a typed paper phrase (case, spaces, dashes and
    the look-alikes O/I/L are forgiven; anything else is an error naming the character)."""
    cleaned = text.strip().upper()
    if cleaned.startswith(IDENTITY_PREFIX):
        cleaned = cleaned[len(IDENTITY_PREFIX):]
    cleaned = "".join(ch for ch in cleaned if ch not in " -\t")
    raw = _b32decode(cleaned, 1 + X25519_BYTES + CHECKSUM_BYTES, "identity")
    payload = _with_checksum(raw, "identity")
    if payload[0] != IDENTITY_VERSION:
        raise ArchiveError(f"identity version {payload[0]} is not supported")
    return Identity(payload[1:])


def identity_file_text(identity: Identity, created: str) -> str:
    return (f"# cfms-trio backup identity, created {created}\n"
            f"# It opens every backup made for recipient {identity.recipient}\n"
            "# Keep it secret; anyone holding it reads those backups.\n"
            f"{identity.identity_line()}\n")


def parse_identity_file(data: bytes, limits: ArchiveLimits) -> tuple[Identity, ...]:
    """The identities of an identity file: one per line, ``#`` lines and blank lines ignored."""
    if len(data) > limits.key_file_bytes:
        raise ArchiveLimitExceeded(
            f"identity file is {len(data)} bytes; the limit is {limits.key_file_bytes} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ArchiveError("identity file is not UTF-8 text") from None
    identities = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            identities.append(parse_identity(line))
        except ArchiveError as exc:
            raise ArchiveError(f"identity file line {number}: {exc.message}") from None
    if not identities:
        raise ArchiveError("identity file holds no identity (no CFMS-SECRET- line)")
    return tuple(identities)


# -- passphrases ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Passphrase:
    """A passphrase recipient, with the scrypt work factors a writer uses for it."""

    text: str = dataclasses.field(repr=False)
    log2_n: int = DEFAULT_SCRYPT_LOG2_N
    r: int = DEFAULT_SCRYPT_R
    p: int = DEFAULT_SCRYPT_P

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text:
            raise ValueError("a passphrase must not be empty")
        if len(self.text) > PASSPHRASE_MAX_CHARS:
            raise ValueError(f"a passphrase may have at most {PASSPHRASE_MAX_CHARS} characters")
        if not (1 <= self.log2_n <= 63 and 1 <= self.r <= 255 and 1 <= self.p <= 255):
            raise ValueError("scrypt factors out of range")

    def encoded(self) -> bytes:
        return unicodedata.normalize("NFC", self.text).encode("utf-8")


def check_scrypt_cost(log2_n: int, r: int, p: int, limits: ArchiveLimits) -> None:
    """Refuse work factors above the limits before deriving anything (docs/SECURITY.md)."""
    if log2_n < 1 or r < 1 or p < 1:
        raise ArchiveError(f"passphrase stanza has invalid scrypt factors "
                           f"(log2 N {log2_n}, r {r}, p {p})")
    memory_bytes = 128 * r * (1 << log2_n)
    work = (1 << log2_n) * r * p
    if memory_bytes > limits.scrypt_memory_bytes or work > limits.scrypt_work:
        raise ArchiveLimitExceeded(
            f"passphrase stanza asks for scrypt N=2^{log2_n}, r={r}, p={p} "
            f"({memory_bytes} bytes of memory, work {work}); this reader allows at most "
            f"{limits.scrypt_memory_bytes} bytes and work {limits.scrypt_work}, so nothing was "
            "derived")


def _scrypt_key(passphrase: bytes, salt: bytes, log2_n: int, r: int, p: int) -> bytes:
    return scrypt(passphrase, SCRYPT_SALT_LABEL + salt, KEY_BYTES, N=1 << log2_n, r=r, p=p)


# -- stanzas -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stanza:
    """One wrapped copy of the file key, as stored in the recipient block."""

    kind: int
    body: bytes

    def describe(self) -> str:
        if self.kind == STANZA_X25519:
            return f"recipient {Recipient(self.body[:X25519_BYTES])}"
        if self.kind == STANZA_SCRYPT:
            log2_n, r, p = self.body[:3]
            return f"passphrase (scrypt N=2^{log2_n}, r={r}, p={p})"
        return f"unknown stanza type {self.kind} ({len(self.body)} bytes)"

    def is_for(self, recipient: Recipient) -> bool:
        return self.kind == STANZA_X25519 and self.body[:X25519_BYTES] == recipient.public_key


def _seal(wrap_key: bytes, file_key: bytes) -> bytes:
    cipher = AES.new(wrap_key, AES.MODE_GCM, nonce=_WRAP_NONCE, mac_len=16)
    ciphertext, tag = cipher.encrypt_and_digest(file_key)
    return ciphertext + tag


def _unseal(wrap_key: bytes, wrapped: bytes) -> bytes | None:
    cipher = AES.new(wrap_key, AES.MODE_GCM, nonce=_WRAP_NONCE, mac_len=16)
    try:
        return cipher.decrypt_and_verify(wrapped[:KEY_BYTES], wrapped[KEY_BYTES:])
    except ValueError:
        return None


def _x25519_wrap_key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(shared, KEY_BYTES, ephemeral + recipient, SHA256, context=X25519_INFO)


def wrap_file_key(file_key: bytes, to: Recipient | Passphrase) -> Stanza:
    """A new stanza wrapping ``file_key`` for one recipient or passphrase."""
    if isinstance(to, Recipient):
        ephemeral = ECC.generate(curve="Curve25519")
        shared = key_agreement(static_priv=ephemeral, static_pub=_public_key(to.public_key),
                               kdf=lambda secret: secret)
        ephemeral_public = ephemeral.public_key().export_key(format="raw")
        wrap_key = _x25519_wrap_key(shared, ephemeral_public, to.public_key)
        return Stanza(STANZA_X25519,
                      to.public_key + ephemeral_public + _seal(wrap_key, file_key))
    salt = os.urandom(SCRYPT_SALT_BYTES)
    wrap_key = _scrypt_key(to.encoded(), salt, to.log2_n, to.r, to.p)
    return Stanza(STANZA_SCRYPT,
                  bytes([to.log2_n, to.r, to.p]) + salt + _seal(wrap_key, file_key))


def check_stanza(kind: int, body: bytes) -> None:
    """Structural check of a stanza read from an archive."""
    expected = {STANZA_X25519: X25519_BODY_BYTES, STANZA_SCRYPT: SCRYPT_BODY_BYTES}.get(kind)
    if expected is not None and len(body) != expected:
        raise ArchiveError(f"recipient block: stanza type {kind} must be {expected} bytes, "
                           f"not {len(body)}")


def unwrap_x25519(stanza: Stanza, identity: Identity) -> bytes | None:
    """The file key if ``stanza`` is for ``identity``; None when it is for someone else."""
    recipient, ephemeral = stanza.body[:X25519_BYTES], stanza.body[X25519_BYTES:2 * X25519_BYTES]
    if recipient != identity.recipient.public_key:
        return None
    try:
        shared = key_agreement(static_priv=identity.private_key(),
                               static_pub=_public_key(ephemeral), kdf=lambda secret: secret)
    except ArchiveError:
        raise ArchiveError(f"the stanza for {identity.recipient} holds an invalid ephemeral key "
                           "(archive corrupt or tampered with)") from None
    file_key = _unseal(_x25519_wrap_key(shared, ephemeral, recipient),
                       stanza.body[2 * X25519_BYTES:])
    if file_key is None:
        raise ArchiveError(f"the stanza for {identity.recipient} does not decrypt "
                           "(archive corrupt or tampered with)")
    return file_key


def unwrap_scrypt(stanza: Stanza, passphrase: Passphrase, limits: ArchiveLimits) -> bytes | None:
    """The file key if ``passphrase`` opens ``stanza``; None when it does not. The work factors
    are checked before deriving."""
    log2_n, r, p = stanza.body[:3]
    check_scrypt_cost(log2_n, r, p, limits)
    salt = stanza.body[3:3 + SCRYPT_SALT_BYTES]
    wrap_key = _scrypt_key(passphrase.encoded(), salt, log2_n, r, p)
    return _unseal(wrap_key, stanza.body[3 + SCRYPT_SALT_BYTES:])


@dataclasses.dataclass(frozen=True)
class Unlock:
    """What a reader may try on a format 3 archive: identities and/or a passphrase, or the
    file key itself. Only the exporter holds a file key: it keeps the key it wrote an archive
    with in memory until it has read that archive back (the self-check), then forgets it. A
    file key is still checked like an unwrapped one (payload key check, recipient block MAC)."""

    identities: tuple[Identity, ...] = ()
    passphrase: Passphrase | None = dataclasses.field(default=None, repr=False)
    file_key: bytes | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if not self.identities and self.passphrase is None and self.file_key is None:
            raise ValueError("an Unlock needs an identity, a passphrase or a file key")
        if self.file_key is not None and len(self.file_key) != KEY_BYTES:
            raise ValueError(f"a file key is {KEY_BYTES} bytes")
