"""Helpers for nurseries whose helper tasks never fail on their own."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def single_error_unwrapped() -> Iterator[None]:
    """Around a nursery whose only possible failure is its body's (or one task's): re-raise a
    group of exactly one exception as that exception, as if no task had been involved."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
