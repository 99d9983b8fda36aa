"""Store a prompt's KV from vLLM-shaped paged memory and load it into SGLang-shaped pools: the cache engine
on its own, as the engine adapters use it. Run: python examples/engine_round_trip.py

(This is the README's "Using the engine" block; the test suite runs both.)
"""

import torch
from lmcache.core.config import load_config
from lmcache.core.engine import CacheEngine
from lmcache.core.geometry import KVGeometry, ModelIdentity
from lmcache.core.layouts import BlockPagedKV, TokenSlotKV

geometry = KVGeometry(num_layers=4, num_kv_heads=8, k_dim=128, v_dim=128, dtype=torch.bfloat16)
config = load_config(env={}, overrides={"chunk_size": 256, "max_cpu_size_gb": 0.5})
engine = CacheEngine(config, ModelIdentity("my-org/my-model", geometry), device="cpu")

# vLLM hands each layer a [num_blocks, heads, block_size, k_dim + v_dim] view (any physical order)
blocks, block_size = 64, 16
vllm_layers = [torch.randn(blocks, 8, block_size, 256).to(torch.bfloat16) for _ in range(4)]
prompt_token_ids = list(range(1000, 1000 + 600))
slot_mapping = torch.arange(600)                             # slot_mapping[i] = KV slot of token i, -1 = none
engine.store(prompt_token_ids, BlockPagedKV(vllm_layers), slot_mapping)
assert engine.lookup(prompt_token_ids) == 512                # the cached prefix: whole chunks, no side effects

# SGLang's pools: k_buffer[l] [slots, H, k_dim], v_buffer[l] [slots, H, v_dim] (MLA: kv_buffer, v=None)
k_buffers = [torch.zeros(2048, 8, 128, dtype=torch.bfloat16) for _ in range(4)]
v_buffers = [torch.zeros(2048, 8, 128, dtype=torch.bfloat16) for _ in range(4)]
sglang_slots = torch.arange(100, 700)
assert engine.retrieve(prompt_token_ids, TokenSlotKV(k_buffers, v_buffers), sglang_slots) == 512
token0 = vllm_layers[0][0, :, 0]                             # token 0's [heads, k|v] row of layer 0, stored above
assert torch.equal(torch.cat([k_buffers[0][100], v_buffers[0][100]], dim=-1), token0)
print("stored 600 tokens, found and loaded the 512 of them in whole chunks, bit for bit")
