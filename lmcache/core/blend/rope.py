"""Moving cached keys between positions under rotary position embeddings (RoPE).

RoPE rotates each pair of a key's first ``rotary_dim`` channels by ``position * inv_freq[j]``. Rotations
compose, so a key computed at position p becomes the key of the same token at position q by one rotation
of ``q - p``: ``R(q - p) R(p) = R(q)``. Values carry no position. The pairing differs by model family: NeoX
style (Llama, Qwen: channel j with j + rotary_dim/2) and GPT-J style (channel 2j with 2j + 1); scaled
variants (Llama 3, linear, NTK) change ``inv_freq`` only, so one table of cos/sin per position serves all.
Rotations run in float32 whatever the KV dtype, and the result is cast back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class Rope:
    """``cos_sin[p]`` = cos(p * inv_freq) then sin(p * inv_freq) (``rotary_dim`` values: vLLM's cos_sin_cache)."""

    cos_sin: torch.Tensor
    rotary_dim: int
    neox: bool

    @classmethod
    def from_inv_freq(cls, inv_freq: torch.Tensor, max_positions: int, neox: bool = True) -> "Rope":
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
        return cls(torch.cat([angles.cos(), angles.sin()], dim=1).float(), 2 * inv_freq.numel(), neox)

    @property
    def max_positions(self) -> int:
        return int(self.cos_sin.shape[0])

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``x`` ``[tokens, heads, dim]`` rotated by ``delta[t]`` positions per token (negative: back)."""
        if x.shape[0] != delta.shape[0]:
            raise ValueError(f"rotate: {x.shape[0]} tokens but {delta.shape[0]} position deltas")
        far = int(delta.abs().max()) if delta.numel() else 0
        if far >= self.max_positions:
            raise ValueError(f"rotate by {far} positions: the model's RoPE table ends at {self.max_positions - 1}")
        half = self.rotary_dim // 2
        table = self.cos_sin.to(x.device)[delta.abs().to(x.device)]
        cos = table[:, None, :half]
        sin = table[:, None, half:] * delta.sign().to(x.device, torch.float32)[:, None, None]
        out = x.float()
        rot = out[..., : self.rotary_dim]
        if self.neox:
            a, b = rot[..., :half], rot[..., half:]
            rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
        else:
            a, b = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
        out = torch.cat([rotated, out[..., self.rotary_dim :]], dim=-1)
        return out.to(x.dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE itself: ``x`` (position-free) rotated to ``positions``."""
        return self.rotate(x, positions)


def llama_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None,
                   rotary_dim: int | None = None) -> torch.Tensor:
    """inv_freq of Llama-family RoPE: plain, ``linear``, or ``llama3`` scaling (HF ``rope_scaling``)."""
    dim = rotary_dim or head_dim
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv
    assert scaling is not None
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        middle = (wavelen <= old / low) & (wavelen >= old / high)
        return torch.where(middle, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise ValueError(f"RoPE scaling type {kind!r} is not supported for blending: plain, linear and llama3 are")
