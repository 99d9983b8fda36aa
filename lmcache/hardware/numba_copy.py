"""The numba kernels behind ``cpu_kernels`` (which checks every address range before calling them).

Imported at first use only: numba's import costs ~0.35 s, which every ``lmcache`` command would pay otherwise.
``cache=True``: compiled code is kept next to this file where writable, so later processes skip the compile.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


def _mem_op(width: int, nontemporal: bool):
    """An intrinsic copying ``width`` bytes from one address to another (non-temporal store: the
    destination must be ``width``-aligned, which callers check)."""

    @intrinsic
    def op(typingctx, dst, src):
        sig = types.void(types.uintp, types.uintp)

        def codegen(context, builder, signature, args):
            d, s = args
            ty = ir.VectorType(ir.IntType(64), 4) if width == 32 else ir.IntType(8 * width)
            value = builder.load(builder.inttoptr(s, ty.as_pointer()), align=1)
            store = builder.store(value, builder.inttoptr(d, ty.as_pointer()), align=width if nontemporal else 1)
            if nontemporal:
                store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
            return context.get_dummy_value()

        return sig, codegen

    return op


_nt32 = _mem_op(32, True)
_mv32, _mv8, _mv2, _mv1 = (_mem_op(w, False) for w in (32, 8, 2, 1))


@intrinsic
def _fence(typingctx):
    """Orders the non-temporal stores before anything after the kernel (they are weakly ordered)."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(nogil=True, cache=True)
def _copy(d, s, n):
    """``n`` bytes from ``s`` to ``d``: 32-byte vectors, streamed (no read of the destination) when the destination
    is aligned and the run long enough, then 8-byte words, then single bytes."""
    stream = n >= 64 and (d & 31) == 0
    while n >= 32:
        if stream:  # loop-invariant: the compiler unswitches it
            _nt32(d, s)
        else:
            _mv32(d, s)
        d, s, n = d + 32, s + 32, n - 32
    while n >= 8:
        _mv8(d, s)
        d, s, n = d + 8, s + 8, n - 8
    while n > 0:
        _mv1(d, s)
        d, s, n = d + 1, s + 1, n - 1


@njit(nogil=True, cache=True)
def rows_gather(base, head_stride, width, at, slot_off, l0, l1, chunk, num_layers, row):
    """Engine -> chunk. Row (head h, layer l, token t) of segment s sits at ``base[s, l] + h *
    head_stride[s] + slot_off[s, t]`` and goes to ``chunk`` at ``((h*L + l)*T + t)*row + at[s]``.
    Walks layer, segment, token, head: the engine's memory order for every layout we know."""
    segments, tokens = slot_off.shape
    heads = head_stride.shape[1]
    for l in range(l0, l1):
        for s in range(segments):
            for t in range(tokens):
                src = base[s, l] + slot_off[s, t]
                for h in range(heads):
                    _copy(chunk + ((h * num_layers + l) * tokens + t) * row + at[s], src + head_stride[s, h], width[s])
    _fence()


@njit(nogil=True, cache=True)
def rows_scatter(base, head_stride, width, at, slot_off, l0, l1, chunk, num_layers, row):
    """Chunk -> engine, the reverse of ``rows_gather``, walking the chunk in its memory order."""
    segments, tokens = slot_off.shape
    heads = head_stride.shape[1]
    for h in range(heads):
        for l in range(l0, l1):
            for t in range(tokens):
                src = chunk + ((h * num_layers + l) * tokens + t) * row
                for s in range(segments):
                    _copy(base[s, l] + head_stride[s, h] + slot_off[s, t], src + at[s], width[s])
    _fence()


@njit(nogil=True, cache=True)
def area(base, head_stride, block_off, in_block, run_src, run_dst, run_len, runs, l0, l1, chunk, num_layers,
          row, to_chunk):
    """BlockAreaKV <-> chunk. Token t's element runs: for run r of its in-block position p, bytes
    ``run_len[p, r]`` at area offset ``run_src[p, r]`` <-> row offset ``run_dst[p, r]``."""
    tokens = block_off.shape[0]
    heads = head_stride.shape[0]
    for l in range(l0, l1):
        for t in range(tokens):
            p = in_block[t]
            for h in range(heads):
                area = base[l] + block_off[t] + head_stride[h]
                line = chunk + ((h * num_layers + l) * tokens + t) * row
                for r in range(runs[p]):
                    n = run_len[p, r]
                    d, s = (line + run_dst[p, r], area + run_src[p, r]) if to_chunk else \
                        (area + run_src[p, r], line + run_dst[p, r])
                    if n == 2:  # one bf16/fp16 element (transposed keys): no general copy's tests
                        _mv2(d, s)
                    else:
                        _copy(d, s, n)
    _fence()
