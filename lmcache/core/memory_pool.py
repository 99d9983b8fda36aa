"""A fixed-capacity host-memory pool: one buffer allocated up front, carved by a free-list allocator.

No per-chunk malloc on the hot path, no pinning per chunk (pinning is slow and pinned memory is
limited): the whole buffer is pinned once, when an accelerator is present. Chunk objects carry a
reference count so a chunk being read is never freed or reused mid-read.
"""

from __future__ import annotations

import atexit
import bisect
import threading
import weakref

import torch

ALIGNMENT = 512  # bytes; keeps every chunk's start aligned for vectorised and DMA copies

#: pools with a background prefault running: stopped at exit, since a thread inside a torch op while the
#: interpreter shuts down aborts the process ("terminate called without an active exception")
_PREFAULTING: "weakref.WeakSet[HostMemoryPool]" = weakref.WeakSet()


@atexit.register
def _stop_prefaults() -> None:
    for pool in list(_PREFAULTING):
        pool.close()


class FreeListAllocator:
    """Address-ordered free list with coalescing; first fit. Not thread-safe: the pool locks it."""

    def __init__(self, capacity: int, alignment: int = ALIGNMENT) -> None:
        self.capacity = capacity - capacity % alignment
        self.alignment = alignment
        self._starts: list[int] = [0] if self.capacity else []  # sorted starts of free blocks
        self._size: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self.used = 0

    def _round(self, nbytes: int) -> int:
        return max(self.alignment, -(-nbytes // self.alignment) * self.alignment)

    def allocate(self, nbytes: int) -> tuple[int, int] | None:
        """(offset, reserved size), or None when no free block is large enough."""
        need = self._round(nbytes)
        for i, start in enumerate(self._starts):
            size = self._size[start]
            if size < need:
                continue
            del self._size[start]
            if size == need:
                self._starts.pop(i)
            else:
                self._starts[i] = start + need
                self._size[start + need] = size - need
            self.used += need
            return start, need
        return None

    def free(self, offset: int, size: int) -> None:
        if offset in self._size or not 0 <= offset < self.capacity:
            raise RuntimeError(f"double free or foreign block at offset {offset}")
        self.used -= size
        i = bisect.bisect_left(self._starts, offset)
        # merge with the following free block
        if i < len(self._starts) and self._starts[i] == offset + size:
            size += self._size.pop(self._starts.pop(i))
        # merge with the preceding free block
        if i > 0:
            prev = self._starts[i - 1]
            if prev + self._size[prev] == offset:
                self._size[prev] += size
                return
        self._starts.insert(i, offset)
        self._size[offset] = size

    def is_free(self, offset: int, size: int) -> bool:
        """Whether bytes [offset, offset + size) lie inside one free block (nobody holds them)."""
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and self._starts[i] + self._size[self._starts[i]] >= offset + size

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return max(self._size.values(), default=0)

    @property
    def fragments(self) -> int:
        return len(self._starts)


class MemoryObj:
    """One allocation in a pool: its bytes, a canonical tensor view, and a reference count."""

    __slots__ = ("pool", "offset", "size", "nbytes", "refcount", "_released")

    def __init__(self, pool: "HostMemoryPool", offset: int, size: int, nbytes: int) -> None:
        self.pool = pool
        self.offset = offset
        self.size = size
        self.nbytes = nbytes
        self.refcount = 1  # the owner's reference
        self._released = False

    @property
    def raw(self) -> torch.Tensor:
        return self.pool.buffer[self.offset : self.offset + self.nbytes]

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self.raw.view(dtype).view(shape)

    def ref(self) -> "MemoryObj":
        with self.pool.lock:
            if self._released:
                raise RuntimeError("use after free of a pooled chunk")
            self.refcount += 1
        return self

    def unref(self) -> None:
        with self.pool.lock:
            if self.refcount <= 0:
                raise RuntimeError("reference count of a pooled chunk went below zero")
            self.refcount -= 1
            if self.refcount == 0:
                self._released = True
                self.pool._allocator.free(self.offset, self.size)


class HostMemoryPool:
    """Host memory for the CPU tier, pinned when asked (only meaningful with an accelerator)."""

    def __init__(self, capacity_bytes: int, pin: bool = False, buffer: torch.Tensor | None = None) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"pool capacity {capacity_bytes} bytes: must be > 0 (raise max_cpu_size_gb)")
        self.pinned = pin
        # Untouched pages cost nothing until first written, so a large pool is cheap to create unpinned.
        self.buffer = buffer if buffer is not None else torch.empty(capacity_bytes, dtype=torch.uint8, pin_memory=pin)
        self._allocator = FreeListAllocator(capacity_bytes)
        self.lock = threading.RLock()
        self._closed = False
        self._prefaulter: threading.Thread | None = None

    @property
    def capacity(self) -> int:
        return self._allocator.capacity

    def prefault(self, step: int = 2 << 20) -> threading.Thread:
        """Fault in the buffer's pages in a background thread, so reads into the pool run at memory speed
        instead of page-fault speed (a first touch costs a fault per 4 KiB page: a third of memory speed).
        Only free memory is touched, a slice at a time under the pool's lock, from the top down (the
        allocator hands out the bottom first): no chunk is ever written, and allocations wait at most one
        slice (~1 ms). Pinned memory is resident already: nothing to do."""
        def run() -> None:
            top = self.capacity
            for start in range(top - top % step if top % step else top - step, -1, -step):
                end = min(start + step, top)
                with self.lock:
                    if self._closed:
                        return
                    if self._allocator.is_free(start, end - start):
                        self.buffer[start:end].zero_()

        thread = threading.Thread(target=run, name="lmcache-prefault", daemon=True)
        if not self.pinned:
            self._prefaulter = thread
            _PREFAULTING.add(self)
            thread.start()
        return thread

    def close(self) -> None:
        """Stop a background prefault and wait for it (the buffer may be unmapped after this)."""
        with self.lock:
            self._closed = True
        thread = self._prefaulter
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    @property
    def used_bytes(self) -> int:
        return self._allocator.used

    def allocate(self, nbytes: int) -> MemoryObj | None:
        with self.lock:
            got = self._allocator.allocate(nbytes)
        return None if got is None else MemoryObj(self, got[0], got[1], nbytes)

    def stats(self) -> dict[str, int]:
        with self.lock:
            a = self._allocator
            return {"capacity": a.capacity, "used": a.used, "free": a.free_bytes,
                    "largest_free": a.largest_free, "fragments": a.fragments}
