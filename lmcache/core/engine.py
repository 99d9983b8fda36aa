"""The cache engine: store, lookup and retrieve a prompt's KV by its tokens.

One engine serves one model identity and one head shard (a tensor-parallel rank's KV heads). The
engine's KV memory is described by a layout (``lmcache.core.layouts``) plus a slot per token; the
hardware backend moves the bytes. Only full chunks are stored (see ``lmcache.core.keys``).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from lmcache.core import key_chain
from lmcache.core.chunk_format import NO_PARENT, ChunkHeader, header_for
from lmcache.core.config import LMCacheConfig
from lmcache.core.convert import SlotPlan, plan_chunks
from lmcache.core.geometry import ModelIdentity
from lmcache.core.keys import ChunkHasher, ObjectKey
from lmcache.core.layouts import KVLayout, LayoutError
from lmcache.core.plugins import Registry, get_registry, open_store, select_backend
from lmcache.core.store import EXISTS, ChunkStore, Readable, Reservation, StoreRequest

log = logging.getLogger("lmcache")
Tokens = Sequence[int] | torch.Tensor


@dataclass
class StoreResult:
    chunk_size: int
    stored_chunks: int = 0
    existing_chunks: int = 0
    #: chunks not stored: no room in the pool, or tokens without a KV slot
    dropped_chunks: int = 0
    #: indices (into the chunk list) of the chunks this call stored
    stored_indices: list[int] = field(default_factory=list)

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
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _PendingWrite:
    """One chunk of a store between reserve and commit."""

    index: int  # into the call's chunk list
    key: ObjectKey
    header: ChunkHeader
    room: Reservation


@dataclass
class LayerwiseLoad:
    """A retrieve in flight, layer by layer (``CacheEngine.retrieve_chunks_by_layer``)."""

    #: tokens [0, end) hold cached KV once every layer has arrived
    end: int
    events: list[Any]  # one backend event per layer (None: nothing to wait for)
    backend: Any
    stack: ChunkStore
    entries: Sequence[Readable]
    done: bool = False

    def wait_layer(self, layer: int) -> None:
        if layer < len(self.events) and self.events[layer] is not None:
            self.backend.wait_event(self.events[layer])

    def finish(self) -> None:
        """Wait for every copy, then let the chunks go (they are pinned in their tier until now)."""
        if not self.done:
            self.done = True
            if self.events:
                self.backend.synchronize()
            self.stack.release_many(self.entries)


class CacheEngine:
    """Store, look up and retrieve a prompt's KV by its tokens, for one model identity and one head shard.

    Invariants: only full chunks are stored, each under a key naming its whole token prefix (keys.py), so
    a hit can never be the KV of other tokens; a load copies only chunks acquired from the store and lets
    them go after the copy (a store that cannot vouch for the copy makes it a miss); every failure path
    aborts or releases what it took. Not thread-safe: one caller at a time (adapters call it from their
    engine's step loop); the store beneath it is thread-safe.
    """

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
        key_chain.configure(config.native_keys)
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
        # the store for config.mode (inproc: TierStack; mp: the server's client), from the plugin that provides it
        self.stack: ChunkStore = open_store(
            StoreRequest(config, identity, self.head_range, self.backend.alloc_host, pin, registry), registry)
        self.stats = EngineStats()
        self._hashers: dict[str, ChunkHasher] = {}
        self._fingerprint = identity.fingerprint()
        self._prefetcher: ThreadPoolExecutor | None = None

    # -- the store --------------------------------------------------------------------------------

    @property
    def tier_problems(self) -> list[str]:
        """Tiers left out because they could not be opened (one line each)."""
        return self.stack.tier_problems

    def flush(self) -> None:
        """Wait until every queued write-back has reached its tier."""
        self.stack.flush()

    def tier_stats(self) -> dict[str, dict[str, int]]:
        return self.stack.tier_stats()

    # -- keys ---------------------------------------------------------------------------------------

    def hasher(self, salt: str | None = None) -> ChunkHasher:
        salt = self.config.cache_salt if salt is None else salt
        h = self._hashers.get(salt)
        if h is None:
            h = self._hashers[salt] = ChunkHasher(self.identity, self.chunk_size, salt)
        return h

    def object_key(self, chunk_key: bytes) -> ObjectKey:
        return ObjectKey(chunk_key, *self.head_range, self.geometry.num_kv_heads)

    def _header(self, chunk_key: bytes, parent_key: bytes = NO_PARENT) -> ChunkHeader:
        return header_for(self.geometry, self._fingerprint, chunk_key, self.chunk_size, *self.head_range, parent_key)

    # -- the three operations -----------------------------------------------------------------------

    def lookup(self, tokens: Tokens, salt: str | None = None) -> int:
        """How many leading tokens are cached in any tier (a multiple of chunk_size). No side effects."""
        hits = self.stack.count_prefix(self.hasher(salt).iter_keys(tokens), *self.head_range, self.geometry.num_kv_heads)
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(tokens)
        self.stats.lookup_hit_tokens += hits * self.chunk_size
        return hits * self.chunk_size

    def lookup_tiers(self, tokens: Tokens, salt: str | None = None) -> list[str]:
        """For each chunk of the cached prefix, the highest tier holding it ("cpu", "disk", "redis", ...)."""
        return self.stack.lookup_tiers(self.object_key(k) for k in self.hasher(salt).iter_keys(tokens))

    def prefetch(self, tokens: Tokens, salt: str | None = None) -> Future[int]:
        """Start pulling lower-tier hits of ``tokens`` up into the CPU tier; the future gives the number
        of leading tokens in the CPU tier when done."""
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="lmcache-prefetch")
        okeys = [self.object_key(k) for k in self.hasher(salt).keys(tokens)]
        return self._prefetcher.submit(lambda: self.stack.prefetch(okeys) * self.chunk_size)

    def store(self, tokens: Tokens, kv: KVLayout, slot_mapping: torch.Tensor, salt: str | None = None) -> StoreResult:
        """Store the full chunks of ``tokens`` whose KV sits at ``slot_mapping`` (one slot per token,
        -1 where the engine has none); chunks already cached are skipped, not rewritten."""
        self._check(kv, tokens, slot_mapping)
        keys = self.hasher(salt).keys(tokens[: (len(slot_mapping) // self.chunk_size) * self.chunk_size])
        return self.store_chunks(keys, kv, slot_mapping)

    def store_chunks(self, chunk_keys: Sequence[bytes], kv: KVLayout, slot_mapping: torch.Tensor, first: int = 0) -> StoreResult:
        """Store chunks by key: ``chunk_keys[i]`` names the tokens at ``slot_mapping[i*cs:(i+1)*cs]``.
        Chunks before index ``first`` are left alone (an adapter that knows they are cached already)."""
        self._check(kv, None, slot_mapping)
        cs = self.chunk_size
        result = StoreResult(cs)
        keys = list(chunk_keys[: len(slot_mapping) // cs])
        if len(keys) <= first:
            return result
        complete = (slot_mapping[: len(keys) * cs].view(len(keys), cs) >= 0).all(dim=1).tolist()
        wanted = []
        for i in range(first, len(keys)):
            if complete[i]:
                wanted.append((i, self.object_key(keys[i]), self._header(keys[i], keys[i - 1] if i else NO_PARENT)))
            else:
                result.dropped_chunks += 1
        answers = self.stack.reserve_many([(okey, h.payload_nbytes) for _, okey, h in wanted])
        pending: list[_PendingWrite] = []
        for (i, okey, header), answer in zip(wanted, answers):
            if answer is EXISTS:
                result.existing_chunks += 1
            elif answer is None:
                result.dropped_chunks += 1
            else:
                pending.append(_PendingWrite(i, okey, header, answer))
        try:
            plans = plan_chunks(kv, slot_mapping, [p.index for p in pending], cs)
            self.backend.gather(kv, [(plan, p.room.tensor(p.header.dtype, p.header.payload_shape))
                                     for p, plan in zip(pending, plans)])
            self.backend.synchronize()
        except BaseException:
            self.stack.abort(p.room for p in pending)
            raise
        committed = self.stack.commit_many([(p.key, p.header, p.room) for p in pending])
        result.stored_chunks = committed.stored
        if committed.refused:  # nothing of this commit is cached: nothing may be announced as stored
            result.dropped_chunks += committed.refused
        else:
            # a chunk another writer committed first is in the cache all the same, so it counts as stored here
            result.stored_indices = [p.index for p in pending]
            result.existing_chunks += len(pending) - result.stored_chunks
        self.stats.stored_tokens += result.stored_tokens
        self.stats.dropped_chunks += result.dropped_chunks
        return result

    def retrieve(self, tokens: Tokens, kv: KVLayout, slot_mapping: torch.Tensor, salt: str | None = None) -> int:
        """Load the cached prefix of ``tokens`` into ``slot_mapping``'s slots (-1: leave that token alone).
        Returns how many leading tokens now hold cached KV (a multiple of chunk_size)."""
        self._check(kv, tokens, slot_mapping)
        keys = self.hasher(salt).keys(tokens[: (len(slot_mapping) // self.chunk_size) * self.chunk_size])
        return self.retrieve_chunks(keys, kv, slot_mapping)

    def retrieve_chunks(self, chunk_keys: Sequence[bytes], kv: KVLayout, slot_mapping: torch.Tensor, first: int = 0) -> int:
        """Load the cached prefix of the chunks named by ``chunk_keys`` (see ``store_chunks``), starting at
        chunk ``first`` (earlier chunks are not read: the caller holds them already). Returns the end, in
        tokens, of what is now loaded; a chunk missing or corrupt in every tier ends it."""
        entries, jobs = self._acquire_jobs(chunk_keys, kv, slot_mapping, first)
        fenced = False
        try:
            self.backend.scatter(kv, jobs)
            self.backend.synchronize()
        finally:
            fenced = self.stack.release_many(entries)
        if not fenced:  # the read lease was lost before the copy ended: those bytes are not vouched for
            log.warning("lmcache: a read lease was lost during the load of %d chunks; they count as a miss", len(entries))
            return first * self.chunk_size
        self.stats.retrieved_tokens += len(entries) * self.chunk_size
        return (first + len(entries)) * self.chunk_size

    def _acquire_jobs(self, chunk_keys: Sequence[bytes], kv: KVLayout, slot_mapping: torch.Tensor,
                      first: int) -> tuple[Sequence[Readable], list[tuple[SlotPlan, torch.Tensor]]]:
        """The cached prefix's entries (acquired: the caller releases them) and their scatter jobs."""
        self._check(kv, None, slot_mapping)
        cs = self.chunk_size
        n = min(len(slot_mapping) // cs, len(chunk_keys))
        entries = self.stack.acquire_prefix(self.object_key(chunk_keys[i]) for i in range(first, n))
        try:
            plans = plan_chunks(kv, slot_mapping, list(range(first, first + len(entries))), cs)
        except BaseException:
            self.stack.release_many(entries)
            raise
        return entries, [(p, e.payload()) for p, e in zip(plans, entries) if p.slots.numel()]

    def retrieve_chunks_by_layer(self, chunk_keys: Sequence[bytes], kv: KVLayout, slot_mapping: torch.Tensor,
                                 first: int = 0) -> "LayerwiseLoad":
        """``retrieve_chunks`` whose copies run layer by layer behind the caller: the chunks are found (and
        read from lower tiers) now, each layer's copy is queued on the backend's copy stream, and
        ``wait_layer(i)`` makes the caller's stream wait for layer i only. ``finish()`` once the forward is
        done (it waits for the copies and releases the chunks). Backends without per-layer copies load
        every layer here."""
        entries, jobs = self._acquire_jobs(chunk_keys, kv, slot_mapping, first)
        cs = self.chunk_size
        try:
            by_layer = getattr(self.backend, "scatter_by_layer", None)
            if by_layer is not None and jobs:
                events = by_layer(kv, jobs)
            else:
                self.backend.scatter(kv, jobs)
                self.backend.synchronize()
                events = []
        except BaseException:
            self.backend.synchronize()
            self.stack.release_many(entries)
            raise
        self.stats.retrieved_tokens += len(entries) * cs
        return LayerwiseLoad((first + len(entries)) * cs, events, self.backend, self.stack, entries)

    def lookup_chunks(self, chunk_keys: Iterable[bytes], head_ranges: Iterable[tuple[int, int]] | None = None) -> int:
        """How many leading chunks are cached for every head range given (default: this engine's).
        A scheduler uses this to ask for all tensor-parallel shards at once. No side effects."""
        keys = list(chunk_keys)
        hits = len(keys)
        for h0, h1 in head_ranges or [self.head_range]:
            if hits == 0:
                break
            hits = min(hits, self.stack.count_prefix(keys[:hits], h0, h1, self.geometry.num_kv_heads))
        return hits

    # -- housekeeping -------------------------------------------------------------------------------

    def _check(self, kv: KVLayout, tokens: Tokens | None, slot_mapping: torch.Tensor) -> None:
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1:
            raise ValueError("slot_mapping must be a 1-D integer tensor with one slot per token")
        if tokens is not None and len(slot_mapping) > len(tokens):
            raise ValueError(f"slot_mapping has {len(slot_mapping)} slots for {len(tokens)} tokens: at most one per token")
        kv.check(self.geometry)
        if (kv.head_start, kv.head_start + kv.num_heads) != self.head_range:
            raise LayoutError(
                f"the KV memory holds heads [{kv.head_start}, {kv.head_start + kv.num_heads}) but this engine serves "
                f"heads {list(self.head_range)}: create the engine with head_range=({kv.head_start}, {kv.head_start + kv.num_heads})"
            )

    def clear(self) -> int:
        """Drop the CPU tier's chunks (lower tiers keep theirs)."""
        return self.stack.clear()

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        self.stack.close()
