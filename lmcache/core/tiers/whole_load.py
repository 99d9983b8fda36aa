"""A whole-object load on top of a tier's ranged read, so each tier reads and verifies in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from lmcache.core.chunk_format import ChunkHeader, byte_view

if TYPE_CHECKING:
    from lmcache.core.hookspecs import HeadDest
    from lmcache.core.memory_pool import MemoryObj


def load_whole(read: Callable[["HeadDest"], ChunkHeader | None],
               alloc: Callable[[int], "MemoryObj | None"]) -> "tuple[ChunkHeader, MemoryObj] | None":
    """``read(dest)`` reads every head of one object into ``dest(header)``; here dest is fresh memory from
    ``alloc(payload_nbytes)``, given back if the read fails. (header, memory) or None."""
    got: list[MemoryObj] = []

    def dest(header: ChunkHeader) -> memoryview | None:
        obj = alloc(header.payload_nbytes)
        if obj is None:
            return None
        got.append(obj)
        return byte_view(obj.raw)

    header = read(dest)
    if header is None:
        for obj in got:
            obj.unref()
        return None
    return header, got[0]
