"""vLLM's Llama / Qwen2 / Qwen3 modules as a ``BlendModel``: the blend step runs the model's own layers.

Each call is the corresponding part of vLLM's decoder layer forward (input norm with the residual, fused
qkv projection, optional per-head q/k norms, the layer's rotary embedding, output projection, post norm,
MLP), with attention done by the blend step itself. Tensor parallel size 1 only: a sharded layer's
partial results would need the engine's collectives.
"""

from __future__ import annotations

from typing import Any

import torch

from lmcache.adapters.vllm.blend_registry import SUPPORTED_ARCHITECTURES, TESTED_VLLM
from lmcache.adapters.vllm.model import UnsupportedModel
from lmcache.core.blend.rope import Rope


def architecture_of(model: Any) -> str | None:
    names = [c.__name__ for c in type(model).__mro__]
    return next((n for n in names if n in SUPPORTED_ARCHITECTURES), None)


class VllmBlendModel:
    def __init__(self, model: Any) -> None:
        arch = architecture_of(model)
        if arch is None:
            raise UnsupportedModel(f"blending runs on {', '.join(SUPPORTED_ARCHITECTURES)} (vLLM {', '.join(TESTED_VLLM)}); "
                                   f"this model is {type(model).__name__}: drop enable_blending")
        self.architecture = arch
        self._layers = list(model.model.layers)
        self._embed = model.model.embed_tokens
        attn = self._layers[0].self_attn
        rot = attn.rotary_emb
        if not hasattr(rot, "cos_sin_cache") or type(rot).__name__ not in ("RotaryEmbedding", "Llama3RotaryEmbedding",
                                                                          "LinearScalingRotaryEmbedding"):
            raise UnsupportedModel(f"blending re-rotates keys with a plain, linear or Llama-3 RoPE table; this model uses "
                                   f"{type(rot).__name__}: drop enable_blending")
        self.rope = Rope(rot.cos_sin_cache.float().cpu(), int(rot.rotary_dim), bool(rot.is_neox_style))
        self._scale = float(attn.scaling)
        self._dtype = attn.o_proj.weight.dtype

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def attn_scale(self) -> float:
        return self._scale

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._embed(tokens)

    def attention_inputs(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
                         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        block = self._layers[layer]
        if residual is None:
            residual = hidden
            x = block.input_layernorm(hidden)
        else:
            x, residual = block.input_layernorm(hidden, residual)
        a = block.self_attn
        qkv, _ = a.qkv_proj(x)
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        n = q.shape[0]
        q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
        if q_norm is not None and k_norm is not None and getattr(a, "qk_norm", True):
            q = q_norm(q.reshape(n, -1, a.head_dim)).reshape(n, -1)
            k = k_norm(k.reshape(n, -1, a.head_dim)).reshape(n, -1)
        q, k = a.rotary_emb(positions, q.contiguous(), k.contiguous())
        return (q.reshape(n, -1, a.head_dim), k.reshape(n, -1, a.head_dim), v.reshape(n, -1, a.head_dim).contiguous(),
                residual)

    def layer_output(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        block = self._layers[layer]
        out, _ = block.self_attn.o_proj(attn.to(self._dtype))
        x, residual = block.post_attention_layernorm(out, residual)
        return block.mlp(x), residual
