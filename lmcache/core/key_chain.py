"""Chunk keys of long prompts in one native loop: the same keys as ``keys.ChunkHasher``'s Python loop.

Why: a cold lookup of a 128K-token prompt derives 512 keys. In Python each costs a bytes concatenation, a
hashlib object and a blake3 object (~2 us of interpreter per chunk, more than the hashing itself). Here one
numba loop (``numba_keys``) runs the same two hashes: SHA-256 through the libcrypto that Python's own hashlib
is linked against (SHA-NI where the CPU has it; nothing is built here), and BLAKE3 of the key's single 48-byte
block, written out in the loop. The token ids arrive as uint32 words: read straight from a Python list of ints
(``token_list``, ~4x faster than any conversion Python offers), else converted by ``keys.token_words``, the
conversion the Python loop uses, which also raises the error for a bad id on either path.

Invariant: a key from here is bit-identical to the Python loop's. A self-check at load compares both on a random
prompt, and the tests compare them over random prompts, chunk sizes and input types; where the loop cannot
load (numba not importable, no libcrypto with SHA256_Init/Update/Final, a big-endian host, a failed self-check,
or the config key ``native_keys: false``) ``native()`` is None, keys.py keeps its Python loop, and the reason
is logged once and shown by ``lmcache doctor`` ("chunk keys" row). Nothing is ever keyed differently: the fallback costs speed only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import logging
import os
import struct
import sys
import threading
from typing import Callable, Iterator

import numpy as np

from lmcache.core import token_list

log = logging.getLogger(__name__)

#: a prompt with fewer full chunks is hashed by the Python loop: the native call's fixed cost and the first
#: use's load (numba import + compiled-code cache, ~0.5 s) are not worth it there
NATIVE_MIN_CHUNKS = 16
#: lazy iteration hashes the first chunk, then the next few, then the rest: a lookup that misses early stops early
_LAZY_STEPS = (1, 8)


class NativeChain:
    """The loaded loop: libcrypto's three SHA-256 entry points and the compiled numba function.

    Invariant: the loop reads only ``tokens[first*cs:(first+count)*cs]`` of a uint32 array that this class
    made or checked, and writes only the output arrays it allocates; every range is checked here, in Python."""

    def __init__(self, functions: tuple[int, int, int], kernel: Callable[..., int],
                 lists: token_list.ListReader | None = None, lists_error: str | None = None) -> None:
        self._functions = functions
        self._kernel = kernel
        self._lists = lists
        #: why lists are converted by ``keys.token_words`` rather than read in place (None: they are read)
        self.lists_error = lists_error

    def list_words(self, tokens: object, start: int = 0, end: int | None = None) -> np.ndarray | None:
        """``tokens[start:end]`` read straight from a Python list of exact ints in [0, 2**32) (``token_list``);
        None for anything else (another type, a bad id, no reader here): the caller converts it with
        ``keys.token_words``, which raises what a bad id deserves."""
        return None if self._lists is None else self._lists.words(tokens, start, end)

    def run(self, words: np.ndarray, chunk_size: int, first: int, count: int, prev: bytes, root: bytes,
            key_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """Page digests and keys of chunks ``first .. first+count-1`` of ``words`` (``prev``: the digest before
        ``first``, b"" at the start)."""
        if not (words.dtype == np.uint32 and words.ndim == 1 and words.flags.c_contiguous):
            raise TypeError(f"token words: {words.dtype} {words.shape}: need a contiguous 1-D uint32 array")
        if first < 0 or count < 0 or (first + count) * chunk_size > words.size or len(prev) not in (0, 32):
            raise ValueError(f"chunks {first}..{first + count} of {chunk_size} tokens: only {words.size} tokens")
        if len(root) % 4 or len(root) + 32 > 64 or not 0 < key_bytes <= 32:
            raise ValueError(f"root of {len(root)} bytes, keys of {key_bytes}: need a one-block BLAKE3 input")
        digests = np.empty((count, 32), np.uint8)
        keys = np.empty((count, key_bytes), np.uint8)
        if count and self._kernel(*self._functions, words, first, chunk_size, np.frombuffer(prev, np.uint8),
                                  np.frombuffer(root, np.uint8), digests, keys):
            raise RuntimeError("libcrypto's SHA256_Init/Update/Final failed: set native_keys: false "
                               "(LMCACHE_NATIVE_KEYS=0) to hash in Python, and report this machine's OpenSSL version")
        return digests, keys

    def keys(self, words: np.ndarray, chunk_size: int, root: bytes, key_bytes: int) -> list[bytes]:
        """All full chunks' keys of the token ``words`` (``keys.token_words``)."""
        return _split(self.run(words, chunk_size, 0, words.size // chunk_size, b"", root, key_bytes)[1], key_bytes)

    def iter_keys(self, num_tokens: int, words_of: Callable[[int, int | None], np.ndarray], chunk_size: int,
                  root: bytes, key_bytes: int) -> Iterator[bytes]:
        """All full chunks' keys of a prompt whose token words ``words_of(start, end)`` converts on demand: the
        first few converted and hashed alone, so that a consumer stopping at the first miss leaves the rest of the
        prompt untouched (a bad id in the first chunk raises here, as ``words_of`` raises it)."""
        if num_tokens < chunk_size:
            return iter(())
        first = self.run(words_of(0, chunk_size), chunk_size, 0, 1, b"", root, key_bytes)
        # chain flattens the batches in C: the generator resumes once per batch, not once per key
        return itertools.chain.from_iterable(self._batches(num_tokens, words_of, chunk_size, root, key_bytes, first))

    def _batches(self, num_tokens: int, words_of: Callable[[int, int | None], np.ndarray], chunk_size: int,
                 root: bytes, key_bytes: int, batch: tuple[np.ndarray, np.ndarray]) -> Iterator[list[bytes]]:
        total, done, steps = num_tokens // chunk_size, 0, iter(_LAZY_STEPS[1:])
        while True:
            yield _split(batch[1], key_bytes)
            done += len(batch[1])
            if done >= total:
                return
            count = min(total - done, next(steps, total))
            try:  # the rest: the whole prompt converts without a slice, and the loop starts at ``done``
                words, first = ((words_of(0, None), done) if done + count == total else
                                (words_of(done * chunk_size, (done + count) * chunk_size), 0))
            except (OverflowError, TypeError) as e:
                raise OverflowError(f"a token id in chunks {done}..{done + count} is not an unsigned 32-bit int "
                                    f"({e})") from None
            batch = self.run(words, chunk_size, first, count, batch[0][-1].tobytes(), root, key_bytes)


def _split(keys: np.ndarray, key_bytes: int) -> list[bytes]:
    # struct's unpacking loop runs in C: ~40% faster than slicing in a comprehension (measured, 512 keys)
    return [key for (key,) in struct.iter_unpack(f"{key_bytes}s", keys.tobytes())]


_lock = threading.Lock()
_loaded: NativeChain | None = None
_error: str | None = None
_tried = False
_disabled: str | None = None  # why configure() turned the loop off


def configure(native: bool, warm: bool = False) -> None:
    """Apply the ``native_keys`` config key to this process (the loop is process-wide, like the copy kernels):
    False keeps every key in Python. ``warm``: load the loop now, so that the first long prompt's lookup does not
    pay numba's import and the compiled-code load (~0.5 s; ~3 s on a machine's very first run). In the caller's
    thread on purpose: a loader thread would hold import and numba locks that a fork() meanwhile copies locked."""
    global _disabled
    _disabled = None if native else "config native_keys: false (LMCACHE_NATIVE_KEYS=0)"
    if native and warm:
        native_loop()


def _libcrypto() -> ctypes.CDLL:
    """The libcrypto this process's hashlib uses (found in /proc/self/maps), else the system's."""
    import _hashlib  # noqa: F401 - maps the libcrypto hashlib is linked against

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libcrypto" in path and os.path.exists(path):
                    return ctypes.CDLL(path)
    except OSError:
        pass
    name = ctypes.util.find_library("crypto")
    if name is None:
        raise OSError("no libcrypto found (Python's hashlib is not linked against OpenSSL here)")
    return ctypes.CDLL(name)


def _load() -> NativeChain:
    if sys.byteorder != "little":
        raise RuntimeError("big-endian host (the loop writes native uint32 words)")
    lib = _libcrypto()
    init, update, final = (ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
                           for name in ("SHA256_Init", "SHA256_Update", "SHA256_Final"))
    from lmcache.core import numba_keys

    try:
        lists, lists_error = token_list.load(), None
    except Exception as e:  # noqa: BLE001 - the loop still runs; lists convert through array('I'), reported
        lists, lists_error = None, f"{type(e).__name__}: {e}"
        log.warning("lmcache: prompt lists are converted by array('I') (~0.4 ms more per 128K tokens): %s", e)
    chain = NativeChain((init, update, final), numba_keys.chain, lists, lists_error)
    _self_check(chain)
    return chain


def _self_check(chain: NativeChain) -> None:
    """The loop against the Python definition on a random prompt; a mismatch refuses the loop."""
    import hashlib

    import blake3

    rng = np.random.default_rng()
    tokens = rng.integers(0, 2**32, size=3 * 64, dtype=np.uint64)
    root = rng.bytes(16)
    got = chain.keys(tokens.astype(np.uint32), 64, root, 16)
    prev, want = b"", []
    for i in range(3):
        prev = hashlib.sha256(prev + tokens[i * 64:(i + 1) * 64].astype("<u4").tobytes()).digest()
        want.append(blake3.blake3(root + prev).digest(16))
    if got != want:
        raise RuntimeError("self-check: the native keys differ from the Python definition")


def native() -> NativeChain | None:
    """The loop, loaded at the first call (logged once when it cannot be: keys then come from Python); None
    also while configure() has turned it off."""
    return None if _disabled else native_loop()


def native_loop() -> NativeChain | None:
    global _loaded, _error, _tried
    if _tried:
        return _loaded
    with _lock:
        if not _tried:
            try:
                _loaded = _load()
            except Exception as e:  # noqa: BLE001 - any failure means the Python loop; reported, never silent
                _error = f"{type(e).__name__}: {e}"
                log.warning("lmcache: chunk keys are hashed in Python (~2x slower lookups of long prompts): %s",
                            _error)
            _tried = True
    return _loaded


def load_error() -> str | None:
    """Why the native loop is not used (loading it first), or None."""
    native_loop()
    return _disabled or _error
