"""Folder-tree helpers shared by the export snapshot and the restore (pure functions)."""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, TypeVar

T = TypeVar("T")


def parents_first(items: Iterable[T], id_of: Callable[[T], Hashable],
                  parent_of: Callable[[T], Hashable | None]) -> list[T]:
    """`items` ordered so every parent precedes its children, level by level from the root
    (parent None), keeping the given order among siblings. Items whose parent is not among
    them (orphans, cycles) are left out: callers check for those first."""
    children: dict = {}
    for item in items:
        children.setdefault(parent_of(item), []).append(item)
    ordered: list[T] = []
    frontier: list = [None]
    while frontier:
        next_frontier = []
        for parent in frontier:
            for item in children.get(parent, ()):
                ordered.append(item)
                next_frontier.append(id_of(item))
        frontier = next_frontier
    return ordered
