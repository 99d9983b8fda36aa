"""The connector's scheduler half: answers "how much of this prompt is cached?" and plans the copies.

Runs in vLLM's scheduler process. It only looks up (never loads or pins); the worker half does the
copies the plan names. A request's chunk keys are hashed once and kept until the request finishes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from lmcache.adapters.vllm.model import ModelView
from lmcache.adapters.vllm.plan import RequestPlan
from lmcache.core import key_chain
from lmcache.core.config import LMCacheConfig
from lmcache.core.keys import ChunkHasher

log = logging.getLogger("lmcache")

#: lookup(chunk_keys) -> how many leading chunks are loadable now, for every TP shard
Lookup = Callable[[list[bytes]], int]
#: router_hash(token_ids, parent, lora_name, cache_salt) -> a KV-aware router's chained hashes of the full
#: blocks of token_ids
RouterHash = Callable[[list[int], "int | None", "str | None", "str | None"], list[int]]


@dataclass
class _Tracked:
    request: Any
    keys: list[bytes]
    block_ids: list[int] = field(default_factory=list)
    #: chunks [0, saved_chunks) are cached or planned to be stored
    saved_chunks: int = 0
    #: (start, end) tokens still to load, handed to the next step's plan
    load: tuple[int, int] | None = None
    #: the router's hashes of the prompt's blocks [0, len), extended as chunks are saved
    router_hashes: list[int] = field(default_factory=list)


def request_salt(config: LMCacheConfig, request: Any) -> str | None:
    """The key namespace of a request, or None when its KV is not a function of its tokens alone."""
    if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) is not None:
        return None  # image/audio placeholders or embeddings: equal token ids, different KV
    parts = [config.cache_salt]
    if getattr(request, "cache_salt", None):
        parts.append("salt:" + request.cache_salt)
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append("lora:" + str(getattr(lora, "lora_name", lora)))
    return "\x1f".join(parts)


def walk_scheduled(scheduler_output: Any, tracked: dict[str, Any]) -> Iterator[tuple[Any, int]]:
    """The tracked requests this step schedules (new, then running), their ``block_ids`` brought up to date, each
    with the number of its tokens computed once the step ends. A preempted request loses its blocks and its
    pending ``load`` (a resume brings new blocks and a new load)."""
    for preempted in scheduler_output.preempted_req_ids or ():
        t = tracked.get(preempted)
        if t is not None:
            t.load = None
            t.block_ids = []
    for new in scheduler_output.scheduled_new_reqs:
        t = tracked.get(new.req_id)
        if t is not None:
            t.block_ids = list(new.block_ids[0])
            yield t, new.num_computed_tokens + scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
    cached = scheduler_output.scheduled_cached_reqs
    for i, rid in enumerate(cached.req_ids):
        t = tracked.get(rid)
        if t is None:
            continue
        new_blocks = cached.new_block_ids[i]
        if rid in cached.resumed_req_ids:
            t.block_ids = list(new_blocks[0]) if new_blocks else []
        elif new_blocks:
            t.block_ids.extend(new_blocks[0])
        yield t, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens.get(rid, 0)


class SchedulerSide:
    def __init__(self, config: LMCacheConfig, view: ModelView, lookup: Lookup, *, load: bool, save: bool,
                 router_hash: RouterHash | None = None) -> None:
        self.config = config
        self.view = view
        self.cs = config.chunk_size
        key_chain.configure(config.native_keys, warm=True)  # loads the loop at startup, not in a request's lookup
        self.bs = view.block_size
        self._lookup = lookup
        self._router_hash = router_hash
        self.load_enabled = load
        self.save_enabled = save
        self._hashers: dict[str, ChunkHasher] = {}
        self._keys: dict[str, list[bytes] | None] = {}  # req_id -> prompt chunk keys (None: not cacheable)
        #: mixed into every key after a connector reset (see reset): "" until the first one
        self._epoch = ""
        self._last_match: dict[str, tuple[int, int]] = {}  # req_id -> (local computed, cached tokens)
        self._tracked: dict[str, _Tracked] = {}

    def _keys_of(self, request: Any) -> list[bytes] | None:
        rid = request.request_id
        if rid not in self._keys:
            salt = request_salt(self.config, request)
            if salt is not None and self._epoch:
                salt = f"{salt}\x1freset:{self._epoch}"
            if salt is None:
                self._keys[rid] = None
            else:
                hasher = self._hashers.get(salt) or self._hashers.setdefault(
                    salt, ChunkHasher(self.view.identity, self.cs, salt))
                self._keys[rid] = hasher.keys(request.prompt_token_ids)
        return self._keys[rid]

    # -- vLLM's scheduler calls, in its order -------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        keys = self._keys_of(request)
        if not self.load_enabled or not keys:
            return 0, False
        # vLLM must compute at least the last token itself, to sample from its logits
        limit = min(len(keys), (request.num_tokens - 1) // self.cs)
        cached = self._lookup(keys[:limit]) * self.cs if limit > 0 else 0
        if not self.save_enabled and cached < limit * self.cs and num_computed_tokens < limit * self.cs:
            # a decode instance (kv_consumer) expects the prefill instance's KV: say when it is not there
            log.info("lmcache: %s: %d of %d prompt tokens found in the pool (the prefill's KV was evicted, or the "
                     "pool restarted); vLLM computes the other %d here", request.request_id, cached,
                     request.num_tokens, request.num_tokens - max(cached, num_computed_tokens))
        self._last_match[request.request_id] = (num_computed_tokens, cached)
        extra = cached - num_computed_tokens
        return (extra, False) if extra > 0 else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        keys = self._keys_of(request)
        if keys is None:
            return
        local, cached = self._last_match.pop(request.request_id, (0, 0))
        t = self._tracked.get(request.request_id)
        if t is None:
            t = self._tracked[request.request_id] = _Tracked(request, keys)
        t.block_ids = list(blocks.get_block_ids()[0])
        t.saved_chunks = max(t.saved_chunks, cached // self.cs)
        t.load = (local, local + num_external_tokens) if num_external_tokens > 0 else None

    def build_plans(self, scheduler_output: Any) -> list[RequestPlan]:
        plans: list[RequestPlan] = []
        for t, done in walk_scheduled(scheduler_output, self._tracked):
            self._plan(t, done, plans)
        return plans

    def _plan(self, t: _Tracked, computed_after_step: int, plans: list[RequestPlan]) -> None:
        cs = self.cs
        load, t.load = t.load, None
        save_end = min(computed_after_step, len(t.request.prompt_token_ids)) // cs if self.save_enabled else 0
        save_first = t.saved_chunks
        if save_end > save_first:
            t.saved_chunks = save_end
        else:
            save_end = save_first
        if load is None and save_end == save_first:
            return
        load_start, load_end = load or (0, 0)
        n = max(load_end // cs, save_end)
        plan = RequestPlan(
            req_id=t.request.request_id,
            chunk_keys=t.keys[:n],
            block_ids=t.block_ids[: -(-n * cs // self.bs)],
            load_start=load_start,
            load_end=load_end,
            save_first=save_first,
            save_end=save_end,
        )
        if save_end > save_first and (self.view.kv_events or self._router_hash is not None):
            self._add_event_data(t, plan)
        plans.append(plan)

    def _add_event_data(self, t: _Tracked, plan: RequestPlan) -> None:
        cs, bs = self.cs, self.bs
        b0, b1 = plan.save_first * cs // bs, plan.save_end * cs // bs
        tokens = t.request.prompt_token_ids
        if self.view.kv_events:
            hashes = list(getattr(t.request, "block_hashes", ()))
            if len(hashes) >= b1:
                plan.block_hashes = [bytes(h) for h in hashes[b0:b1]]
                plan.parent_hash = bytes(hashes[b0 - 1]) if b0 > 0 else None
        if self._router_hash is not None:
            lora = getattr(t.request, "lora_request", None)
            plan.lora_name = getattr(lora, "lora_name", None) if lora is not None else None
            plan.cache_salt = getattr(t.request, "cache_salt", None) or None
            have = len(t.router_hashes)
            if have < b1:  # chained from the prompt's start: each block is hashed once per request
                t.router_hashes += self._router_hash(list(tokens[have * bs : b1 * bs]),
                                                     t.router_hashes[-1] if have else None,
                                                     plan.lora_name, plan.cache_salt)
            plan.router_hashes = t.router_hashes[b0:b1]
            plan.router_parent = t.router_hashes[b0 - 1] if b0 > 0 else None
        if plan.block_hashes or plan.router_hashes:
            plan.save_token_ids = list(tokens[plan.save_first * cs : plan.save_end * cs])

    def reset(self) -> None:
        """vLLM's ``reset_prefix_cache(reset_connector=True)``, which its engine core runs when generation is paused
        to update the weights: every chunk cached so far may be the KV of other weights, so none may be loaded
        again. The engine's keys move to a fresh namespace (a random epoch in the key scope): chunks stored before
        are never looked up by this engine again and age out of every tier; other engines sharing the pool are
        not touched (their weights did not change)."""
        import secrets

        self._epoch = secrets.token_hex(8)
        self._keys.clear()
        self._last_match.clear()
        self._tracked.clear()  # requests in flight are neither saved nor loaded under the old keys any more
        log.info("lmcache: connector reset: this engine's chunk keys moved to a new namespace; earlier chunks will "
                 "not be loaded again")

    def request_finished(self, request: Any) -> None:
        # saves complete inside the step that planned them (wait_for_save), so the blocks are free now
        rid = request.request_id
        self._tracked.pop(rid, None)
        self._keys.pop(rid, None)
        self._last_match.pop(rid, None)
