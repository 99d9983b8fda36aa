"""The CPU tier: chunks in the pooled host memory, chain-aware LRU eviction (``chain_lru``: a prompt's
chunks leave tail first), entries being read never evicted."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from lmcache.core.chunk_format import NO_PARENT, ChunkHeader, byte_view, encode
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import HostMemoryPool, MemoryObj
from lmcache.core.tiers.chain_lru import ChainLru
from lmcache.core.tiers.stats import TierStats


@dataclass(eq=False)
class CpuEntry:
    key: ObjectKey
    header: ChunkHeader
    obj: MemoryObj
    #: header bytes with the payload checksum, computed once for all lower tiers (bytes are immutable once stored)
    sealed: bytes | None = None

    def payload(self) -> torch.Tensor:
        return self.obj.tensor(self.header.dtype, self.header.payload_shape)

    def encoded(self) -> tuple[bytes, memoryview]:
        """(sealed header, payload bytes) for a lower tier; the checksum is computed on first use only."""
        if self.sealed is None:
            self.sealed, view = encode(self.header, self.obj.raw)
            return self.sealed, view
        return self.sealed, byte_view(self.obj.raw)


class CpuTier:
    """The CPU tier: committed chunks in pooled host memory, in LRU order.

    Invariants: an entry is in the index only once its bytes are complete (commit publishes it); an
    entry whose memory has a reader's reference (refcount > 1) is never evicted, and its memory is freed
    only when the last reader lets go, even after removal or clear. Lock rule: ``_lock`` covers the index
    and eviction, and ``on_evict`` runs under it (it must be quick and must not call back into the tier).
    """

    name = "cpu"

    def __init__(self, pool: HostMemoryPool, on_evict: Callable[[CpuEntry], None] | None = None) -> None:
        self.pool = pool
        self.on_evict = on_evict
        self.stats = TierStats()
        self._entries: ChainLru[CpuEntry] = ChainLru()
        #: chunk key -> head ranges held, so a reader of another TP size finds the shards covering its heads
        self._ranges: dict[bytes, set[tuple[int, int]]] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, key: ObjectKey) -> bool:
        """Pure membership test: no LRU touch, no statistics (lookups may be repeated freely)."""
        return key in self._entries

    def leading(self, chunks: Iterator[bytes], head_range: tuple[int, int]) -> tuple[int, bytes | None]:
        """(how many leading chunks of ``chunks`` hold ``head_range`` here, the first chunk that does not or
        None). Lock-free: one dict and one set probe per chunk, each atomic; a chunk committed or evicted
        meanwhile is seen or not, as with any lookup racing a store."""
        ranges = self._ranges
        n = 0
        for chunk in chunks:
            held = ranges.get(chunk)
            if held is None or head_range not in held:
                return n, chunk
            n += 1
        return n, None

    def head_ranges(self, chunk: bytes) -> set[tuple[int, int]]:
        """The head ranges of ``chunk`` held here (a copy)."""
        with self._lock:
            return set(self._ranges.get(chunk, ()))

    def acquire(self, key: ObjectKey, count: bool = True) -> CpuEntry | None:
        """The entry with a reader's reference held (release it), or None. Counts a hit or a miss
        unless ``count`` is False (the engine's own bookkeeping reads)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += count
                return None
            entry.obj.ref()
            self._entries.touch(key)
            if count:
                self.stats.hits += 1
                self.stats.bytes_out += entry.header.payload_nbytes
            return entry

    def release(self, entry: CpuEntry) -> None:
        entry.obj.unref()

    def reserve(self, nbytes: int) -> MemoryObj | None:
        """Room for a new chunk, evicting least-recently-used unread chunks as needed; None if impossible."""
        with self._lock:
            obj = self.pool.allocate(nbytes)
            while obj is None and self._evict_one():
                obj = self.pool.allocate(nbytes)
            return obj

    def _evict_one(self) -> bool:
        # only the tier holds it (refcount 1): nobody is reading; a prompt's tail goes before its head
        key = self._entries.victim(lambda e: e.obj.refcount == 1)
        if key is None:
            return False
        entry = self._pop(key)
        assert entry is not None
        self.stats.evictions += 1
        if self.on_evict is not None:
            self.on_evict(entry)
        entry.obj.unref()
        return True

    def _pop(self, key: ObjectKey) -> CpuEntry | None:
        entry = self._entries.pop(key)
        if entry is not None:
            ranges = self._ranges.get(key.chunk)
            if ranges is not None:
                ranges.discard((key.head_start, key.head_end))
                if not ranges:
                    del self._ranges[key.chunk]
        return entry

    def commit(self, key: ObjectKey, header: ChunkHeader, obj: MemoryObj) -> bool:
        """Publish a filled chunk. If another writer got there first, ours is dropped (same bytes)."""
        with self._lock:
            if key in self._entries:
                obj.unref()
                return False
            parent = None if header.parent_key == NO_PARENT else ObjectKey(header.parent_key, key.head_start, key.head_end)
            self._entries.add(key, CpuEntry(key, header, obj), parent)
            self._ranges.setdefault(key.chunk, set()).add((key.head_start, key.head_end))
            self.stats.stores += 1
            self.stats.bytes_in += header.payload_nbytes
            return True

    def remove(self, key: ObjectKey) -> bool:
        with self._lock:
            entry = self._pop(key)
        if entry is None:
            return False
        entry.obj.unref()  # freed now, or when its last reader releases it
        return True

    def clear(self) -> int:
        with self._lock:
            entries = list(self._entries.values())
            self._entries.clear()
            self._ranges.clear()
        for entry in entries:
            entry.obj.unref()
        return len(entries)

    def keys(self) -> Iterator[ObjectKey]:
        with self._lock:
            return iter(list(self._entries))

    def usage(self) -> dict[str, int]:
        return {"chunks": len(self._entries), **self.pool.stats()}
