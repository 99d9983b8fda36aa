"""A Llama / Qwen2 decoder in plain torch, loaded from a Hugging Face checkpoint directory.

It implements ``BlendModel`` (so the blend step runs on it) and a plain forward with a KV cache, so the
quality evaluation (``lmcache bench blend``) can compare full prefill, naive reuse and blending on one
model without an engine. Same math as the engines' Llama: RMSNorm, RoPE (NeoX pairing), grouped-query
attention, SwiGLU; Qwen2 adds q/k/v biases. It serves evaluations and tests, not traffic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmcache.core.blend.blender import attend
from lmcache.core.blend.rope import Rope, llama_inv_freq

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass
class ReferenceLlama:
    weights: dict[str, torch.Tensor]
    config: dict[str, Any]

    def __post_init__(self) -> None:
        c = self.config
        arch = (c.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"reference model: architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
        self.hidden_size = int(c["hidden_size"])
        self.q_heads = int(c["num_attention_heads"])
        self.kv_heads = int(c.get("num_key_value_heads") or self.q_heads)
        self.head_dim = int(c.get("head_dim") or self.hidden_size // self.q_heads)
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        # transformers >= 5 keeps theta and scaling together in rope_parameters; older configs split them
        params = c.get("rope_parameters") or {}
        theta = float(c.get("rope_theta") or params.get("rope_theta") or 10000.0)
        inv = llama_inv_freq(self.head_dim, theta, c.get("rope_scaling") or params)
        self.rope = Rope.from_inv_freq(inv, int(c.get("max_position_embeddings", 4096)), neox=True)
        self._layers = int(c["num_hidden_layers"])
        if "lm_head.weight" not in self.weights:  # tied embeddings
            self.weights["lm_head.weight"] = self.weights["model.embed_tokens.weight"]

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "ReferenceLlama":
        from safetensors.torch import load_file

        path = Path(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {path}")
        weights: dict[str, torch.Tensor] = {}
        for f in files:
            weights.update({k: v.to(dtype) for k, v in load_file(str(f)).items()})
        return cls(weights, json.loads((path / "config.json").read_text()))

    # -- BlendModel ------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self._layers

    @property
    def attn_scale(self) -> float:
        return float(self.head_dim**-0.5)

    def _w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self._w(name)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self._w(name + ".weight"), self.weights.get(name + ".bias"))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self._w("model.embed_tokens.weight"))

    def attention_inputs(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
                         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        p = f"model.layers.{layer}."
        residual = hidden if residual is None else hidden + residual
        x = self._norm(residual, p + "input_layernorm.weight")
        n = x.shape[0]
        q = self._linear(x, p + "self_attn.q_proj").view(n, self.q_heads, self.head_dim)
        k = self._linear(x, p + "self_attn.k_proj").view(n, self.kv_heads, self.head_dim)
        v = self._linear(x, p + "self_attn.v_proj").view(n, self.kv_heads, self.head_dim)
        return self.rope.apply(q, positions), self.rope.apply(k, positions), v, residual

    def layer_output(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = f"model.layers.{layer}."
        residual = residual + self._linear(attn, p + "self_attn.o_proj")
        x = self._norm(residual, p + "post_attention_layernorm.weight")
        mlp = self._linear(F.silu(self._linear(x, p + "mlp.gate_proj")) * self._linear(x, p + "mlp.up_proj"), p + "mlp.down_proj")
        return mlp, residual

    # -- plain forward ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, past_k: list[torch.Tensor] | None = None,
                past_v: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Logits ``[tokens, vocab]`` of ``tokens`` placed after the cached ``past`` K/V (positions follow it),
        and the K/V of past + tokens per layer."""
        start = past_k[0].shape[0] if past_k else 0
        n = tokens.shape[0]
        positions = torch.arange(start, start + n)
        q_pos = positions if start else None
        hidden, residual = self.embed(tokens), None
        ks, vs = [], []
        for layer in range(self._layers):
            q, k, v, residual = self.attention_inputs(layer, hidden, residual, positions)
            if past_k and past_v:
                k, v = torch.cat([past_k[layer].to(k.dtype), k]), torch.cat([past_v[layer].to(v.dtype), v])
            ks.append(k)
            vs.append(v)
            hidden, residual = self.layer_output(layer, attend(q, k, v, q_pos, self.attn_scale), residual)
        assert residual is not None  # set by the first layer
        final = self._norm(hidden + residual, "model.norm.weight")
        return F.linear(final, self._w("lm_head.weight")).float(), ks, vs
