"""Overlapping blocking chunk work with sending, for both ends of a transfer."""

from __future__ import annotations

from typing import Awaitable, Callable, TypeVar

import trio

from ..nurseries import single_error_unwrapped

T = TypeVar("T")


async def send_ahead(indices: range, produce: Callable[[int], T],
                     consume: Callable[[int, T], Awaitable[bool]], *, depth: int,
                     limiter: trio.CapacityLimiter | None = None) -> None:
    """Run `produce(index)` in a worker thread and `await consume(index, item)` on the event
    loop for every index in order, with up to `depth` produced items waiting in between.

    Reading and sealing the next chunks then overlaps with framing and sending the current
    one, instead of the two taking turns; memory stays bounded by `depth` + 2 items.
    `consume` returns True to stop early. An exception of either side ends both and comes out
    as itself, not wrapped in an exception group.
    """
    send_items, receive_items = trio.open_memory_channel(depth)

    async def produce_all() -> None:
        async with send_items:
            for index in indices:
                item = await trio.to_thread.run_sync(produce, index, limiter=limiter)
                await send_items.send((index, item))

    with single_error_unwrapped():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce_all)
            try:
                async for index, item in receive_items:
                    if await consume(index, item):
                        break
            finally:
                # Cancel the producer before closing its channel: closing first would let a
                # producer about to send fail with BrokenResourceError, which would then
                # come out instead of (or beside) the consumer's own outcome.
                nursery.cancel_scope.cancel()
                receive_items.close()
