"""The cuda/rocm Triton kernels, run on CPU tensors by Triton's interpreter (TRITON_INTERPRET=1): their
indexing is checked bit-exact against the torch reference converters for every layout, dtype and geometry.
On a GPU the same kernels are compiled instead (``lmcache doctor`` runs a self-test there)."""

from __future__ import annotations

import importlib
import logging
import os

import pytest
import torch
from engineutil import require_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from kvutil import DTYPES, VLLM_ORDERS, read_token, sglang_layout, slots_for, vllm_layout

require_engine("triton", ".ci/run installs triton (vLLM's requirements pull it in too)")

from lmcache.core import convert  # noqa: E402
from lmcache.core.config import load_config  # noqa: E402
from lmcache.core.engine import CacheEngine  # noqa: E402
from lmcache.core.geometry import KIND_MHA, KIND_MLA, KVGeometry, ModelIdentity  # noqa: E402
from lmcache.core.layouts import BlockPagedKV, TokenSlotKV  # noqa: E402
from lmcache.core.plugins import Registry  # noqa: E402
from lmcache.hardware.ascend import AscendBackend, CpuOps  # noqa: E402
from lmcache.hardware.cuda import TritonGpuBackend  # noqa: E402


def _interpreted_module():
    """triton_copy with its kernels built for the interpreter (decided when @triton.jit runs)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from lmcache.hardware import triton_copy

        return importlib.reload(triton_copy)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


triton_copy = _interpreted_module()
copier = triton_copy.TritonCopier()
LAYOUTS = [*VLLM_ORDERS, "sglang"]


@st.composite
def cases(draw):
    kind = draw(st.sampled_from([KIND_MHA, KIND_MLA]))
    dtype = draw(st.sampled_from(DTYPES))
    layers = draw(st.integers(1, 3))
    if kind == KIND_MLA:
        g = KVGeometry(layers, 1, draw(st.integers(1, 20)), 0, dtype, KIND_MLA)
    else:
        g = KVGeometry(layers, draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 12)), dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    per_chunk = block_size * draw(st.integers(1, 2))
    chunks = draw(st.integers(1, 3))
    # a tensor-parallel shard: a head range of the layout (strided views, head_start > 0)
    shard = draw(st.booleans()) and g.num_kv_heads > 1
    return g, layout, block_size, per_chunk, chunks, shard, draw(st.integers(0, 2**16))


def build(g, layout, num_slots, block_size, seed, shard):
    kv = sglang_layout(g, num_slots, seed) if layout == "sglang" else vllm_layout(layout, g, num_slots // block_size,
                                                                                block_size, seed)
    if not shard:
        return kv
    h = g.num_kv_heads // 2
    if isinstance(kv, BlockPagedKV):
        return BlockPagedKV([t[:, h:] for t in kv.layers], head_start=h)
    return TokenSlotKV([t[:, h:] for t in kv.k], [t[:, h:] for t in kv.v] if kv.v else None, h)


def random_chunk(heads: int, g: KVGeometry, tokens: int, gen: torch.Generator) -> torch.Tensor:
    chunk = torch.empty(heads, g.num_layers, tokens, g.row_dim, dtype=g.dtype)
    raw = chunk.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    return chunk


def layers_of(kv):
    return kv.layers if isinstance(kv, BlockPagedKV) else kv.k + (kv.v or [])


@settings(max_examples=60, deadline=None)
@given(cases())
def test_gather_kernel_equals_the_reference(case):
    g, layout, block_size, per_chunk, chunks, shard, seed = case
    num_slots = (per_chunk * chunks // block_size + 4) * block_size * 2
    kv = build(g, layout, num_slots, block_size, seed, shard)
    jobs, want = [], []
    for j in range(chunks):  # several chunks in one launch: whole blocks and scattered slots mixed
        plan = convert.plan_slots(kv, slots_for(per_chunk, num_slots, block_size, j % 2 == 0, seed + j))
        ref = torch.empty(kv.num_heads, g.num_layers, per_chunk, g.row_dim, dtype=g.dtype)
        convert.gather(kv, plan, ref, range(g.num_layers))
        jobs.append((plan, torch.zeros_like(ref)))
        want.append(ref)
    copier.gather(kv, jobs)
    for (_, got), ref in zip(jobs, want):
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


@settings(max_examples=60, deadline=None)
@given(cases(), st.integers(0, 3))
def test_scatter_kernel_equals_the_reference_and_skips_negative_slots(case, masked):
    g, layout, block_size, per_chunk, chunks, shard, seed = case
    num_slots = (per_chunk * chunks // block_size + 4) * block_size * 2
    ours = build(g, layout, num_slots, block_size, seed, shard)
    theirs = build(g, layout, num_slots, block_size, seed, shard)
    gen = torch.Generator().manual_seed(seed)
    ours_jobs, ref_jobs = [], []
    for j in range(chunks):
        slots = slots_for(per_chunk, num_slots, block_size, j % 2 == 1, seed + 7 * j)
        slots[: min(masked, per_chunk - 1)] = -1  # tokens the engine holds already: left alone
        chunk = random_chunk(ours.num_heads, g, per_chunk, gen)
        ours_jobs.append((convert.plan_slots(ours, slots), chunk))
        ref_jobs.append((convert.plan_slots(theirs, slots), chunk))
    copier.scatter(ours, ours_jobs)
    for plan, chunk in ref_jobs:
        convert.scatter(theirs, plan, chunk, range(g.num_layers))
    for a, b in zip(layers_of(ours), layers_of(theirs)):
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@settings(max_examples=25, deadline=None)
@given(cases())
def test_layer_by_layer_launches_add_up_to_the_whole(case):
    """layerwise_load issues one launch per layer: together they write exactly what one whole launch does."""
    g, layout, block_size, per_chunk, chunks, shard, seed = case
    num_slots = (per_chunk * chunks // block_size + 4) * block_size * 2
    ours = build(g, layout, num_slots, block_size, seed, shard)
    theirs = build(g, layout, num_slots, block_size, seed, shard)
    gen = torch.Generator().manual_seed(seed)
    jobs, ref = [], []
    for j in range(chunks):
        slots = slots_for(per_chunk, num_slots, block_size, j % 2 == 0, seed + j)
        chunk = random_chunk(ours.num_heads, g, per_chunk, gen)
        jobs.append((convert.plan_slots(ours, slots), chunk))
        ref.append((convert.plan_slots(theirs, slots), chunk))
    launch = copier.prepare(ours, jobs)
    for layer in reversed(range(g.num_layers)):
        copier.run(launch, range(layer, layer + 1), to_chunk=False)
    for plan, chunk in ref:
        convert.scatter(theirs, plan, chunk, range(g.num_layers))
    for a, b in zip(layers_of(ours), layers_of(theirs)):
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


class InterpretedTritonBackend(TritonGpuBackend):
    """The cuda backend's copy path with CPU KV memory, its kernels run by the interpreter."""

    name = "triton-interpreted"
    device_types = ("cpu",)
    priority = 100

    def __init__(self):
        super().__init__()
        self._copier = copier

    def available(self):
        return True, "Triton interpreter"

    def _copy(self, kv, jobs, to_chunk):
        jobs = [(p, c) for p, c in jobs if p.slots.numel()]
        (self.copier.gather if to_chunk else self.copier.scatter)(kv, jobs)


