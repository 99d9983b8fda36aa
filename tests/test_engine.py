"""The cache engine end to end on real CPU tensors: lookup, store, retrieve, eviction, concurrency."""

import threading

import pytest
import torch
from kvutil import same_tokens, sglang_layout, slots_for, vllm_layout

from lmcache.core.config import load_config
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import KVGeometry, ModelIdentity
from lmcache.core.layouts import LayoutError

GEO = KVGeometry(2, 2, 8, 8, torch.bfloat16)
CHUNK = 16
CHUNK_BYTES = GEO.bytes_per_token() * CHUNK  # 2 KiB


def make_engine(chunks_capacity: float = 64, **over) -> CacheEngine:
    cfg = load_config(env={}, overrides={"chunk_size": CHUNK, "max_cpu_size_gb": chunks_capacity * CHUNK_BYTES / 2**30, **over})
    return CacheEngine(cfg, ModelIdentity("m", GEO), device="cpu")


def prompt(n, seed=0):
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_lookup_counts_the_chunk_aligned_cached_prefix_only():
    e = make_engine()
    kv = vllm_layout("LBNHC", GEO, 64, 16)
    toks = prompt(80)
    assert e.lookup(toks) == 0
    e.store(toks[:40], kv, slots_for(40, 1024, 16, True, 1))  # 2 full chunks + a tail that is not stored
    assert e.lookup(toks) == 32
    assert e.lookup(toks[:31]) == 16
    diverged = toks[:20] + [7] * 60
    assert e.lookup(diverged) == 16  # shares chunk 0 only
    assert e.lookup(toks, salt="other-tenant") == 0
    e.lookup(toks)
    assert e.stack.cpu.stats.hits == 0  # lookups have no side effects on the tier


def test_existing_chunks_are_not_rewritten():
    e = make_engine()
    kv = vllm_layout("LBNHC", GEO, 64, 16)
    toks = prompt(64)
    slots = slots_for(64, 1024, 16, True, 1)
    assert e.store(toks[:32], kv, slots[:32]).stored_chunks == 2
    r = e.store(toks, kv, slots)
    assert (r.existing_chunks, r.stored_chunks) == (2, 2)


def test_lru_eviction_keeps_recently_used_chunks():
    e = make_engine(chunks_capacity=4)
    kv = vllm_layout("LBNHC", GEO, 64, 16)
    a, b, c = prompt(32, 1), prompt(32, 2), prompt(32, 3)
    s = slots_for(32, 1024, 16, True, 1)
    e.store(a, kv, s)
    e.store(b, kv, s)
    dst = sglang_layout(GEO, 64)
    assert e.retrieve(a, dst, torch.arange(32)) == 32  # a becomes most recently used
    e.store(c, kv, s)  # needs 2 chunks: b's go
    assert e.lookup(a) == 32 and e.lookup(c) == 32 and e.lookup(b) == 0
    assert e.stack.cpu.stats.evictions == 2


def test_chunks_being_read_are_never_evicted():
    e = make_engine(chunks_capacity=2)
    kv = vllm_layout("LBNHC", GEO, 64, 16)
    a, b = prompt(32, 1), prompt(32, 2)
    e.store(a, kv, slots_for(32, 1024, 16, True, 1))
    held = [e.stack.cpu.acquire(k) for k in list(e.stack.cpu.keys())]  # a reader holds both chunks
    r = e.store(b, kv, slots_for(32, 1024, 16, True, 2))
    assert r.stored_chunks == 0 and r.dropped_chunks == 2 and e.stack.cpu.stats.drops == 2
    assert all(torch.equal(h.payload().view(torch.uint8), h.payload().view(torch.uint8)) for h in held)
    for h in held:
        e.stack.cpu.release(h)
    assert e.store(b, kv, slots_for(32, 1024, 16, True, 2)).stored_chunks == 2
    assert e.lookup(a) == 0


def test_layout_mismatches_are_clear_errors():
    e = make_engine()
    wrong_dtype = vllm_layout("LBNHC", KVGeometry(2, 2, 8, 8, torch.float16), 8, 16)
    with pytest.raises(LayoutError, match="dtype torch.float16: the model geometry says torch.bfloat16"):
        e.store(prompt(16), wrong_dtype, torch.arange(16))
    wrong_layers = vllm_layout("LBNHC", KVGeometry(3, 2, 8, 8, torch.bfloat16), 8, 16)
    with pytest.raises(LayoutError, match="has 3 layers: the model geometry has 2"):
        e.store(prompt(16), wrong_layers, torch.arange(16))
    shard = vllm_layout("LBNHC", KVGeometry(2, 2, 8, 8, torch.bfloat16), 8, 16, heads=1, head_start=1)
    with pytest.raises(LayoutError, match=r"create the engine with head_range=\(1, 2\)"):
        e.store(prompt(16), shard, torch.arange(16))
    with pytest.raises(ValueError, match="at most one per token"):
        e.store(prompt(4), vllm_layout("LBNHC", GEO, 8, 16), torch.arange(16))


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="device_backend 'tpu' is not registered: choose auto or one of cpu"):
        make_engine(device_backend="tpu")


def test_concurrent_store_lookup_retrieve_is_safe_and_exact():
    """Eight threads storing, looking up and retrieving overlapping prompts through a pool that evicts."""
    e = make_engine(chunks_capacity=24)
    src = vllm_layout("LBHNC", GEO, 256, 16, seed=9)
    shared = prompt(64, 100)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            dst = sglang_layout(GEO, 4096, seed=i)
            for j in range(15):
                pre = 16 * (1 + (i + j) % 4)
                toks = shared[:pre] + prompt(48, 1000 * i + j)
                # same tokens, same KV: the shared prefix sits at the same slots for every thread
                s = torch.cat([torch.arange(pre), 64 + slots_for(48, 4096 - 64, 16, True, i * 100 + j)])
                e.store(toks, src, s)
                hit = e.lookup(toks)
                d = slots_for(len(toks), 4096, 1, False, i * 100 + j + 1)
                got = e.retrieve(toks, dst, d)
                assert got % 16 == 0 and got <= len(toks)
                assert same_tokens(src, s[:got], dst, d[:got], GEO.num_layers)
                assert hit >= 0
        except BaseException as ex:  # surfaced below
            errors.append(ex)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert e.stack.cpu.pool.used_bytes == sum(x.obj.size for x in (e.stack.cpu._entries.values()))
    assert all(x.obj.refcount == 1 for x in e.stack.cpu._entries.values())
