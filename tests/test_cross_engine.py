"""One pool, two engines: what vLLM stores SGLang loads, and the other way round, bit for bit.

vLLM side: vLLM's real Scheduler and connector on vLLM-layout CPU tensors (vllmutil). SGLang side: the
HiCache backend through SGLang's own factory, with SGLang's own page hashes (sglangutil). Both serve
the same model name and KV geometry; SGLang's page size equals the chunk size (the alignment rule).
"""

from __future__ import annotations

import pytest
import torch
from sglangutil import HostPool, batch_exists, make_backend, page_keys  # noqa: E402
from vllmutil import CpuVllm, expected_kv, vllm_config, write_model_dir  # noqa: E402

from lmcache.core import shared

CS = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(autouse=True)
def fresh_pool():
    shared.close_all()
    yield
    shared.close_all()


@pytest.fixture(params=["inproc", "mp"])
def lmcache_extra(request):
    extra = {"lmcache.chunk_size": CS, "lmcache.max_cpu_size_gb": 0.05, "lmcache.model_name": "shared-llama"}
    if request.param == "inproc":
        yield extra
        return
    from lmcache.server.launch import ChildServer

    server = ChildServer(CS, 0.1)
    try:
        yield {**extra, "lmcache.mode": "mp", "lmcache.server_url": server.url}
    finally:
        server.stop()


def tokens(n, seed=1):
    return [(seed * 131 + i * 17) % 997 + 3 for i in range(n)]


@pytest.mark.parametrize("layout", ["layer_first", "page_first_direct"])
@pytest.mark.parametrize("chunks", [6, 17])  # 17: vLLM's keys come from the native loop (16+ chunks), SGLang's not
def test_vllm_stores_sglang_loads(model_dir, lmcache_extra, layout, chunks):
    prompt = tokens(chunks * CS + 8)
    v = CpuVllm(vllm_config(model_dir, lmcache_extra))
    v.add("A", prompt)
    v.run()
    pool = HostPool(layout, CS, pages=chunks + 6, layers=2, heads=2, head_dim=16)
    sg = make_backend(lmcache_extra, pool)
    keys = page_keys(prompt, CS)
    assert batch_exists(sg, keys) == chunks
    assert sg.batch_get_v1(keys, torch.arange(3 * CS, (3 + chunks) * CS)) == [True] * chunks
    got = torch.stack([pool.token_kv(3 * CS + i) for i in range(chunks * CS)])
    want = expected_kv(torch.tensor(prompt[:chunks * CS]), torch.arange(chunks * CS), 2, 2, 32)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    sg.close()


@pytest.mark.parametrize("layout", ["page_first", "page_first_direct"])
def test_sglang_stores_vllm_loads(model_dir, lmcache_extra, layout):
    prompt = tokens(200, seed=5)
    pool = HostPool(layout, CS, pages=12, layers=2, heads=2, head_dim=16)
    sg = make_backend(lmcache_extra, pool)
    kv = expected_kv(torch.tensor(prompt[:192]), torch.arange(192), 2, 2, 32)
    for i in range(192):
        pool.set_token_kv(CS + i, kv[i])
    assert sg.batch_set_v1(page_keys(prompt, CS), torch.arange(CS, 7 * CS)) == [True] * 6
    if lmcache_extra.get("lmcache.mode") == "mp":
        sg.close()  # SGLang shut down: what it stored lives on in the server (in-process, the pool is the process's)
    v = CpuVllm(vllm_config(model_dir, lmcache_extra))
    v.add("B", prompt)
    assert v.step().output.scheduled_new_reqs[0].num_computed_tokens == 192
    v.run()  # every step checks each token's KV against the stand-in model, bit for bit


def test_model_decodes_from_kv_vllm_stored_and_sglang_loaded(tmp_path):
    """A tiny transformers Llama (random weights): KV computed in vLLM's layout, loaded into SGLang's host
    layout, used as the model's cache: the logits equal a full recompute. Semantics, not only bytes."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    model_dir = write_model_dir(tmp_path / "llama")
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, head_dim=16, vocab_size=1000, max_position_embeddings=8192)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    prompt = [(i * 53) % 991 + 3 for i in range(100)]
    seq = prompt + [7] * 4
    with torch.no_grad():
        layers = model(torch.tensor([seq]), use_cache=True).past_key_values.layers
    kv_all = torch.stack([torch.cat([l.keys[0], l.values[0]], dim=-1).transpose(0, 1) for l in layers], dim=1)
    extra = {"lmcache.chunk_size": CS, "lmcache.max_cpu_size_gb": 0.05, "lmcache.model_name": "shared-llama"}
    v = CpuVllm(vllm_config(model_dir, extra), kv_fn=lambda t, p: kv_all[p], dtype=torch.float32)
    v.add("A", prompt)
    v.run()
    pool = HostPool("page_first", CS, pages=8, layers=2, heads=2, head_dim=16, dtype=torch.float32)
    sg = make_backend(extra, pool)
    keys = page_keys(prompt, CS)
    assert sg.batch_get_v1(keys, torch.arange(0, 3 * CS)) == [True] * 3
    loaded = torch.stack([pool.token_kv(i) for i in range(96)])  # [96, layers, heads, 32]
    past = DynamicCache()
    for i in range(2):
        kv = loaded[:, i].transpose(0, 1).unsqueeze(0)
        past.update(kv[..., :16].contiguous(), kv[..., 16:].contiguous(), i)
    with torch.no_grad():
        resumed = model(torch.tensor([prompt[96:]]), past_key_values=past)
        recomputed = model(torch.tensor([prompt]))
    torch.testing.assert_close(resumed.logits[0, -1], recomputed.logits[0, -1], rtol=0, atol=1e-5)
