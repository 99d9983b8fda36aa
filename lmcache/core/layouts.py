"""Layout descriptors: how an engine's paged KV memory is laid out, in engine-neutral terms.

Adapters fill these in from the engine's tensors; converters (``lmcache.core.convert``, and the fast
kernels of ``lmcache.hardware``) move tokens between them and canonical chunks. A slot is the index of
one token's KV in the engine's memory; a negative slot means "no KV here: skip this token".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmcache.core.geometry import KIND_MLA, KVGeometry


class LayoutError(ValueError):
    """The engine's KV tensors do not match the model geometry; the message names what differs."""


class _PerLayerTensors:
    """What a layout whose ``layers`` are one tensor per layer, heads in dim 1, says of itself."""

    layers: list[torch.Tensor]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return self.layers[0].shape[1]

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype


@dataclass
class BlockPagedKV(_PerLayerTensors):
    """Per-layer block views of logical shape ``[num_blocks, heads, block_size, row_dim]``.

    This is vLLM 0.33's ``register_kv_caches`` layout: K then V concatenated in the last dim (MLA: the
    latent row, heads == 1). Any physical order (LBNHC, LBHNC, block-first, ...) is accepted because
    only the logical indexing is used; strides carry the physical order.
    """

    layers: list[torch.Tensor]
    head_start: int = 0
    #: planners' results for this memory (row maps), made once: its shapes and strides never change
    plan_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def block_size(self) -> int:
        return self.layers[0].shape[2]

    @property
    def num_slots(self) -> int:
        return self.layers[0].shape[0] * self.layers[0].shape[2]

    def check(self, geometry: KVGeometry) -> None:
        _check_common(self.layers, geometry, self.head_start, "BlockPagedKV")
        want = (self.num_heads, self.block_size, geometry.row_dim)
        for i, t in enumerate(self.layers):
            if t.dim() != 4 or (t.shape[1], t.shape[2], t.shape[3]) != want or t.shape[0] != self.layers[0].shape[0]:
                raise LayoutError(
                    f"BlockPagedKV layer {i} has shape {tuple(t.shape)}: expected [blocks, {want[0]}, {want[1]}, "
                    f"{want[2]}] (row_dim = k_dim + v_dim = {geometry.k_dim} + {geometry.v_dim})"
                )


