"""Segment KV between the cache and dense per-layer tensors: keys turned to canonical positions on the way in,
to the prompt's positions on the way out.

Buffers here are made as normal tensors even under an engine's ``torch.inference_mode`` (vLLM runs its step in
it): the backend's copy threads are not in inference mode, and may not write into inference tensors.

The dense form (a ``TokenSlotKV`` whose slot i is prompt position i) is what the blend step works on and
what an adapter copies to and from its engine's paged memory. Storing and loading go through the
``CacheEngine``'s chunk calls, so segments get the tiers, the canonical format and every integrity check
prefix chunks get; a segment is loaded only as far as its chunks form an unbroken, verified run.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lmcache.core.blend.rope import Rope
from lmcache.core.blend.segments import Segment
from lmcache.core.convert import plan_slots
from lmcache.core.engine import CacheEngine, StoreResult
from lmcache.core.geometry import KIND_MLA, KVGeometry
from lmcache.core.layouts import KVLayout, TokenSlotKV


@torch.inference_mode(False)
def dense_kv(geometry: KVGeometry, heads: tuple[int, int], num_tokens: int, device: torch.device | str = "cpu") -> TokenSlotKV:
    if geometry.kind == KIND_MLA:
        raise ValueError("blending needs per-head keys to re-rotate: MLA models (latent KV) are not supported")
    h = heads[1] - heads[0]
    k = [torch.zeros(num_tokens, h, geometry.k_dim, dtype=geometry.dtype, device=device) for _ in range(geometry.num_layers)]
    v = [torch.zeros(num_tokens, h, geometry.v_dim, dtype=geometry.dtype, device=device) for _ in range(geometry.num_layers)]
    return TokenSlotKV(k, v, head_start=heads[0])


@torch.inference_mode(False)
def _rotate_span(kv: TokenSlotKV, start: int, end: int, delta: int, rope: Rope | None) -> None:
    if rope is None or delta == 0 or end <= start:
        return
    d = torch.full((end - start,), delta, dtype=torch.int64)
    for k in kv.k:
        k[start:end] = rope.rotate(k[start:end], d)


@torch.inference_mode(False)
def save_segment(engine: CacheEngine, segment: Segment, kv: TokenSlotKV, rope: Rope | None, first: int = 0) -> StoreResult:
    """Store the full chunks of ``segment`` (from chunk ``first``) whose KV sits at its prompt positions in ``kv``."""
    cs = engine.chunk_size
    n = len(segment.keys) * cs
    if n == 0 or first >= len(segment.keys):
        return StoreResult(cs)
    own = TokenSlotKV([k[segment.start : segment.start + n].clone() for k in kv.k],
                      [v[segment.start : segment.start + n].clone() for v in (kv.v or [])], head_start=kv.head_start)
    _rotate_span(own, 0, n, -segment.start, rope)
    return engine.store_chunks(list(segment.keys), own, torch.arange(n, dtype=torch.int64), first=first)


@torch.inference_mode(False)
def load_segments(engine: CacheEngine, segments: Sequence[Segment], chunks: Sequence[int], kv: TokenSlotKV,
                  rope: Rope | None) -> torch.Tensor:
    """Load up to ``chunks[i]`` leading chunks of each segment into ``kv`` at its prompt positions (keys rotated
    there). Returns a bool per slot of ``kv``: true where cached KV was loaded."""
    cs = engine.chunk_size
    cached = torch.zeros(kv.num_slots, dtype=torch.bool)
    for seg, want in zip(segments, chunks):
        want = min(want, len(seg.keys), (kv.num_slots - seg.start) // cs)
        if want <= 0:
            continue
        slots = torch.arange(seg.start, seg.start + want * cs, dtype=torch.int64)
        got = engine.retrieve_chunks(list(seg.keys[:want]), kv, slots)
        _rotate_span(kv, seg.start, seg.start + got, seg.start, rope)
        cached[seg.start : seg.start + got] = True
    return cached


@torch.inference_mode(False)
def copy_tokens(backend: Any, src: KVLayout, src_slots: torch.Tensor, dst: KVLayout, dst_slots: torch.Tensor,
                geometry: KVGeometry) -> None:
    """Copy the KV of ``src_slots`` in ``src`` to ``dst_slots`` in ``dst`` (any two layouts, same heads), through one
    canonical buffer, with the engine's backend (``HardwareBackend`` gather/scatter)."""
    n = int(src_slots.numel())
    if n == 0:
        return
    heads = src.num_heads
    canonical = torch.empty(heads, geometry.num_layers, n, geometry.row_dim, dtype=geometry.dtype, device=src.device)
    backend.gather(src, [(plan_slots(src, src_slots), canonical)])
    backend.synchronize()
    backend.scatter(dst, [(plan_slots(dst, dst_slots), canonical)])
    backend.synchronize()
