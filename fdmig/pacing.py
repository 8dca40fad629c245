"""Work done behind the chardevs' serving (a precopy, on either side of it; a
status of thousands) goes a piece at a time, and after each piece the loop
serves, or sleeps, PACE times as long as the piece took. Such work takes at
most a quarter of a CPU, which on a busy host is the peers', at the cost of
taking four times as long. QEMU caps its RAM precopy so (max-bandwidth); here
the cost is CPU per chardev, not bytes on a link, so the cap is one of time."""

import asyncio
import time

from fdmig import marks

PACE = 3.0


async def yield_after(began: float, what: str) -> None:
    """After a piece of such work, `what`, begun at `began` (time.monotonic())."""
    marks.span(what, began)
    await asyncio.sleep((time.monotonic() - began) * PACE)


async def in_slices(items, size: int, work, what: str) -> None:
    """`work(piece)` for each piece of `size` of the sequence `items`, paced."""
    for start in range(0, len(items), size):
        began = time.monotonic()
        work(items[start: start + size])
        await yield_after(began, what)
