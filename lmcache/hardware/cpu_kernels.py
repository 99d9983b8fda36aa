"""CPU copy kernels (numba, compiled at first use): canonical chunks <-> engine KV memory in host RAM.

Why not torch's index ops: they store with ordinary writes, so a gather or scatter of 512-byte rows reads
every destination cache line before overwriting it (read-for-ownership) and moves ~1.5x the bytes - about
2/3 of a ``memcpy``, which streams large copies with non-temporal stores (measured). These kernels write whole
aligned 32-byte vectors with non-temporal stores and walk the strided side in its memory order, so a layout
conversion runs at or above the speed of a flat copy of the same bytes. vLLM's CPU attention layout
(``BlockAreaKV``: keys transposed inside a block) moves element runs with the same kernels.

Nothing is built against torch: numba compiles these for the installed numpy and LLVM; the compiled code is
cached next to this file when it is writable. ``import_error()`` says why the kernels cannot be used.

Invariant: the kernels dereference raw addresses, so every address range a call touches is checked here,
against the storage of the tensors involved, before the call: a wrong offset raises instead of corrupting
memory. Chunks are ``[heads, layers, tokens, row]`` contiguous (``chunk_format``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmcache.core.layouts import BlockAreaKV, BlockPagedKV, KVLayout, TokenSlotKV, transposed_key_maps

_jit = None
_jit_error: str | None = None


def jit():
    """The compiled kernels (``numba_copy``), imported at first use; None when numba cannot be imported."""
    global _jit, _jit_error
    if _jit is None and _jit_error is None:
        try:
            from lmcache.hardware import numba_copy

            _jit = numba_copy
        except Exception as e:  # noqa: BLE001 - numba is a dependency; a broken install lands here, reported
            _jit_error = f"{type(e).__name__}: {e}"
    return _jit


def import_error() -> str | None:
    """Why the kernels cannot be used here (numba not importable), or None."""
    jit()
    return _jit_error


class KernelRefused(ValueError):
    """This memory cannot be moved by the kernels (the reason says why); the torch reference moves it."""


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses of ``t``'s storage."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _reach(t: torch.Tensor) -> tuple[int, int]:
    """[lowest, highest) byte addresses a view can touch (non-negative strides)."""
    if any(s < 0 for s in t.stride()):
        raise KernelRefused("a negative stride")
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _inside(views: list[torch.Tensor]) -> None:
    for v in views:
        lo, hi = _reach(v)
        s_lo, s_hi = _extent(v)
        if lo < s_lo or hi > s_hi:
            raise KernelRefused("a view reaches outside its storage")


@dataclass(frozen=True)
class RowProgram:
    """A BlockPagedKV or TokenSlotKV as byte-addressed rows: a canonical row is ``segments`` runs (K|V, or one)
    whose address is ``base[s, layer] + head_stride[s, head] + slot offset``; the slot offset is affine in the
    slot's block and in-block index (``block_size`` 1: token pools)."""

    base: np.ndarray  # [S, L] int64
    head_stride: np.ndarray  # [S, H] int64: head h's byte offset
    width: np.ndarray  # [S] bytes
    at: np.ndarray  # [S] byte offset inside the canonical row
    block_stride: np.ndarray  # [S] bytes
    token_stride: np.ndarray  # [S] bytes
    block_size: int
    row: int  # canonical row bytes
    num_slots: int

    def slot_offsets(self, slots: torch.Tensor) -> np.ndarray:
        s = slots.numpy().astype(np.int64, copy=False)
        n = self.block_size
        return (s // n)[None, :] * self.block_stride[:, None] + (s % n)[None, :] * self.token_stride[:, None]


@dataclass(frozen=True)
class AreaProgram:
    """A BlockAreaKV: per-layer base addresses, block and head strides, and per in-block position the byte runs
    its K then V elements form in the area (contiguous elements merged: V rows are one run, transposed keys
    one run per element)."""

    base: np.ndarray  # [L] int64
    head_stride: np.ndarray  # [H] int64
    block_stride: int
    block_size: int
    run_src: np.ndarray  # [N, R] int64
    run_dst: np.ndarray
    run_len: np.ndarray
    runs: np.ndarray  # [N] int64
    row: int
    num_slots: int
    #: vLLM CPU's "vec" order (a block's keys transposed, then its value rows): ``numba_copy.area`` moves its
    #: keys as tiles; False for any other order (element runs only)
    vec_order: bool = False
    k_dim: int = 0
    v_dim: int = 0
    elem: int = 0


def _layer_strides(tensors: list[torch.Tensor], what: str) -> tuple[int, ...]:
    stride = tensors[0].stride()
    if any(t.stride() != stride for t in tensors):
        raise KernelRefused(f"{what} layers have different strides")
    if stride[-1] != 1:
        raise KernelRefused(f"{what} rows are not contiguous")
    return stride


def build(kv: KVLayout) -> RowProgram | AreaProgram:
    """The kernel program for ``kv`` (host memory), or KernelRefused with the reason."""
    if kv.device.type != "cpu":
        raise KernelRefused(f"the KV memory is on {kv.device}")
    if isinstance(kv, BlockAreaKV):
        return _build_area(kv)
    if isinstance(kv, BlockPagedKV):
        t0 = kv.layers[0]
        sb, sh, sn, _ = _layer_strides(kv.layers, "BlockPagedKV")
        _inside(kv.layers)
        e = t0.element_size()
        return RowProgram(
            base=np.array([[t.data_ptr() for t in kv.layers]], dtype=np.int64),
            head_stride=np.arange(kv.num_heads, dtype=np.int64)[None, :] * (sh * e),
            width=np.array([t0.shape[3] * e], dtype=np.int64), at=np.zeros(1, dtype=np.int64),
            block_stride=np.array([sb * e], dtype=np.int64), token_stride=np.array([sn * e], dtype=np.int64),
            block_size=kv.block_size, row=t0.shape[3] * e, num_slots=kv.num_slots)
    assert isinstance(kv, TokenSlotKV)
    parts = [kv.k] if kv.v is None else [kv.k, kv.v]
    strides = [_layer_strides(p, name) for p, name in zip(parts, ("K", "V"))]
    _inside([t for p in parts for t in p])
    e = kv.k[0].element_size()
    widths = [p[0].shape[2] * e for p in parts]
    return RowProgram(
        base=np.array([[t.data_ptr() for t in p] for p in parts], dtype=np.int64),
        head_stride=np.stack([np.arange(kv.num_heads, dtype=np.int64) * (st[1] * e) for st in strides]),
        width=np.array(widths, dtype=np.int64), at=np.array([0, *widths[:-1]], dtype=np.int64),
        block_stride=np.array([st[0] * e for st in strides], dtype=np.int64),
        token_stride=np.zeros(len(parts), dtype=np.int64), block_size=1, row=sum(widths), num_slots=kv.num_slots)


def _build_area(kv: BlockAreaKV) -> AreaProgram:
    sb, sh, sa = _layer_strides(kv.layers, "BlockAreaKV")
    _inside(kv.layers)
    e = kv.layers[0].element_size()
    places = torch.cat([kv.k_index, kv.v_index], dim=1).to("cpu", torch.int64)  # [N, row elements]
    if int(places.min()) < 0 or int(places.max()) >= kv.layers[0].shape[2]:
        raise KernelRefused("an index map points outside the block area")
    n, k_dim, v_dim = kv.block_size, kv.k_index.shape[1], kv.v_index.shape[1]
    tile = 32 // e if e in (1, 2, 4) else 0
    vec_k, vec_v = transposed_key_maps(n, k_dim, v_dim)
    vec_order = bool(tile and n % tile == 0 and k_dim % tile == 0 and torch.equal(kv.k_index.cpu(), vec_k)
                     and torch.equal(kv.v_index.cpu(), vec_v))
    src, dst, length, runs = _run_tables(places, e)
    return AreaProgram(
        base=np.array([t.data_ptr() for t in kv.layers], dtype=np.int64),
        head_stride=np.arange(kv.num_heads, dtype=np.int64) * (sh * e), block_stride=sb * e,
        block_size=n, run_src=src, run_dst=dst, run_len=length, runs=runs, row=places.shape[1] * e,
        num_slots=kv.num_slots, vec_order=vec_order, k_dim=k_dim, v_dim=v_dim, elem=e)


def _run_tables(places: torch.Tensor, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per in-block position, the byte runs (area offset, row offset, length) of its row elements: contiguous
    elements merged (V rows are one run, transposed keys one run per element)."""
    src_runs, dst_runs, len_runs = [], [], []
    for p in range(places.shape[0]):
        idx = places[p].tolist()
        runs: list[list[int]] = []
        for d, a in enumerate(idx):
            if runs and a == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
                runs[-1][2] += 1
            else:
                runs.append([a, d, 1])
        src_runs.append([r[0] * e for r in runs])
        dst_runs.append([r[1] * e for r in runs])
        len_runs.append([r[2] * e for r in runs])
    most = max(len(r) for r in src_runs)

    def table(rows: list[list[int]]) -> np.ndarray:
        return np.array([r + [0] * (most - len(r)) for r in rows], dtype=np.int64)

    return table(src_runs), table(dst_runs), table(len_runs), np.array([len(r) for r in src_runs], dtype=np.int64)


def _chunk_address(chunk: torch.Tensor, program: RowProgram | AreaProgram, tokens: int) -> tuple[int, int]:
    if chunk.device.type != "cpu" or not chunk.is_contiguous() or chunk.dim() != 4:
        raise KernelRefused("the chunk is not a contiguous host tensor")
    heads, layers, t, row = chunk.shape
    if t != tokens or row * chunk.element_size() != program.row:
        raise KernelRefused(f"chunk shape {tuple(chunk.shape)} does not match {tokens} tokens of {program.row}-byte rows")
    return chunk.data_ptr(), layers


def _slots(slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    slots = slots.to("cpu", torch.int64)
    if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= num_slots):
        raise IndexError(f"a slot is outside [0, {num_slots})")  # plan_slots checks this too: never reached
    return slots


def run(program: RowProgram | AreaProgram, slots: torch.Tensor, chunk: torch.Tensor, layers: range, to_chunk: bool) -> None:
    """Move ``layers`` of the tokens at ``slots`` between the engine memory and ``chunk`` (``to_chunk``: a gather)."""
    slots = _slots(slots, program.num_slots)
    address, num_layers = _chunk_address(chunk, program, slots.numel())
    if layers.start < 0 or layers.stop > num_layers:
        raise KernelRefused(f"layers {layers} outside the chunk's {num_layers}")
    kernels = jit()
    if kernels is None:
        raise KernelRefused(f"numba is not importable ({_jit_error}): pip install numba")
    if isinstance(program, AreaProgram):
        s = slots.numpy()
        n = program.block_size
        kernels.area(program.base, program.head_stride, (s // n) * program.block_stride, s % n, program.run_src,
                     program.run_dst, program.run_len, program.runs, program.vec_order, n, program.k_dim,
                     program.v_dim, program.elem, layers.start, layers.stop, address, num_layers, program.row,
                     to_chunk)
        return
    fn = kernels.rows_gather if to_chunk else kernels.rows_scatter
    fn(program.base, program.head_stride, program.width, program.at, program.slot_offsets(slots), layers.start,
       layers.stop, address, num_layers, program.row)


def self_test() -> tuple[bool, str]:
    """Gather and scatter small memories of each layout kind (vLLM's, SGLang's, vLLM CPU's transposed keys) with
    the kernels, bit-exact against the torch reference converters."""
    from lmcache.core import convert

    # 32-token blocks of 32-wide keys in bf16: vLLM CPU's order takes the tiled kernel, tile pairs included
    layers, heads, n, k_dim, v_dim = 3, 2, 32, 32, 32
    slots = (torch.tensor([5, 2])[:, None] * n + torch.arange(n)).flatten()
    paged = torch.empty(layers, 8, n, heads, k_dim + v_dim, dtype=torch.bfloat16)
    pool = torch.empty(2, layers, 8 * n, heads, k_dim, dtype=torch.bfloat16)
    area = torch.empty(layers, 8, heads, n * (k_dim + v_dim), dtype=torch.bfloat16)
    k_index, v_index = transposed_key_maps(n, k_dim, v_dim)
    memories: list[tuple[str, KVLayout]] = [
        ("vLLM paged", BlockPagedKV([paged[l].permute(0, 2, 1, 3) for l in range(layers)])),
        ("SGLang token pool", TokenSlotKV([pool[0, l] for l in range(layers)], [pool[1, l] for l in range(layers)])),
        ("vLLM CPU block area", BlockAreaKV([area[l] for l in range(layers)], k_index, v_index)),
    ]
    if not build(memories[2][1]).vec_order:  # pragma: no cover - the shapes above are chosen for it
        return False, "kernel self-test: vLLM CPU's transposed keys did not take the tiled kernel (please report this)"
    for storage in (paged, pool, area):
        storage.view(torch.int16).random_()
    for name, kv in memories:
        plan = convert.plan_slots(kv, slots)
        want = torch.empty(heads, layers, slots.numel(), k_dim + v_dim, dtype=torch.bfloat16)
        convert.gather(kv, plan, want, range(layers))
        got = torch.zeros_like(want)
        program = build(kv)
        run(program, slots, got, range(layers), to_chunk=True)
        if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
            return False, f"kernel self-test: {name}: gathered bytes differ from the reference (please report this)"
        back = torch.zeros_like(want)
        got.view(torch.int16).random_()
        run(program, slots, got, range(layers), to_chunk=False)
        convert.gather(kv, plan, back, range(layers))
        if not torch.equal(got.view(torch.int16), back.view(torch.int16)):
            return False, f"kernel self-test: {name}: scattered bytes differ from the reference (please report this)"
    return True, ("kernel self-test passed (vLLM paged, SGLang token pool, vLLM CPU block area with tiled transposed "
                  "keys; gather and scatter, bit-exact)")