def engine_with(backend, geometry, chunk_size):
    cfg = load_config(env={}, overrides={"chunk_size": chunk_size, "max_cpu_size_gb": 0.02,
                                         "device_backend": backend.name})
    from lmcache.core.plugins import get_registry

    registry = Registry(hardware={backend.name: backend}, stores=get_registry().stores)  # only this backend
    return CacheEngine(cfg, ModelIdentity("kernels", geometry), device="cpu", registry=registry)


@pytest.mark.parametrize("backend", [InterpretedTritonBackend(), AscendBackend(CpuOps())], ids=lambda b: b.name)
@pytest.mark.parametrize("layout", ["LBNHC", "BHLNC", "LBNHC/sep", "sglang"])
def test_engine_round_trip_through_backend(backend, layout):
    """Store with one layout, retrieve into another, through the backend's gather and scatter."""
    g = KVGeometry(2, 2, 8, 8, torch.bfloat16)
    engine = engine_with(backend, g, 8)
    assert engine.backend is backend
    tokens = list(range(40))
    src = build(g, layout, 128, 4, 1, False)
    dst = build(g, "LBHNC" if layout != "LBHNC" else "sglang", 128, 4, 2, False)
    src_slots, dst_slots = slots_for(40, 128, 4, True, 3), slots_for(40, 128, 4, False, 4)
    assert engine.store(tokens, src, src_slots).stored_chunks == 5
    dst_slots[:3] = -1
    untouched = [read_token(dst, int(s), 1) for s in slots_for(40, 128, 4, False, 4)[:3]]
    assert engine.retrieve(tokens, dst, dst_slots) == 40
    for layer in range(2):
        for a, b in zip(src_slots[3:].tolist(), dst_slots[3:].tolist()):
            assert torch.equal(read_token(src, a, layer), read_token(dst, b, layer))
    assert all(torch.equal(u, read_token(dst, int(s), 1)) for u, s in zip(untouched, slots_for(40, 128, 4, False, 4)[:3]))
    engine.close()


