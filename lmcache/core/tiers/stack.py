"""The storage side of the cache: the CPU tier over a host-memory buffer, the lower tiers, write-back.

It works on object keys and memory objects only (no tokens, no engine layouts), so the same stack runs
inside an engine process (in-process mode) and inside ``lmcache server`` (MP mode, buffer in shared
memory). Operations are batched per request so that MP mode needs one round trip per step.
"""

from __future__ import annotations

import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch

from lmcache.core.chunk_format import ChunkCorrupt, ChunkHeader, byte_view
from lmcache.core.config import LMCacheConfig, remote_urls
from lmcache.core.head_cover import cover_plans
from lmcache.core.hookspecs import (
    BatchLookup,
    ParallelWrites,
    PrefixLookup,
    RangedLoad,
    StorageTier,
    TierUnavailable,
    hookimpl,
)
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
READ_THREADS = min(4, os.cpu_count() or 1)
#: remote objects read side by side (network-bound, not CPU-bound: measured 1.5x one at a time on S3 and 2 cores)
REMOTE_READS = 4
__all__ = ["EXISTS", "Committed", "TierStack"]
#: load(key, promote) -> the chunk's entry, acquired, or None
_Load = Callable[[ObjectKey, bool], "CpuEntry | None"]


class TierStack:
    """The in-process ``ChunkStore`` (``lmcache.core.store``): CPU tier, then disk, then the remote tiers in
    ``remote_url``'s order (e.g. Redis, then S3).

    Invariants: a chunk is in the CPU tier's index only once committed (readers never see a half-written
    chunk); memory with a reader's reference is never evicted or reused; a chunk leaving the CPU tier is
    offered to the disk tier first. Lock rules: the CPU tier's lock covers its index and eviction, so
    ``eviction_listeners`` run under it (they must be quick and must not call back into the stack); lower
    tiers are written by their write-back thread(s) (several for a ParallelWrites tier) and must be thread-safe.
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
        #: the remote tiers, highest first; ``remote`` is the first (or None)
        self.remotes = self._open_remotes(config, registry)
        self.remote = self.remotes[0] if self.remotes else None
        self.lower: list[StorageTier] = ([self.disk] if self.disk is not None else []) + self.remotes
        #: tier name -> rank, highest first (the remote tiers below the local ones, in their configured order)
        self._rank = {"cpu": 0, "disk": 1} | {t.name: 2 + n for n, t in enumerate(self.remotes)}
        # decided once: a Protocol isinstance check costs more than the rest of a prompt's lookup
        self._batch: dict[str, BatchLookup] = {t.name: t for t in self.remotes if isinstance(t, BatchLookup)}
        self._leading: dict[str, PrefixLookup] = {t.name: t for t in self.remotes if isinstance(t, PrefixLookup)}
        self._ranged: dict[str, RangedLoad] = {t.name: t for t in self.lower if isinstance(t, RangedLoad)}
        # write-back may pin at most a quarter of the CPU pool, shared by the lower tiers
        share = self.cpu.pool.capacity // 4 // max(1, len(self.lower))
        self.writeback = {t.name: WriteBack(t, config.writeback_queue_size, share,
                                            t.write_workers if isinstance(t, ParallelWrites) else 1)
                          for t in self.lower}
        # disk reads release the GIL: several in flight read a batch faster than one after another
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="lmcache-read")
        self._remote_readers = (ThreadPoolExecutor(REMOTE_READS, thread_name_prefix="lmcache-remote-read")
                                if self.remotes else None)
        if config.prefault_cpu_memory:
            # in the background, free memory only (HostMemoryPool.prefault); started last, once nothing above can
            # fail: a caller that unmaps the buffer after a failed start (the server's shared memory) must find no
            # thread writing to it
            self.cpu.pool.prefault()

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
    def _open_remotes(config: LMCacheConfig, registry: "Registry") -> list[StorageTier]:
        tiers: list[StorageTier] = []
        try:
            for url in remote_urls(config):
                tiers.append(open_remote(url, config, registry))
                names = [t.name for t in tiers]
                if len(set(names)) < len(names) or "cpu" in names or "disk" in names:
                    raise ValueError(f"remote_url '{config.remote_url}': two remote tiers named '{names[-1]}'; "
                                     "list each kind of store once")
        except BaseException:
            for t in tiers:
                t.close()
            raise
        return tiers

    # -- movement between tiers ---------------------------------------------------------------------

    def _demote(self, entry: CpuEntry) -> None:
        """A chunk leaving the CPU tier goes to disk unless it is there or on its way already."""
        to_disk = self.disk is not None
        if self.disk is not None and not self.disk.contains(entry.key):
            to_disk = self.writeback["disk"].offer(entry)
        for listener in list(self.eviction_listeners):
            listener(entry.key, "disk" if to_disk else None)

    def _from_lower(self, okey: ObjectKey, promote: bool, tiers: list[StorageTier] | None = None) -> CpuEntry | None:
        """Load a chunk from the first lower tier (of ``tiers``, default all) holding it; the entry comes back
        acquired."""
        for tier in self.lower if tiers is None else tiers:
            entry = self._from_tier(tier, okey, promote)
            if entry is not None:
                return entry
        return None

    def _from_tier(self, tier: StorageTier | None, okey: ObjectKey, promote: bool) -> CpuEntry | None:
        """Load a chunk from ``tier`` into the pool (committed to the CPU tier when ``promote``); acquired."""
        if tier is None:
            return None
        got = tier.load(okey, self.cpu.reserve)
        if got is None:
            return None
        header, obj = got
        if not promote:
            return CpuEntry(okey, header, obj)  # private: freed when released
        if self.cpu.commit(okey, header, obj):
            entry = self.cpu.acquire(okey, count=False)
            if entry is not None:  # a hit is kept in the tiers above the one it came from (local disk, Redis)
                for above in self.lower[: self.lower.index(tier)]:
                    self.writeback[above.name].offer(entry)
            return entry
        return self.cpu.acquire(okey, count=False)

    # -- batched operations -------------------------------------------------------------------------

    def lookup_tiers(self, okeys: Iterable[ObjectKey]) -> list[str]:
        """For each key of the cached prefix, the highest tier holding it (for a chunk served by shards of
        another TP size, the lowest tier among its pieces). No side effects."""
        where: list[str] = []
        it = iter(okeys)  # lazily: keys after the first miss are not even hashed
        for okey in it:
            tier = self._local_where(okey)
            if tier is None and okey.total_heads:
                tier = self._cover_where(okey, self._local_where)
            if tier is None:
                if self.remotes:  # one round trip per tier for the rest of the prompt (where the tier can)
                    where.extend(self._remote_lookup([okey, *it]))
                break
            where.append(tier)
        return where

    def count_prefix(self, chunks: Iterable[bytes], head_start: int, head_end: int, total_heads: int) -> int:
        it = iter(chunks)
        n, missing = self.cpu.leading(it, (head_start, head_end))
        if missing is None:
            return n
        rest = (ObjectKey(c, head_start, head_end, total_heads) for c in itertools.chain((missing,), it))
        return n + len(self.lookup_tiers(rest))

    def _local_where(self, okey: ObjectKey) -> str | None:
        if self.cpu.contains(okey):
            return "cpu"
        if self.disk is not None and self.disk.contains(okey):
            return "disk"
        return None

    def _remote_has(self, keys: list[ObjectKey], prefix: bool = False) -> list[str | None]:
        """For each key, the highest remote tier holding it, or None: one batched question per tier, each
        lower tier asked only about what the ones above it lack. ``prefix``: the keys are a prompt's chunks in
        order and only their leading run matters (a tier with ``PrefixLookup`` finds it in fewer round trips)."""
        where: list[str | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for tier in self.remotes:
            if not todo:
                break
            batch, leading = self._batch.get(tier.name), self._leading.get(tier.name)
            asked = [keys[i] for i in todo]
            if prefix and leading is not None:
                n = leading.leading(asked)
                found = [i < n for i in range(len(asked))]
            else:
                found = batch.contains_many(asked) if batch is not None else [tier.contains(k) for k in asked]
            for i, f in zip(todo, found):
                if f:
                    where[i] = tier.name
            todo = [i for i, f in zip(todo, found) if not f]
        return where

    def _remote_lookup(self, rest: list[ObjectKey]) -> list[str]:
        """The cached prefix of ``rest`` (the first key missed the local tiers) with the remote tiers: exact
        objects in one round trip per tier; a chunk only other TP sizes stored costs one more for its candidate
        shards, and the shards that served it are asked for the rest of the prompt in one round trip."""
        exact = self._remote_has(rest, prefix=True)
        known: dict[ObjectKey, str | None] = {}
        where: list[str] = []
        for n, (okey, found) in enumerate(zip(rest, exact)):
            tier = found or self._local_where(okey)
            if tier is None and okey.total_heads:
                plans = cover_plans(okey.head_start, okey.head_end, okey.total_heads)
                wanted = [p for plan in plans for p in self._pieces(okey, plan) if p not in known]
                if wanted:
                    known.update(zip(wanted, self._remote_has(wanted)))
                tier = self._cover_where(okey, lambda p: self._local_where(p) or known.get(p))
                if tier is not None:  # the same split most likely serves the rest: ask for it in one go
                    ahead = [p for later, f in zip(rest[n + 1 :], exact[n + 1 :]) if not f
                             for plan in plans[:1] for p in self._pieces(later, plan) if p not in known]
                    known.update(zip(ahead, self._remote_has(ahead)))
            if tier is None:
                break
            where.append(tier)
        return where

    @staticmethod
    def _pieces(okey: ObjectKey, plan: tuple[tuple[int, int], ...]) -> list[ObjectKey]:
        return [ObjectKey(okey.chunk, p0, p1, okey.total_heads) for p0, p1 in plan]

    def _cover_where(self, okey: ObjectKey, where: Callable[[ObjectKey], str | None]) -> str | None:
        """The tier a chunk is served from by shards of other TP sizes (the lowest among its pieces), or None."""
        for plan in cover_plans(okey.head_start, okey.head_end, okey.total_heads):
            tiers = [where(p) for p in self._pieces(okey, plan)]
            if all(tiers):
                return max(tiers, key=lambda t: self._rank.get(t or "", len(self._rank)))
        return None

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
        """Entries of the cached prefix, each with a reader's reference (release_many them). A run of chunks
        on local disk or on remote tiers only is read in parallel (``_lower_run``); a chunk stored only by engines
        of other TP sizes is assembled from their shards (``_assemble``)."""
        return self._acquire(list(okeys), self.config.promote_on_hit if promote is None else promote, True)

    def _acquire(self, keys: list[ObjectKey], promote: bool, count: bool) -> list[CpuEntry]:
        entries: list[CpuEntry] = []
        i, alone = 0, -1
        while i < len(keys):
            okey = keys[i]
            entry = self.cpu.acquire(okey, count=count and i != alone)
            if entry is None and i != alone:
                run, load, readers = self._lower_run(keys, i)
                if len(run) > 1:
                    if count:  # the run's other chunks miss the CPU tier too
                        self.cpu.stats.misses += len(run) - 1
                    got = list(readers.map(lambda k: load(k, promote), run))
                    ended = next((n for n, e in enumerate(got) if e is None), len(got))
                    entries.extend(e for e in got[:ended] if e is not None)
                    self.release_many(e for e in got[ended:] if e is not None)  # past a gap: not part of the prefix
                    i += ended
                    if ended < len(got):  # a gap: tried once more on its own (another tier, shards of other TP sizes)
                        alone = i
                    continue
            if entry is None and self.lower:
                entry = self._from_lower(okey, promote)
            if entry is None and okey.total_heads:
                entry = self._assemble(okey, promote)
            if entry is None:
                break
            entries.append(entry)
            i += 1
        return entries

    def _lower_run(self, keys: list[ObjectKey], start: int) -> tuple[list[ObjectKey], _Load, ThreadPoolExecutor]:
        """keys[start:j]: the chunks from ``start`` on that are not in the CPU tier and can be read side by side,
        each into its own pool memory, with how to read one and the threads to read them with: a run on local
        disk (disk reads release the GIL), else, with remote tiers, a run on none of the local tiers (each
        remote read waits on the network: several in flight hide its latency). The keys come from a lookup,
        so they are expected to be there; a gap ends the prefix and what was read past it is let go."""
        on_disk = self.disk is not None and not self.cpu.contains(keys[start]) and self.disk.contains(keys[start])
        if on_disk:
            limit, readers = 4 * READ_THREADS, self._readers
            load: _Load = lambda k, p: self._from_tier(self.disk, k, p)
        elif self._remote_readers is not None:  # not on local disk (checked per key below): ask the remote tiers only
            limit, readers = 2 * REMOTE_READS, self._remote_readers
            load = lambda k, p: self._from_lower(k, p, self.remotes)
        else:
            return [], self._from_lower, self._readers
        run: list[ObjectKey] = []
        for okey in keys[start : start + limit]:
            if self.cpu.contains(okey) or on_disk != (self.disk is not None and self.disk.contains(okey)):
                break
            run.append(okey)
        return run, load, readers

    def _assemble(self, okey: ObjectKey, promote: bool) -> CpuEntry | None:
        """Heads [a, b) of a chunk from shards other TP sizes stored (``head_cover``), into one new object in
        the pool: each piece's heads are read straight into their place (a ranged read from disk or remote,
        a copy from the CPU tier) and verified against that piece's head checksums. Committed to the CPU tier
        when ``promote`` (the next read is an exact hit); the entry comes back acquired."""
        a, b = okey.head_start, okey.head_end
        for plan in cover_plans(a, b, okey.total_heads):
            pieces = self._pieces(okey, plan)
            if not all(self._local_where(p) or any(t.contains(p) for t in self.remotes) for p in pieces):
                continue
            target: list[tuple[ChunkHeader, MemoryObj]] = []

            def dest_for(lo: int, hi: int) -> Callable[[ChunkHeader], memoryview | None]:
                def dest(piece: ChunkHeader) -> memoryview | None:
                    # the piece's header, as the header of heads [a, b) of the same chunk
                    wanted = piece.replace(head_start=a, head_end=b, payload_nbytes=piece.head_nbytes * (b - a),
                                           checksum=0, part_nbytes=0)
                    if not target:
                        obj = self.cpu.reserve(wanted.payload_nbytes)
                        if obj is None:
                            return None
                        target.append((wanted, obj))
                    header, obj = target[0]
                    if wanted.replace(parent_key=header.parent_key) != header:  # parents may be unknown to some writers
                        raise ChunkCorrupt("shards of one chunk disagree on its shape")
                    at = (lo - a) * header.head_nbytes
                    return byte_view(obj.raw)[at : at + (hi - lo) * header.head_nbytes]
                return dest

            ok = True
            for piece in pieces:
                lo, hi = max(a, piece.head_start), min(b, piece.head_end)
                try:
                    ok = self._read_heads(piece, lo, hi, dest_for(lo, hi))
                except ChunkCorrupt as e:
                    log.warning("lmcache: chunk %s not assembled from shards: %s", okey, e)
                    ok = False
                if not ok:
                    break
            if not target:
                continue
            header, obj = target[0]
            if not ok:
                obj.unref()
                continue
            if not promote:
                return CpuEntry(okey, header, obj)  # private: freed when released
            self.cpu.commit(okey, header, obj)
            entry = self.cpu.acquire(okey, count=False)
            if entry is not None:
                return entry
        return None

    def _read_heads(self, piece: ObjectKey, lo: int, hi: int, dest: Callable[[ChunkHeader], memoryview | None]) -> bool:
        """Heads [lo, hi) of one stored shard into ``dest(header)``, from the highest tier holding it."""
        def copy_heads(header: ChunkHeader, whole: MemoryObj) -> bool:  # from a whole object in memory
            view = dest(header)
            if view is None:
                return False
            per, first = header.head_nbytes, lo - piece.head_start
            view[:] = byte_view(whole.raw)[first * per : (first + hi - lo) * per]
            return True

        entry = self.cpu.acquire(piece, count=False)
        if entry is not None:
            try:
                return copy_heads(entry.header, entry.obj)
            finally:
                self.cpu.release(entry)
        for tier in self.lower:
            ranged = self._ranged.get(tier.name)
            if ranged is not None:
                if ranged.load_heads(piece, lo, hi, dest) is not None:
                    return True
                continue
            got = tier.load(piece, self.cpu.reserve)  # a tier without ranged reads: the whole object, then its heads
            if got is not None:
                try:
                    return copy_heads(*got)
                finally:
                    got[1].unref()
        return False

    def release_many(self, entries: Iterable[Readable]) -> bool:
        """Drop readers' references; True (in-process, a reference cannot be lost)."""
        for entry in entries:
            if not isinstance(entry, CpuEntry):
                raise TypeError(f"release of a {type(entry).__name__}: this stack releases only its own entries")
            self.cpu.release(entry)
        return True

    def prefetch(self, okeys: Iterable[ObjectKey]) -> int:
        """Pull lower-tier hits into the CPU tier; returns how many leading keys are now there."""
        entries = self._acquire(list(okeys), promote=True, count=False)
        self.release_many(entries)
        return len(entries)

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
        self.cpu.pool.close()
        self._readers.shutdown(wait=True)
        if self._remote_readers is not None:
            self._remote_readers.shutdown(wait=True)
        for wb in self.writeback.values():
            wb.close()
        for tier in self.lower:
            tier.close()
        self.cpu.clear()


