"""Paged gather/scatter as Triton kernels: engine KV memory <-> canonical chunks, every layer in one launch.

One kernel serves every layout lmcache knows, because it walks strides, not shapes: a token's row in
the engine is ``layer_origin[l] + (slot // block_size) * s_block + h * s_head + (slot % block_size) * s_tok``
(vLLM's ``[B, H, N, C]`` views in any physical order; SGLang's token pools with block_size 1 and K and V
as two column ranges of the canonical row; MLA with one head). The canonical chunk row of (head h,
layer l, token t) is ``((h * L + l) * T + t) * row``. Bits are copied, not values: rows are moved as the
widest integer that divides every stride and offset, so fp8 and NaN payloads move exactly.

Layers and chunks may be separate allocations: their origins are passed as element offsets from one
reference pointer (a flat address space: CUDA/ROCm unified addressing, host memory under the Triton
interpreter). Pinned host chunks are read or written by the kernel directly (zero-copy over PCIe).

JIT-compiled by Triton against whatever torch/Triton is installed: nothing to rebuild on an upgrade.
On a machine without a GPU, ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors (the tests do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcache.core.convert import SlotPlan
from lmcache.core.layouts import BlockAreaKV, BlockPagedKV, KVLayout

try:
    import triton
    import triton.language as tl

    IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 - any import failure means "no Triton here", with its reason
    triton = tl = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"

_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}

if triton is not None:

    @triton.jit
    def _copy_rows(kv_ref, layer_origin, chunk_ref, chunk_origin, slots, T, tiles, L, layer0, H, block_size,
                   s_block, s_head, s_tok, row, col0, WIDTH: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_C: tl.constexpr, TO_CHUNK: tl.constexpr):
        # builtins only (no triton.language helpers that are themselves @jit functions): the interpreter
        # can then run this kernel even when Triton was imported before TRITON_INTERPRET was set
        pid_t = tl.program_id(0)  # chunk j, token tile
        pid_lh = tl.program_id(1)  # layer l (from layer0), head h
        j = pid_t // tiles
        t = (pid_t % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        layer = layer0 + pid_lh // H
        head = pid_lh % H
        in_chunk = t < T
        slot = tl.load(slots + j * T + t, mask=in_chunk, other=-1)
        live = in_chunk & (slot >= 0)  # a negative slot: no KV for this token, leave both sides alone
        slot = tl.where(live, slot, 0)
        kv_row = (tl.load(layer_origin + layer) + (slot // block_size) * s_block + head * s_head
                  + (slot % block_size) * s_tok)
        ch_row = tl.load(chunk_origin + j) + ((head * L + layer) * T + t).to(tl.int64) * row + col0
        for c0 in tl.static_range(0, WIDTH, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = live[:, None] & (c < WIDTH)[None, :]
            kv_at = kv_ref + kv_row[:, None] + c[None, :]
            ch_at = chunk_ref + ch_row[:, None] + c[None, :]
            if TO_CHUNK:
                tl.store(ch_at, tl.load(kv_at, mask=mask), mask=mask)
            else:
                tl.store(kv_at, tl.load(ch_at, mask=mask), mask=mask)


@dataclass(frozen=True)
class _Part:
    """One column range of the canonical row and the engine tensors (one per layer) holding it."""

    tensors: tuple[torch.Tensor, ...]  # per layer, logical [blocks, heads, block_size, width] (strided)
    col0: int  # first column in the canonical row, in elements


def _parts(kv: KVLayout) -> list[_Part]:
    if isinstance(kv, BlockPagedKV):
        return [_Part(tuple(kv.layers), 0)]
    k = tuple(t.unsqueeze(2) for t in kv.k)  # token pools [slots, H, D] -> [slots, H, 1, D]
    if kv.v is None:
        return [_Part(k, 0)]
    return [_Part(k, 0), _Part(tuple(t.unsqueeze(2) for t in kv.v), kv.k[0].shape[2])]


def _element_width(kv: KVLayout, parts: list[_Part], chunks: list[torch.Tensor]) -> int:
    """Widest integer (bytes) dividing every stride, width, column offset and origin involved."""
    es = kv.dtype.itemsize
    quantities = []
    for p in parts:
        ref = p.tensors[0]
        if ref.stride(3) != 1:
            return 0  # rows not contiguous in the engine: not a layout these kernels handle
        quantities += [ref.stride(0) * es, ref.stride(1) * es, ref.stride(2) * es, ref.shape[3] * es, p.col0 * es]
        quantities += [t.data_ptr() for t in p.tensors]
    quantities += [c.data_ptr() for c in chunks] + [chunks[0].shape[-1] * es]
    for w in (8, 4, 2, 1):
        if all(q % w == 0 for q in quantities):
            return w
    return 1


def _ref(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor of ``dtype`` at ``t``'s first byte: the pointer every origin is relative to."""
    w = dtype.itemsize
    byte_off = t.storage_offset() * t.element_size()
    return torch.empty(0, dtype=dtype, device=t.device).set_(t.untyped_storage(), byte_off // w, (1,), (1,))


@dataclass
class Launch:
    """Everything a gather or scatter of some jobs needs, prepared once for any number of layer ranges."""

    parts: list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...], int]]  # (kv_ref, origins, strides/shape, col0)
    chunk_ref: torch.Tensor
    chunk_origin: torch.Tensor
    slots: torch.Tensor
    jobs: int
    heads: int
    layers: int
    tokens: int
    row: int
    element_bytes: int