def test_gpu_backend_falls_back_loudly_never_silently(caplog):
    """KV memory the kernels cannot take (here: on the CPU) is copied by the reference ops, and says so once."""
    backend = TritonGpuBackend()
    g = KVGeometry(1, 1, 4, 4, torch.float16)
    kv = vllm_layout("LBNHC", g, 8, 4, 1)
    plan = convert.plan_slots(kv, slots_for(8, 32, 4, True, 0))
    out = torch.empty(1, 1, 8, 8, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="lmcache"):
        backend.gather(kv, [(plan, out)])
        backend.gather(kv, [(plan, out)])
    warnings = [r.message for r in caplog.records if "reference ops" in r.message]
    assert warnings == ["lmcache: cuda backend: using the slower torch reference ops: the KV memory is on cpu, not a GPU"]
    assert backend.fallback == "the KV memory is on cpu, not a GPU"
    ref = torch.empty_like(out)
    convert.gather(kv, plan, ref, range(1))
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_backends_say_why_they_are_unavailable_here():
    from lmcache.core.plugins import get_registry

    hw = get_registry().hardware
    assert {"cpu", "cuda", "rocm"} <= set(hw)
    if not torch.cuda.is_available():
        ok, why = hw["cuda"].available()
        assert not ok and why
        assert hw["cuda"].self_test() == (False, why)
    assert "ascend" not in hw or hw["ascend"].available()[0] is not None  # registered only with torch_npu


def test_chunks_of_one_launch_must_agree():
    g = KVGeometry(1, 1, 4, 4, torch.float16)
    kv = vllm_layout("LBNHC", g, 8, 4, 1)
    plan = convert.plan_slots(kv, slots_for(4, 32, 4, True, 0))
    with pytest.raises(ValueError, match="same shape"):
        copier.gather(kv, [(plan, torch.empty(1, 1, 4, 8, dtype=torch.float16)),
                           (plan, torch.empty(1, 1, 8, 8, dtype=torch.float16))])


def test_layerwise_retrieve_releases_its_chunks_when_finished():
    g = KVGeometry(2, 2, 8, 8, torch.bfloat16)
    backend = InterpretedTritonBackend()
    engine = engine_with(backend, g, 8)
    src, dst = build(g, "LBNHC", 128, 4, 1, False), build(g, "sglang", 128, 4, 2, False)
    src_slots, dst_slots = slots_for(32, 128, 4, True, 3), slots_for(32, 128, 4, False, 4)
    tokens = list(range(32))
    engine.store(tokens, src, src_slots)
    keys = engine.hasher().keys(tokens)
    inflight = engine.retrieve_chunks_by_layer(keys, dst, dst_slots)
    assert inflight.end == 32
    assert all(e.obj.refcount == 2 for e in inflight.entries)  # the tier's reference and the load's
    for layer in range(2):
        inflight.wait_layer(layer)
        for a, b in zip(src_slots.tolist(), dst_slots.tolist()):
            assert torch.equal(read_token(src, a, layer), read_token(dst, b, layer))
    inflight.finish()
    inflight.finish()  # idempotent
    assert all(e.obj.refcount == 1 for e in inflight.entries)
    assert engine.clear() == 4 and engine.stack.cpu.pool.stats()["used"] == 0  # every byte went back to the pool
    engine.close()