def open_remote(url: str, config: LMCacheConfig, registry: "Registry") -> StorageTier:
    """The remote tier for one URL, by its scheme's registered plugin (checked against the protocol)."""
    scheme = url.split("://", 1)[0].lower()
    spec = registry.tiers.get(scheme)
    if spec is None:
        raise ValueError(f"remote_url '{url}': no storage tier handles '{scheme}://'; "
                         f"registered schemes: {', '.join(sorted(registry.tiers))}")
    tier = spec.factory(url, config)
    if not isinstance(tier, StorageTier):
        missing = [m for m in ("name", "stats", "contains", "load", "put", "remove", "close") if not hasattr(tier, m)]
        raise ValueError(f"the storage tier plugin for '{scheme}://' returned a {type(tier).__name__} without "
                         f"{', '.join(missing)}: it must implement lmcache.core.hookspecs.StorageTier")
    return tier


def _open(request: StoreRequest) -> TierStack:
    capacity = int(request.config.max_cpu_size_gb * 2**30)
    return TierStack(request.config, request.alloc_host(capacity, request.pin), request.pin, request.registry)


@hookimpl
def lmcache_chunk_stores() -> list[ChunkStoreSpec]:
    return [ChunkStoreSpec("inproc", _open, "the pool inside the engine process, tiers cpu -> disk -> remote")]
