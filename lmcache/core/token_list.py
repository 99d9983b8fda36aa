"""A prompt's token ids read straight out of the CPython list that holds them, for ``key_chain``'s loop.

Why: engines hand a prompt over as a Python list of ints, and the chunk keys hash it as little-endian uint32.
The fastest conversion Python itself offers, ``array('I').fromlist``, costs 0.5 ms for 128K ids (a type check,
an overflow check and a function call per id): half of a cold 128K-token lookup. Reading each int's digits where
CPython keeps them (``numba_keys.list_words``) does the same in ~0.14 ms.

Invariant: the words read here are exactly what ``keys.token_words`` converts. Any item that is not an exact
``int`` in [0, 2**32) makes ``words()`` return None, and the caller converts with ``token_words``, which raises
the error that id deserves (so a bad id reads the same on every path). Before the kernel is trusted, ``_load``
checks the layout it assumes through ctypes, on objects of known content (type sizes, the list's length and item
pointers, the ints' type and size words), then compares the kernel with ``token_words`` on edge and random ids; a
build that differs (PyPy, a free-threaded or debug build, 15-bit digits, a layout that moved) refuses the
reader, and lists convert through ``token_words`` as before: slower, never different.
"""

from __future__ import annotations

import array
import ctypes
import struct
import sys
import sysconfig
from typing import Any, Callable

import numpy as np

#: ids whose storage the self-check exercises: zero, one digit, two digits, the top of the uint32 range
_EDGE_IDS = [0, 1, 255, 256, 257, 2**15, 2**30 - 1, 2**30, 2**30 + 1, 2**31, 2**32 - 2, 2**32 - 1]
_NOT_IDS: list[Any] = [-1, -(2**31), 2**32, 2**40, 2**64, 2**100, True, False, 1.5, "7", None]


class ListReader:
    """The checked kernel for one interpreter layout (``tagged``: 3.12+ ints carry lv_tag, not ob_size)."""

    def __init__(self, kernel: Callable[..., int], tagged: bool) -> None:
        self._kernel = kernel
        self._tagged = tagged
        self._int_type = id(int)

    def words(self, tokens: object, start: int = 0, end: int | None = None) -> np.ndarray | None:
        """``tokens[start:end]`` as uint32 words, or None where ``tokens`` is not exactly a list, an item is not
        an exact int in [0, 2**32), or the range is not a plain forward one: the caller then converts with
        ``keys.token_words``."""
        if type(tokens) is not list:
            return None
        end = len(tokens) if end is None else end
        if not 0 <= start <= end <= len(tokens):
            return None
        out = np.empty(end - start, np.uint32)
        if self._kernel(id(tokens), self._int_type, self._tagged, start, end, out) != -1:
            return None
        return out


def load() -> ListReader:
    """The reader, after checking the layout it reads; raises with the reason where it cannot be trusted."""
    if sys.implementation.name != "cpython":
        raise RuntimeError(f"{sys.implementation.name} is not CPython (the reader reads CPython's int objects)")
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        raise RuntimeError("a free-threaded CPython build (its lists may change under the reader)")
    if sys.byteorder != "little" or struct.calcsize("P") != 8:
        raise RuntimeError("not a little-endian 64-bit host")
    if (sys.int_info.bits_per_digit, sys.int_info.sizeof_digit) != (30, 4):
        raise RuntimeError(f"ints of {sys.int_info.bits_per_digit}-bit digits (the reader knows 30-bit ones)")
    if (list.__basicsize__, int.__basicsize__, int.__itemsize__) != (40, 24, 4):
        raise RuntimeError(f"object sizes list {list.__basicsize__}, int {int.__basicsize__}+{int.__itemsize__}"
                           " per digit (a debug build?): not the layout the reader knows")
    tagged = sys.version_info >= (3, 12)
    ids = _EDGE_IDS + list(np.random.default_rng().integers(0, 2**32, 500, dtype=np.uint64).tolist())
    _check_layout(ids, tagged)
    from lmcache.core import numba_keys

    reader = ListReader(numba_keys.list_words, tagged)
    _self_check(reader, ids)
    return reader


def _word(address: int) -> int:
    return ctypes.c_uint64.from_address(address).value


def _check_layout(ids: list[int], tagged: bool) -> None:
    """Every offset the kernel reads, read here through ctypes on objects whose content is known; only inside
    each object's own size, so a layout that moved fails here, not by reading stray memory."""
    if _word(id(ids) + 8) != id(list) or _word(id(ids) + 16) != len(ids):
        raise RuntimeError("a list's type and length are not where the reader reads them")
    items = _word(id(ids) + 24)
    for i, value in enumerate(ids):
        if _word(items + 8 * i) != id(value) or _word(id(value) + 8) != id(int):
            raise RuntimeError("a list's items or an int's type are not where the reader reads them")
        digits = (value > 0) + (value >= 2**30)
        head = _word(id(value) + 16)
        size = (head >> 3 if head & 3 != 1 else 0) if tagged else head
        if size != digits or (tagged and head & 3 != (0 if value else 1)):
            raise RuntimeError(f"int {value}: size word {head:#x}, not the layout the reader knows")
        got = sum(ctypes.c_uint32.from_address(id(value) + 24 + 4 * d).value << (30 * d) for d in range(digits))
        if got != value:
            raise RuntimeError(f"int {value}: digits read as {got}")


def _self_check(reader: ListReader, ids: list[int]) -> None:
    """The kernel against ``array('I')`` on the same ids, whole and in pieces; every kind of non-id refused."""
    want = np.frombuffer(array.array("I", ids), np.uint32)
    whole, part = reader.words(ids), reader.words(ids, 5, 17)
    if whole is None or part is None or not (np.array_equal(whole, want) and np.array_equal(part, want[5:17])):
        raise RuntimeError("self-check: the list reader's words differ from array('I')")
    for bad in _NOT_IDS:
        if reader.words([1, 2, bad, 3]) is not None:
            raise RuntimeError(f"self-check: the list reader accepted {bad!r} as a token id")
