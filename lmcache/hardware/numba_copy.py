"""The numba kernels behind ``cpu_kernels`` (which checks every address range before calling them).

Imported at first use only: numba's import costs ~0.35 s, which every ``lmcache`` command would pay otherwise.
``cache=True``: compiled code is kept next to this file where writable, so later processes skip the compile.
"""

from __future__ import annotations

import numpy as np
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


def _unpack_mask(n: int, m: int, unit: int, high: bool) -> list[int]:
    """shufflevector indices of an x86 unpack (lo or hi) of ``unit``-element groups within each 128-bit lane of
    ``m`` elements, for ``n``-element vectors a (indices 0..n-1) and b (n..2n-1)."""
    out = []
    for lane in range(n // m):
        first = lane * m + (m // 2 if high else 0)
        for g in range(m // 2 // unit):
            for source in (0, n):
                out.extend(source + first + g * unit + e for e in range(unit))
    return out


def _transpose_network(bits: int) -> list[list[tuple[int, int, int, list[int]]]]:
    """The shuffles transposing an n x n tile of ``bits``-bit elements held in n 256-bit rows: per stage, (output
    row, input row x, input row y, indices into x||y). First the textbook in-lane transpose of each group of m
    rows (m elements per 128-bit lane): log2(m) stages of unpacks of 1, 2, 4, ... elements; then one 128-bit lane
    exchange. Every stage is a single-cycle in-lane unpack or a lane permute on x86 (vpunpck*, vperm2i128), not
    the slow cross-lane word permutes a plain interleave needs. ``tests/test_cpu_kernels.py`` checks it."""
    n, m = 256 // bits, 128 // bits
    stages = []
    for s in range(m.bit_length() - 1):
        step = 2 ** s
        lo, hi = _unpack_mask(n, m, step, False), _unpack_mask(n, m, step, True)
        stage = []
        for first in range(0, n, 2 * step):  # 2*step <= m: a block of rows never straddles two groups
            for j in range(step):
                stage.append((first + 2 * j, first + j, first + j + step, lo))
                stage.append((first + 2 * j + 1, first + j, first + j + step, hi))
        stages.append(stage)
    low_lanes = list(range(m)) + list(range(n, n + m))
    high_lanes = list(range(m, n)) + list(range(n + m, 2 * n))
    stages.append([(k, k, k + m, low_lanes) for k in range(m)] + [(k + m, k, k + m, high_lanes) for k in range(m)])
    return stages


def _transpose_op(bits: int, pair: bool, nontemporal: bool):
    """An intrinsic transposing square tiles of ``bits``-bit elements, 32 bytes a row (16x16 of bf16/fp16, 8x8
    of fp32, 32x32 of fp8): rows ``src + i*src_stride`` in, rows ``dst + j*dst_stride`` out; element (i, j) of
    the input becomes element (j, i) of the output. ``pair``: two tiles, input rows 0..n-1 and n..2n-1, whose
    output rows are stored side by side (64 bytes: a whole cache line, so that a ``nontemporal`` store skips the
    line's read-for-ownership; the destination is then 64-byte aligned, which callers check).

    The shuffles (``_transpose_network``) run in registers as explicit shufflevectors. Why: the element-wise
    gather LLVM derives from a scalar loop uses vector gathers of 16-bit elements, which ran at a third of a
    plain copy here, and tiles stored as half cache lines at half of it (measured)."""
    n = 256 // bits
    vec = ir.VectorType(ir.IntType(bits), n)
    mask_ty = ir.VectorType(ir.IntType(32), n)
    network = [[(o, x, y, ir.Constant(mask_ty, mask)) for o, x, y, mask in stage] for stage in _transpose_network(bits)]

    @intrinsic
    def op(typingctx, dst, dst_stride, src, src_stride):
        sig = types.void(types.uintp, types.uintp, types.uintp, types.uintp)

        def codegen(context, builder, signature, args):
            d, ds, s, ss = args
            i64 = ir.IntType(64)

            def at(base, stride, i, offset=0):
                address = builder.add(builder.add(base, builder.mul(stride, ir.Constant(i64, i))),
                                      ir.Constant(i64, offset))
                return builder.inttoptr(address, vec.as_pointer())

            tiles = []
            for tile in range(2 if pair else 1):
                rows = [builder.load(at(s, ss, tile * n + i), align=1) for i in range(n)]
                for stage in network:
                    shuffled = list(rows)
                    for o, x, y, mask in stage:
                        shuffled[o] = builder.shuffle_vector(rows[x], rows[y], mask)
                    rows = shuffled
                tiles.append(rows)
            for j in range(n):
                for tile, rows in enumerate(tiles):
                    store = builder.store(rows[j], at(d, ds, j, 32 * tile), align=32 if nontemporal else 1)
                    if nontemporal:
                        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
            return context.get_dummy_value()

        return sig, codegen

    return op


def _tile_for(bits: int):
    """The tile move for ``bits``-bit elements: one tile or a pair (``_transpose_op``), streamed where its stores
    fill whole 64-byte-aligned lines (a pair's 64-byte rows, or a single tile's 32-byte rows laid end to end)."""
    single, single_streamed, paired, paired_streamed = (_transpose_op(bits, pair, streamed)
                                                        for pair in (False, True) for streamed in (False, True))

    @njit(inline="always")
    def tile(dst, dst_stride, src, src_stride, pair):
        if not pair and dst_stride == 32 and (dst & 63) == 0:
            single_streamed(dst, dst_stride, src, src_stride)
        elif not pair:
            single(dst, dst_stride, src, src_stride)
        elif (dst & 63) == 0 and (dst_stride & 63) == 0:
            paired_streamed(dst, dst_stride, src, src_stride)
        else:
            paired(dst, dst_stride, src, src_stride)

    return tile


_tile8, _tile16, _tile32 = (_tile_for(b) for b in (8, 16, 32))


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


@njit(inline="always")
def _tile(dst, dst_stride, src, src_stride, elem, pair):
    """One tile (``pair``: two, output rows side by side) of ``elem``-byte elements (``_tile_for``)."""
    if elem == 2:
        _tile16(dst, dst_stride, src, src_stride, pair)
    elif elem == 4:
        _tile32(dst, dst_stride, src, src_stride, pair)
    else:
        _tile8(dst, dst_stride, src, src_stride, pair)


@njit(inline="always")
def _area_span(line, area, p, span, block_size, k_dim, elem, row, v_at, v_bytes, n, group, pair, to_chunk):
    """``span`` tokens (whole groups) at positions p.. of one block, one head and layer: keys key row by key row
    as tiles (the area in its memory order; the chunk side whole lines, streamed), then value rows."""
    if to_chunk:
        for d in range(0, k_dim, 2 * n if pair else n):
            for sub in range(0, span, n):
                _tile(line + sub * row + d * elem, row, area + (d * block_size + p + sub) * elem, block_size * elem,
                      elem, pair)
        for i in range(span):
            _copy(line + i * row + k_dim * elem, area + v_at + (p + i) * v_bytes, v_bytes)
    else:
        for d in range(0, k_dim, n):
            for sub in range(0, span, group):
                _tile(area + (d * block_size + p + sub) * elem, block_size * elem, line + sub * row + d * elem, row,
                      elem, pair)
        for i in range(span):
            _copy(area + v_at + (p + i) * v_bytes, line + i * row + k_dim * elem, v_bytes)


@njit(nogil=True, cache=True)
def _spans(block_off, in_block, group):
    """Per token: the length of the span of whole groups of tokens at consecutive, group-aligned positions of one
    block that starts there; 0 for a token moved on its own; -1 inside a span."""
    tokens = block_off.shape[0]
    spans = np.zeros(tokens, np.int64)
    t = 0
    while t < tokens:
        p, span = in_block[t], 0
        if p % group == 0:
            while t + span + group <= tokens:
                ok = True
                for i in range(span, span + group):
                    if block_off[t + i] != block_off[t] or in_block[t + i] != p + i:
                        ok = False
                        break
                if not ok:
                    break
                span += group
        spans[t] = span
        spans[t + 1:t + span] = -1
        t += max(span, 1)
    return spans


# Helpers here take scalars only: a call passing arrays increfs and decrefs each (atomics), which cost more than
# the 256-byte copy it wraps, even inlined (measured: 2 vs 8 GB/s)
@njit(nogil=True, cache=True)
def area(base, head_stride, block_off, in_block, run_src, run_dst, run_len, runs, vec_order, block_size, k_dim,
         v_dim, elem, l0, l1, chunk, num_layers, row, to_chunk):
    """BlockAreaKV <-> chunk. Token t's element runs: for run r of its in-block position p, bytes
    ``run_len[p, r]`` at area offset ``run_src[p, r]`` <-> row offset ``run_dst[p, r]``.

    ``vec_order``: the area is vLLM CPU's "vec" order, a block's keys transposed (element d of in-block position
    p at area offset ``(d*block_size + p) * elem``), then its values row by row. Then a span of whole groups of
    tokens at consecutive, group-aligned positions of one block (``_spans``) moves its keys as tiles (``_tile``)
    and each value row as one run; any other token moves by its element runs. Groups are 2n tokens where the
    block size allows, so that key rows are read or written in whole 64-byte lines, and tiles go in pairs whose
    output rows are whole lines: gathering, 2n key dims of n tokens (a 64-byte piece of each chunk row);
    scattering, n key dims of 2n tokens (a 64-byte piece of each transposed key row).

    Walks layer, token, head: the engine's memory order (a scatter in the chunk's order measured slower)."""
    tokens = block_off.shape[0]
    heads = head_stride.shape[0]
    n = 32 // elem if vec_order else 1
    group = 2 * n if block_size % (2 * n) == 0 else n
    pair = k_dim % (2 * n) == 0 if to_chunk else group == 2 * n
    v_at, v_bytes = block_size * k_dim * elem, v_dim * elem
    spans = _spans(block_off, in_block, group) if vec_order else np.zeros(tokens, np.int64)
    for l in range(l0, l1):
        for t in range(tokens):
            span = spans[t]
            for h in range(heads):
                line = chunk + ((h * num_layers + l) * tokens + t) * row
                area = base[l] + block_off[t] + head_stride[h]
                if span > 0:
                    _area_span(line, area, in_block[t], span, block_size, k_dim, elem, row, v_at, v_bytes, n, group,
                               pair, to_chunk)
                elif span == 0:  # one token by its element runs (written out here: see above)
                    p = in_block[t]
                    for r in range(runs[p]):
                        c, a, size = line + run_dst[p, r], area + run_src[p, r], run_len[p, r]
                        if size == 2:  # one bf16/fp16 key element: no general copy's tests
                            if to_chunk:
                                _mv2(c, a)
                            else:
                                _mv2(a, c)
                        elif to_chunk:
                            _copy(c, a, size)
                        else:
                            _copy(a, c, size)
    _fence()
