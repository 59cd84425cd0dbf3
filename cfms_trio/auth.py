"""Password hashing and session tokens (blocking helpers; callers offload them).

Passwords use scrypt, a memory-hard KDF, with a per-user random salt. Tokens are random; only
their SHA-256 is stored, so a leaked database does not leak live sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
SCRYPT_KEY_BYTES = 32
TOKEN_BYTES = 32


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(SCRYPT_SALT_BYTES)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=SCRYPT_KEY_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, digest_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), n=int(n),
                                r=int(r), p=int(p), dklen=len(digest_hex) // 2)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest.hex(), digest_hex)


SCRYPT_STORED_MAX_MEMORY_BYTES = 32 * 1024 * 1024  # hashlib.scrypt's default maxmem


def is_verifiable_hash(stored: str) -> bool:
    """Whether `stored` is a password hash `verify_password` can check (an imported account's
    hash, say): the scrypt scheme, sane factors within hashlib's memory bound, hex salt and
    digest."""
    try:
        scheme, n, r, p, salt_hex, digest_hex = stored.split("$")
        n_value, r_value, p_value = int(n), int(r), int(p)
        bytes.fromhex(salt_hex)
        bytes.fromhex(digest_hex)
    except ValueError:
        return False
    return (scheme == "scrypt" and n_value > 1 and n_value & (n_value - 1) == 0
            and r_value >= 1 and 1 <= p_value <= 16 and len(digest_hex) >= 32
            and 128 * n_value * r_value <= SCRYPT_STORED_MAX_MEMORY_BYTES)


def dummy_password_check(password: str) -> None:
    """Spend the same work as a real check, so unknown users are not told apart by timing."""
    verify_password(password, _DUMMY_HASH)


_DUMMY_HASH = f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${'00' * SCRYPT_SALT_BYTES}${'00' * SCRYPT_KEY_BYTES}"


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()