@dataclass
class TokenSlotKV:
    """Per-layer token-granular pools: MHA ``k[l]`` ``[slots, heads, k_dim]`` and ``v[l]`` ``[slots, heads, v_dim]``;
    MLA ``k[l]`` ``[slots, 1, row_dim]`` and ``v = None`` (SGLang's ``k_buffer``/``v_buffer``/``kv_buffer``).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor] | None = None
    head_start: int = 0
    #: planners' results for this memory (row maps), made once: its shapes and strides never change
    plan_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_heads(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def check(self, geometry: KVGeometry) -> None:
        _check_common(self.k, geometry, self.head_start, "TokenSlotKV")
        mla = geometry.kind == KIND_MLA
        if mla != (self.v is None):
            raise LayoutError("TokenSlotKV: an MLA model has one kv pool (v=None); an MHA model needs both k and v pools")
        k_dim = geometry.row_dim if mla else geometry.k_dim
        for i, t in enumerate(self.k):
            if t.dim() != 3 or tuple(t.shape[1:]) != (self.num_heads, k_dim) or t.shape[0] != self.num_slots:
                raise LayoutError(f"TokenSlotKV k[{i}] has shape {tuple(t.shape)}: expected [slots, {self.num_heads}, {k_dim}]")
        if self.v is not None:
            if len(self.v) != len(self.k):
                raise LayoutError(f"TokenSlotKV has {len(self.k)} k pools but {len(self.v)} v pools")
            for i, t in enumerate(self.v):
                if t.dim() != 3 or tuple(t.shape) != (self.num_slots, self.num_heads, geometry.v_dim) or t.dtype != geometry.dtype:
                    raise LayoutError(
                        f"TokenSlotKV v[{i}] has shape {tuple(t.shape)} {t.dtype}: expected "
                        f"[{self.num_slots}, {self.num_heads}, {geometry.v_dim}] {geometry.dtype}"
                    )


@dataclass
class BlockAreaKV(_PerLayerTensors):
    """Per-layer tensors ``[num_blocks, heads, area]``: a block's K and V of one head packed in an engine's own
    order, token t's K element d at ``k_index[t, d]`` of the area and its V element at ``v_index[t, d]``.

    Why: vLLM's CPU attention keeps a block's keys transposed (or tiled) for its vector unit, in an order that
    depends on the instruction set it picked, so no strided view describes it. Whole-block copies of such
    memory are exact under any reading, which hid it; a chunk is canonical only if every element lands where
    the canonical format says. The adapter measures the order with the engine's own cache-write op.
    """

    layers: list[torch.Tensor]
    k_index: torch.Tensor  # [block_size, k_dim] int64
    v_index: torch.Tensor  # [block_size, v_dim] int64
    head_start: int = 0
    plan_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def block_size(self) -> int:
        return self.k_index.shape[0]

    @property
    def num_slots(self) -> int:
        return self.layers[0].shape[0] * self.block_size

    def check(self, geometry: KVGeometry) -> None:
        _check_common(self.layers, geometry, self.head_start, "BlockAreaKV")
        if geometry.kind == KIND_MLA:
            raise LayoutError("BlockAreaKV holds per-head K and V: an MLA model's latent rows need BlockPagedKV")
        n = self.block_size
        if tuple(self.k_index.shape) != (n, geometry.k_dim) or tuple(self.v_index.shape) != (n, geometry.v_dim):
            raise LayoutError(f"BlockAreaKV index maps are {tuple(self.k_index.shape)} and {tuple(self.v_index.shape)}: "
                              f"expected [{n}, {geometry.k_dim}] and [{n}, {geometry.v_dim}]")
        area = n * geometry.row_dim
        if "index_ok" not in self.plan_cache and not torch.equal(
                torch.cat([self.k_index.flatten(), self.v_index.flatten()]).sort().values.cpu(), torch.arange(area)):
            raise LayoutError(f"BlockAreaKV index maps do not place every K and V element of a block exactly once in "
                              f"its {area}-element area")
        for i, t in enumerate(self.layers):
            if t.dim() != 3 or tuple(t.shape[1:]) != (self.num_heads, area) or t.shape[0] != self.layers[0].shape[0]:
                raise LayoutError(f"BlockAreaKV layer {i} has shape {tuple(t.shape)}: expected [blocks, {self.num_heads}, {area}]")
        self.plan_cache["index_ok"] = True


KVLayout = BlockPagedKV | TokenSlotKV | BlockAreaKV


def transposed_key_maps(block_size: int, k_dim: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockAreaKV index maps for the order vLLM's CPU attention writes with its "vec" ISA (measured): a block's
    keys transposed (element d of token t at ``d * block_size + t``), then its values row by row. For benchmarks
    and tests; the vLLM adapter measures the order instead of assuming it."""
    t, n = torch.arange(block_size)[:, None], block_size
    return torch.arange(k_dim)[None, :] * n + t, n * k_dim + t * v_dim + torch.arange(v_dim)[None, :]


def _check_common(tensors: list[torch.Tensor], geometry: KVGeometry, head_start: int, what: str) -> None:
    if len(tensors) != geometry.num_layers:
        raise LayoutError(f"{what} has {len(tensors)} layers: the model geometry has {geometry.num_layers}")
    heads = tensors[0].shape[1] if tensors[0].dim() >= 2 else 0
    if head_start < 0 or heads <= 0 or head_start + heads > geometry.num_kv_heads:
        raise LayoutError(
            f"{what} holds heads [{head_start}, {head_start + heads}): must lie within the model's "
            f"{geometry.num_kv_heads} KV heads (set head_start to this rank's first head)"
        )
    for i, t in enumerate(tensors):
        if t.dtype != geometry.dtype:
            raise LayoutError(f"{what} layer {i} has dtype {t.dtype}: the model geometry says {geometry.dtype}")
        if t.device != tensors[0].device:
            raise LayoutError(f"{what} layer {i} is on {t.device}, layer 0 on {tensors[0].device}: all layers must share a device")

