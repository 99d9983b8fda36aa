"""The cuda/rocm backend compiled on a real GPU (these run only where torch sees one; CI has none, and the same
kernels' indexing is covered there by tests/test_triton_kernels.py under Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
from kvutil import VLLM_ORDERS, read_token, sglang_layout, slots_for, vllm_layout

from lmcache.core import convert
from lmcache.core.config import load_config
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import KVGeometry, ModelIdentity
from lmcache.core.layouts import BlockPagedKV, TokenSlotKV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU visible to torch")


def to_gpu(kv):
    if isinstance(kv, BlockPagedKV):
        return BlockPagedKV([t.cuda() for t in kv.layers], kv.head_start)
    return TokenSlotKV([t.cuda() for t in kv.k], [t.cuda() for t in kv.v] if kv.v else None, kv.head_start)


def test_doctor_self_test_passes_on_this_gpu():
    from lmcache.core.plugins import get_registry

    name = "rocm" if torch.version.hip else "cuda"
    backend = get_registry().hardware[name]
    assert backend.self_test()[0], backend.self_test()[1]


@pytest.mark.parametrize("layout", [*VLLM_ORDERS, "sglang"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, getattr(torch, "float8_e4m3fn", torch.float16)])
@pytest.mark.parametrize("layerwise", [False, True])
def test_engine_round_trip_on_the_gpu_is_bit_exact(layout, dtype, layerwise):
    g = KVGeometry(3, 4, 32, 32, dtype)
    cfg = load_config(env={}, overrides={"chunk_size": 32, "max_cpu_size_gb": 0.05, "pin_cpu_memory": "yes"})
    engine = CacheEngine(cfg, ModelIdentity("gpu-test", g), device="cuda")
    assert engine.backend.name in ("cuda", "rocm")
    make = (lambda s: sglang_layout(g, 512, s)) if layout == "sglang" else (lambda s: vllm_layout(layout, g, 32, 16, s))
    src, dst = to_gpu(make(1)), to_gpu(make(2))
    src_slots, dst_slots = slots_for(128, 512, 16, True, 3).cuda(), slots_for(128, 512, 16, False, 4).cuda()
    tokens = list(range(128))
    assert engine.store(tokens, src, src_slots).stored_chunks == 4
    if layerwise:
        inflight = engine.retrieve_chunks_by_layer(engine.hasher().keys(tokens), dst, dst_slots)
        for layer in range(3):
            inflight.wait_layer(layer)
        torch.cuda.current_stream().synchronize()
        inflight.finish()
        assert inflight.end == 128
    else:
        assert engine.retrieve(tokens, dst, dst_slots) == 128
    assert engine.backend.fallback is None
    for layer in range(3):
        for a, b in zip(src_slots.tolist(), dst_slots.tolist()):
            assert torch.equal(read_token(src, a, layer), read_token(dst, b, layer))
    engine.close()


def test_pageable_chunks_are_staged_and_still_exact():
    g = KVGeometry(2, 2, 16, 16, torch.bfloat16)
    kv = to_gpu(vllm_layout("LBNHC", g, 16, 16, 1))
    plan = convert.plan_slots(kv, slots_for(32, 256, 16, True, 2).cuda())
    from lmcache.core.plugins import get_registry

    backend = get_registry().hardware["rocm" if torch.version.hip else "cuda"]
    out = torch.zeros(2, 2, 32, 32, dtype=torch.bfloat16)  # pageable host memory
    backend.gather(kv, [(plan, out)])
    backend.synchronize()
    ref = torch.empty(2, 2, 32, 32, dtype=torch.bfloat16, device="cuda")
    convert.gather(kv, plan, ref, range(2))
    assert torch.equal(out.cuda().view(torch.int16), ref.view(torch.int16))
