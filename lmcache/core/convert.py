"""Reference converters between engine layouts and canonical chunks, in plain torch.

Correct on CPU and GPU tensors alike; the ``cpu`` hardware backend runs them, faster backends are
tested bit-exact against them. A canonical chunk is ``[heads, layers, tokens, row_dim]`` (see
``chunk_format``); these functions fill or read the layers in ``layers`` so callers can split work.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from lmcache.core.layouts import BlockAreaKV, BlockPagedKV, KVLayout, TokenSlotKV


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
    #: ``slots`` / ``positions`` in host memory when the caller gave host slots (kernels build their
    #: tables from these without a device round trip)
    host_slots: torch.Tensor | None = None
    host_positions: torch.Tensor | None = None


def plan_slots(kv: KVLayout, slots: torch.Tensor) -> SlotPlan:
    """Digest one chunk's slots where they are (checks on host slots cost no device synchronization),
    then move the results to the KV memory's device."""
    slots = slots.to(dtype=torch.long)
    positions = None
    if bool((slots < 0).any()):
        positions = torch.nonzero(slots >= 0).flatten()
        slots = slots[positions]
    if int(slots.numel()) and int(slots.max()) >= kv.num_slots:
        raise IndexError(f"slot {int(slots.max())} is out of range: the KV memory has {kv.num_slots} slots")
    host = slots.device.type == "cpu"
    host_slots, host_positions = (slots, positions) if host else (None, None)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(kv.device, non_blocking=True)

    def dev_opt(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else dev(t)

    if not isinstance(kv, BlockPagedKV):
        return SlotPlan(dev(slots), dev_opt(positions), None, None, None, host_slots, host_positions)
    n = kv.block_size
    if positions is None and slots.numel() % n == 0 and slots.numel():
        rows = slots.view(-1, n)
        first = rows[:, 0]
        if bool(((first % n) == 0).all()) and bool((rows - first[:, None] == torch.arange(n, device=slots.device)).all()):
            return SlotPlan(dev(slots), None, dev(first // n), None, None, host_slots, None)
    return SlotPlan(dev(slots), dev_opt(positions), None, dev(slots // n), dev(slots % n), host_slots, host_positions)


def plan_chunks(kv: KVLayout, slot_mapping: torch.Tensor, chunks: list[int], chunk_size: int) -> list[SlotPlan]:
    """``plan_slots`` for chunks ``chunks`` of ``slot_mapping`` at once: a few tensor ops for all of them
    instead of a dozen per chunk (per-chunk planning cost more than the copy on a GPU, measured)."""
    if not chunks:
        return []
    cs = chunk_size
    mapping = slot_mapping.to(dtype=torch.long)
    if chunks == list(range(chunks[0], chunks[0] + len(chunks))):
        rows = mapping[chunks[0] * cs : (chunks[-1] + 1) * cs].view(len(chunks), cs)
    else:
        rows = mapping.view(-1, cs)[torch.tensor(chunks, device=mapping.device)] if mapping.numel() % cs == 0 else \
            torch.stack([mapping[c * cs : (c + 1) * cs] for c in chunks])
    partial = (rows < 0).any(dim=1).tolist()
    if any(partial):  # chunks with tokens the engine holds already: rare, planned one by one
        whole = [i for i, p in enumerate(partial) if not p]
        by_index = dict(zip(whole, plan_chunks(kv, rows[whole].flatten(), list(range(len(whole))), cs)))
        return [by_index[i] if i in by_index else plan_slots(kv, rows[i]) for i in range(len(chunks))]
    top = int(rows.max())
    if top >= kv.num_slots:
        raise IndexError(f"slot {top} is out of range: the KV memory has {kv.num_slots} slots")
    host = rows if rows.device.type == "cpu" else None
    dev_rows = rows.to(kv.device, non_blocking=True)
    if not isinstance(kv, BlockPagedKV):
        return [SlotPlan(dev_rows[i], None, None, None, None, None if host is None else host[i]) for i in range(len(chunks))]
    n = kv.block_size
    if cs % n == 0:
        blocks = rows.view(len(chunks), cs // n, n)
        first = blocks[:, :, 0]
        whole_blocks = ((first % n) == 0).all(dim=1) & (
            blocks - first[:, :, None] == torch.arange(n, device=rows.device)).all(dim=2).all(dim=1)
        in_order: list[bool] = whole_blocks.tolist()
        block_ids = (first // n).to(kv.device, non_blocking=True)
    else:
        in_order = [False] * len(chunks)
    plans: list[SlotPlan] = []
    by_token = None
    for i, is_whole in enumerate(in_order):
        if is_whole:
            plans.append(SlotPlan(dev_rows[i], None, block_ids[i], None, None, None if host is None else host[i]))
            continue
        if by_token is None:
            by_token = (dev_rows // n, dev_rows % n)
        plans.append(SlotPlan(dev_rows[i], None, None, by_token[0][i], by_token[1][i], None if host is None else host[i]))
    return plans


_local = threading.local()
_WIDTHS = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)


def _widen(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same bytes viewed through the widest element type all of ``tensors`` allow.

    Bits, not values: no kernel sees a float, so fp8 (which lacks some kernels) and NaN payloads move
    exactly. Wide: torch's index kernels move one element per step, so viewing a bf16 row as 16-byte
    elements makes index_copy_ ~8x faster (measured) and index_select/copy_ no slower.
    """
    size = tensors[0].element_size()
    for dt in _WIDTHS:
        if dt.itemsize < size:
            break
        try:
            return tuple(t.view(dt) for t in tensors)
        except RuntimeError:  # last dim not contiguous, or sizes/offsets not divisible: try narrower
            continue
    raise TypeError(f"cannot view {tensors[0].dtype} tensors as raw bits")


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
    order = sorted((1, 2, 3), key=lambda d: -t.stride()[d])
    inner = t[0].permute([d - 1 for d in order]) if t.shape[0] else None
    if inner is None or not inner.is_contiguous():
        return None
    flat = t.as_strided((t.shape[0], inner.numel()), (t.stride(0), 1))
    phys = [0, *order]
    return flat, [t.shape[d] for d in order], [phys.index(d) for d in range(4)]


@dataclass(frozen=True)
class RowMap:
    """A BlockPagedKV whose layers all live in one allocation with the same strides (vLLM 0.33 allocates
    them so) seen as one table of ``row_dim``-wide rows: row(layer, head, slot) is affine in all three.
    A whole chunk (every layer and head) then moves with one index_select / index_copy_: one pass over
    the bytes, no transposing temporary."""

    rows: torch.Tensor  # [R, C'] over the whole allocation, widened
    base: torch.Tensor  # [H, L, 1]: row of (head, layer) at slot 0
    block_stride: int
    token_stride: int
    block_size: int
    #: [L, slots, H, C'] when slots are evenly spaced (block stride = block_size x token stride, as in
    #: vLLM's LBNHC) and layers too: scatters then index_copy_ along slots, writing in memory order
    by_slot: torch.Tensor | None = None

    def index(self, slots: torch.Tensor) -> torch.Tensor:
        at = (slots // self.block_size) * self.block_stride + (slots % self.block_size) * self.token_stride
        return (self.base + at.view(1, 1, -1)).view(-1)  # canonical order: head, layer, token


def row_map(kv: BlockPagedKV) -> RowMap | None:
    if "row_map" not in kv.plan_cache:
        kv.plan_cache["row_map"] = _build_row_map(kv)
    found: RowMap | None = kv.plan_cache["row_map"]
    return found


def _build_row_map(kv: BlockPagedKV) -> RowMap | None:
    first = kv.layers[0]
    storage = first.untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() or t.stride() != first.stride() for t in kv.layers):
        return None
    (wide,) = _widen(first)
    c = wide.shape[3]
    ratio = wide.element_size() // first.element_size()
    if wide.stride(3) != 1 or any(t.storage_offset() % (c * ratio) for t in kv.layers):
        return None
    sb, sh, sn = (wide.stride(d) for d in (0, 1, 2))
    if sb % c or sh % c or sn % c:
        return None
    total_rows = storage.nbytes() // (c * wide.element_size())
    rows = torch.empty(0, dtype=wide.dtype, device=first.device).set_(storage, 0, (total_rows, c), (c, 1))
    layer_rows = torch.tensor([t.storage_offset() // (c * ratio) for t in kv.layers], device=first.device)
    heads = torch.arange(kv.num_heads, device=first.device) * (sh // c)
    base = (heads.view(-1, 1, 1) + layer_rows.view(1, -1, 1))
    by_slot = None
    steps = {kv.layers[i + 1].storage_offset() - kv.layers[i].storage_offset() for i in range(len(kv.layers) - 1)}
    if sb == kv.block_size * sn and len(steps) <= 1:
        layer_step = (steps.pop() // ratio) if steps else 0
        by_slot = torch.empty(0, dtype=wide.dtype, device=first.device).set_(
            storage, first.storage_offset() // ratio, (len(kv.layers), kv.num_slots, kv.num_heads, c), (layer_step, sn, sh, 1))
    return RowMap(rows, base, sb // c, sn // c, kv.block_size, by_slot)


@dataclass(frozen=True)
class TokenRowMap:
    """A TokenSlotKV whose K and V pools (every layer) are strided views of one allocation - SGLang's host
    pool ``kv_buffer`` - seen as one table of rows: row(head, layer, K|V, slot) is affine, so a whole chunk
    moves with one index_select / index_copy_, as ``RowMap`` does for vLLM's layout."""

    rows: torch.Tensor  # [R, D'] over the whole allocation, widened
    base: torch.Tensor  # [H, L, 1, P]: row of (head, layer, part) at slot 0; P = 2 (K, V) or 1 (MLA)
    slot_stride: int

    def index(self, slots: torch.Tensor) -> torch.Tensor:
        return (self.base + (slots * self.slot_stride).view(1, 1, -1, 1)).reshape(-1)  # canonical order


def token_row_map(kv: TokenSlotKV) -> TokenRowMap | None:
    if "token_row_map" not in kv.plan_cache:
        kv.plan_cache["token_row_map"] = _build_token_row_map(kv)
    found: TokenRowMap | None = kv.plan_cache["token_row_map"]
    return found


def _build_token_row_map(kv: TokenSlotKV) -> TokenRowMap | None:
    parts = [kv.k] if kv.v is None else [kv.k, kv.v]
    first = kv.k[0]
    storage = first.untyped_storage()
    tensors = [t for part in parts for t in part]
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() or t.stride() != first.stride()
           or t.shape[1:] != first.shape[1:] for t in tensors):
        return None  # separate allocations, or K and V rows of different widths
    try:
        (wide,) = _widen(first)
    except TypeError:
        return None
    d = wide.shape[2]
    ratio = wide.element_size() // first.element_size()
    if wide.stride(2) != 1 or any(t.storage_offset() % (d * ratio) for t in tensors):
        return None
    s_slot, s_head = wide.stride(0), wide.stride(1)
    if s_slot % d or s_head % d:
        return None
    rows = torch.empty(0, dtype=wide.dtype, device=first.device).set_(
        storage, 0, (storage.nbytes() // (d * wide.element_size()), d), (d, 1))
    origin = torch.tensor([[t.storage_offset() // (d * ratio) for t in part] for part in parts],
                          device=first.device)  # [P, L]
    heads = torch.arange(kv.num_heads, device=first.device) * (s_head // d)
    base = (heads.view(-1, 1, 1, 1) + origin.t().reshape(1, len(kv.k), 1, len(parts))).contiguous()
    return TokenRowMap(rows, base, s_slot // d)


def gather(kv: KVLayout, plan: SlotPlan, out: torch.Tensor, layers: range) -> None:
    """Copy the planned tokens of ``layers`` from ``kv`` into canonical ``out`` ``[heads, L, T, row_dim]``."""
    if plan.positions is not None:
        raise ValueError("gather needs a KV slot for every token of the chunk (found negative slots)")
    if isinstance(kv, BlockAreaKV):
        _gather_area(kv, plan.slots, out, layers)
        return
    if isinstance(kv, BlockPagedKV) and len(layers) == len(kv.layers) and out.is_contiguous():
        rm = row_map(kv)
        if rm is not None:
            flat = out.view(rm.rows.dtype).view(-1, rm.rows.shape[1])  # rows as wide as the engine's
            if flat.device == rm.rows.device:
                torch.index_select(rm.rows, 0, rm.index(plan.slots), out=flat)
            else:  # engine memory on an accelerator, chunk in (pinned) host memory: gather there, then one copy
                tmp = _scratch(flat.numel(), flat.dtype, rm.rows.device).view_as(flat)
                torch.index_select(rm.rows, 0, rm.index(plan.slots), out=tmp)
                flat.copy_(tmp, non_blocking=True)
            return
    if not isinstance(kv, BlockPagedKV):
        tm = token_row_map(kv) if len(layers) == len(kv.k) and out.is_contiguous() else None
        if tm is not None:
            flat = out.view(tm.rows.dtype).view(-1, tm.rows.shape[1])  # rows as wide as the pool's
            if flat.device == tm.rows.device:
                torch.index_select(tm.rows, 0, tm.index(plan.slots), out=flat)
            else:
                tmp = _scratch(flat.numel(), flat.dtype, tm.rows.device).view_as(flat)
                torch.index_select(tm.rows, 0, tm.index(plan.slots), out=tmp)
                flat.copy_(tmp, non_blocking=True)
            return
        _gather_token_slots(kv, plan.slots, out, layers)
        return
    for layer in layers:
        src, dst = _widen(kv.layers[layer], out[:, layer])  # [B, H, N, C], [heads, T, C]
        heads, tokens, row = dst.shape
        if plan.blocks is None:
            dst.copy_(src[plan.block_idx, :, plan.in_block, :].permute(1, 0, 2))
            continue
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


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the element's width: moves are bit-exact (NaN payloads, fp8) and every
    index op exists for them."""
    return t.view(_BITS[t.element_size()])


def _area_index(kv: BlockAreaKV, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors picking token t's K then V elements of every head: (block ``[T, 1, 1]``, head ``[1, H, 1]``,
    place ``[T, 1, row_dim]``), so ``layer[block, head, place]`` is ``[T, H, row_dim]``: only those elements move
    (an index_select of whole block areas per token moved block_size times the bytes: measured 0.02 GB/s)."""
    places = kv.plan_cache.get("area_places")
    if places is None or places.device != slots.device:
        places = kv.plan_cache["area_places"] = torch.cat([kv.k_index, kv.v_index], dim=1).to(slots.device)
    n = kv.block_size
    heads = torch.arange(kv.num_heads, device=slots.device)
    return (slots // n)[:, None, None], heads[None, :, None], places[slots % n][:, None, :]


def _gather_area(kv: BlockAreaKV, slots: torch.Tensor, out: torch.Tensor, layers: range) -> None:
    index = _area_index(kv, slots)
    for layer in layers:
        _bits(out[:, layer]).copy_(_bits(kv.layers[layer])[index].permute(1, 0, 2))


def _scatter_area(kv: BlockAreaKV, slots: torch.Tensor, chunk: torch.Tensor, layers: range) -> None:
    index = _area_index(kv, slots)
    for layer in layers:
        _bits(kv.layers[layer])[index] = _bits(chunk[:, layer]).permute(1, 0, 2)


def _gather_token_slots(kv: TokenSlotKV, slots: torch.Tensor, out: torch.Tensor, layers: range) -> None:
    for layer in layers:
        if kv.v is None:
            k, dst = _widen(kv.k[layer], out[:, layer])
            dst.copy_(k.index_select(0, slots).permute(1, 0, 2))
            continue
        k_dim = kv.k[layer].shape[2]
        k, dst_k = _widen(kv.k[layer], out[:, layer, :, :k_dim])
        dst_k.copy_(k.index_select(0, slots).permute(1, 0, 2))  # [T, H, Dk] -> [H, T, Dk]
        v, dst_v = _widen(kv.v[layer], out[:, layer, :, k_dim:])
        dst_v.copy_(v.index_select(0, slots).permute(1, 0, 2))


def scatter(kv: KVLayout, plan: SlotPlan, chunk: torch.Tensor, layers: range) -> None:
    """Copy canonical ``chunk`` ``[heads, L, T, row_dim]`` into the planned slots of ``kv``."""
    if chunk.device != kv.device:
        chunk = chunk.to(kv.device, non_blocking=True)
    if plan.positions is not None:
        chunk = chunk.index_select(2, plan.positions)
    if isinstance(kv, BlockAreaKV):
        _scatter_area(kv, plan.slots, chunk, layers)
        return
    if isinstance(kv, BlockPagedKV) and len(layers) == len(kv.layers):
        rm = row_map(kv)
        if rm is not None:
            src = chunk.contiguous().view(rm.rows.dtype)
            if rm.by_slot is not None:  # [H, L, T, C'] -> [L, T, H, C'] written slot by slot
                rm.by_slot.index_copy_(1, plan.slots, src.permute(1, 2, 0, 3))
            else:
                rm.rows.index_copy_(0, rm.index(plan.slots), src.view(-1, rm.rows.shape[1]))
            return
    if not isinstance(kv, BlockPagedKV):
        tm = token_row_map(kv) if len(layers) == len(kv.k) else None
        if tm is not None:
            src = chunk.contiguous().view(tm.rows.dtype)
            tm.rows.index_copy_(0, tm.index(plan.slots), src.view(-1, tm.rows.shape[1]))
            return
        _scatter_token_slots(kv, plan.slots, chunk, layers)
        return
    for layer in layers:
        dst, src = _widen(kv.layers[layer], chunk[:, layer])  # [B, H, N, C], [heads, T, C]
        heads, tokens, row = src.shape
        if plan.blocks is None:
            dst[plan.block_idx, :, plan.in_block, :] = src.permute(1, 0, 2)
            continue
        nb = plan.blocks.numel()
        blocks_view = src.view(heads, nb, tokens // nb, row).permute(1, 0, 2, 3)  # [nb, H, N, C]
        rows = _block_rows(dst)
        if rows is None:
            dst.index_copy_(0, plan.blocks, blocks_view)
            continue
        # transpose into the engine's physical block order first, then copy whole rows
        flat, phys_shape, to_logical = rows
        tmp = _scratch(nb * flat.shape[1], dst.dtype, dst.device).view(nb, *phys_shape)
        tmp.permute(to_logical).copy_(blocks_view)
        flat.index_copy_(0, plan.blocks, tmp.view(nb, -1))


def _scatter_token_slots(kv: TokenSlotKV, slots: torch.Tensor, chunk: torch.Tensor, layers: range) -> None:
    for layer in layers:
        if kv.v is None:
            k, src = _widen(kv.k[layer], chunk[:, layer])
            k.index_copy_(0, slots, src.permute(1, 0, 2))
            continue
        k_dim = kv.k[layer].shape[2]
        k, src_k = _widen(kv.k[layer], chunk[:, layer, :, :k_dim])
        k.index_copy_(0, slots, src_k.permute(1, 0, 2))
        v, src_v = _widen(kv.v[layer], chunk[:, layer, :, k_dim:])
        v.index_copy_(0, slots, src_v.permute(1, 0, 2))
