"""The store contract: everything the cache engine and its adapters need from where chunks live.

The engine works on tokens, layouts and copies; a ``ChunkStore`` works on object keys and pool memory.
Two stores exist: ``TierStack`` (in-process: a CPU tier over a host buffer, lower tiers below it) and
``ServerStack`` (mp mode: ``lmcache server`` owns the pool, this process maps it). A store is picked by the
config's ``mode`` through the ``lmcache_chunk_stores`` hook, so the core never imports the server, and a
vendor can register a store of its own the same way.

Every write is reserve -> fill -> commit (or abort); every read is acquire -> copy -> release. Between
them the memory is the caller's alone: a reservation is never handed to another writer, an acquired
chunk is never freed or overwritten. ``release_many`` returning False means the store cannot vouch that
the chunk stayed the caller's for the whole copy: the caller treats those bytes as a miss.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence, Union, runtime_checkable

if TYPE_CHECKING:
    import torch

    from lmcache.core.chunk_format import ChunkHeader
    from lmcache.core.config import LMCacheConfig
    from lmcache.core.geometry import ModelIdentity
    from lmcache.core.keys import ObjectKey
    from lmcache.core.plugins import Registry


class Exists(enum.Enum):
    """``reserve_many``'s answer for a chunk that is stored already (nothing to write)."""

    EXISTS = "exists"


EXISTS = Exists.EXISTS


@dataclass(frozen=True)
class Committed:
    """What ``commit_many`` did: ``stored`` chunks are new; ``refused`` ones are not cached at all (a lost
    lease, a server that went away); the rest were committed first by another writer (cached all the same)."""

    stored: int
    refused: int = 0


class Reservation(Protocol):
    """Room for one chunk's payload, the caller's to fill until it commits or aborts."""

    nbytes: int

    def tensor(self, dtype: "torch.dtype", shape: tuple[int, ...]) -> "torch.Tensor": ...


class Readable(Protocol):
    """One acquired chunk: its header and payload, unchanging until released."""

    @property
    def header(self) -> "ChunkHeader": ...

    def payload(self) -> "torch.Tensor": ...


#: listener(key, "disk" or None): a chunk left the CPU tier (to disk, or out of this machine's tiers)
EvictionListener = Callable[["ObjectKey", Union[str, None]], None]
ReserveAnswer = Union[Reservation, Exists, None]


@runtime_checkable
class ChunkStore(Protocol):
    """Where chunks live, as the engine sees it (see the module docstring)."""

    #: called for every chunk that leaves the CPU tier; in-process as it happens (under the CPU tier's lock:
    #: listeners must be quick and must not call back into the store), in mp mode from ``poll_evictions``
    eviction_listeners: list[EvictionListener]

    @property
    def tier_problems(self) -> list[str]:
        """Tiers that could not be opened and are left out, one line each (never fatal)."""

    def lookup_tiers(self, okeys: Iterable["ObjectKey"]) -> list[str]:
        """For each key of the cached prefix, the highest tier holding it. No side effects."""

    def count_prefix(self, chunks: Iterable[bytes], head_start: int, head_end: int, total_heads: int) -> int:
        """How many leading chunks (chunk keys, one head range of a model with ``total_heads``) are cached in
        any tier: ``len(lookup_tiers(...))`` without an ObjectKey per chunk on the hot path of every
        scheduler lookup. Consumes ``chunks`` only up to the first miss. No side effects."""

    def reserve_many(self, items: Sequence[tuple["ObjectKey", int]]) -> list[ReserveAnswer]:
        """Per (key, payload bytes): a Reservation, EXISTS, or None (no room: then for every later item too)."""

    def abort(self, reservations: Iterable[object]) -> None:
        """Give back reservations that will not be committed (anything else in the iterable is ignored)."""

    def commit_many(self, items: Sequence[tuple["ObjectKey", "ChunkHeader", Reservation]]) -> Committed:
        """Publish filled reservations (each store accepts only the reservations it handed out)."""

    def acquire_prefix(self, okeys: Iterable["ObjectKey"], promote: bool | None = None) -> Sequence[Readable]:
        """The cached prefix of ``okeys``, each chunk held for the caller until ``release_many``."""

    def release_many(self, entries: Iterable[Readable]) -> bool:
        """Let acquired chunks go; False when the store cannot vouch they stayed the caller's throughout."""

    def prefetch(self, okeys: Iterable["ObjectKey"]) -> int:
        """Pull lower-tier hits into the CPU tier; how many leading keys are there now."""

    def poll_evictions(self) -> int:
        """Deliver evictions that happened elsewhere (mp: in the server) to ``eviction_listeners``; returns
        how many. In-process stores deliver them as they happen and return 0."""

    def flush(self) -> None:
        """Wait until queued write-backs have reached their tiers."""

    def tier_stats(self) -> dict[str, dict[str, int]]: ...

    def queue_depths(self) -> dict[str, int]:
        """Chunks waiting for each lower tier."""

    def clear(self) -> int:
        """Drop the CPU tier's chunks (lower tiers keep theirs); how many were dropped."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class StoreRequest:
    """What a store factory gets: the engine's config, model shard, and how to get host memory."""

    config: "LMCacheConfig"
    identity: "ModelIdentity"
    head_range: tuple[int, int]
    #: alloc_host(nbytes, pin) -> a uint8 host buffer (the hardware backend's: pinned where it matters)
    alloc_host: Callable[[int, bool], "torch.Tensor"]
    pin: bool
    #: the plugin registry the engine uses (storage tiers for remote_url come from it)
    registry: "Registry"


@dataclass(frozen=True)
class ChunkStoreSpec:
    """A store for ``mode: <mode>`` (``inproc`` and ``mp`` are built in)."""

    mode: str
    factory: Callable[[StoreRequest], ChunkStore]
    doc: str = ""
