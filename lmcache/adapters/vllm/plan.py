"""What the scheduler tells the workers each step: per request, which chunks to load and to save.

Plain data (pickled by vLLM from the scheduler process to every worker). Positions are token indices
into the request; chunk indices count ``chunk_size`` tokens; blocks are vLLM's KV cache block ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class BlendPlan:
    """A blended request (``enable_blending``): its segments and what of them is cached or to be stored.

    Segment i is tokens ``spans[i]`` of the prompt with chunk keys ``keys[i]``; ``cached[i]`` leading chunks
    of it are in the cache. A load blends tokens [0, region_end): ``tokens`` are those tokens. A save stores
    chunks ``cached[i]..`` of every segment (``save``), once the whole prompt has been computed."""

    spans: list[tuple[int, int]]
    keys: list[tuple[bytes, ...]]
    cached: list[int]
    tokens: list[int] = field(default_factory=list)
    region_end: int = 0
    save: bool = False
    #: the request's own recompute ratio (``kv_transfer_params`` ``lmcache_recompute_ratio``); None: the config's
    ratio: float | None = None


@dataclass
class RequestPlan:
    req_id: str
    #: keys of the request's chunks 0 .. n-1, enough to cover the load and the save below
    chunk_keys: list[bytes]
    #: the request's block ids covering tokens [0, n * chunk_size)
    block_ids: list[int]
    #: tokens [load_start, load_end) are loaded; load_end is chunk-aligned (0, 0: no load)
    load_start: int = 0
    load_end: int = 0
    #: chunks [save_first, save_end) are stored (equal: no save)
    save_first: int = 0
    save_end: int = 0
    #: for KV events: vLLM's block hashes of the saved chunks' blocks, with the one before them first
    #: (None at the start of the prompt), and the saved tokens
    block_hashes: list[bytes] = field(default_factory=list)
    parent_hash: bytes | None = None
    save_token_ids: list[int] = field(default_factory=list)
    #: for router events (``router_events``): the router's hashes of the saved chunks' blocks and of the
    #: block before them (computed by the scheduler, which has the whole prompt)
    router_hashes: list[int] = field(default_factory=list)
    router_parent: int | None = None
    #: the request's namespace as the router hashes it
    lora_name: str | None = None
    cache_salt: str | None = None
    #: a blended request: load_start/load_end are the blended region, the chunk fields are unused
    blend: BlendPlan | None = None

    def slot_mapping(self, block_size: int, num_tokens: int) -> torch.Tensor:
        """Slot of each token [0, num_tokens): ``block_ids[pos // block_size] * block_size + pos % block_size``.
        The same flat slot indexes vLLM's kernel-block views (a block split into kernel blocks keeps
        its tokens in order), so the manager's block size is the one to use."""
        pos = torch.arange(num_tokens, dtype=torch.int64)
        blocks = torch.tensor(self.block_ids, dtype=torch.int64)
        return blocks[pos // block_size] * block_size + pos % block_size

    def blocks_of(self, start: int, end: int, block_size: int) -> set[int]:
        """Block ids holding tokens [start, end)."""
        if end <= start:
            return set()
        return set(self.block_ids[start // block_size : (end - 1) // block_size + 1])
