"""Test helpers: engine-shaped KV memories built the simplest way, and a naive per-token reader."""

from __future__ import annotations

import torch

from lmcache.core.geometry import KIND_MLA, KVGeometry
from lmcache.core.layouts import BlockPagedKV, TokenSlotKV

# vLLM 0.33's physical orders over logical [L, B, H, N, C] (vllm/v1/kv_cache_layout.py)
VLLM_ORDERS = ("LBNHC", "LBHNC", "LHBNC", "BLHNC", "BLNHC", "BHLNC", "LBNHC/sep", "LBHNC/sep")

FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, *FLOAT8]


def random_bits(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = t.view(-1).view(torch.uint8)
    flat.copy_(torch.randint(0, 256, (flat.numel(),), dtype=torch.uint8, generator=g))
    return t


def vllm_layout(order: str, geometry: KVGeometry, num_blocks: int, block_size: int, seed: int = 0,
                heads: int | None = None, head_start: int = 0) -> BlockPagedKV:
    """One allocation in ``order``; each layer a strided logical [B, H, N, C] view of it.
    ``order`` ending in "/sep": one allocation per layer (older engines), so no whole-chunk fast path."""
    h = heads or geometry.num_kv_heads
    if order.endswith("/sep"):
        one = KVGeometry(1, geometry.num_kv_heads, geometry.k_dim, geometry.v_dim, geometry.dtype, geometry.kind)
        layers = [vllm_layout(order[:-4], one, num_blocks, block_size, seed + l, heads).layers[0]
                  for l in range(geometry.num_layers)]
        return BlockPagedKV(layers, head_start=head_start)
    sizes = {"L": geometry.num_layers, "B": num_blocks, "H": h, "N": block_size, "C": geometry.row_dim}
    storage = random_bits(torch.empty([sizes[c] for c in order], dtype=geometry.dtype), seed)
    rest = order.replace("L", "")
    layers = [storage.select(order.index("L"), l).permute([rest.index(c) for c in "BHNC"]) for l in range(geometry.num_layers)]
    return BlockPagedKV(layers, head_start=head_start)


def sglang_layout(geometry: KVGeometry, num_slots: int, seed: int = 0, heads: int | None = None,
                  head_start: int = 0) -> TokenSlotKV:
    """SGLang's per-layer pools: k_buffer/v_buffer [slots, H, D], or MLA kv_buffer [slots, 1, C]."""
    h = heads or geometry.num_kv_heads
    if geometry.kind == KIND_MLA:
        k = [random_bits(torch.empty(num_slots, 1, geometry.row_dim, dtype=geometry.dtype), seed + l)
             for l in range(geometry.num_layers)]
        return TokenSlotKV(k, None, head_start)
    k = [random_bits(torch.empty(num_slots, h, geometry.k_dim, dtype=geometry.dtype), seed + l) for l in range(geometry.num_layers)]
    v = [random_bits(torch.empty(num_slots, h, geometry.v_dim, dtype=geometry.dtype), seed + 100 + l)
         for l in range(geometry.num_layers)]
    return TokenSlotKV(k, v, head_start)


def sglang_host_layout(geometry: KVGeometry, num_slots: int, seed: int = 0, order: str = "layer_first") -> TokenSlotKV:
    """SGLang's HiCache host pool: ONE kv_buffer, (2, L, size, H, D) layer_first or (2, size, L, H, D)
    page_first (MLA: no leading 2), seen through lmcache.adapters.sglang.host_layout as strided token views."""
    from lmcache.adapters.sglang.host_layout import token_slots

    L, H = geometry.num_layers, geometry.num_kv_heads
    mla = geometry.kind == KIND_MLA
    if not mla and geometry.k_dim != geometry.v_dim:
        return sglang_layout(geometry, num_slots, seed)  # SGLang's host pool needs K and V of one width
    d = geometry.row_dim if mla else geometry.k_dim
    inner = (num_slots, L) if order == "page_first" else (L, num_slots)
    shape = (*inner, 1 if mla else H, d) if mla else (2, *inner, H, d)
    buffer = random_bits(torch.empty(shape, dtype=geometry.dtype), seed)
    return token_slots(buffer, order, mla, 0)


def read_token(kv, slot: int, layer: int) -> torch.Tensor:
    """The [H, row_dim] bits of one token of one layer, read the most obvious way."""
    if isinstance(kv, BlockPagedKV):
        t = kv.layers[layer][slot // kv.block_size, :, slot % kv.block_size, :]
    elif kv.v is None:
        t = kv.k[layer][slot]
    else:
        t = torch.cat([kv.k[layer][slot], kv.v[layer][slot]], dim=-1)
    return t.contiguous().view(torch.uint8)


def same_tokens(a, a_slots, b, b_slots, num_layers: int) -> bool:
    return all(
        torch.equal(read_token(a, int(sa), l), read_token(b, int(sb), l))
        for l in range(num_layers) for sa, sb in zip(a_slots.tolist(), b_slots.tolist())
    )


def slots_for(num_tokens: int, num_slots: int, block_size: int, whole_blocks: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if whole_blocks:
        blocks = torch.randperm(num_slots // block_size, generator=g)[: -(-num_tokens // block_size)]
        return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:num_tokens]
    return torch.randperm(num_slots, generator=g)[:num_tokens]
