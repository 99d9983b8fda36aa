"""The storage side of the cache: the CPU tier over a host-memory buffer, the lower tiers, write-back.

It works on object keys and memory objects only (no tokens, no engine layouts), so the same stack runs
inside an engine process (in-process mode) and inside ``lmcache server`` (MP mode, buffer in shared
memory). Operations are batched per request so that MP mode needs one round trip per step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import torch

from lmcache.core.chunk_format import ChunkHeader
from lmcache.core.config import LMCacheConfig
from lmcache.core.hookspecs import BatchLookup, StorageTier, TierUnavailable, hookimpl
from lmcache.core.keys import ObjectKey
from lmcache.core.memory_pool import HostMemoryPool, MemoryObj
from lmcache.core.store import (
    EXISTS,
    ChunkStoreSpec,
    Committed,
    EvictionListener,
    Readable,
    Reservation,
    ReserveAnswer,
    StoreRequest,
)
from lmcache.core.tiers.cpu import CpuEntry, CpuTier
from lmcache.core.tiers.disk import DiskTier
from lmcache.core.tiers.writeback import WriteBack

if TYPE_CHECKING:
    from lmcache.core.plugins import Registry

log = logging.getLogger("lmcache")
__all__ = ["EXISTS", "Committed", "TierStack"]


class TierStack:
    """The in-process ``ChunkStore`` (``lmcache.core.store``): CPU tier, then disk, then a remote tier.

    Invariants: a chunk is in the CPU tier's index only once committed (readers never see a half-written
    chunk); memory with a reader's reference is never evicted or reused; a chunk leaving the CPU tier is
    offered to the disk tier first. Lock rules: the CPU tier's lock covers its index and eviction, so
    ``eviction_listeners`` run under it (they must be quick and must not call back into the stack); lower
    tiers are written by one write-back thread each and must be thread-safe themselves.
    """

    def __init__(self, config: LMCacheConfig, buffer: torch.Tensor, pinned: bool, registry: "Registry") -> None:
        self.config = config
        self.cpu = CpuTier(HostMemoryPool(buffer.numel(), pinned, buffer=buffer), on_evict=self._demote)
        #: listener(key, "disk" or None) when a chunk leaves the CPU tier (None: it left the machine's tiers
        #: too, as far as this process knows); adapters turn these into their engine's KV events
        self.eviction_listeners: list[EvictionListener] = []
        #: problems met while opening tiers (a tier that cannot work is left out, never fatal)
        self.tier_problems: list[str] = []
        self.disk = self._open_disk(config)
        self.remote = self._open_remote(config, registry)
        self.lower: list[StorageTier] = [t for t in (self.disk, self.remote) if t is not None]
        # decided once: a Protocol isinstance check costs more than the rest of a prompt's lookup
        self._batch_remote: BatchLookup | None = self.remote if isinstance(self.remote, BatchLookup) else None
        # write-back may pin at most a quarter of the CPU pool, shared by the lower tiers
        share = self.cpu.pool.capacity // 4 // max(1, len(self.lower))
        self.writeback = {t.name: WriteBack(t, config.writeback_queue_size, share) for t in self.lower}

    # -- opening ------------------------------------------------------------------------------------

    def _open_disk(self, config: LMCacheConfig) -> DiskTier | None:
        if not config.local_disk_path:
            return None
        try:
            return DiskTier(config.local_disk_path, int(config.max_local_disk_size_gb * 2**30), config.local_disk_fsync)
        except TierUnavailable as e:
            self.tier_problems.append(str(e))
            log.warning("lmcache: running without a disk tier: %s", e)
            return None

    @staticmethod
    def _open_remote(config: LMCacheConfig, registry: "Registry") -> StorageTier | None:
        if not config.remote_url:
            return None
        scheme = config.remote_url.split("://", 1)[0].lower()
        spec = registry.tiers.get(scheme)
        if spec is None:
            raise ValueError(f"remote_url '{config.remote_url}': no storage tier handles '{scheme}://'; "
                             f"registered schemes: {', '.join(sorted(registry.tiers))}")
        tier = spec.factory(config.remote_url, config)
        if not isinstance(tier, StorageTier):
            missing = [m for m in ("name", "stats", "contains", "load", "put", "remove", "close") if not hasattr(tier, m)]
            raise ValueError(f"the storage tier plugin for '{scheme}://' returned a {type(tier).__name__} without "
                             f"{', '.join(missing)}: it must implement lmcache.core.hookspecs.StorageTier")
        return tier

    # -- movement between tiers ---------------------------------------------------------------------

    def _demote(self, entry: CpuEntry) -> None:
        """A chunk leaving the CPU tier goes to disk unless it is there or on its way already."""
        to_disk = self.disk is not None
        if self.disk is not None and not self.disk.contains(entry.key):
            to_disk = self.writeback["disk"].offer(entry)
        for listener in list(self.eviction_listeners):
            listener(entry.key, "disk" if to_disk else None)

    def _from_lower(self, okey: ObjectKey, promote: bool) -> CpuEntry | None:
        """Load a chunk from the first lower tier holding it; the entry comes back acquired."""
        for tier in self.lower:
            got = tier.load(okey, self.cpu.reserve)
            if got is None:
                continue
            header, obj = got
            if not promote:
                return CpuEntry(okey, header, obj)  # private: freed when released
            if self.cpu.commit(okey, header, obj):
                entry = self.cpu.acquire(okey, count=False)
                if entry is not None and tier is not self.disk and self.disk is not None:
                    self.writeback["disk"].offer(entry)  # a remote hit is kept on local disk too
                return entry
            return self.cpu.acquire(okey, count=False)
        return None

    # -- batched operations -------------------------------------------------------------------------

    def lookup_tiers(self, okeys: Iterable[ObjectKey]) -> list[str]:
        """For each key of the cached prefix, the highest tier holding it. No side effects."""
        where: list[str] = []
        it: Iterator[ObjectKey] = iter(okeys)
        for okey in it:
            if self.cpu.contains(okey):
                where.append("cpu")
            elif self.disk is not None and self.disk.contains(okey):
                where.append("disk")
            else:
                if self.remote is not None:  # one round trip for the rest of the prompt (where the tier can)
                    rest = [okey, *it]
                    remote = self.remote
                    found_all = (self._batch_remote.contains_many(rest) if self._batch_remote is not None
                                 else (remote.contains(k) for k in rest))
                    for found in found_all:
                        if not found:
                            break
                        where.append(self.remote.name)
                break
        return where

    def reserve_many(self, items: Sequence[tuple[ObjectKey, int]]) -> list[ReserveAnswer]:
        """Per (key, nbytes): EXISTS, a MemoryObj to fill, or None when the pool has no room (and for
        every later item: a prefix must stay contiguous)."""
        out: list[ReserveAnswer] = []
        for okey, nbytes in items:
            if self.cpu.contains(okey):
                out.append(EXISTS)
                continue
            obj = self.cpu.reserve(nbytes)
            if obj is None:
                self.cpu.stats.drops += len(items) - len(out)
                log.warning("lmcache: CPU tier full of chunks being read; dropped %d chunks", len(items) - len(out))
                return out + [None] * (len(items) - len(out))
            out.append(obj)
        return out

    def abort(self, objs: Iterable[object]) -> None:
        for obj in objs:
            if isinstance(obj, MemoryObj):
                obj.unref()

    def commit_many(self, items: Sequence[tuple[ObjectKey, ChunkHeader, Reservation]]) -> Committed:
        """Publish filled chunks and queue them for the lower tiers."""
        stored = 0
        for okey, header, obj in items:
            if not isinstance(obj, MemoryObj):
                raise TypeError(f"commit of a {type(obj).__name__}: this stack commits only its own reservations")
            if not self.cpu.commit(okey, header, obj):
                continue
            stored += 1
            if self.lower:
                entry = self.cpu.acquire(okey, count=False)
                if entry is not None:
                    for tier in self.lower:
                        self.writeback[tier.name].offer(entry)
                    self.cpu.release(entry)
        return Committed(stored)

    def acquire_prefix(self, okeys: Iterable[ObjectKey], promote: bool | None = None) -> list[CpuEntry]:
        """Entries of the cached prefix, each with a reader's reference (release_many them)."""
        promote = self.config.promote_on_hit if promote is None else promote
        entries = []
        for okey in okeys:
            entry = self.cpu.acquire(okey)
            if entry is None and self.lower:
                entry = self._from_lower(okey, promote)
            if entry is None:
                break
            entries.append(entry)
        return entries

    def release_many(self, entries: Iterable[Readable]) -> bool:
        """Drop readers' references; True (in-process, a reference cannot be lost)."""
        for entry in entries:
            if not isinstance(entry, CpuEntry):
                raise TypeError(f"release of a {type(entry).__name__}: this stack releases only its own entries")
            self.cpu.release(entry)
        return True

    def prefetch(self, okeys: Iterable[ObjectKey]) -> int:
        """Pull lower-tier hits into the CPU tier; returns how many leading keys are now there."""
        n = 0
        for okey in okeys:
            if not self.cpu.contains(okey):
                entry = self._from_lower(okey, promote=True)
                if entry is None:
                    break
                self.cpu.release(entry)
            n += 1
        return n

    # -- housekeeping -------------------------------------------------------------------------------

    def poll_evictions(self) -> int:
        return 0  # in-process: listeners hear evictions as they happen

    def queue_depths(self) -> dict[str, int]:
        return {name: wb.depth() for name, wb in self.writeback.items()}

    def flush(self) -> None:
        for wb in self.writeback.values():
            wb.flush()

    def tier_stats(self) -> dict[str, dict[str, int]]:
        out = {"cpu": self.cpu.stats.as_dict()}
        for tier in self.lower:
            out[tier.name] = tier.stats.as_dict()
            out[f"{tier.name}_writeback"] = self.writeback[tier.name].stats.as_dict()
        return out

    def clear(self) -> int:
        return self.cpu.clear()

    def close(self) -> None:
        for wb in self.writeback.values():
            wb.close()
        for tier in self.lower:
            tier.close()
        self.cpu.clear()


def _open(request: StoreRequest) -> TierStack:
    capacity = int(request.config.max_cpu_size_gb * 2**30)
    return TierStack(request.config, request.alloc_host(capacity, request.pin), request.pin, request.registry)


@hookimpl
def lmcache_chunk_stores() -> list[ChunkStoreSpec]:
    return [ChunkStoreSpec("inproc", _open, "the pool inside the engine process, tiers cpu -> disk -> remote")]
