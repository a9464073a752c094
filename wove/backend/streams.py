"""Moving large bodies without copying them: reading into one buffer, and cutting buffers into ranges.

Shared by the callback server (request bodies, uploads) and the clients (blob downloads, uploads in parts).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

__all__ = ["byte_ranges", "read_into", "read_stream", "slices"]

Buffer = Any  # bytes, bytearray or memoryview
#: Bodies up to this size are read in one call.
SMALL_BODY = 64 * 1024


async def read_into(stream: aiohttp.StreamReader, view: memoryview) -> None:
    """Fill ``view`` from ``stream``; ``ValueError("incomplete_body")`` when the stream ends early or overruns."""
    done, length = 0, view.nbytes
    while done < length:
        chunk = await stream.readany()
        if not chunk or done + len(chunk) > length:
            raise ValueError("incomplete_body")
        view[done : done + len(chunk)] = chunk
        done += len(chunk)


async def read_stream(stream: aiohttp.StreamReader, length: int | None, limit: int) -> bytearray:
    """Read a body into one buffer, sized up front when ``length`` is known; ``ValueError`` past ``limit`` bytes."""
    if length is None:
        grown = bytearray()
        while chunk := await stream.readany():
            grown += chunk
            if len(grown) > limit:
                raise ValueError("body_too_large")
        return grown
    if length > limit:
        raise ValueError("body_too_large")
    if length == 0:
        return bytearray()
    if length <= SMALL_BODY:  # usually in the buffer already: one call, no copy loop
        import asyncio  # here, not at the top: the sync worker imports this module and never asyncio

        try:
            return bytearray(await stream.readexactly(length))
        except asyncio.IncompleteReadError:
            raise ValueError("incomplete_body") from None
    buf = bytearray(length)
    with memoryview(buf) as view:
        await read_into(stream, view)
    return buf


def byte_ranges(parts: list[Buffer], size: int) -> Iterator[tuple[int, list[memoryview], int]]:
    """Cut the concatenation of ``parts`` into ranges of at most ``size`` bytes: ``(offset, views, length)``."""
    offset, current, filled = 0, [], 0
    for part in parts:
        view = memoryview(part).cast("B")
        start = 0
        while start < view.nbytes:
            take = min(size - filled, view.nbytes - start)
            current.append(view[start : start + take])
            filled += take
            start += take
            if filled == size:
                yield offset, current, filled
                offset, current, filled = offset + filled, [], 0
    if current:
        yield offset, current, filled


async def slices(parts: list[Buffer], size: int) -> AsyncIterator[memoryview]:
    """Yield a body's parts in slices of at most ``size`` bytes, copying none (an aiohttp request body)."""
    for part in parts:
        flat = memoryview(part).cast("B")
        for start in range(0, flat.nbytes, size):
            yield flat[start : start + size]