class TritonCopier:
    """Launches the kernels; device-agnostic (a CUDA or ROCm device, or CPU under the interpreter)."""

    BLOCK_T = 16

    def supports(self, kv: KVLayout) -> str | None:
        """None when the kernels handle ``kv``; otherwise why not (the caller uses the reference ops)."""
        if triton is None:
            return f"Triton is not importable ({IMPORT_ERROR})"
        if isinstance(kv, BlockAreaKV):
            return "the engine packs each block's K and V in its own order (BlockAreaKV): the reference ops place them"
        if any(p.tensors[0].stride(3) != 1 for p in _parts(kv)):
            return "the engine's KV rows are not contiguous in their last dimension"
        return None

    def gather(self, kv: KVLayout, jobs: list[tuple[SlotPlan, torch.Tensor]], layers: range | None = None) -> None:
        for plan, _ in jobs:
            if plan.positions is not None:
                raise ValueError("gather needs a KV slot for every token of the chunk (found negative slots)")
        launch = self.prepare(kv, jobs)
        if launch is not None:
            self.run(launch, layers, to_chunk=True)

    def scatter(self, kv: KVLayout, jobs: list[tuple[SlotPlan, torch.Tensor]], layers: range | None = None) -> None:
        launch = self.prepare(kv, jobs)
        if launch is not None:
            self.run(launch, layers, to_chunk=False)

    def prepare(self, kv: KVLayout, jobs: list[tuple[SlotPlan, torch.Tensor]]) -> Launch | None:
        jobs = [(p, c) for p, c in jobs if p.slots.numel()]
        if not jobs:
            return None
        chunks = [c for _, c in jobs]
        heads, layers, tokens, row = chunks[0].shape
        if any(tuple(c.shape) != (heads, layers, tokens, row) or not c.is_contiguous() for c in chunks):
            raise ValueError("every chunk of one launch must be a contiguous [heads, layers, tokens, row] tensor "
                             f"of the same shape (first: {tuple(chunks[0].shape)})")
        parts = _parts(kv)
        w = _element_width(kv, parts, chunks)
        if w == 0:
            raise ValueError("the engine's KV rows are not contiguous in their last dimension")
        es = kv.dtype.itemsize
        wide = _INT[w]
        device = kv.device
        if all(p.positions is None and p.host_slots is not None and p.host_slots.numel() == tokens for p, _ in jobs):
            slots = torch.stack([p.host_slots for p, _ in jobs])  # the common case: one op for all chunks
        else:
            slots = torch.full((len(jobs), tokens), -1, dtype=torch.int64)
            for j, (plan, _) in enumerate(jobs):  # the plan's slots, back in chunk-token positions
                s = plan.host_slots if plan.host_slots is not None else plan.slots.to("cpu")
                if plan.positions is None:
                    slots[j, : s.numel()] = s
                else:
                    slots[j, plan.host_positions if plan.host_positions is not None else plan.positions.to("cpu")] = s
        chunk_origin = torch.tensor([(c.data_ptr() - chunks[0].data_ptr()) // w for c in chunks], dtype=torch.int64)
        prepared = []
        for part in parts:
            ref = part.tensors[0]
            origin = torch.tensor([(t.data_ptr() - ref.data_ptr()) // w for t in part.tensors], dtype=torch.int64)
            geometry = (ref.shape[2], ref.stride(0) * es // w, ref.stride(1) * es // w, ref.stride(2) * es // w,
                        ref.shape[3] * es // w)
            prepared.append((_ref(ref, wide), origin.to(device, non_blocking=True), geometry, part.col0 * es // w))
        return Launch(prepared, _ref(chunks[0], wide), chunk_origin.to(device, non_blocking=True),
                      slots.to(device, non_blocking=True), len(jobs), heads, layers, tokens, row * es // w, w)

    def run(self, launch: Launch, layers: range | None, to_chunk: bool) -> None:
        """Copy ``layers`` (default: all) of a prepared launch; one kernel launch per K/V part."""
        layers = layers if layers is not None else range(launch.layers)
        if not len(layers):
            return
        tiles = -(-launch.tokens // self.BLOCK_T)
        grid = (launch.jobs * tiles, len(layers) * launch.heads)
        for kv_ref, origin, (block_size, s_block, s_head, s_tok, width), col0 in launch.parts:
            _copy_rows[grid](
                kv_ref, origin, launch.chunk_ref, launch.chunk_origin, launch.slots, launch.tokens, tiles,
                launch.layers, layers.start, launch.heads, block_size, s_block, s_head, s_tok, launch.row, col0,
                WIDTH=width, BLOCK_T=self.BLOCK_T, BLOCK_C=min(triton.next_power_of_2(width), 128),
                TO_CHUNK=to_chunk)
