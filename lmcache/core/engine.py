"""The cache engine: store, lookup and retrieve a prompt's KV by its tokens.

One engine serves one model identity and one head shard (a tensor-parallel rank's KV heads). The
engine's KV memory is described by a layout (``lmcache.core.layouts``) plus a slot per token; the
hardware backend moves the bytes. Only full chunks are stored (see ``lmcache.core.keys``).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from lmcache.core.chunk_format import ChunkHeader, header_for
from lmcache.core.config import LMCacheConfig
from lmcache.core.convert import plan_slots
from lmcache.core.geometry import ModelIdentity
from lmcache.core.keys import ChunkHasher, ObjectKey
from lmcache.core.layouts import KVLayout, LayoutError
from lmcache.core.memory_pool import HostMemoryPool
from lmcache.core.plugins import Registry, get_registry, select_backend
from lmcache.core.tiers.cpu import CpuEntry, CpuTier
from lmcache.core.tiers.disk import DiskTier, TierUnavailable
from lmcache.core.tiers.writeback import WriteBack

log = logging.getLogger("lmcache")
Tokens = Sequence[int] | torch.Tensor


@dataclass
class StoreResult:
    chunk_size: int
    stored_chunks: int = 0
    existing_chunks: int = 0
    #: chunks not stored: no room in the pool, or tokens without a KV slot
    dropped_chunks: int = 0

    @property
    def stored_tokens(self) -> int:
        return self.stored_chunks * self.chunk_size


@dataclass
class EngineStats:
    lookups: int = 0
    lookup_tokens: int = 0
    lookup_hit_tokens: int = 0
    stored_tokens: int = 0
    retrieved_tokens: int = 0
    dropped_chunks: int = 0
    extra: dict = field(default_factory=dict)


class CacheEngine:
    def __init__(
        self,
        config: LMCacheConfig,
        identity: ModelIdentity,
        *,
        device: str | torch.device | None = None,
        head_range: tuple[int, int] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.geometry = identity.geometry
        self.chunk_size = config.chunk_size
        h0, h1 = head_range or (0, self.geometry.num_kv_heads)
        if not 0 <= h0 < h1 <= self.geometry.num_kv_heads:
            raise ValueError(f"head_range {head_range}: must satisfy 0 <= start < end <= {self.geometry.num_kv_heads}")
        self.head_range = (h0, h1)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        registry = registry or get_registry()
        self.backend = select_backend(config.device_backend, self.device.type, registry)
        if config.copy_threads and hasattr(self.backend, "threads"):
            self.backend.threads = config.copy_threads
        pin = config.pin_cpu_memory == "yes" or (config.pin_cpu_memory == "auto" and self.device.type != "cpu")
        capacity = int(config.max_cpu_size_gb * 2**30)
        self.cpu = CpuTier(HostMemoryPool(capacity, pin, buffer=self.backend.alloc_host(capacity, pin)),
                           on_evict=self._demote)
        self.stats = EngineStats()
        self._hashers: dict[str, ChunkHasher] = {}
        #: problems met while opening tiers (a tier that cannot work is left out, never fatal)
        self.tier_problems: list[str] = []
        self.disk = self._open_disk(config)
        self.remote = self._open_remote(config, registry)
        self.lower: list[Any] = [t for t in (self.disk, self.remote) if t is not None]
        # write-back may pin at most a quarter of the CPU pool, shared by the lower tiers
        share = self.cpu.pool.capacity // 4 // max(1, len(self.lower))
        self.writeback = {t.name: WriteBack(t, config.writeback_queue_size, share) for t in self.lower}
        self._prefetcher: ThreadPoolExecutor | None = None

    # -- tiers --------------------------------------------------------------------------------------

    def _open_disk(self, config: LMCacheConfig) -> DiskTier | None:
        if not config.local_disk_path:
            return None
        try:
            return DiskTier(config.local_disk_path, int(config.max_local_disk_size_gb * 2**30), config.local_disk_fsync)
        except TierUnavailable as e:
            self.tier_problems.append(str(e))
            log.warning("lmcache: running without a disk tier: %s", e)
            return None

    def _open_remote(self, config: LMCacheConfig, registry: Registry) -> Any:
        if not config.remote_url:
            return None
        scheme = config.remote_url.split("://", 1)[0].lower()
        spec = registry.tiers.get(scheme)
        if spec is None:
            raise ValueError(f"remote_url '{config.remote_url}': no storage tier handles '{scheme}://'; "
                             f"registered schemes: {', '.join(sorted(registry.tiers))}")
        return spec.factory(config.remote_url, config)

    def _demote(self, entry: CpuEntry) -> None:
        """A chunk leaving the CPU tier goes to disk unless it is there or on its way already."""
        if self.disk is not None and not self.disk.contains(entry.key):
            self.writeback["disk"].offer(entry)

    def _write_back(self, entry: CpuEntry, skip: Any = None) -> None:
        for tier in self.lower:
            if tier is not skip:
                self.writeback[tier.name].offer(entry)

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

    def flush(self) -> None:
        """Wait until every queued write-back has reached its tier."""
        for wb in self.writeback.values():
            wb.flush()

    def tier_stats(self) -> dict[str, dict[str, int]]:
        out = {"cpu": self.cpu.stats.as_dict()}
        for tier in self.lower:
            out[tier.name] = tier.stats.as_dict()
            out[f"{tier.name}_writeback"] = self.writeback[tier.name].stats.as_dict()
        return out

    # -- keys ---------------------------------------------------------------------------------------

    def hasher(self, salt: str | None = None) -> ChunkHasher:
        salt = self.config.cache_salt if salt is None else salt
        h = self._hashers.get(salt)
        if h is None:
            h = self._hashers[salt] = ChunkHasher(self.identity, self.chunk_size, salt)
        return h

    def object_key(self, chunk_key: bytes) -> ObjectKey:
        return ObjectKey(chunk_key, *self.head_range)

    def _header(self, chunk_key: bytes) -> ChunkHeader:
        return header_for(self.geometry, self.identity.fingerprint(), chunk_key, self.chunk_size, *self.head_range)

    # -- the three operations -----------------------------------------------------------------------

    def lookup(self, tokens: Tokens, salt: str | None = None) -> int:
        """How many leading tokens are cached in any tier (a multiple of chunk_size). No side effects."""
        hits = len(self.lookup_tiers(tokens, salt))
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(tokens)
        self.stats.lookup_hit_tokens += hits * self.chunk_size
        return hits * self.chunk_size

    def lookup_tiers(self, tokens: Tokens, salt: str | None = None) -> list[str]:
        """For each chunk of the cached prefix, the highest tier holding it ("cpu", "disk", "redis", ...)."""
        where: list[str] = []
        keys = self.hasher(salt).iter_keys(tokens)
        for key in keys:
            okey = self.object_key(key)
            if self.cpu.contains(okey):
                where.append("cpu")
            elif self.disk is not None and self.disk.contains(okey):
                where.append("disk")
            else:
                if self.remote is not None:  # one round trip for the rest of the prompt
                    rest = [okey] + [self.object_key(k) for k in keys]
                    for found in self.remote.contains_many(rest):
                        if not found:
                            break
                        where.append(self.remote.name)
                break
        return where

    def prefetch(self, tokens: Tokens, salt: str | None = None) -> Future:
        """Start pulling lower-tier hits of ``tokens`` up into the CPU tier; the future gives the number
        of leading tokens in the CPU tier when done."""
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="lmcache-prefetch")
        keys = self.hasher(salt).keys(tokens)
        return self._prefetcher.submit(self._prefetch, keys)

    def _prefetch(self, keys: list[bytes]) -> int:
        n = 0
        for key in keys:
            okey = self.object_key(key)
            if not self.cpu.contains(okey):
                entry = self._from_lower(okey, promote=True)
                if entry is None:
                    break
                self.cpu.release(entry)
            n += 1
        return n * self.chunk_size

    def store(self, tokens: Tokens, kv: KVLayout, slot_mapping: torch.Tensor, salt: str | None = None) -> StoreResult:
        """Store the full chunks of ``tokens`` whose KV sits at ``slot_mapping`` (one slot per token,
        -1 where the engine has none); chunks already cached are skipped, not rewritten."""
        self._check(kv, tokens, slot_mapping)
        cs = self.chunk_size
        result = StoreResult(cs)
        keys = self.hasher(salt).keys(tokens[: (len(slot_mapping) // cs) * cs])
        if not keys:
            return result
        complete = (slot_mapping[: len(keys) * cs].view(len(keys), cs) >= 0).all(dim=1).tolist()
        pending = []
        for i, key in enumerate(keys):
            okey = self.object_key(key)
            if self.cpu.contains(okey):
                result.existing_chunks += 1
                continue
            if not complete[i]:
                result.dropped_chunks += 1
                continue
            header = self._header(key)
            obj = self.cpu.reserve(header.payload_nbytes)
            if obj is None:
                result.dropped_chunks += len(keys) - i
                self.cpu.stats.drops += len(keys) - i
                log.warning("lmcache: CPU tier full of chunks being read; dropped %d chunks", len(keys) - i)
                break
            pending.append((okey, header, obj, plan_slots(kv, slot_mapping[i * cs : (i + 1) * cs])))
        try:
            self.backend.gather(kv, [(plan, obj.tensor(h.dtype, h.payload_shape)) for _, h, obj, plan in pending])
            self.backend.synchronize()
        except BaseException:
            for _, _, obj, _ in pending:
                obj.unref()
            raise
        for okey, header, obj, _ in pending:
            if self.cpu.commit(okey, header, obj):
                result.stored_chunks += 1
                if self.lower:
                    entry = self.cpu.acquire(okey, count=False)
                    if entry is not None:
                        self._write_back(entry)
                        self.cpu.release(entry)
            else:
                result.existing_chunks += 1
        self.stats.stored_tokens += result.stored_tokens
        self.stats.dropped_chunks += result.dropped_chunks
        return result

    def retrieve(self, tokens: Tokens, kv: KVLayout, slot_mapping: torch.Tensor, salt: str | None = None) -> int:
        """Load the cached prefix of ``tokens`` into ``slot_mapping``'s slots (-1: leave that token alone).
        Returns how many leading tokens now hold cached KV (a multiple of chunk_size)."""
        self._check(kv, tokens, slot_mapping)
        cs = self.chunk_size
        entries = []
        for key in self.hasher(salt).iter_keys(tokens[: (len(slot_mapping) // cs) * cs]):
            okey = self.object_key(key)
            entry = self.cpu.acquire(okey)
            if entry is None and self.lower:
                entry = self._from_lower(okey, self.config.promote_on_hit)
            if entry is None:
                break
            entries.append(entry)
        try:
            jobs = []
            for i, entry in enumerate(entries):
                slots = slot_mapping[i * cs : (i + 1) * cs]
                jobs.append((plan_slots(kv, slots), entry.payload()))
            self.backend.scatter(kv, [(p, c) for p, c in jobs if p.slots.numel()])
            self.backend.synchronize()
        finally:
            for entry in entries:
                self.cpu.release(entry)
        self.stats.retrieved_tokens += len(entries) * cs
        return len(entries) * cs

    # -- housekeeping -------------------------------------------------------------------------------

    def _check(self, kv: KVLayout, tokens: Tokens, slot_mapping: torch.Tensor) -> None:
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1:
            raise ValueError("slot_mapping must be a 1-D integer tensor with one slot per token")
        if len(slot_mapping) > len(tokens):
            raise ValueError(f"slot_mapping has {len(slot_mapping)} slots for {len(tokens)} tokens: at most one per token")
        kv.check(self.geometry)
        if (kv.head_start, kv.head_start + kv.num_heads) != self.head_range:
            raise LayoutError(
                f"the KV memory holds heads [{kv.head_start}, {kv.head_start + kv.num_heads}) but this engine serves "
                f"heads {list(self.head_range)}: create the engine with head_range=({kv.head_start}, {kv.head_start + kv.num_heads})"
            )

    def clear(self) -> int:
        """Drop the CPU tier's chunks (lower tiers keep theirs)."""
        return self.cpu.clear()

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        for wb in self.writeback.values():
            wb.close()
        for tier in self.lower:
            tier.close()
        self.cpu.clear()
