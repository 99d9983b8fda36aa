"""End to end with a real model architecture: a tiny transformers Llama (random weights, no download).

Its KV is written into vLLM's paged layout by the stand-in forward pass, stored through the connector
by one vLLM instance and loaded by another; decoding from the loaded KV must give the logits of a full
recompute. This checks what K, V, heads and positions mean, not only that bytes round-trip.
"""

from __future__ import annotations

import torch
import transformers  # noqa: E402,F401  (a vLLM requirement: installed wherever these tests run)
from vllmutil import CpuVllm, vllm_config, write_model_dir  # noqa: E402  (skips when vllm is absent)

from lmcache.core import shared

CS = 32


def test_decode_from_loaded_kv_matches_full_recompute(tmp_path):
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    model_dir = write_model_dir(tmp_path / "llama", num_layers=2, kv_heads=2, head_dim=16)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, head_dim=16, vocab_size=1000, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    prompt = [(i * 37) % 997 + 3 for i in range(100)]
    seq = prompt + [7] * 4  # what the harness samples after the prompt
    with torch.no_grad():
        full = model(torch.tensor([seq]), use_cache=True)
    # [tokens, layers, heads, k|v] of the whole sequence, as vLLM's cache holds it
    layers = full.past_key_values.layers
    kv_all = torch.stack([torch.cat([l.keys[0], l.values[0]], dim=-1).transpose(0, 1) for l in layers], dim=1)

    def model_kv(tokens, positions):
        assert tokens.tolist() == [seq[p] for p in positions.tolist()]
        return kv_all[positions]

    shared.close_all()
    extra = {"lmcache.chunk_size": CS, "lmcache.max_cpu_size_gb": 0.05}
    a = CpuVllm(vllm_config(model_dir, extra), kv_fn=model_kv, dtype=torch.float32)
    a.add("A", prompt)
    a.run()
    b = CpuVllm(vllm_config(model_dir, extra), kv_fn=model_kv, dtype=torch.float32, layout="LBHNC")
    b.add("B", prompt)
    first = b.step()
    assert first.output.scheduled_new_reqs[0].num_computed_tokens == 96
    # the 96 tokens B loaded, read back from B's paged cache and handed to the model as its past
    loaded = b.read(b.workers[0], b.slots("B", 96))  # [96, layers, heads, 32]
    past = DynamicCache()
    for i in range(cfg.num_hidden_layers):
        kv = loaded[:, i].transpose(0, 1).unsqueeze(0)  # [1, heads, 96, 32]
        past.update(kv[..., :16].contiguous(), kv[..., 16:].contiguous(), i)
    with torch.no_grad():
        resumed = model(torch.tensor([prompt[96:]]), past_key_values=past, use_cache=True)
        recomputed = model(torch.tensor([prompt]))
    # same weights and inputs; only the attention's reduction order differs (96 cached + 4 new vs 100 at once)
    torch.testing.assert_close(resumed.logits[0, -1], recomputed.logits[0, -1], rtol=0, atol=1e-5)
    assert torch.equal(resumed.logits[0].argmax(-1), recomputed.logits[0, 96:].argmax(-1))
    b.run()
    shared.close_all()
