"""Speed-ups of the WebSocket byte path, shared by both ends of a transfer (issue 15).

Profiles of a 1 GiB upload showed two costs outside our code, both on the event loops:

- wsproto masks and unmasks client frames in Python (`XorMaskerSimple`: strided slices and
  `bytes.translate`), about 950 µs per MiB. `FastXorMasker` gives the same bytes with
  pycryptodome's `strxor` (C), about 60 µs per MiB.
- wsproto and trio-websocket copy every message a few times. Each copy of a 1 MiB buffer is a
  fresh allocation, and glibc hands the freed memory straight back to the kernel (its trim
  threshold follows the size of the last large block freed), so the next copy page-faults all
  256 pages again: about 900 µs per MiB on this VM instead of 40 µs. `tune_allocator` keeps
  freed memory up to `ALLOCATOR_TRIM_BYTES` for reuse.

`install()` applies both, once per process; the server calls it when it starts, the client
library when it opens a connection.
"""

from __future__ import annotations

import ctypes
import sys

import wsproto.frame_protocol
from Crypto.Util.strxor import strxor

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Freed memory kept by the process for reuse instead of being returned to the kernel. It is a
# ceiling on what stays resident after a peak, not memory taken: a transfer holds a few chunks.
ALLOCATOR_TRIM_BYTES = 64 * 1024 * 1024
# Blocks at least this large get their own mapping (and are unmapped when freed). Above the
# largest archive segment (16 MiB) and transfer chunk, so those reuse memory too.
ALLOCATOR_MMAP_BYTES = 32 * 1024 * 1024

_installed = False


class FastXorMasker:
    """wsproto's `XorMaskerSimple` (the same interface and bytes), XORing in C.

    `process` returns a new bytearray of `data` masked with the 4-byte key, and rotates the key
    so that the next call continues where this one ended, as a frame's payload arrives in
    pieces."""

    def __init__(self, masking_key: bytes | bytearray):
        self._masking_key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        data = bytearray(data)
        size = len(data)
        if size:
            key = self._masking_key
            stream = memoryview(key * (size // 4 + 1))[:size]
            strxor(data, stream, output=data)
            rotation = size % 4
            self._masking_key = key[rotation:] + key[:rotation]
        return data


def tune_allocator() -> bool:
    """Keep glibc from returning freed large blocks to the kernel at once; False where the C
    library is not glibc (nothing to tune)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_TRIM_BYTES)
                and mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_MMAP_BYTES))


def install() -> None:
    """Apply the speed-ups of this module to the current process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    wsproto.frame_protocol.XorMaskerSimple = FastXorMasker
    tune_allocator()
