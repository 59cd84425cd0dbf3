"""Keeping the cyclic garbage collector off while a backup's listings are alive.

A backup of 100,000 documents parses into about a million containers. Every full collection
walks all of them while holding the GIL: up to 200 ms each, nine times in one import, and the
event loop answers nobody meanwhile. The listings hold no reference cycles, so a collection can
never free any of them; objects still die as usual when their last reference goes. Cyclic
garbage made elsewhere meanwhile is collected once the last holder leaves.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_lock = threading.Lock()
_holders = 0
_was_enabled = False


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause the cyclic collector (process-wide) until every holder has left; nestable and
    safe to use from several threads and tasks at once."""
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()
