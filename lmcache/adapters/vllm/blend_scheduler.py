"""The scheduler half of blending (``enable_blending``): which segments of a prompt are cached, how many
tokens the worker will blend, and when to store the prompt's segments.

A prompt's segments are cut at the separator's token ids, or given by the caller as token spans in the
request's ``kv_transfer_params`` (``{"lmcache_segments": [[start, end], ...]}``). The blended region runs
from the prompt's start to the end of the last cached chunk of any segment (at most the prompt's length
minus one: vLLM computes the last token itself); vLLM counts it as computed and the worker fills it in
before the forward. Segments are stored once the whole prompt has been computed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from lmcache.adapters.vllm.model import ModelView
from lmcache.adapters.vllm.plan import BlendPlan, RequestPlan
from lmcache.adapters.vllm.scheduler_side import Lookup, request_salt, walk_scheduled
from lmcache.core.blend.segments import SegmentHasher, check_spans, split_spans
from lmcache.core.config import LMCacheConfig

log = logging.getLogger("lmcache")
SPANS_PARAM = "lmcache_segments"
RATIO_PARAM = "lmcache_recompute_ratio"


@dataclass
class _Blended:
    request: Any
    plan: BlendPlan
    block_ids: list[int] = field(default_factory=list)
    load: tuple[int, int] | None = None
    saved: bool = False


class BlendScheduler:
    def __init__(self, config: LMCacheConfig, view: ModelView, lookup: Lookup, separator: list[int], *,
                 load: bool, save: bool) -> None:
        self.config = config
        self.view = view
        self.cs = config.chunk_size
        self.separator = separator
        self._lookup = lookup
        self.load_enabled = load
        self.save_enabled = save
        self._hashers: dict[str, SegmentHasher] = {}
        self._plans: dict[str, BlendPlan | None] = {}
        self._tracked: dict[str, _Blended] = {}
        self._epoch = ""

    def _plan_of(self, request: Any) -> BlendPlan | None:
        rid = request.request_id
        if rid in self._plans:
            return self._plans[rid]
        plan = None
        salt = request_salt(self.config, request)
        if salt is not None:
            if self._epoch:
                salt = f"{salt}\x1freset:{self._epoch}"
            tokens = list(request.prompt_token_ids)
            params = getattr(request, "kv_transfer_params", None) or {}
            try:
                spans = (check_spans(params[SPANS_PARAM], len(tokens)) if SPANS_PARAM in params
                         else split_spans(tokens, self.separator))
            except (ValueError, TypeError, IndexError) as e:
                log.warning("lmcache: %s: %s; the request is served without blending", rid, e)
                spans = []
            hasher = self._hashers.get(salt) or self._hashers.setdefault(salt, SegmentHasher(self.view.identity, self.cs, salt))
            segments = hasher.segments(tokens, spans)
            cached = [self._lookup(list(s.keys)) if self.load_enabled and s.keys else 0 for s in segments]
            plan = BlendPlan([(s.start, s.end) for s in segments], [s.keys for s in segments], cached,
                             ratio=self._ratio(rid, params))
        self._plans[rid] = plan
        return plan

    def _ratio(self, rid: str, params: dict) -> float | None:
        if RATIO_PARAM not in params:
            return None
        try:
            ratio = float(params[RATIO_PARAM])
            if 0.0 <= ratio <= 1.0:
                return ratio
        except (TypeError, ValueError):
            pass
        log.warning("lmcache: %s: kv_transfer_params %s = %r is not a fraction in 0..1; blend_recompute_ratio %g is used",
                    rid, RATIO_PARAM, params[RATIO_PARAM], self.config.blend_recompute_ratio)
        return None

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        plan = self._plan_of(request)
        if plan is None or not self.load_enabled:
            return 0, False
        ends = [s + c * self.cs for (s, _), c in zip(plan.spans, plan.cached) if c]
        from_cache = sum(c * self.cs for c in plan.cached)
        if not ends or from_cache < max(1, self.config.blend_min_tokens):
            return 0, False
        end = min(max(ends), request.num_tokens - 1)
        plan.region_end = end
        return (end - num_computed_tokens, False) if end > num_computed_tokens else (0, False)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        plan = self._plan_of(request)
        if plan is None:
            return
        t = self._tracked.get(request.request_id)
        if t is None:
            t = self._tracked[request.request_id] = _Blended(request, plan)
        t.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens > 0:
            local = plan.region_end - num_external_tokens
            t.load = (local, plan.region_end)
        else:
            t.load = None

    def build_plans(self, scheduler_output: Any) -> list[RequestPlan]:
        plans: list[RequestPlan] = []
        for t, done in walk_scheduled(scheduler_output, self._tracked):
            self._plan(t, done, plans)
        return plans

    def _plan(self, t: _Blended, computed_after_step: int, plans: list[RequestPlan]) -> None:
        prompt = list(t.request.prompt_token_ids)
        load, t.load = t.load, None
        save = (self.save_enabled and not t.saved and computed_after_step >= len(prompt)
                and any(c < len(k) for k, c in zip(t.plan.keys, t.plan.cached)))
        if save:
            t.saved = True
        if load is None and not save:
            return
        start, end = load or (0, 0)
        blend = BlendPlan(t.plan.spans, t.plan.keys, t.plan.cached, prompt[:end], end, save, t.plan.ratio)
        n = len(prompt) if save else end
        plans.append(RequestPlan(req_id=t.request.request_id, chunk_keys=[], block_ids=t.block_ids[: -(-n // self.view.block_size)],
                                 load_start=start, load_end=end, blend=blend))

    def reset(self) -> None:
        """As ``SchedulerSide.reset``: the weights changed, so segments move to a fresh key namespace."""
        import secrets

        self._epoch = secrets.token_hex(8)
        self._plans.clear()
        self._tracked.clear()

    def request_finished(self, request: Any) -> None:
        self._plans.pop(request.request_id, None)
        self._tracked.pop(request.request_id, None)
