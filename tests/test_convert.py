"""Engine layout -> canonical chunk -> engine layout, bit-exact, for every layout, dtype and geometry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kvutil import DTYPES, VLLM_ORDERS, read_token, same_tokens, sglang_host_layout, sglang_layout, slots_for, vllm_layout

from lmcache.core import convert
from lmcache.core.config import load_config
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import KIND_MHA, KIND_MLA, KVGeometry, ModelIdentity

LAYOUTS = [*VLLM_ORDERS, "sglang", "sglang-host/layer_first", "sglang-host/page_first"]


@st.composite
def geometries(draw):
    kind = draw(st.sampled_from([KIND_MHA, KIND_MLA]))
    layers = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    if kind == KIND_MLA:
        return KVGeometry(layers, 1, draw(st.integers(1, 24)), 0, dtype, KIND_MLA)
    return KVGeometry(layers, draw(st.integers(1, 4)), draw(st.integers(1, 16)), draw(st.integers(1, 16)), dtype)


def build(kind: str, geometry: KVGeometry, num_slots: int, block_size: int, seed: int):
    if kind == "sglang":
        return sglang_layout(geometry, num_slots, seed)
    if kind.startswith("sglang-host/"):
        return sglang_host_layout(geometry, num_slots, seed, kind.split("/")[1])
    return vllm_layout(kind, geometry, num_slots // block_size, block_size, seed)


def engine_for(geometry: KVGeometry, chunk_size: int) -> CacheEngine:
    cfg = load_config(env={}, overrides={"chunk_size": chunk_size, "max_cpu_size_gb": 0.02})
    return CacheEngine(cfg, ModelIdentity("test-model", geometry), device="cpu")


@given(
    geometry=geometries(),
    src_kind=st.sampled_from(LAYOUTS),
    dst_kind=st.sampled_from(LAYOUTS),
    block_size=st.sampled_from([1, 2, 4, 8, 16]),
    blocks_per_chunk=st.integers(1, 3),
    num_chunks=st.integers(1, 3),
    tail=st.integers(0, 5),
    whole_blocks=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_bit_exact(geometry, src_kind, dst_kind, block_size, blocks_per_chunk, num_chunks, tail,
                                 whole_blocks, seed):
    chunk_size = block_size * blocks_per_chunk
    tail %= chunk_size  # a partial chunk only
    num_tokens = num_chunks * chunk_size + tail
    num_slots = (num_tokens // block_size + 4) * block_size * 2
    src = build(src_kind, geometry, num_slots, block_size, seed)
    dst = build(dst_kind, geometry, num_slots, block_size, seed + 1)
    src_slots = slots_for(num_tokens, num_slots, block_size, whole_blocks, seed)
    dst_slots = slots_for(num_tokens, num_slots, block_size, not whole_blocks, seed + 2)
    tokens = torch.randint(0, 50000, (num_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()

    engine = engine_for(geometry, chunk_size)
    assert engine.store(tokens, src, src_slots).stored_chunks == num_chunks
    assert engine.lookup(tokens) == num_chunks * chunk_size
    before = [read_token(dst, int(s), 0) for s in dst_slots[num_chunks * chunk_size:].tolist()]
    assert engine.retrieve(tokens, dst, dst_slots) == num_chunks * chunk_size
    full = num_chunks * chunk_size
    assert same_tokens(src, src_slots[:full], dst, dst_slots[:full], geometry.num_layers)
    # the partial tail is neither stored nor loaded: those destination slots are untouched
    after = [read_token(dst, int(s), 0) for s in dst_slots[full:].tolist()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@given(geometry=geometries(), kind=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16), whole=st.booleans())
def test_gather_produces_the_documented_canonical_layout(geometry, kind, seed, whole):
    """Canonical chunk = [heads, layers, tokens, K|V]: checked element by element against the engine memory."""
    block_size, tokens = 4, 8
    kv = build(kind, geometry, 64, block_size, seed)
    slots = slots_for(tokens, 64, block_size, whole, seed)
    out = torch.empty(geometry.num_kv_heads, geometry.num_layers, tokens, geometry.row_dim, dtype=geometry.dtype)
    convert.gather(kv, convert.plan_slots(kv, slots), out, range(geometry.num_layers))
    for layer in range(geometry.num_layers):
        for t, s in enumerate(slots.tolist()):
            assert torch.equal(out[:, layer, t].contiguous().view(torch.uint8), read_token(kv, s, layer))


def test_negative_slots_are_skipped_on_retrieve():
    g = KVGeometry(2, 2, 4, 4, torch.float16)
    src = vllm_layout("LBNHC", g, 16, 4, seed=1)
    dst = vllm_layout("LBHNC", g, 16, 4, seed=2)
    engine = engine_for(g, 8)
    tokens = list(range(16))
    src_slots = slots_for(16, 64, 4, True, 3)
    engine.store(tokens, src, src_slots)
    dst_slots = slots_for(16, 64, 4, True, 4)
    masked = dst_slots.clone()
    masked[:5] = -1  # the engine already holds these tokens (its own prefix cache): do not touch them
    untouched = [read_token(dst, int(s), 1) for s in dst_slots[:5]]
    assert engine.retrieve(tokens, dst, masked) == 16
    assert same_tokens(src, src_slots[5:], dst, dst_slots[5:], 2)
    assert all(torch.equal(u, read_token(dst, int(s), 1)) for u, s in zip(untouched, dst_slots[:5]))


def test_store_skips_chunks_without_kv_slots():
    g = KVGeometry(1, 1, 4, 4, torch.float32)
    src = vllm_layout("LBNHC", g, 16, 4)
    engine = engine_for(g, 4)
    slots = slots_for(12, 64, 4, True, 0)
    slots[5] = -1  # chunk 1 is incomplete in the engine: it must not be stored
    result = engine.store(list(range(12)), src, slots)
    assert (result.stored_chunks, result.dropped_chunks) == (2, 1)
    assert engine.lookup(list(range(12))) == 4  # the prefix stops at the missing chunk


def test_out_of_range_slot_is_a_clear_error():
    g = KVGeometry(1, 1, 4, 4, torch.float32)
    src = vllm_layout("LBNHC", g, 4, 4)
    engine = engine_for(g, 4)
    with pytest.raises(IndexError, match="slot 99 is out of range: the KV memory has 16 slots"):
        engine.store([1, 2, 3, 4], src, torch.tensor([0, 1, 2, 99]))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_tensor_parallel_shards_store_side_by_side(kind):
    """Two ranks each hold half the heads; the chunk key is shared, the head range addresses the shard."""
    g = KVGeometry(2, 4, 8, 8, torch.bfloat16)
    cfg = load_config(env={}, overrides={"chunk_size": 8, "max_cpu_size_gb": 0.01})
    tokens = list(range(16))
    full = build(kind, g, 64, 4, seed=5)
    slots = slots_for(16, 64, 4, True, 6)
    ranks = [CacheEngine(cfg, ModelIdentity("m", g), device="cpu", head_range=(h, h + 2)) for h in (0, 2)]
    for rank, engine in enumerate(ranks):
        shard = _head_shard(full, rank * 2, 2)
        assert engine.store(tokens, shard, slots).stored_chunks == 2
    keys = [ranks[0].hasher().keys(tokens), ranks[1].hasher().keys(tokens)]
    assert keys[0] == keys[1]
    assert {str(k) for k in ranks[0].stack.cpu.keys()}.isdisjoint({str(k) for k in ranks[1].stack.cpu.keys()})
    for rank, engine in enumerate(ranks):
        dst = _head_shard(build(kind, g, 64, 4, seed=7), rank * 2, 2)
        dst_slots = slots_for(16, 64, 4, False, 8)
        assert engine.retrieve(tokens, dst, dst_slots) == 16
        assert same_tokens(_head_shard(full, rank * 2, 2), slots, dst, dst_slots, 2)


def _head_shard(kv, start: int, count: int):
    from lmcache.core.layouts import BlockPagedKV, TokenSlotKV

    if isinstance(kv, BlockPagedKV):
        return BlockPagedKV([t[:, start : start + count] for t in kv.layers], head_start=start)
    return TokenSlotKV([t[:, start : start + count] for t in kv.k], [t[:, start : start + count] for t in kv.v], start)


def test_sglang_host_pool_takes_the_whole_chunk_path():
    g = KVGeometry(3, 2, 8, 8, torch.bfloat16)
    for order in ("layer_first", "page_first"):
        assert convert.token_row_map(sglang_host_layout(g, 64, 0, order)) is not None, order
    assert convert.token_row_map(sglang_layout(g, 64)) is None  # per-layer allocations
    assert convert.token_row_map(sglang_host_layout(KVGeometry(2, 1, 12, 0, torch.float16, KIND_MLA), 64)) is not None


def test_whole_chunk_fast_path_applies_to_one_allocation_only():
    g = KVGeometry(3, 2, 8, 8, torch.bfloat16)
    for order in ("LBNHC", "LBHNC", "BLHNC"):
        assert convert.row_map(vllm_layout(order, g, 8, 4)) is not None, order
    assert convert.row_map(vllm_layout("LBNHC/sep", g, 8, 4)) is None
