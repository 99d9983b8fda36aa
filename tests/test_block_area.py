"""``BlockAreaKV``: engine memory whose blocks pack K and V in the engine's own order (vLLM's CPU attention)
moves to and from the canonical format bit-exact, every element where the index maps say."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvutil import random_bits

from lmcache.core.convert import gather, plan_slots, scatter
from lmcache.core.geometry import KVGeometry
from lmcache.core.layouts import BlockAreaKV, LayoutError


def area_kv(geometry: KVGeometry, blocks: int, block: int, heads: int, seed: int) -> BlockAreaKV:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(block * geometry.row_dim, generator=gen)
    k_index = order[: block * geometry.k_dim].view(block, geometry.k_dim)
    v_index = order[block * geometry.k_dim :].view(block, geometry.v_dim)
    layers = [torch.zeros(blocks, heads, block * geometry.row_dim, dtype=geometry.dtype) for _ in range(geometry.num_layers)]
    return BlockAreaKV(layers, k_index, v_index)


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]),
       block=st.sampled_from([4, 16, 32]), tokens=st.integers(1, 70), seed=st.integers(0, 1000))
def test_a_chunk_scattered_into_packed_blocks_gathers_back_bit_exact_and_lands_where_the_maps_say(dtype, block, tokens, seed):
    geometry = KVGeometry(2, 2, 8, 4, dtype)
    kv = area_kv(geometry, 12, block, 2, seed)
    kv.check(geometry)
    tokens = min(tokens, 12 * block)
    slots = torch.randperm(12 * block, generator=torch.Generator().manual_seed(seed))[:tokens]
    chunk = random_bits(torch.empty(2, 2, tokens, geometry.row_dim, dtype=dtype), seed)
    plan = plan_slots(kv, slots)
    scatter(kv, plan, chunk, range(2))
    back = torch.zeros_like(chunk)
    gather(kv, plan, back, range(2))
    assert torch.equal(back.view(torch.uint8), chunk.view(torch.uint8))
    t, b = int(slots[0]) % block, int(slots[0]) // block
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[dtype.itemsize]  # compare bits: random bits hold NaNs
    raw, want = kv.layers[1].view(bits), chunk[:, 1, 0].view(bits)
    assert torch.equal(raw[b, :, kv.k_index[t]], want[:, :8]) and torch.equal(raw[b, :, kv.v_index[t]], want[:, 8:])


def test_index_maps_that_do_not_place_every_element_once_are_refused():
    geometry = KVGeometry(1, 1, 4, 4, torch.float32)
    kv = area_kv(geometry, 2, 4, 1, 0)
    kv.v_index[0, 0] = kv.k_index[0, 0]
    with pytest.raises(LayoutError, match="exactly once"):
        kv.check(geometry)


def test_the_vllm_adapter_takes_the_cpu_layout_only_where_vllms_cpu_attention_serves_the_layers():
    from types import SimpleNamespace

    from lmcache.adapters.vllm.cpu_layout import cpu_attention

    def config(backend_name: str | None, isa: str | None = None):
        layer = SimpleNamespace(attn_backend=SimpleNamespace(get_name=lambda: backend_name), isa=isa) if backend_name else None
        context = {"model.layers.0.self_attn.attn": layer} if layer else {}
        return SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context=context))

    names = ("model.layers.0.self_attn.attn",)
    assert cpu_attention(config("CPU_ATTN", "vec"), names) == (True, "vec")
    assert cpu_attention(config("CPU_ATTN"), names) == (True, None)
    assert cpu_attention(config("FLASH_ATTN"), names) == (False, None)
    assert cpu_attention(config(None), names) == (False, None)  # no attention modules: a scheduler-only harness
