"""The blend step (CacheBlend, EuroSys 2025): reuse cached segment KV at new positions, recompute a few tokens.

Input: a prompt region's tokens, and for each of them either a cached K/V per layer (already rotated to its
position here) or nothing (``cached`` false: a separator, an uncached segment). The step:

* layers below ``check_layer``: every token is computed in full (its hidden state is exact up to there);
* at ``check_layer``: every token's fresh K/V is computed and compared with the cached one; the cached
  tokens that deviate most (``recompute_ratio`` of them, at least ``min_recompute``) and every uncached
  token are *selected*; the layer keeps the fresh K/V of all tokens (it is exact);
* above it: only selected tokens go on; their fresh K/V replaces the cached rows, and their queries attend
  over the blended K/V (causal by position).

Invariants: ratio 1 recomputes every token through every layer (a full prefill, the same numbers); an
uncached token is always recomputed, so no token is ever left without KV; the selection only grows with
the ratio. The model is reached only through ``BlendModel``, so any engine (or the reference model) can
run the step; its attention runs here, in plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class BlendModel(Protocol):
    """A decoder-only transformer, layer by layer. Hidden and residual are ``[tokens, hidden]``; ``q`` is
    ``[tokens, q_heads, head_dim]``, ``k``/``v`` ``[tokens, kv_heads, head_dim]`` with RoPE applied to
    q and k at ``positions``."""

    @property
    def num_layers(self) -> int: ...

    @property
    def attn_scale(self) -> float: ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def attention_inputs(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
                         positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v, residual) of ``layer`` for these tokens (residual: the stream the attention adds to)."""
        ...

    def layer_output(self, layer: int, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) after ``layer``, from its attention output ``[tokens, q_heads * head_dim]``."""
        ...


@dataclass(frozen=True)
class BlendSettings:
    recompute_ratio: float = 0.15
    min_recompute: int = 8
    check_layer: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"blend recompute ratio {self.recompute_ratio}: must be in 0..1 (blend_recompute_ratio)")
        # check layer 0 is naive reuse (at layer 0 a cached key equals a fresh one: nothing deviates); evaluations
        # use it as the no-recompute baseline, the config asks for >= 1
        if self.check_layer < 0 or self.min_recompute < 0:
            raise ValueError(f"blend check layer {self.check_layer} / min recompute {self.min_recompute}: both must be "
                             ">= 0 (blend_check_layer, blend_recompute_min_tokens)")


@dataclass
class BlendResult:
    """The region's K/V per layer (``[tokens, kv_heads, head_dim]``), as a full prefill would leave them for
    the recomputed tokens and as cached for the others."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    #: positions recomputed through every layer (sorted): the selected cached tokens and the uncached ones
    recomputed: torch.Tensor
    #: share of a full prefill's per-token layer work (projections, MLP) this blend did, for the region
    compute_fraction: float


def select(deviation: torch.Tensor, cached: torch.Tensor, settings: BlendSettings) -> torch.Tensor:
    """Sorted positions to recompute: every uncached one, plus the most deviating cached ones."""
    n_cached = int(cached.sum())
    want = min(n_cached, max(round(settings.recompute_ratio * n_cached), settings.min_recompute))
    score = torch.where(cached, deviation.float(), torch.full_like(deviation, float("inf"), dtype=torch.float32))
    # stable order among equals (ties: earlier positions first) keeps the selection nested across ratios
    order = torch.sort(-score, stable=True).indices
    chosen = order[: (len(cached) - n_cached) + want]
    return torch.sort(chosen).values


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Causal attention of queries ``[m, hq, d]`` over all keys ``[n, hk, d]``; ``q_pos`` None: m == n, in order."""
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
    if q_pos is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


@torch.inference_mode()
def blend(model: BlendModel, tokens: torch.Tensor, cached_k: list[torch.Tensor], cached_v: list[torch.Tensor],
          cached: torch.Tensor, settings: BlendSettings) -> BlendResult:
    """Blend the region ``tokens`` (positions 0..n-1); ``cached_k/v[layer]`` hold the cached K/V (rotated to
    these positions) where ``cached`` is true, anything elsewhere."""
    n, layers = int(tokens.shape[0]), model.num_layers
    if len(cached_k) != layers or len(cached_v) != layers or cached.shape[0] != n:
        raise ValueError(f"blend: {len(cached_k)} K and {len(cached_v)} V layers for a {layers}-layer model, "
                         f"{cached.shape[0]} cached flags for {n} tokens")
    device = cached_k[0].device
    positions = torch.arange(n, device=device)
    check = min(settings.check_layer, layers)
    out_k, out_v = list(cached_k), list(cached_v)
    hidden = model.embed(tokens)
    residual: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # None: every token is still computed
    for layer in range(layers):
        q, k, v, residual = model.attention_inputs(layer, hidden, residual, positions if keep is None else positions[keep])
        if keep is None:
            out_k[layer], out_v[layer] = k.to(cached_k[layer].dtype), v.to(cached_v[layer].dtype)
            q_pos = None
            if layer == check:
                deviation = ((k.float() - cached_k[layer].float()) ** 2).sum(dim=(1, 2)) + \
                    ((v.float() - cached_v[layer].float()) ** 2).sum(dim=(1, 2))
                keep = select(deviation, cached, settings)
                if keep.numel() == 0:  # nothing to recompute: the layers above keep their cached K/V
                    break
                q, residual, q_pos = q[keep], residual[keep], keep
        else:
            blended_k, blended_v = cached_k[layer].clone(), cached_v[layer].clone()
            blended_k[keep], blended_v[keep] = k.to(blended_k.dtype), v.to(blended_v.dtype)
            out_k[layer], out_v[layer] = blended_k, blended_v
            q_pos = keep
        attn = attend(q, out_k[layer].to(q.dtype), out_v[layer].to(q.dtype), q_pos, model.attn_scale)
        hidden, residual = model.layer_output(layer, attn, residual)
    recomputed = keep if keep is not None else positions
    share = recomputed.numel() / max(n, 1)
    fraction = (min(check + 1, layers) + (layers - min(check + 1, layers)) * share) / layers
    return BlendResult(out_k, out_v, recomputed, fraction)
