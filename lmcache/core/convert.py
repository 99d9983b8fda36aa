"""Reference converters between engine layouts and canonical chunks, in plain torch.

Correct on CPU and GPU tensors alike; the ``cpu`` hardware backend runs them, faster backends are
tested bit-exact against them. A canonical chunk is ``[heads, layers, tokens, row_dim]`` (see
``chunk_format``); these functions fill or read the layers in ``layers`` so callers can split work.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from lmcache.core.layouts import BlockPagedKV, KVLayout, TokenSlotKV


@dataclass(frozen=True)
class SlotPlan:
    """One chunk's slots, pre-digested once for all layers.

    ``positions``: which chunk tokens take part (None = all). For a BlockPagedKV whose tokens fill whole
    blocks in order, ``blocks`` holds the block ids and the copy moves whole blocks (the common case).
    """

    slots: torch.Tensor
    positions: torch.Tensor | None
    blocks: torch.Tensor | None
    block_idx: torch.Tensor | None
    in_block: torch.Tensor | None


def plan_slots(kv: KVLayout, slots: torch.Tensor) -> SlotPlan:
    slots = slots.to(device=kv.device, dtype=torch.long)
    positions = None
    if bool((slots < 0).any()):
        positions = torch.nonzero(slots >= 0).flatten()
        slots = slots[positions]
    if int(slots.numel()) and int(slots.max()) >= kv.num_slots:
        raise IndexError(f"slot {int(slots.max())} is out of range: the KV memory has {kv.num_slots} slots")
    if not isinstance(kv, BlockPagedKV):
        return SlotPlan(slots, positions, None, None, None)
    n = kv.block_size
    if positions is None and slots.numel() % n == 0 and slots.numel():
        rows = slots.view(-1, n)
        first = rows[:, 0]
        if bool(((first % n) == 0).all()) and bool((rows - first[:, None] == torch.arange(n, device=slots.device)).all()):
            return SlotPlan(slots, None, first // n, None, None)
    return SlotPlan(slots, positions, None, slots // n, slots % n)


_local = threading.local()
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Move bits, not values: integer views have every kernel (fp8 lacks some) and no NaN semantics."""
    return t.view(_BITS[t.element_size()])


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable buffer: a fresh large allocation per chunk would page-fault every time."""
    key = (dtype, device)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _block_rows(t: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]] | None:
    """View a logical ``[B, H, N, C]`` tensor as ``[B, H*N*C]`` rows when each block is contiguous
    in memory (whatever its inner order), plus the inner physical shape and the permutation from
    ``[nb, *physical]`` back to logical order. None when blocks are not contiguous (cross-layer layouts)."""
    order = sorted((1, 2, 3), key=lambda d: -t.stride(d))
    inner = t[0].permute([d - 1 for d in order]) if t.shape[0] else None
    if inner is None or not inner.is_contiguous():
        return None
    flat = t.as_strided((t.shape[0], inner.numel()), (t.stride(0), 1))
    phys = [0, *order]
    return flat, [t.shape[d] for d in order], [phys.index(d) for d in range(4)]


def gather(kv: KVLayout, plan: SlotPlan, out: torch.Tensor, layers: range) -> None:
    """Copy the planned tokens of ``layers`` from ``kv`` into canonical ``out`` ``[heads, L, T, row_dim]``."""
    if plan.positions is not None:
        raise ValueError("gather needs a KV slot for every token of the chunk (found negative slots)")
    out = _bits(out)
    if isinstance(kv, BlockPagedKV):
        heads, tokens, row = out.shape[0], out.shape[2], out.shape[3]
        for layer in layers:
            src = _bits(kv.layers[layer])
            dst = out[:, layer]
            if plan.blocks is not None:
                nb = plan.blocks.numel()
                rows = _block_rows(src)
                if rows is None:
                    picked = src.index_select(0, plan.blocks)  # [nb, H, N, C]
                else:  # whole blocks as contiguous rows (memcpy speed), then one transposing copy
                    flat, phys_shape, to_logical = rows
                    tmp = _scratch(nb * flat.shape[1], src.dtype, src.device).view(nb, flat.shape[1])
                    torch.index_select(flat, 0, plan.blocks, out=tmp)
                    picked = tmp.view(nb, *phys_shape).permute(to_logical)
                dst.view(heads, nb, tokens // nb, row).copy_(picked.permute(1, 0, 2, 3))
            else:
                dst.copy_(src[plan.block_idx, :, plan.in_block, :].permute(1, 0, 2))
    else:
        _gather_token_slots(kv, plan.slots, out, layers)


def _gather_token_slots(kv: TokenSlotKV, slots: torch.Tensor, out: torch.Tensor, layers: range) -> None:
    for layer in layers:
        k = _bits(kv.k[layer]).index_select(0, slots)  # [T, H, Dk]
        if kv.v is None:
            out[:, layer].copy_(k.permute(1, 0, 2))
            continue
        k_dim = k.shape[2]
        out[:, layer, :, :k_dim].copy_(k.permute(1, 0, 2))
        out[:, layer, :, k_dim:].copy_(_bits(kv.v[layer]).index_select(0, slots).permute(1, 0, 2))


def scatter(kv: KVLayout, plan: SlotPlan, chunk: torch.Tensor, layers: range) -> None:
    """Copy canonical ``chunk`` ``[heads, L, T, row_dim]`` into the planned slots of ``kv``."""
    chunk = _bits(chunk)
    if chunk.device != kv.device:
        chunk = chunk.to(kv.device, non_blocking=True)
    if plan.positions is not None:
        chunk = chunk.index_select(2, plan.positions)
    if isinstance(kv, BlockPagedKV):
        heads, tokens, row = chunk.shape[0], chunk.shape[2], chunk.shape[3]
        for layer in layers:
            dst = _bits(kv.layers[layer])
            src = chunk[:, layer]
            if plan.blocks is not None:
                nb = plan.blocks.numel()
                blocks_view = src.view(heads, nb, tokens // nb, row).permute(1, 0, 2, 3)  # [nb, H, N, C]
                rows = _block_rows(dst)
                if rows is None:
                    dst.index_copy_(0, plan.blocks, blocks_view)
                else:  # transpose into the engine's physical block order first, then copy whole rows
                    flat, phys_shape, to_logical = rows
                    tmp = _scratch(nb * flat.shape[1], dst.dtype, dst.device).view(nb, *phys_shape)
                    tmp.permute(to_logical).copy_(blocks_view)
                    flat.index_copy_(0, plan.blocks, tmp.view(nb, -1))
            else:
                dst[plan.block_idx, :, plan.in_block, :] = src.permute(1, 0, 2)
        return
    for layer in layers:
        src = chunk[:, layer]
        k = _bits(kv.k[layer])
        if kv.v is None:
            k.index_copy_(0, plan.slots, src.permute(1, 0, 2))
            continue
        k_dim = k.shape[2]
        k.index_copy_(0, plan.slots, src[:, :, :k_dim].permute(1, 0, 2))
        _bits(kv.v[layer]).index_copy_(0, plan.slots, src[:, :, k_dim:].permute(1, 0, 2))
