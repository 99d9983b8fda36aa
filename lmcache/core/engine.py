"""The cache engine: store, lookup and retrieve a prompt's KV by its tokens.

One engine serves one model identity and one head shard (a tensor-parallel rank's KV heads). The
engine's KV memory is described by a layout (``lmcache.core.layouts``) plus a slot per token; the
hardware backend moves the bytes. Only full chunks are stored (see ``lmcache.core.keys``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lmcache.core.chunk_format import ChunkHeader, header_for
from lmcache.core.config import LMCacheConfig
from lmcache.core.convert import plan_slots
from lmcache.core.geometry import ModelIdentity
from lmcache.core.keys import ChunkHasher, ObjectKey
from lmcache.core.layouts import KVLayout, LayoutError
from lmcache.core.memory_pool import HostMemoryPool
from lmcache.core.plugins import Registry, get_registry, select_backend
from lmcache.core.tiers.cpu import CpuTier

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
        self.cpu = CpuTier(HostMemoryPool(capacity, pin, buffer=self.backend.alloc_host(capacity, pin)))
        self.stats = EngineStats()
        self._hashers: dict[str, ChunkHasher] = {}

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
        """How many leading tokens are cached (a multiple of chunk_size). No side effects."""
        hits = 0
        for key in self.hasher(salt).iter_keys(tokens):
            if not self.cpu.contains(self.object_key(key)):
                break
            hits += 1
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(tokens)
        self.stats.lookup_hit_tokens += hits * self.chunk_size
        return hits * self.chunk_size

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
            entry = self.cpu.acquire(self.object_key(key))
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
        return self.cpu.clear()

    def close(self) -> None:
        self.cpu.clear()
