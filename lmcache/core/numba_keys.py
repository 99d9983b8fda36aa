"""The numba loops behind ``key_chain`` (which finds libcrypto and checks every range before calling it) and
``token_list`` (which checks CPython's object layout before this reads a list through it).

Imported at first use only (numba's import costs ~0.35 s). ``cache=True``: the compiled loop is kept next to this
file where writable. libcrypto's functions arrive as addresses (arguments, not globals), so the compiled code
holds no process-specific pointer and can be cached.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_I32, _PTR = ir.IntType(32), ir.IntType(8).as_pointer()


def _codegen(kinds: str):
    """Lowering of a call to the C function at address ``llargs[0]`` with pointer ("p") and 64-bit size ("n")
    arguments, returning its int (SHA256_Init/Update/Final all return 1 on success)."""

    def codegen(context, builder, signature, llargs):
        fnty = ir.FunctionType(_I32, [_PTR if k == "p" else ir.IntType(64) for k in kinds])
        target = builder.inttoptr(llargs[0], fnty.as_pointer())
        return builder.call(target, [builder.inttoptr(v, _PTR) if k == "p" else v for k, v in zip(kinds, llargs[1:])])

    return codegen


@intrinsic
def _call_p(typingctx, fn, a):
    return types.int32(types.uintp, types.uintp), _codegen("p")


@intrinsic
def _call_pp(typingctx, fn, a, b):
    return types.int32(types.uintp, types.uintp, types.uintp), _codegen("pp")


@intrinsic
def _call_ppn(typingctx, fn, a, b, n):
    return types.int32(types.uintp, types.uintp, types.uintp, types.uintp), _codegen("ppn")


def _load_codegen(bits: int):
    def codegen(context, builder, signature, llargs):
        value = builder.load(builder.inttoptr(llargs[0], ir.IntType(bits).as_pointer()))
        return value if bits == 64 else builder.zext(value, ir.IntType(64))

    return codegen


@intrinsic
def _load_u64(typingctx, address):
    return types.uint64(types.uintp), _load_codegen(64)


@intrinsic
def _load_u32(typingctx, address):
    return types.uint64(types.uintp), _load_codegen(32)


_ZERO, _ONE, _TWO, _THREE = np.uint64(0), np.uint64(1), np.uint64(2), np.uint64(3)
_DIGIT_BITS, _WORD = np.uint64(30), np.uint64(1 << 32)


# Not nogil, on purpose: holding the GIL is what keeps the list, its item array and its ints alive and unchanged
# while this reads them through raw addresses.
@njit(cache=True)
def list_words(lst, int_type, tagged, start, end, out):
    """Items ``start .. end-1`` of the CPython list at address ``lst`` into ``out`` (uint32), read straight from
    the int objects: a PyListObject's ob_size at +16 and item array at +24; a PyLongObject's type at +8, its size
    word at +16 (3.11: ob_size, the digit count with the value's sign; 3.12+ (``tagged``): lv_tag, sign in bits
    0-1 (1: zero, 2: negative), digit count from bit 3) and 30-bit digits from +24. Returns -1, or the index of the
    first item that is not an exact int in [0, 2**32) (or ``start`` when the list is now shorter than ``end``):
    the caller then converts in Python, which raises the error a bad id deserves."""
    if np.int64(_load_u64(lst + 16)) < end:
        return start
    items = _load_u64(lst + 24)
    for i in range(start, end):
        item = _load_u64(items + np.uint64(8 * i))
        if _load_u64(item + 8) != int_type:
            return i  # not exactly int (bool, a subclass, a float, ...)
        head = _load_u64(item + 16)
        if tagged:
            sign, digits = head & _THREE, head >> _THREE
            if sign == _ONE:
                digits = _ZERO
            elif sign != _ZERO:
                return i
        elif np.int64(head) < 0:
            return i
        else:
            digits = head
        if digits == _ZERO:
            out[i - start] = 0
        elif digits == _ONE:
            out[i - start] = _load_u32(item + 24)
        elif digits == _TWO:
            value = _load_u32(item + 24) | (_load_u32(item + 28) << _DIGIT_BITS)
            if value >= _WORD:
                return i
            out[i - start] = value
        else:
            return i
    return -1


# BLAKE3's message word order for rounds 0..6 (the permutation applied 0..6 times)
_SCHEDULE = np.array([
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8],
    [3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1],
    [10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6],
    [12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4],
    [9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7],
    [11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13],
], dtype=np.int64)
_IV = np.array([0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19],
               dtype=np.uint64)
_M32 = np.uint64(0xFFFFFFFF)


@njit(inline="always")
def _rotr(x, n):
    return ((x >> np.uint64(n)) | (x << np.uint64(32 - n))) & _M32


@njit(inline="always")
def _g(a, b, c, d, mx, my):
    a = (a + b + mx) & _M32
    d = _rotr(d ^ a, 16)
    c = (c + d) & _M32
    b = _rotr(b ^ c, 12)
    a = (a + b + my) & _M32
    d = _rotr(d ^ a, 8)
    c = (c + d) & _M32
    b = _rotr(b ^ c, 7)
    return a, b, c, d


@njit(inline="always")
def _le32(a, off):
    return (np.uint64(a[off]) | (np.uint64(a[off + 1]) << np.uint64(8)) | (np.uint64(a[off + 2]) << np.uint64(16))
            | (np.uint64(a[off + 3]) << np.uint64(24)))


@njit(nogil=True, cache=True)
def _blake3_one_block(m, block_len, out, out_bytes):
    """BLAKE3 of a message of one block (<= 64 bytes, words ``m`` little-endian, zero-padded): the first
    ``out_bytes`` (<= 32) of its hash into ``out``. One compression with CHUNK_START|CHUNK_END|ROOT; the state
    lives in 16 scalars (registers), not an array."""
    v0, v1, v2, v3, v4, v5, v6, v7 = _IV[0], _IV[1], _IV[2], _IV[3], _IV[4], _IV[5], _IV[6], _IV[7]
    v8, v9, v10, v11 = _IV[0], _IV[1], _IV[2], _IV[3]
    v12, v13, v14, v15 = np.uint64(0), np.uint64(0), np.uint64(block_len), np.uint64(1 | 2 | 8)
    for r in range(7):
        s = _SCHEDULE[r]
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m[s[0]], m[s[1]])
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m[s[2]], m[s[3]])
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m[s[4]], m[s[5]])
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m[s[6]], m[s[7]])
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m[s[8]], m[s[9]])
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m[s[10]], m[s[11]])
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m[s[12]], m[s[13]])
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m[s[14]], m[s[15]])
    words = (v0 ^ v8, v1 ^ v9, v2 ^ v10, v3 ^ v11, v4 ^ v12, v5 ^ v13, v6 ^ v14, v7 ^ v15)
    for i in range(out_bytes):
        out[i] = (words[i >> 2] >> np.uint64(8 * (i & 3))) & np.uint64(0xFF)


@njit(nogil=True, cache=True)
def chain(fn_init, fn_update, fn_final, tokens, first, chunk_size, prev, root, digests, keys):
    """Chunks ``first, first+1, ...`` (``len(digests)`` of them) of ``tokens`` (uint32 token ids, little-endian:
    callers use this on little-endian hosts only): ``d = sha256(prev || chunk)`` into ``digests[i]`` and
    ``blake3(root || d)`` (its first ``keys.shape[1]`` bytes) into ``keys[i]``; ``prev`` is the digest before
    chunk ``first`` (empty: the prompt's start). Returns 0; 1 when a libcrypto call failed."""
    ctx = np.zeros(512, np.uint8)  # SHA256_CTX is 112 bytes; room to spare
    m = np.zeros(16, np.uint64)
    root_words = root.size // 4
    for j in range(root_words):
        m[j] = _le32(root, 4 * j)
    ok = True
    c = ctx.ctypes.data
    for i in range(digests.shape[0]):
        ok &= _call_p(fn_init, c) == 1
        if i > 0:
            ok &= _call_ppn(fn_update, c, digests[i - 1].ctypes.data, 32) == 1
        elif prev.size:
            ok &= _call_ppn(fn_update, c, prev.ctypes.data, prev.size) == 1
        ok &= _call_ppn(fn_update, c, tokens[(first + i) * chunk_size:].ctypes.data, 4 * chunk_size) == 1
        ok &= _call_pp(fn_final, digests[i].ctypes.data, c) == 1
        for j in range(8):
            m[root_words + j] = _le32(digests[i], 4 * j)
        _blake3_one_block(m, root.size + 32, keys[i], keys.shape[1])
    return 0 if ok else 1
