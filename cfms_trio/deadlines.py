"""Wall-clock deadlines (stored in rows, SPEC §3) as trio deadlines."""

from __future__ import annotations

import time

import trio


def trio_deadline(wall_time: float) -> float:
    """A wall-clock time as a trio deadline: trio's clock is not the wall clock."""
    return trio.current_time() + max(0.0, wall_time - time.time())
